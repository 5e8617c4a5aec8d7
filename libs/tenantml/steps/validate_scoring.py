"""validate_scoring: new batches of rows to score -> `scoring_<ds>` + quarantine + quality.

The same rules as the history, minus the label's; a batch is validated once (its rows keep their
batch id, so predictions stay history per batch). Rows of tenants not registered are quarantined
(rows to score never register a tenant). A tenant whose latest batch is mostly garbage is blocked
from scoring only: its training and champion are untouched.
"""

from __future__ import annotations

from tenantml.io.delta import read_table, table_exists
from tenantml.io.spark import local_frame
from tenantml.io.tenants import case_collisions, list_tenant_ids
from tenantml.quality.split import split_rows
from tenantml.steps.base import StepOutput, StepScope, TenantOutcome, step
from tenantml.steps.validate import QUALITY_SCHEMA, rules_hash, threshold_of


@step(name="validate_scoring", help="new batches of rows to score -> scoring table + quarantine (same rules, no label)",
      after=("ingest_scoring", "validate"), reads=("inference", "tenants"), writes=("scoring", "quarantine", "quality"),
      eligibility="own", resumable=False, skip_unchanged=True)
def run(scope: StepScope) -> StepOutput:
    from pyspark.sql import functions as F

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    spark, t = ctx.spark, ctx.tables
    inference_ref, scoring_ref, quarantine_ref = t.inference(name), t.scoring(name), t.quarantine(name)
    if not table_exists(spark, inference_ref):
        return StepOutput(summary={"rows_validated": 0, "reason": f"no rows to score yet ({inference_ref.display})"})
    rows = read_table(spark, inference_ref)
    if scope.requested:
        rows = rows.where(F.col("tenant_id").isin(list(scope.requested)))
    # (tenant, batch) pairs validated before: in the scoring table or quarantined for scoring.
    seen = None
    for ref, where in ((scoring_ref, F.lit(True)), (quarantine_ref, F.coalesce(F.col("_purpose"), F.lit("")) == "scoring")):
        if table_exists(spark, ref) and "_batch_id" in read_table(spark, ref).columns and (
                ref != quarantine_ref or "_purpose" in read_table(spark, ref).columns):
            pairs = (read_table(spark, ref).where(where)
                     .select(F.coalesce(F.col("tenant_id"), F.lit("")).alias("_s_tenant"), F.col("_batch_id").alias("_s_batch")))
            seen = pairs if seen is None else seen.unionByName(pairs)
    if seen is not None:
        rows = rows.join(F.broadcast(seen.distinct()),
                         (F.coalesce(F.col("tenant_id"), F.lit("")) == F.col("_s_tenant")) & (F.col("_batch_id") == F.col("_s_batch")),
                         "left_anti")
    batches = sorted(r[0] for r in rows.select("_batch_id").distinct().collect())
    if not batches:
        scope.phase("no new batches of rows to score")
        return StepOutput(summary={"rows_validated": 0, "batches": []})
    known = list_tenant_ids(spark, t.tenants)
    present = [r[0] for r in rows.select("tenant_id").distinct().collect() if r[0] is not None]
    collisions = {x: held for x, held in case_collisions(present, known).items() if x not in known}
    scope.phase(f"validating {len(batches)} new batch(es) of rows to score")
    split = split_rows(spark, rows, spec, run_id=ctx.run_id, registered=known, collisions=collisions,
                       suite=f"tenantml_{name}_scoring", purpose="scoring", supersede=False)
    tenants = scope.acting_for(split.tenant_ids)
    batch_in = "_batch_id IN (" + ", ".join(f"'{b}'" for b in batches) + ")"  # content hashes (hex)
    include_invalid = not scope.requested and None in split.counts
    tenants.write(split.valid, scoring_ref, extra_predicate=batch_in)
    tenants.write(split.quarantine, quarantine_ref, include_null=include_invalid,
                  extra_predicate=f"coalesce(_purpose, 'history') = 'scoring' AND {batch_in}"
                  if table_exists(spark, quarantine_ref) and "_purpose" in read_table(spark, quarantine_ref).columns
                  else None)
    latest = {r["tenant_id"]: r["b"] for r in rows.groupBy("tenant_id").agg(F.max(F.struct("_ingested_at", "_batch_id")).alias("m"))
              .select("tenant_id", F.col("m._batch_id").alias("b")).collect()}
    threshold = threshold_of(scope)
    r_hash = rules_hash(scope, "scoring")
    outcomes: list[TenantOutcome] = []
    quality_rows = []
    blocked: list[str] = []
    marks = {r["tenant_id"]: r["m"] for r in rows.groupBy("tenant_id").agg(F.max("_ingested_at").alias("m")).collect()}
    for tid in [*split.tenant_ids, *([None] if include_invalid else [])]:
        c = split.counts[tid]
        share = c.rejected / c.rows if c.rows else 0.0
        is_blocked = tid is not None and share > threshold
        if is_blocked:
            blocked.append(str(tid))
        quality_rows.append((tid, "scoring", ctx.run_id, c.rows, c.rows - c.rejected, c.rejected, 0, share, is_blocked,
                             threshold, marks.get(tid), r_hash, latest.get(tid)))
        outcomes.append(TenantOutcome(
            tenant_id=tid, status="blocked" if is_blocked else "ok", rows_in=c.rows, rows_out=c.rows - c.rejected,
            rows_quarantined=c.rejected,
            error=(f"tenant {tid!r}: {share:.1%} of rows to score rejected, above the {threshold:.0%} threshold: "
                   f"blocked from scoring") if is_blocked else None,
            detail={"rejected_fraction": round(share, 4), "batch_id": latest.get(tid),
                    **({"case_collision_with": split.collisions[str(tid)]} if tid in split.collisions else {})}))
    quality = local_frame(spark, quality_rows, QUALITY_SCHEMA).withColumn("validated_at", F.current_timestamp())
    q_ref = t.quality(name)
    tenants.write(quality, q_ref, include_null=include_invalid,
                  extra_predicate="coalesce(purpose, 'history') = 'scoring'"
                  if table_exists(spark, q_ref) and "purpose" in read_table(spark, q_ref).columns else None)
    split.release()
    return StepOutput(outcomes=outcomes, tables_written=[scoring_ref.display, quarantine_ref.display, q_ref.display],
                      summary={"rows_validated": sum(c.rows for c in split.counts.values()), "batches": batches,
                               "tenants_blocked_ids": blocked,
                               "rule_failures": {r.rule.reason: r.unexpected_count for r in split.results
                                                 if r.unexpected_count}})
