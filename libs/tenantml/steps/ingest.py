"""ingest: the dataset's source (files or a table) -> `bronze_<ds>`, partitioned by tenant.

One batch per call; its id is a content hash, so re-ingesting the same files replaces the batch
instead of duplicating it. Rows are written through the scope of the tenants found in the source
(plus the rows whose tenant id is missing or unsafe, kept with `tenant_id` NULL for validate to
quarantine). New tenants are registered in `tenants` (unique case-insensitively).
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
from tenantml.io.tenants import register_tenants
from tenantml.steps.base import Option, StepOutput, StepScope, TenantOutcome, held_already, step


@step(name="ingest", help="source -> bronze Delta (idempotent per batch)", after=(),
      reads=("source",), writes=("bronze", "tenants"), eligibility="own", resumable=False,
      options=(Option("--source", "source_path", "override the dataset's source path"),))
def run(scope: StepScope) -> StepOutput:
    from pyspark.sql import functions as F

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    bronze_ref = ctx.tables.bronze(name)
    override = scope.options.get("source_path")
    check_source_exists(name, spec, override, ctx.resolve_path)  # before any Spark work
    batch_id = batch_identity(ctx.spark, ctx.resolve_path, name, spec, override)
    held = held_batch(ctx.spark, bronze_ref, batch_id)
    if held is not None and (not scope.requested or set(scope.requested) <= set(held)):
        return held_already(scope, bronze_ref.display, batch_id, held)
    scope.phase("reading source")
    df, batch_id, ignored = read_source(ctx.spark, ctx.resolve_path, name, spec, override, batch_id=batch_id)
    bronze = to_bronze(df, spec, batch_id).withColumn("_partial", F.lit(bool(scope.requested)))
    if scope.requested:
        bronze = bronze.where(F.col("tenant_id").isin(list(scope.requested)))
    # Everything is read here, before any write: a file that cannot be read to its end fails the
    # ingest by name and bronze is left as it was (the write below is one Delta commit).
    try:
        bronze = bronze.localCheckpoint(eager=True).drop(ALL_FIELDS)
    except Exception as exc:
        failure = read_failure(name, spec.source.format, exc)
        if failure is None:
            raise
        raise failure from exc
    check_json_documents(bronze, name, effective_source(spec, "history", override))
    counts = {r["tenant_id"]: int(r["n"]) for r in
              bronze.groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
    seen = sorted(t for t in counts if t is not None)
    tenants = scope.acting_for(seen)
    scope.phase(f"writing batch {batch_id} to {bronze_ref.display}")
    tenants.write(bronze, bronze_ref, include_null=not scope.requested, extra_predicate=f"_batch_id = '{batch_id}'")
    new = []
    if ctx.config.tenants.auto_register and seen:
        new = register_tenants(ctx.spark, ctx.tables.tenants, seen, ctx.config.tenants)
    outcomes = [
        TenantOutcome(tenant_id=t, status="ok", rows_in=n, rows_out=n,
                      detail={"batch_id": batch_id} if t is not None else
                      {"batch_id": batch_id, "note": "rows with a missing or invalid tenant id"})
        for t, n in counts.items()
    ]
    return StepOutput(outcomes=outcomes,
                      tables_written=[bronze_ref.display] + ([ctx.tables.tenants.display] if new else []),
                      summary={"batch_id": batch_id, "tenants_registered": len(new),
                               "rows_ingested": sum(counts.values()), "columns_ignored": ignored})
