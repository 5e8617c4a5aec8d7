"""validate: new bronze rows -> silver + quarantine + quality, every tenant in one GX run.

Incremental: each tenant's quality row records how far its bronze rows were validated
(`validated_through`, the latest ingest time seen) and under which rules (`rules_hash`). Only rows
ingested since are read and validated; they supersede the tenant's silver and quarantine rows of
the same keys, and the tenant's counts are recomputed over its current state. A quiet night reads
no bronze rows at all; a change of rules revalidates everything. `--full` revalidates all rows.

Each rejected row keeps every raw value plus the reasons it failed; for every tenant,
valid + quarantined = rows of its current state. History rows without a label are quarantined as
`unlabelled`: not training rows, and not counted as rejected. Tenants whose rejected share passes
the threshold are blocked from training until a later batch brings them under it.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from tenantml.core.errors import ConfigError, UnknownTenantError
from tenantml.io.delta import read_table, table_exists
from tenantml.io.sources import RAW_TENANT
from tenantml.io.spark import local_frame
from tenantml.io.tenants import case_collisions, list_tenant_ids
from tenantml.quality.rules import referenced_columns
from tenantml.quality.split import KIND_REJECTED, KIND_UNLABELLED, Counts, split_rows
from tenantml.steps.base import Option, StepOutput, StepScope, TenantOutcome, step

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

QUALITY_SCHEMA = (
    "tenant_id string, purpose string, run_id string, rows_in long, rows_valid long, rows_quarantined long, "
    "rows_unlabelled long, rejected_fraction double, blocked boolean, threshold double, "
    "validated_through timestamp, rules_hash string, batch_id string"
)


def rules_hash(scope: StepScope, purpose: str) -> str:
    """What the current rules are, so a change of rules revalidates every row."""
    spec = scope.spec
    payload = {"purpose": purpose, "rules": spec.rules.model_dump(mode="json"), "task": spec.task,
               "label": spec.label, "positive": spec.positive_label, "key": spec.entity_key,
               "numeric": spec.numeric_features, "categorical": spec.categorical_features,
               "event_time": spec.event_time, "auto_register": scope.ctx.config.tenants.auto_register}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def threshold_of(scope: StepScope) -> float:
    spec = scope.spec
    return (spec.rules.max_rejected_fraction if spec.rules.max_rejected_fraction is not None
            else scope.ctx.config.validation.max_rejected_fraction)


def quality_state(scope: StepScope, purpose: str) -> dict[str | None, Any]:
    """Each tenant's latest quality row for ``purpose`` (None: the rows without a valid tenant id)."""
    from pyspark.sql import functions as F

    ref = scope.ctx.tables.quality(scope.dataset)
    if not table_exists(scope.ctx.spark, ref):
        return {}
    q = read_table(scope.ctx.spark, ref)
    if "purpose" not in q.columns or "validated_through" not in q.columns:
        return {}  # written before validation was incremental: validate everything once
    return {r["tenant_id"]: r for r in q.where(F.coalesce(F.col("purpose"), F.lit("history")) == purpose).collect()}


@step(name="validate", help="new bronze rows -> silver + quarantine (Great Expectations), incremental",
      after=("ingest",), reads=("bronze", "tenants", "quality"), writes=("silver", "quarantine", "quality"),
      eligibility="own", resumable=False, skip_unchanged=True,
      options=(Option("--full", "full", "revalidate every row, not only the rows ingested since the last run",
                      switch=True),))
