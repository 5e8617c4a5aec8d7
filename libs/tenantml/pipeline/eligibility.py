"""Which tenants a step may touch: requested, present, active, and not blocked by data quality."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from tenantml.errors import UnknownTenantError
from tenantml.io import read_table, table_exists
from tenantml.pipeline.result import ExcludedStatus, TenantOutcome
from tenantml.tenancy import validate_tenant_ids

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from tenantml.config import DatasetSpec
    from tenantml.context import JobContext
    from tenantml.gate import TenantScope
    from tenantml.tables import TableRef


@dataclass
class Eligibility:
    rows: dict[str, int]
    eligible: list[str]
    excluded: dict[str, tuple[ExcludedStatus, str]] = field(default_factory=dict)  # tenant -> (status, why)


def eligible_tenants(ctx: JobContext, dataset: str, silver: DataFrame,
                     tenants: Sequence[str] | None) -> Eligibility:
    """Row counts per tenant in silver, minus the tenants this run must leave out (with why)."""
    from pyspark.sql import functions as F

    scoped = silver
    if tenants:
        ids = validate_tenant_ids(tenants, where="--tenants")
        scoped = silver.where(F.col("tenant_id").isin(ids))
    rows = {r["tenant_id"]: int(r["n"]) for r in
            scoped.groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
    excluded: dict[str, tuple[ExcludedStatus, str]] = {}
    quality_ref = ctx.tables.quality(dataset)
    blocked: dict[str, float] = {}
    if table_exists(ctx.spark, quality_ref):
        blocked = {r["tenant_id"]: float(r["rejected_fraction"]) for r in
                   read_table(ctx.spark, quality_ref).where("blocked").collect()}
    if tenants:
        missing = sorted(set(tenants) - set(rows) - set(blocked))
        if missing:
            raise UnknownTenantError(f"dataset {dataset!r} has no validated rows for tenant(s) {missing}")
    for t, share in blocked.items():
        if not tenants or t in tenants:
            excluded[t] = ("blocked", f"tenant {t!r} blocked by validation: {share:.1%} of rows rejected")
    if table_exists(ctx.spark, ctx.tables.tenants):
        for r in read_table(ctx.spark, ctx.tables.tenants).where("status != 'active'").collect():
            if r["tenant_id"] in rows:
                excluded[r["tenant_id"]] = ("skipped", f"tenant {r['tenant_id']!r} has status {r['status']!r}")
    _apply_budgets(ctx, rows, excluded)
    eligible = sorted(t for t in rows if t not in excluded)
    return Eligibility(rows=rows, eligible=eligible, excluded=excluded)


def _apply_budgets(ctx: JobContext, rows: dict[str, int], excluded: dict[str, tuple[ExcludedStatus, str]]) -> None:
    """Over-budget tenants get a warning, or are left out when `tenants.budget_action` is 'stop'."""
    from tenantml.pipeline.ledger import spent_this_month

    cfg = ctx.config.tenants
    budgeted = [t for t in rows if t not in excluded and cfg.budget(t) is not None]
    if not budgeted:
        return
    spent = spent_this_month(ctx.spark, ctx.tables.cost_ledger, budgeted)
    for t in budgeted:
        budget = cfg.budget(t) or 0.0
        used = spent.get(t, 0.0)
        if used <= budget:
            continue
        why = f"tenant {t!r} used {used:.1f}s of compute this month, over its budget of {budget:.1f}s"
        log.warning(why)
        ctx.progress.phase(f"warning: {why}")
        if cfg.budget_action == "stop":
            excluded[t] = ("skipped", why + ": stopped (tenants.budget_action = stop)")


def excluded_outcomes(elig: Eligibility) -> list[TenantOutcome]:
    """Blocked tenants carry their reason as the error (it shows in summaries); skipped ones in detail."""
    return [TenantOutcome(tenant_id=t, status=st, rows_in=elig.rows.get(t, 0),
                          error=why if st == "blocked" else None, detail={"reason": why})
            for t, (st, why) in sorted(elig.excluded.items())]


class StepInput(NamedTuple):
    """What every per-tenant step starts from: its dataset, one pinned silver snapshot, who may run."""

    name: str
    spec: DatasetSpec
    silver_ref: TableRef
    version: int
    silver: DataFrame
    elig: Eligibility
    outcomes: list[TenantOutcome]
    scope: TenantScope


def open_step(ctx: JobContext, dataset: str | None, tenants: Sequence[str] | None, step: str) -> StepInput:
    """Tenant ids are checked before any Spark work; every task then reads the same silver version.

    The step gets the silver rows of its eligible tenants only, through its `TenantScope`, which
    it also writes and loads models through.
    """
    from tenantml.gate import TenantScope
    from tenantml.io import table_version

    validate_tenant_ids(tenants or [], where="--tenants")
    name, spec = ctx.config.dataset(dataset)
    silver_ref = ctx.tables.silver(name)
    version = table_version(ctx.spark, silver_ref)
    elig = eligible_tenants(ctx, name, read_table(ctx.spark, silver_ref, version=version), tenants)
    scope = TenantScope(ctx, elig.eligible, step)
    silver = scope.read(silver_ref, version=version)
    return StepInput(name, spec, silver_ref, version, silver, elig, excluded_outcomes(elig), scope)
