"""validate: bronze -> silver + quarantine + quality with Great Expectations, every tenant in one run.

Each rejected row keeps every raw value plus the reasons it failed; for every tenant,
valid + quarantined = ingested. Tenants whose rejected share passes the threshold are blocked
from training and scoring until a later batch brings them under it.
"""

from __future__ import annotations

from tenantml.core.errors import ConfigError, UnknownTenantError
from tenantml.io.delta import read_table
from tenantml.io.tenants import case_collisions, list_tenant_ids
from tenantml.quality.rules import referenced_columns
from tenantml.quality.split import split_rows
from tenantml.steps.base import StepOutput, StepScope, TenantOutcome, step


@step(name="validate", help="bronze -> silver + quarantine (Great Expectations)", after=("ingest",),
      reads=("bronze", "tenants"), writes=("silver", "quarantine", "quality"), eligibility="own",
      resumable=False)
def run(scope: StepScope) -> StepOutput:
    from pyspark.sql import functions as F

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    undeclared = sorted(set(referenced_columns(spec)) - set(spec.declared_columns))
    if undeclared:
        raise ConfigError(f"dataset {name!r}: key 'rules' names undeclared column(s) {undeclared}")
    threshold = (spec.rules.max_rejected_fraction if spec.rules.max_rejected_fraction is not None
                 else ctx.config.validation.max_rejected_fraction)
    scope.phase("reading bronze")
    bronze = read_table(ctx.spark, ctx.tables.bronze(name))
    if scope.requested:
        ids = list(scope.requested)
        present = {r[0] for r in bronze.where(F.col("tenant_id").isin(ids)).select("tenant_id").distinct().collect()}
        unknown = sorted(set(ids) - present)
        if unknown:
            raise UnknownTenantError(f"dataset {name!r} has no bronze rows for tenant(s) {unknown}")
        bronze = bronze.where(F.col("tenant_id").isin(ids))
    known = list_tenant_ids(ctx.spark, ctx.tables.tenants)
    present_ids = [r[0] for r in bronze.select("tenant_id").distinct().collect() if r[0] is not None]
    collisions = {t: held for t, held in case_collisions(present_ids, known).items() if t not in known}
    registered = None if ctx.config.tenants.auto_register else known
    scope.phase("running Great Expectations rules over all tenants")
    split = split_rows(ctx.spark, bronze, spec, run_id=ctx.run_id, registered=registered, collisions=collisions,
                       suite=f"tenantml_{name}")

    outcomes: list[TenantOutcome] = []
    blocked: list[str] = []
    for t in [*split.tenant_ids, *([None] if None in split.rows else [])]:
        n, bad = split.rows[t]
        share = bad / n if n else 0.0
        is_blocked = t is not None and share > threshold
        if is_blocked:
            blocked.append(str(t))
        outcomes.append(TenantOutcome(
            tenant_id=t, status="blocked" if is_blocked else "ok", rows_in=n, rows_out=n - bad,
            rows_quarantined=bad,
            error=(f"tenant {t!r}: {share:.1%} of rows rejected, above the "
                   f"{threshold:.0%} threshold: blocked from training and scoring") if is_blocked else None,
            detail={"rejected_fraction": round(share, 4), "rows_superseded": split.superseded.get(t, 0),
                    **({"case_collision_with": split.collisions[str(t)]} if t in split.collisions else {})}))

    scope.phase("writing silver, quarantine and quality tables")
    tenants = scope.acting_for(split.tenant_ids)
    tenants.write(split.silver, ctx.tables.silver(name))
    tenants.write(split.quarantine, ctx.tables.quarantine(name), include_null=not scope.requested)
    quality = ctx.spark.createDataFrame(
        [(t, ctx.run_id, n, n - bad, bad, (bad / n if n else 0.0), t in blocked, threshold)
         for t, (n, bad) in split.rows.items() if t is not None],
        "tenant_id string, run_id string, rows_in long, rows_valid long, rows_quarantined long, "
        "rejected_fraction double, blocked boolean, threshold double",
    ).withColumn("validated_at", F.current_timestamp())
    tenants.write(quality, ctx.tables.quality(name))
    split.release()

    rule_summary = {r.rule.reason: r.unexpected_count for r in split.results if r.unexpected_count}
    return StepOutput(
        outcomes=outcomes,
        tables_written=[ctx.tables.silver(name).display, ctx.tables.quarantine(name).display,
                        ctx.tables.quality(name).display],
        summary={"tenants_blocked_ids": blocked, "rows_superseded": sum(split.superseded.values()),
                 "rules": len(split.rules), "rule_failures": rule_summary},
    )