def run(scope: StepScope) -> StepOutput:
    from pyspark.sql import functions as F

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    undeclared = sorted(set(referenced_columns(spec)) - set(spec.declared_columns))
    if undeclared:
        raise ConfigError(f"dataset {name!r}: key 'rules' names undeclared column(s) {undeclared}")
    threshold = threshold_of(scope)
    r_hash = rules_hash(scope, "history")
    spark, t = ctx.spark, ctx.tables
    scope.phase("finding bronze rows not validated yet")
    bronze = read_table(spark, t.bronze(name))
    if scope.requested:
        ids = list(scope.requested)
        present = {r[0] for r in bronze.where(F.col("tenant_id").isin(ids)).select("tenant_id").distinct().collect()}
        unknown = sorted(set(ids) - present)
        if unknown:
            raise UnknownTenantError(f"dataset {name!r} has no bronze rows for tenant(s) {unknown}")
        bronze = bronze.where(F.col("tenant_id").isin(ids))
    state = {} if scope.options.get("full") else quality_state(scope, "history")
    marks = local_frame(spark,
        [(k or "", r["validated_through"]) for k, r in state.items()
         if r["rules_hash"] == r_hash and r["validated_through"] is not None and (k is not None or not scope.requested)],
        "_mark_tenant string, _mark timestamp")
    keyed_tenant = F.coalesce(F.col("tenant_id"), F.lit(""))
    new = (bronze.join(F.broadcast(marks), keyed_tenant == F.col("_mark_tenant"), "left")
           .where(F.col("_mark").isNull() | (F.col("_ingested_at") > F.col("_mark")))
           .drop("_mark_tenant", "_mark"))
    new_tenants = {r[0] for r in new.select("tenant_id").distinct().collect()}
    if not new_tenants:
        scope.phase("no new bronze rows: nothing to validate")
        return StepOutput(summary={"rows_validated": 0, "tenants_blocked_ids": sorted(
            str(k) for k, r in state.items() if k is not None and r["blocked"])})
    # A tenant whose rows are all new (first run, or rules changed) is rebuilt, not merged.
    rebuilt = {k for k in new_tenants if k not in state or state[k]["rules_hash"] != r_hash
               or scope.options.get("full")}
    include_invalid = not scope.requested and None in new_tenants
    known = list_tenant_ids(spark, t.tenants)
    present_ids = [x for x in new_tenants if x is not None]
    collisions = {x: held for x, held in case_collisions(present_ids, known).items() if x not in known}
    registered = None if ctx.config.tenants.auto_register else known
    scope.phase(f"running Great Expectations rules over the new rows of {len(new_tenants)} tenant group(s)")
    split = split_rows(spark, new, spec, run_id=ctx.run_id, registered=registered, collisions=collisions,
                       suite=f"tenantml_{name}")
    affected = split.tenant_ids
    tenants = scope.acting_for(affected)

    # Merge: the tenants' earlier rows, minus the keys the new rows carry, plus the new rows.
    silver_ref, quarantine_ref = t.silver(name), t.quarantine(name)
    key = spec.entity_key
    keys = split.keys.withColumnRenamed(RAW_TENANT, "_k_tenant").withColumnRenamed(key, "_k_key")
    merge = [x for x in affected if x not in rebuilt]
    replaced: dict[str | None, int] = {}
    silver_out = split.valid
    quarantine_out = split.quarantine
    if merge and table_exists(spark, silver_ref):
        old = tenants.read(silver_ref).where(F.col("tenant_id").isin(merge))
        kept = old.join(keys, (old["tenant_id"] == keys["_k_tenant"]) & (old[key] == keys["_k_key"]), "left_anti")
        silver_out = silver_out.unionByName(kept, allowMissingColumns=True)
        replaced = _count_replaced(old, keys, "tenant_id", key, replaced)
    if (merge or include_invalid) and table_exists(spark, quarantine_ref):
        oldq = tenants.read(quarantine_ref, include_null=include_invalid)
        if "_purpose" in oldq.columns:
            oldq = oldq.where(F.coalesce(F.col("_purpose"), F.lit("history")) == "history")
        keep_invalid = include_invalid and None not in rebuilt
        scope_q = F.col("tenant_id").isin(merge) | (F.col("tenant_id").isNull() if keep_invalid else F.lit(False))
        oldq = oldq.where(scope_q)
        keptq = oldq.join(keys, (oldq[RAW_TENANT] == keys["_k_tenant"]) & (oldq[key] == keys["_k_key"]), "left_anti")
        quarantine_out = quarantine_out.unionByName(_with_kind(keptq), allowMissingColumns=True)
        replaced = _count_replaced(oldq, keys, RAW_TENANT, key, replaced, by="tenant_id")

    scope.phase("writing silver, quarantine and quality tables")
    tenants.write(silver_out, silver_ref)
    tenants.write(quarantine_out, quarantine_ref, include_null=include_invalid,
                  extra_predicate="coalesce(_purpose, 'history') = 'history'" if table_exists(spark, quarantine_ref)
                  and "_purpose" in read_table(spark, quarantine_ref).columns else None)
    totals = _totals(spark, silver_ref, quarantine_ref, affected, include_invalid)
    split.release()

    marks_now = {r["tenant_id"]: r["m"] for r in new.groupBy("tenant_id").agg(F.max("_ingested_at").alias("m")).collect()}
    outcomes: list[TenantOutcome] = []
    blocked: list[str] = []
    quality_rows = []
    for tid in [*affected, *([None] if include_invalid else [])]:
        c = totals.get(tid, Counts(0, 0, 0))
        share = c.rejected_fraction
        is_blocked = tid is not None and share > threshold
        if is_blocked:
            blocked.append(str(tid))
        quality_rows.append((tid, "history", ctx.run_id, c.rows, c.valid, c.rejected, c.unlabelled, share,
                             is_blocked, threshold, marks_now.get(tid), r_hash, None))
        new_c = split.counts.get(tid, Counts(0, 0, 0))
        outcomes.append(TenantOutcome(
            tenant_id=tid, status="blocked" if is_blocked else "ok", rows_in=new_c.rows, rows_out=new_c.valid,
            rows_quarantined=new_c.rejected,
            error=(f"tenant {tid!r}: {share:.1%} of rows rejected, above the {threshold:.0%} threshold: "
                   f"blocked from training") if is_blocked else None,
            detail={"rejected_fraction": round(share, 4), "rows_unlabelled": new_c.unlabelled,
                    "rows_superseded": split.superseded.get(tid, 0) + replaced.get(tid, 0),
                    "tenant_rows": c.rows, "rebuilt": tid in rebuilt,
                    **({"case_collision_with": split.collisions[str(tid)]} if tid in split.collisions else {})}))
    quality = local_frame(spark, quality_rows, QUALITY_SCHEMA).withColumn("validated_at", F.current_timestamp())
    tenants.write(quality, t.quality(name), include_null=include_invalid, extra_predicate=_purpose_predicate(scope, "history"))
    rule_summary = {r.rule.reason: r.unexpected_count for r in split.results if r.unexpected_count}
    return StepOutput(
        outcomes=outcomes,
        tables_written=[silver_ref.display, quarantine_ref.display, t.quality(name).display],
        summary={"tenants_blocked_ids": blocked, "rows_validated": sum(c.rows for c in split.counts.values()),
                 "rows_superseded": sum(split.superseded.values()) + sum(replaced.values()),
                 "rows_unlabelled": sum(c.unlabelled for c in split.counts.values()),
                 "tenants_rebuilt": len([x for x in affected if x in rebuilt]), "rules": len(split.rules),
                 "rule_failures": rule_summary},
    )


