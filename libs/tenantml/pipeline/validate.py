"""Validate: bronze -> silver + quarantine with Great Expectations, every tenant in one run.

Each rejected row keeps every raw value plus the reasons it failed; for every tenant,
valid + quarantined = ingested. Tenants whose rejected share passes the threshold are blocked
from training and scoring until a later batch brings them under it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tenantml.errors import ConfigError, UnknownTenantError
from tenantml.gate import TenantScope
from tenantml.io import read_table
from tenantml.pipeline.ingest import RAW_TENANT
from tenantml.pipeline.result import StepResult, TenantOutcome
from tenantml.tenancy import validate_tenant_ids
from tenantml.tenants import list_tenant_ids
from tenantml.validation.gx_rules import run_rules
from tenantml.validation.rules import (
    DUP_RANK,
    MALFORMED,
    ROW_ID,
    build_rules,
    referenced_columns,
    typed_check_columns,
    typed_select,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from tenantml.context import JobContext


def _scoped_bronze(ctx: JobContext, name: str, tenants: Sequence[str] | None) -> tuple[DataFrame, bool]:
    from pyspark.sql import functions as F

    bronze = read_table(ctx.spark, ctx.tables.bronze(name))
    if not tenants:
        return bronze, True
    ids = validate_tenant_ids(tenants, where="--tenants")
    present = {r[0] for r in bronze.where(F.col("tenant_id").isin(ids)).select("tenant_id").distinct().collect()}
    unknown = sorted(set(ids) - present)
    if unknown:
        raise UnknownTenantError(f"dataset {name!r} has no bronze rows for tenant(s) {unknown}")
    return bronze.where(F.col("tenant_id").isin(ids)), False


def validate(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None) -> StepResult:
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    started = time.perf_counter()
    validate_tenant_ids(tenants or [], where="--tenants")  # before any Spark work
    name, spec = ctx.config.dataset(dataset)
    undeclared = sorted(set(referenced_columns(spec)) - set(spec.declared_columns))
    if undeclared:
        raise ConfigError(f"dataset {name!r}: key 'rules' names undeclared column(s) {undeclared}")
    threshold = (spec.rules.max_rejected_fraction if spec.rules.max_rejected_fraction is not None
                 else ctx.config.validation.max_rejected_fraction)
    ctx.progress.phase(f"validate {name}: reading bronze")
    bronze, include_invalid = _scoped_bronze(ctx, name, tenants)
    if MALFORMED not in bronze.columns:  # bronze written before ingest recorded malformed lines
        bronze = bronze.withColumn(MALFORMED, F.lit(None).cast("string"))

    # The latest batch holding a (tenant, key) is its current state: rows of earlier batches are
    # superseded history (kept in bronze, left out of silver and quarantine); a key repeated
    # within the latest batch is a duplicate, and all but the last copy are quarantined.
    order = Window.partitionBy(RAW_TENANT, spec.entity_key).orderBy(
        F.col("_ingested_at").desc(), F.col("_row_number").desc())
    keyed = F.col(spec.entity_key).isNotNull()
    ranked = (bronze
              .withColumn(DUP_RANK, F.when(keyed, F.row_number().over(order)).otherwise(F.lit(1)))
              .withColumn("_superseded", keyed & (F.col("_batch_id") != F.first("_batch_id").over(order))))
    range_cols = [F.expr(f"try_cast(trim(`{c}`) AS DOUBLE)").alias(f"{c}__typed")
                  for c in typed_check_columns(spec)]
    # Row ids must not change between the rule jobs and the split below, and the window must not
    # be evaluated once per job: materialise once, then count and drop the superseded rows.
    checkpointed = ranked.select("*", F.monotonically_increasing_id().alias(ROW_ID), *range_cols) \
        .localCheckpoint(eager=True)
    superseded = {r["tenant_id"]: int(r["n"]) for r in checkpointed.where("_superseded")
                  .groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
    frame = checkpointed.where(~F.col("_superseded")).drop("_superseded")

    registered = None if ctx.config.tenants.auto_register else list_tenant_ids(ctx.spark, ctx.tables.tenants)
    rules = build_rules(spec, registered)
    ctx.progress.phase(f"validate {name}: running {len(rules)} Great Expectations rules over all tenants")
    results = run_rules(frame, rules, row_id_col=ROW_ID, suite_name=f"tenantml_{name}")

    reasons: dict[int, list[str]] = defaultdict(list)
    for res in results:
        for rid in res.failing_row_ids:
            reasons[int(rid)].append(res.rule.reason)
    reason_df = ctx.spark.createDataFrame(
        [(rid, "; ".join(rs)) for rid, rs in reasons.items()],
        T.StructType([T.StructField(ROW_ID, T.LongType(), False),
                      T.StructField("_reason", T.StringType(), False)]),
    )
    joined = frame.join(F.broadcast(reason_df), on=ROW_ID, how="left")
    now = F.current_timestamp()
    quarantine = joined.where(F.col("_reason").isNotNull()).select(
        *[F.col(f"`{c}`") for c in bronze.columns], "_reason",
        F.lit(ctx.run_id).alias("_run_id"), now.alias("_quarantined_at"))
    valid = joined.where(F.col("_reason").isNull())
    silver = valid.select(*typed_select(valid, spec), "_batch_id", "_ingested_at",
                          now.alias("_validated_at"), F.lit(ctx.run_id).alias("_run_id"))

    per_tenant = {r["tenant_id"]: (int(r["n"]), int(r["bad"] or 0)) for r in joined.groupBy("tenant_id").agg(
        F.count(F.lit(1)).alias("n"), F.sum(F.col("_reason").isNotNull().cast("long")).alias("bad")).collect()}
    tenant_ids = sorted(t for t in per_tenant if t is not None)

    outcomes: list[TenantOutcome] = []
    blocked: list[str] = []
    for t in [*tenant_ids, None] if None in per_tenant else tenant_ids:
        n, bad = per_tenant[t]
        share = bad / n if n else 0.0
        is_blocked = t is not None and share > threshold
        if is_blocked:
            blocked.append(str(t))
        outcomes.append(TenantOutcome(
            tenant_id=t, status="blocked" if is_blocked else "ok", rows_in=n, rows_out=n - bad,
            rows_quarantined=bad,
            error=(f"tenant {t!r}: {share:.1%} of rows rejected, above the "
                   f"{threshold:.0%} threshold: blocked from training and scoring") if is_blocked else None,
            detail={"rejected_fraction": round(share, 4), "rows_superseded": superseded.get(t, 0)}))

    ctx.progress.phase(f"validate {name}: writing silver, quarantine and quality tables")
    scope = TenantScope(ctx, tenant_ids, "validate")
    scope.write(silver, ctx.tables.silver(name))
    scope.write(quarantine, ctx.tables.quarantine(name), include_null=include_invalid)
    quality = ctx.spark.createDataFrame(
        [(t, ctx.run_id, n, n - bad, bad, (bad / n if n else 0.0), t in blocked, threshold)
         for t, (n, bad) in per_tenant.items() if t is not None],
        "tenant_id string, run_id string, rows_in long, rows_valid long, rows_quarantined long, "
        "rejected_fraction double, blocked boolean, threshold double",
    ).withColumn("validated_at", now)
    scope.write(quality, ctx.tables.quality(name))
    checkpointed.unpersist()

    rule_summary = {r.rule.reason: r.unexpected_count for r in results if r.unexpected_count}
    return StepResult(
        step="validate", dataset=name, run_id=ctx.run_id, tenants=outcomes,
        tables_written=[ctx.tables.silver(name).display, ctx.tables.quarantine(name).display,
                        ctx.tables.quality(name).display],
        seconds=time.perf_counter() - started,
        summary={"tenants_blocked_ids": blocked, "rows_superseded": sum(superseded.values()), "rules": len(rules), "rule_failures": rule_summary},
    )
