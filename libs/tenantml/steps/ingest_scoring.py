"""ingest_scoring: the dataset's rows to score -> `inference_<ds>`, clustered by tenant.

The rows that need predictions (this month's customers, tomorrow's flights) come from the
dataset's `scoring_source` (or `--scoring-source PATH`): the training source's columns minus the
label. One batch per call, its id a content hash, so re-ingesting the same files replaces the
batch. No tenant is registered from rows to score: rows of tenants the platform does not know are
quarantined by validate_scoring.
"""

from __future__ import annotations

from tenantml.io.sources import (
    ALL_FIELDS,
    batch_identity,
    check_json_documents,
    check_source_exists,
    effective_source,
    held_batch,
    read_failure,
    read_source,
    to_bronze,
)
from tenantml.steps.base import Option, StepOutput, StepScope, TenantOutcome, held_already, step


@step(name="ingest_scoring", help="rows to score -> inference Delta table (idempotent per batch)", after=(),
      reads=("scoring_source",), writes=("inference",), eligibility="own", resumable=False,
      options=(Option("--scoring-source", "scoring_source_path", "read the rows to score from this path"),))
def run(scope: StepScope) -> StepOutput:
    from pyspark.sql import functions as F

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    override = scope.options.get("scoring_source_path")
    if spec.scoring_source is None and not override:
        return StepOutput(summary={"batch_id": None, "reason": "the dataset declares no scoring_source"})
    ref = ctx.tables.inference(name)
    check_source_exists(name, spec, override, ctx.resolve_path, "scoring")  # before any Spark work
    batch_id = batch_identity(ctx.spark, ctx.resolve_path, name, spec, override, "scoring")
    held = held_batch(ctx.spark, ref, batch_id)
    if held is not None and (not scope.requested or set(scope.requested) <= set(held)):
        return held_already(scope, ref.display, batch_id, held)
    scope.phase("reading rows to score")
    df, batch_id, ignored = read_source(ctx.spark, ctx.resolve_path, name, spec, override, purpose="scoring",
                                        batch_id=batch_id)
    rows = to_bronze(df, spec, batch_id, purpose="scoring").withColumn("_partial", F.lit(bool(scope.requested)))
    if scope.requested:
        rows = rows.where(F.col("tenant_id").isin(list(scope.requested)))
    try:
        rows = rows.localCheckpoint(eager=True).drop(ALL_FIELDS)
    except Exception as exc:
        failure = read_failure(name, effective_source(spec, "scoring", override).format, exc)
        if failure is None:
            raise
        raise failure from exc
    check_json_documents(rows, name, effective_source(spec, "scoring", override))
    counts = {r["tenant_id"]: int(r["n"]) for r in rows.groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
    tenants = scope.acting_for(sorted(t for t in counts if t is not None))
    scope.phase(f"writing batch {batch_id} to {ref.display}")
    tenants.write(rows, ref, include_null=not scope.requested, extra_predicate=f"_batch_id = '{batch_id}'")
    outcomes = [TenantOutcome(tenant_id=t, status="ok", rows_in=n, rows_out=n,
                              detail={"batch_id": batch_id} if t is not None else
                              {"batch_id": batch_id, "note": "rows with a missing or invalid tenant id"})
                for t, n in counts.items()]
    return StepOutput(outcomes=outcomes, tables_written=[ref.display],
                      summary={"batch_id": batch_id, "rows_ingested": sum(counts.values()), "columns_ignored": ignored})