def _purpose_predicate(scope: StepScope, purpose: str) -> str | None:
    """Quality rows of other purposes are kept: a table written before purposes existed has none."""
    ref = scope.ctx.tables.quality(scope.dataset)
    if not table_exists(scope.ctx.spark, ref) or "purpose" not in read_table(scope.ctx.spark, ref).columns:
        return None
    return f"coalesce(purpose, 'history') = '{purpose}'"


def _with_kind(df: DataFrame) -> DataFrame:
    from pyspark.sql import functions as F

    if "_kind" in df.columns:
        return df
    return df.withColumn("_kind", F.lit(KIND_REJECTED)).withColumn("_purpose", F.lit("history"))


def _count_replaced(old: DataFrame, keys: DataFrame, tenant_col: str, key: str, acc: dict[str | None, int],
                    by: str = "tenant_id") -> dict[str | None, int]:
    from pyspark.sql import functions as F

    hit = old.join(keys, (old[tenant_col] == keys["_k_tenant"]) & (old[key] == keys["_k_key"]), "left_semi")
    out = dict(acc)
    for r in hit.groupBy(by).agg(F.count(F.lit(1)).alias("n")).collect():
        out[r[by]] = out.get(r[by], 0) + int(r["n"])
    return out


def _totals(spark: Any, silver_ref: Any, quarantine_ref: Any, tenants: list[str],
            include_invalid: bool) -> dict[str | None, Counts]:
    """Each tenant's counts over its current state (silver + quarantine), after the write."""
    from pyspark.sql import functions as F

    valid = {r["tenant_id"]: int(r["n"]) for r in read_table(spark, silver_ref)
             .where(F.col("tenant_id").isin(tenants)).groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
    q = read_table(spark, quarantine_ref)
    q = q.where(F.coalesce(F.col("_purpose"), F.lit("history")) == "history") if "_purpose" in q.columns else q
    scope_q = F.col("tenant_id").isin(tenants) | (F.col("tenant_id").isNull() if include_invalid else F.lit(False))
    kind = F.coalesce(F.col("_kind"), F.lit(KIND_REJECTED)) if "_kind" in q.columns else F.lit(KIND_REJECTED)
    quarantined = {r["tenant_id"]: (int(r["bad"] or 0), int(r["unl"] or 0)) for r in q.where(scope_q).groupBy("tenant_id").agg(
        F.sum((kind == KIND_REJECTED).cast("long")).alias("bad"),
        F.sum((kind == KIND_UNLABELLED).cast("long")).alias("unl")).collect()}
    out: dict[str | None, Counts] = {}
    for tid in [*tenants, *([None] if include_invalid else [])]:
        bad, unl = quarantined.get(tid, (0, 0))
        v = valid.get(tid, 0)
        out[tid] = Counts(v + bad + unl, bad, unl)
    return out
