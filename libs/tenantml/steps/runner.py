"""Run steps with their bookkeeping, for every entry point (CLI, jobs, workflow tasks, notebooks).

`run_step` resolves which tenants the step may act for (present, active, not blocked by data
quality, within budget), opens the tenant scope over them, runs the step, times it, and writes
every (run, step, tenant) outcome to `run_log` and the step's compute to `cost_ledger`. A step
that raises is logged as failed, then re-raised. `--resume` and `--from` are handled here too.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tenantml.core.errors import ConfigError, TenantMLError, UnknownTenantError
from tenantml.core.ids import sql_identifier, tenant_in_predicate, validate_run_id, validate_tenant_ids
from tenantml.core.policy import monthly_budget, over_budget
from tenantml.io.delta import read_table, replace_where, table_exists, table_version
from tenantml.io.spark import local_frame
from tenantml.steps.base import (
    Excluded,
    Step,
    StepOutput,
    StepResult,
    StepScope,
    TenantOutcome,
    get_step,
    pipeline_order,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from tenantml.io.context import JobContext
    from tenantml.io.tables import TableRef

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- eligibility


@dataclass
class Resolved:
    input_ref: TableRef | None
    version: int | None
    rows: dict[str, int]
    excluded: dict[str, Excluded]


def _blocked(ctx: JobContext, dataset: str, purpose: str) -> dict[str, float]:
    """Tenants blocked by validation for ``purpose`` (history: training; scoring): rejected share."""
    from pyspark.sql import functions as F

    ref = ctx.tables.quality(dataset)
    if not table_exists(ctx.spark, ref):
        return {}
    version = table_version(ctx.spark, ref)

    def compute() -> dict[str, float]:
        q = read_table(ctx.spark, ref, version=version).where(F.col("blocked") & F.col("tenant_id").isNotNull())
        if "purpose" in q.columns:
            q = q.where(F.coalesce(F.col("purpose"), F.lit("history")) == purpose)
        elif purpose != "history":
            return {}
        return {r["tenant_id"]: float(r["rejected_fraction"]) for r in q.collect()}

    return _once_per_version(ctx, ("blocked", ref.display, version, purpose), compute)


def _once_per_version(ctx: JobContext, key: tuple[Any, ...], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` once per key, for every step of the run; the key names a Delta table version,
    so the value can never go stale. A copy is returned: callers may change it."""
    if key not in ctx.by_version:
        ctx.by_version[key] = compute()
    return dict(ctx.by_version[key])


def _inactive(ctx: JobContext) -> dict[str, str]:
    """Registered tenants whose status is not active, with their status."""
    ref = ctx.tables.tenants
    if not table_exists(ctx.spark, ref):
        return {}
    version = table_version(ctx.spark, ref)
    return _once_per_version(ctx, ("inactive", ref.display, version), lambda: {
        r["tenant_id"]: str(r["status"]) for r in
        read_table(ctx.spark, ref, version=version).where("status != 'active'").collect()})


def failed_upstream(ctx: JobContext, step: Step, dataset: str, tenants: list[str]) -> dict[str, str]:
    """Tenants that failed, in this run, a step this one runs after: they are skipped (the rest go
    on), so a partial failure upstream never feeds a half-made result downstream."""
    from pyspark.sql import functions as F

    ref = ctx.tables.run_log
    if not step.after or not tenants or not table_exists(ctx.spark, ref):
        return {}
    rows = (read_table(ctx.spark, ref)
            .where((F.col("run_id") == ctx.run_id) & (F.col("dataset") == dataset) & F.col("step").isin(list(step.after))
                   & (F.col("status") == "failed") & F.col("tenant_id").isin(tenants))
            .select("tenant_id", "step").collect())
    return {r["tenant_id"]: r["step"] for r in rows}


def decisions_run(ctx: JobContext, dataset: str) -> str:
    """The run whose retraining decisions stand for this one: this run's, or when its monitor was
    skipped (nothing it reads changed) the run whose decisions that skip stood on."""
    return stood_on(ctx, "monitor", dataset) or ctx.run_id


def retraining_decisions(ctx: JobContext, dataset: str) -> dict[str, tuple[bool, str]] | None:
    """The run's retraining decisions (tenant -> (retrain, why); `decisions_run`), or None when
    none were made: without a monitor step in the run, the train steps train every eligible tenant."""
    from pyspark.sql import functions as F

    ref = ctx.tables.retraining(dataset)
    if not table_exists(ctx.spark, ref):
        return None
    run_id = decisions_run(ctx, dataset)
    version = table_version(ctx.spark, ref)

    def read() -> dict[str, tuple[bool, str]]:  # read once per version by a run's gated steps
        rows = read_table(ctx.spark, ref, version=version).where(
            (F.col("run_id") == run_id) & (F.col("dataset") == dataset)).collect()
        return {r["tenant_id"]: (bool(r["retrain"]), str(r["reasons"] or "")) for r in rows}

    decisions = _once_per_version(ctx, ("retraining decisions", ref.display, version, run_id), read)
    return decisions or None


def stood_on(ctx: JobContext, step: str, dataset: str) -> str | None:
    """When ``step`` was skipped in this run as unchanged: the run whose result stands (known in
    this process, else read back from the run log, e.g. by a later task of a workflow)."""
    from pyspark.sql import functions as F

    key = (step, dataset)
    if key in ctx.stood_on:
        return ctx.stood_on[key]
    ref = ctx.tables.run_log
    if not table_exists(ctx.spark, ref):
        return None
    rows = (read_table(ctx.spark, ref).where((F.col("run_id") == ctx.run_id) & (F.col("step") == step)
                                             & (F.col("dataset") == dataset) & F.col("tenant_id").isNull()
                                             & (F.col("status") == "skipped"))
            .select(F.get_json_object("detail", "$.unchanged_since").alias("since")).collect())
    since = next((str(r["since"]) for r in rows if r["since"]), None)
    if since is not None:
        ctx.stood_on[key] = since
    return since


def _resolve(ctx: JobContext, step: Step, dataset: str, requested: Sequence[str] | None) -> Resolved:
    """Row counts per tenant in the step's input, minus the tenants this run must leave out (with why)."""
    from pyspark.sql import functions as F

    if step.eligibility == "own":
        return Resolved(None, None, {}, {})
    if step.eligibility == "silver":
        ref, purpose, what = ctx.tables.silver(dataset), "history", "validated rows"
    else:
        ref, purpose, what = ctx.tables.scoring(dataset), "scoring", "validated rows to score"
    if step.eligibility == "inference" and not table_exists(ctx.spark, ref):
        return Resolved(ref, None, {}, {})
    version = table_version(ctx.spark, ref)

    def count() -> dict[str, int]:  # the steps after validate all read the same silver version
        frame: DataFrame = read_table(ctx.spark, ref, version=version)
        if requested:
            frame = frame.where(F.col("tenant_id").isin(list(requested)))
        return {r["tenant_id"]: int(r["n"]) for r in frame.groupBy("tenant_id").agg(
            F.count(F.lit(1)).alias("n")).collect() if r["tenant_id"] is not None}

    rows = _once_per_version(ctx, ("rows per tenant", ref.display, version,
                                   tuple(sorted(requested)) if requested else None), count)
    blocked = _blocked(ctx, dataset, purpose)
    if requested:
        missing = sorted(set(requested) - set(rows) - set(blocked))
        if missing:
            raise UnknownTenantError(f"dataset {dataset!r} has no {what} for tenant(s) {missing} "
                                     f"in {ref.display}")
    excluded: dict[str, Excluded] = {}
    for t, share in blocked.items():
        if not requested or t in requested:
            excluded[t] = Excluded("blocked", f"tenant {t!r} blocked by validation: {share:.1%} of "
                                              f"{'scoring ' if purpose == 'scoring' else ''}rows rejected",
                                   rows.get(t, 0))
    for tenant, status in _inactive(ctx).items():
        if tenant in rows:
            excluded[tenant] = Excluded("skipped", f"tenant {tenant!r} has status {status!r}", rows[tenant])
    _apply_budgets(ctx, rows, excluded)
    for t, dep in failed_upstream(ctx, step, dataset, list(rows)).items():
        if t not in excluded:
            excluded[t] = Excluded("skipped", f"tenant {t!r} failed step {dep} of this run", rows[t])
    if step.gated and not ctx.config.retraining.force:
        decisions = retraining_decisions(ctx, dataset)
        for t, (retrain, why) in (decisions or {}).items():
            if t in rows and t not in excluded and not retrain:
                excluded[t] = Excluded("skipped", f"no retraining needed: {why}", rows[t])
    return Resolved(ref, version, {t: n for t, n in rows.items() if t not in excluded}, excluded)


def _apply_budgets(ctx: JobContext, rows: dict[str, int], excluded: dict[str, Excluded]) -> None:
    """Over-budget tenants get a warning, or are left out when `tenants.budget_action` is 'stop'."""
    cfg = ctx.config.tenants
    budgets = {t: monthly_budget(cfg.budgets, cfg.budget_seconds_per_month, t) for t in rows if t not in excluded}
    budgeted = [t for t, b in budgets.items() if b is not None]
    if not budgeted:
        return
    spent = spent_this_month(ctx.spark, ctx.tables.cost_ledger, budgeted)
    for t in budgeted:
        why = over_budget(t, spent.get(t, 0.0), budgets[t])
        if why is None:
            continue
        log.warning(why)
        ctx.progress.phase(f"warning: {why}")
        if cfg.budget_action == "stop":
            excluded[t] = Excluded("skipped", why + ": stopped (tenants.budget_action = stop)", rows[t])


def _excluded_outcomes(excluded: dict[str, Excluded]) -> list[TenantOutcome]:
    """Blocked tenants carry their reason as the error (it shows in summaries); skipped ones in detail."""
    return [TenantOutcome(tenant_id=t, status=e.status, rows_in=e.rows,
                          error=e.reason if e.status == "blocked" else None, detail={"reason": e.reason})
            for t, e in sorted(excluded.items())]


def open_scope(ctx: JobContext, step: Step, dataset: str, requested: Sequence[str] | None,
               options: dict[str, Any] | None = None) -> StepScope:
    """The step's scope: tenant ids are checked before any Spark work; every task then reads the
    same version of the step's input."""
    name, spec = ctx.config.dataset(dataset)
    resolved = _resolve(ctx, step, name, requested)
    eligible = sorted(resolved.rows) if step.eligibility != "own" else list(requested or [])
    return StepScope(ctx=ctx, step=step, dataset=name, spec=spec, tenants=ctx.scope(eligible, step.name),
                     rows=resolved.rows, requested=validate_tenant_ids(requested) if requested else None,
                     options=dict(options or {}),
                     input_ref=resolved.input_ref, input_version=resolved.version, excluded=resolved.excluded)


# --------------------------------------------------------------------------- running


def run_step(ctx: JobContext, name: str, dataset: str | None = None, tenants: Sequence[str] | None = None,
             resume: str | None = None, rerun: bool = False, **options: Any) -> StepResult:
    """Run one step and record it; a step that raises is logged as failed, then re-raised.

    ``resume`` (a run id): rerun only the tenants that failed this step in that run; nothing to
    do when none failed. ``rerun``: run a `skip_unchanged` step even when nothing it depends on
    changed since its last clean run (e.g. after a change the run log cannot see).
    """
    return _run_step(ctx, name, dataset, tenants, resume, rerun, None, **options)


def _run_step(ctx: JobContext, name: str, dataset: str | None, tenants: Sequence[str] | None,
              resume: str | None, rerun: bool, night: _Night | None, **options: Any) -> StepResult:
    step = get_step(name)
    ds, _ = ctx.config.dataset(dataset)
    requested = validate_tenant_ids(tenants, where="--tenants") if tenants else None
    unknown = sorted(set(options) - {o.dest for o in step.options})
    if unknown:
        raise ConfigError(f"step {name} takes no option(s) {unknown}")
    if resume == "auto":  # a workflow task's retry: resume only if this run already logged the step
        resume = ctx.run_id if step.resumable and _logged_per_tenant(ctx, name, ds) else None
        if resume is not None and requested:
            # A for-each iteration shares the run and step with its siblings: its own tenants that
            # this run never tried are not a retry; they run, with the ones that failed before.
            seen = _logged_statuses(ctx, name, ds)
            if any(t not in seen for t in requested):
                todo = [t for t in requested if seen.get(t, "failed") == "failed"]
                if not todo:
                    return StepResult(step=name, dataset=ds, run_id=ctx.run_id, summary={"resumed": []})
                resume, requested = None, validate_tenant_ids(todo)
    if resume is not None:
        if not step.resumable:
            raise ConfigError(f"step {name} cannot be resumed: rerun it whole (it is idempotent)")
        failed = failed_tenants(ctx.spark, ctx.tables.run_log, resume, name, ds)
        if requested:
            failed = [t for t in failed if t in requested]
        if not failed:
            ctx.progress.phase(f"run {resume}: no tenant failed {name} of {ds}; nothing to resume")
            return StepResult(step=name, dataset=ds, run_id=ctx.run_id, summary={"resumed": []})
        ctx.progress.phase(f"resuming {name} for {len(failed)} failed tenant(s): {', '.join(failed)}")
        requested = validate_tenant_ids(failed)
    started = time.perf_counter()
    if step.gated and resume is None and not ctx.config.retraining.force:
        kept = _nobody_to_retrain(ctx, step, ds, requested, started, night)
        if kept is not None:
            return kept
    rerun = rerun or any(options.get(o.dest) for o in step.options if o.forces_run)
    versions = None
    if step.skip_unchanged and resume is None:
        log.debug("%s %s: inputs since it last ran", name, ds)
        versions = night.versions(step) if night is not None else input_versions(ctx, step, ds)
    if versions is not None and not rerun:
        skipped = _skip_if_unchanged(ctx, step, ds, requested, options, versions, started, night)
        if skipped is not None:
            return skipped
    if night is not None:
        night.changed()  # the step runs: what it writes (declared or not) is no longer known
    ctx.stood_on[(name, ds)] = None
    try:
        log.debug("%s %s: eligible tenants and their scope", name, ds)  # where a step's time goes (bench/)
        scope = open_scope(ctx, step, ds, requested, options)
        out = step.run(scope)
    except TenantMLError as exc:
        _record_failure(ctx, name, ds, str(exc), started)
        raise
    except Exception as exc:
        _record_failure(ctx, name, ds, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}", started)
        raise
    result = _result(ctx, step, ds, scope, out, time.perf_counter() - started)
    if resume is not None:
        result.summary["resumed"] = list(requested or [])
    if versions is not None:  # what the next run compares with: its own writes count as seen
        after = {**versions, **_versions(ctx, _tables(ctx, step.writes, ds) or {})}
        digest = inputs_digest(ctx, step, requested, options, after)
        if not result.tenants:  # nothing to do (no new batch): one step-level row keeps the record
            reason = str(result.summary.get("reason") or "nothing new to do")
            result.tenants.append(TenantOutcome(tenant_id=None, status="skipped", detail={"reason": reason}))
        until = result.summary.get("valid_until")  # a result that time alone makes stale (a champion's age)
        for t in result.tenants:
            t.detail["inputs"] = digest
            if until is not None:
                t.detail["valid_until"] = until.isoformat() if isinstance(until, datetime) else str(until)
    log.debug("%s %s: run log and cost ledger", name, ds)
    write_run_log(ctx.spark, ctx.tables.run_log, result)
    write_cost_ledger(ctx.spark, ctx.tables.cost_ledger, result, measured=step.measured)
    return result


def _nobody_to_retrain(ctx: JobContext, step: Step, dataset: str, requested: Sequence[str] | None,
                       started: float, night: _Night | None) -> StepResult | None:
    """A gated step in a run whose monitor kept every champion (of ``requested``, when given) has
    nothing to do: one step-level row says so, without counting rows per tenant for a scope that
    would exclude every tenant. None: someone is to be retrained (or the run has no decisions)."""
    decisions = retraining_decisions(ctx, dataset)
    if decisions is None or any(decisions[t][0] if t in decisions else True for t in (requested or decisions)):
        return None
    why = f"the monitor of run {decisions_run(ctx, dataset)} decided that no tenant needs retraining"
    ctx.progress.phase(f"{step.name} {dataset}: skipped, {why}")
    result = StepResult(step=step.name, dataset=dataset, run_id=ctx.run_id, seconds=time.perf_counter() - started,
                        tenants=[TenantOutcome(tenant_id=None, status="skipped", detail={"reason": why})],
                        summary={"reason": why, "tenants_kept": len(decisions), "models_trained": 0})
    _log_skip(ctx, result, night)
    return result


def _log_skip(ctx: JobContext, result: StepResult, night: _Night | None) -> None:
    """A skipped step's one row: written now, or with the pipeline's other skips in one commit."""
    if night is not None:
        night.pending.append((result, datetime.now(UTC).replace(tzinfo=None)))
        return
    log.debug("%s %s: run log", result.step, result.dataset)
    write_run_log(ctx.spark, ctx.tables.run_log, result)


# --------------------------------------------------------------------------- unchanged inputs


# Declared reads that are not Delta tables (files at a path): a step reading one always runs.
_NOT_TABLES = frozenset({"source", "scoring_source"})
# Every champion alias tenantml sets is recorded in `promotions` (promote, train_shared): its version
# stands for the registry's. An alias set by hand in MLflow is not seen: `--rerun` (or `--rescore`) runs anyway.
_STANDS_FOR = {"registry": "promotions"}
# What the runner itself reads to find a step's tenants (rows per tenant, blocked, paused).
_ELIGIBILITY_READS: dict[str, tuple[str, ...]] = {"silver": ("silver", "quality", "tenants"),
                                                  "inference": ("scoring", "quality", "tenants"), "own": ()}


def _tables(ctx: JobContext, names: Sequence[str], dataset: str) -> dict[str, TableRef] | None:
    """The Delta tables behind declared reads or writes, by display name; None when one is not a table."""
    if any(n in _NOT_TABLES for n in names):
        return None
    out: dict[str, TableRef] = {}
    for n in names:
        attr = getattr(ctx.tables, _STANDS_FOR.get(n, n))
        ref = attr(dataset) if callable(attr) else attr
        out[ref.display] = ref
    return out


def _versions(ctx: JobContext, refs: dict[str, TableRef]) -> dict[str, int | None]:
    """Each table's current version (None: not created yet). The lookups are small queries of their
    own (a listing of the log each): they run side by side, as one session's queries may."""
    from concurrent.futures import ThreadPoolExecutor

    def one(ref: TableRef) -> int | None:
        return table_version(ctx.spark, ref) if table_exists(ctx.spark, ref) else None

    items = sorted(refs.items())
    with ThreadPoolExecutor(max_workers=min(8, max(len(items), 1)), thread_name_prefix="table-version") as pool:
        return dict(zip([k for k, _ in items], pool.map(one, [r for _, r in items]), strict=True))


def _depends_on(step: Step) -> tuple[str, ...]:
    return (*step.reads, *step.writes, *_ELIGIBILITY_READS[step.eligibility])


def input_versions(ctx: JobContext, step: Step, dataset: str) -> dict[str, int | None] | None:
    """The Delta version of every table ``step`` reads or writes (None: not created yet), or None
    when it reads something that is not a Delta table (its step then always runs)."""
    refs = _tables(ctx, _depends_on(step), dataset)
    return None if refs is None else _versions(ctx, refs)


def inputs_digest(ctx: JobContext, step: Step, requested: Sequence[str] | None, options: dict[str, Any],
                  versions: dict[str, int | None]) -> str:
    """What decides a step's result besides the code: its tables' versions, the whole config, the
    tenants and options asked for, the package version, and with budgets set the month and ledger."""
    import hashlib

    from tenantml import __version__

    state: dict[str, Any] = {"versions": versions, "config": ctx.config.model_dump(mode="json"),
                             "tenants": sorted(requested or []), "options": options, "tenantml": __version__}
    cfg = ctx.config.tenants
    if cfg.budgets or cfg.budget_seconds_per_month is not None:
        state["month"] = datetime.now(UTC).strftime("%Y-%m")
        state["ledger"] = _versions(ctx, {"ledger": ctx.tables.cost_ledger})
    text = json.dumps(state, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _skip_if_unchanged(ctx: JobContext, step: Step, dataset: str, requested: Sequence[str] | None,
                       options: dict[str, Any], versions: dict[str, int | None], started: float,
                       night: _Night | None) -> StepResult | None:
    """When the step's last run ended without a failure and nothing it depends on changed since,
    its result would be the same: it is logged as skipped, with the run whose result stands."""
    digest = inputs_digest(ctx, step, requested, options, versions)
    last = night.last_run(step.name) if night is not None else last_runs(ctx, dataset, [step.name]).get(step.name)
    stands = _stands(last, digest)
    if stands is None:
        return None
    since, until = stands
    why = f"nothing it reads or writes changed since run {since}"
    ctx.progress.phase(f"{step.name} {dataset}: skipped, {why}")
    detail: dict[str, Any] = {"reason": why, "unchanged_since": since, "inputs": digest}
    if until is not None:
        detail["valid_until"] = until
    result = StepResult(step=step.name, dataset=dataset, run_id=ctx.run_id, seconds=time.perf_counter() - started,
                        tenants=[TenantOutcome(tenant_id=None, status="skipped", detail=detail)],
                        summary={"unchanged_since": since, "reason": why, "table_versions": versions})
    ctx.stood_on[(step.name, dataset)] = since
    _log_skip(ctx, result, night)
    return result


@dataclass(frozen=True)
class LastRun:
    """A step's latest run as the run log has it: what a skip-unchanged step compares with."""
    run_id: str
    failed: bool
    inputs: tuple[str | None, ...]
    since: str | None
    valid_until: str | None


def last_runs(ctx: JobContext, dataset: str, steps: Sequence[str]) -> dict[str, LastRun]:
    """Each of ``steps``' latest run in the run log (one query for them all)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ref = ctx.tables.run_log
    if not steps or not table_exists(ctx.spark, ref):
        return {}
    w = Window.partitionBy("step").orderBy(F.col("at").desc())
    rows = (read_table(ctx.spark, ref).where(F.col("step").isin(list(steps)) & (F.col("dataset") == dataset))
            .groupBy("step", "run_id").agg(F.max("logged_at").alias("at"),
                                           F.max((F.col("status") == "failed").cast("int")).alias("failed"),
                                           F.collect_set(F.get_json_object("detail", "$.inputs")).alias("inputs"),
                                           F.max(F.get_json_object("detail", "$.unchanged_since")).alias("since"),
                                           F.min(F.get_json_object("detail", "$.valid_until")).alias("until"))
            .withColumn("_n", F.row_number().over(w)).where("_n = 1").collect())
    return {r["step"]: LastRun(run_id=str(r["run_id"]), failed=bool(r["failed"]), inputs=tuple(r["inputs"]),
                               since=r["since"], valid_until=r["until"]) for r in rows}


def _stands(last: LastRun | None, digest: str) -> tuple[str, str | None] | None:
    """(the run whose result stands, until when) when ``last`` logged ``digest``, no failure, and
    its result has not expired; None: the step has to run."""
    if last is None or last.failed or list(last.inputs) != [digest]:
        return None
    if last.valid_until is not None and datetime.now(UTC).replace(tzinfo=None).isoformat() >= last.valid_until:
        return None
    return str(last.since or last.run_id), last.valid_until


class _Night:
    """What `run_pipeline` knows between steps that write nothing: the versions of every table its
    skip-unchanged steps depend on (one lookup, side by side, until a step runs) and each step's
    last run (one run-log query); the skipped steps' rows are written together at the end."""

    def __init__(self, ctx: JobContext, dataset: str, names: Sequence[str]) -> None:
        self.ctx, self.dataset = ctx, dataset
        self.steps = [get_step(n) for n in names]
        self._versions: dict[str, int | None] | None = None
        self._last: dict[str, LastRun] | None = None
        self.pending: list[tuple[StepResult, datetime]] = []

    def versions(self, step: Step) -> dict[str, int | None] | None:
        refs = _tables(self.ctx, _depends_on(step), self.dataset)
        if refs is None:
            return None
        if self._versions is None or not set(refs) <= set(self._versions):
            wanted: dict[str, TableRef] = dict(refs)
            for other in self.steps:  # the steps still to come read the same lookup
                more = _tables(self.ctx, _depends_on(other), self.dataset) if other.skip_unchanged else None
                wanted.update(more or {})
            self._versions = _versions(self.ctx, wanted)
        return {k: self._versions[k] for k in sorted(refs)}

    def last_run(self, step: str) -> LastRun | None:
        if self._last is None:
            self._last = last_runs(self.ctx, self.dataset, [s.name for s in self.steps if s.skip_unchanged])
        return self._last.get(step)

    def changed(self) -> None:
        self._versions = None

    def flush(self) -> None:
        if self.pending:
            log.debug("%d skipped step(s): run log", len(self.pending))
            write_run_logs(self.ctx.spark, self.ctx.tables.run_log, self.pending)
            self.pending = []


def _logged_statuses(ctx: JobContext, step: str, dataset: str) -> dict[str, str]:
    """tenant -> status of this run's latest logged outcome of ``step``."""
    from pyspark.sql import functions as F

    rows = (read_table(ctx.spark, ctx.tables.run_log)
            .where((F.col("run_id") == ctx.run_id) & (F.col("step") == step) & (F.col("dataset") == dataset)
                   & F.col("tenant_id").isNotNull()).select("tenant_id", "status").collect())
    return {r["tenant_id"]: r["status"] for r in rows}


def _logged_per_tenant(ctx: JobContext, step: str, dataset: str) -> bool:
    """Whether this run's earlier attempt of ``step`` ended and logged per-tenant outcomes (a step
    that crashed as a whole logged one failure row without a tenant: it is rerun whole)."""
    from pyspark.sql import functions as F

    ref = ctx.tables.run_log
    if not table_exists(ctx.spark, ref):
        return False
    rows = (read_table(ctx.spark, ref).where((F.col("run_id") == ctx.run_id) & (F.col("step") == step)
                                             & (F.col("dataset") == dataset))
            .select((F.col("tenant_id").isNull() & (F.col("status") == "failed")).alias("whole")).distinct().collect())
    return bool(rows) and not any(r["whole"] for r in rows)


def _result(ctx: JobContext, step: Step, dataset: str, scope: StepScope, out: StepOutput,
            seconds: float) -> StepResult:
    outcomes = [*_excluded_outcomes(scope.excluded), *out.outcomes]
    seen = [o.tenant_id for o in outcomes if o.tenant_id is not None]
    if len(seen) != len(set(seen)):
        dup = sorted({t for t in seen if seen.count(t) > 1})
        raise RuntimeError(f"step {step.name} reported tenant(s) {dup[:5]} more than once")
    outcomes.sort(key=lambda o: (o.tenant_id is None, o.tenant_id or ""))
    summary = dict(out.summary)
    if scope.input_version is not None:
        summary.setdefault(f"{'silver' if step.eligibility == 'silver' else 'inference'}_version",
                           scope.input_version)
    return StepResult(step=step.name, dataset=dataset, run_id=ctx.run_id, tenants=outcomes,
                      tables_written=out.tables_written, mlflow_run_id=out.mlflow_run_id, seconds=seconds,
                      summary=summary)


def _record_failure(ctx: JobContext, step: str, dataset: str, error: str, started: float) -> None:
    try:
        write_run_log(ctx.spark, ctx.tables.run_log, StepResult(
            step=step, dataset=dataset, run_id=ctx.run_id, seconds=time.perf_counter() - started,
            tenants=[TenantOutcome(tenant_id=None, status="failed", error=error[:4000],
                                   seconds=time.perf_counter() - started)]))
    except Exception:  # the original error matters more than the log write
        log.exception("could not record the failure of step %s in run_log", step)


def pipeline_steps(start: str | None = None, stop: str | None = None) -> tuple[str, ...]:
    """The pipeline's steps from ``start`` to ``stop`` (inclusive), in dependency order."""
    order = pipeline_order()
    for value, flag in ((start, "--from"), (stop, "--to")):
        if value is not None and value not in order:
            raise ConfigError(f"{flag} {value!r}: not a pipeline step (steps: {', '.join(order)})")
    first = order.index(start) if start else 0
    last = order.index(stop) if stop else len(order) - 1
    return order[first:last + 1]


def run_pipeline(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None,
                 steps: Sequence[str] | None = None, rerun: bool = False, **options: Any) -> list[StepResult]:
    """Every step under one run id; tenants failing a step don't stop the others. ``options`` go
    to the steps that declare them (e.g. ``source_path`` to ingest); ``rerun`` to every step."""
    names = list(steps if steps is not None else pipeline_steps())
    ds, _ = ctx.config.dataset(dataset)
    night = _Night(ctx, ds, names)
    results = []
    try:
        for name in names:
            step = get_step(name)
            own = {k: v for k, v in options.items() if k in {o.dest for o in step.options} and v is not None}
            results.append(_run_step(ctx, name, dataset, tenants, None, rerun, night, **own))
    finally:
        night.flush()
    return results


# --------------------------------------------------------------------------- run_log


_RUN_LOG_SCHEMA = (
    "run_id string not null, step string not null, dataset string not null, tenant_id string, "
    "status string not null, rows_in long not null, rows_out long not null, rows_quarantined long not null, "
    "seconds double not null, error string, detail string, logged_at timestamp not null"
)


def write_run_log(spark: SparkSession, ref: TableRef, result: StepResult) -> None:
    """Record every tenant's outcome; a rerun of the same run and step replaces its rows."""
    write_run_logs(spark, ref, [(result, datetime.now(UTC).replace(tzinfo=None))])


def write_run_logs(spark: SparkSession, ref: TableRef, results: Sequence[tuple[StepResult, datetime]]) -> None:
    """Several steps' outcomes (each with when it was logged) in one commit; each result replaces
    its own (run, step, dataset) rows as `write_run_log` does."""
    rows, predicates = [], []
    for result, at in results:
        validate_run_id(result.run_id)
        sql_identifier(result.step, "step")
        sql_identifier(result.dataset, "dataset")
        rows += [(result.run_id, result.step, result.dataset, t.tenant_id, t.status, int(t.rows_in),
                  int(t.rows_out), int(t.rows_quarantined), float(t.seconds), t.error,
                  json.dumps(t.detail, default=str, sort_keys=True), at)
                 for t in result.tenants]
        ids = [t.tenant_id for t in result.tenants if t.tenant_id is not None]
        # Only this result's tenants are replaced, so a resumed step keeps the rows of the tenants it
        # did not rerun; a step-level failure row (tenant NULL) is always superseded.
        scope = f"{tenant_in_predicate(ids)} OR tenant_id IS NULL" if ids else "tenant_id IS NULL"
        predicates.append(f"(run_id = '{result.run_id}' AND step = '{result.step}' "
                          f"AND dataset = '{result.dataset}' AND ({scope}))")
    if rows:
        replace_where(local_frame(spark, rows, _RUN_LOG_SCHEMA), ref, " OR ".join(predicates))


def failed_tenants(spark: SparkSession, ref: TableRef, run_id: str, step: str, dataset: str) -> list[str]:
    """Tenants whose ``step`` failed in ``run_id``: what `--resume` reruns."""
    from pyspark.sql import functions as F

    if not table_exists(spark, ref):
        return []
    rows = (read_table(spark, ref)
            .where((F.col("run_id") == validate_run_id(run_id)) & (F.col("step") == step)
                   & (F.col("dataset") == dataset) & (F.col("status") == "failed")
                   & F.col("tenant_id").isNotNull())
            .select("tenant_id").distinct().collect())
    return sorted(r[0] for r in rows)


# --------------------------------------------------------------------------- cost ledger


def write_cost_ledger(spark: SparkSession, ref: TableRef, result: StepResult, *, measured: bool) -> None:
    """One row per tenant of the step; replaced on rerun like run_log.

    Measured steps time each tenant inside the Spark tasks; the others process all tenants in
    shared jobs, so their wall time is allocated by row share and marked as such."""
    validate_run_id(result.run_id)
    tenants = [t for t in result.tenants if t.tenant_id is not None and t.status in ("ok", "failed")]
    if not tenants:
        return
    total_rows = sum(t.rows_in for t in tenants) or 1
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [(result.run_id, result.step, result.dataset, t.tenant_id,
             float(t.seconds) if measured else result.seconds * t.rows_in / total_rows,
             int(t.rows_in), "measured" if measured else "allocated", now) for t in tenants]
    df = local_frame(spark, rows, "run_id string, step string, dataset string, tenant_id string, "
                                     "compute_seconds double, rows long, method string, recorded_at timestamp")
    predicate = (f"run_id = '{result.run_id}' AND step = '{sql_identifier(result.step, 'step')}' "
                 f"AND dataset = '{sql_identifier(result.dataset, 'dataset')}' "
                 f"AND {tenant_in_predicate([t.tenant_id for t in tenants if t.tenant_id])}")
    replace_where(df, ref, predicate)


def spent_this_month(spark: SparkSession, ref: TableRef, tenants: list[str]) -> dict[str, float]:
    """Compute seconds recorded per tenant since the first of the current month (UTC)."""
    from pyspark.sql import functions as F

    if not tenants or not table_exists(spark, ref):
        return {}
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    rows = (read_table(spark, ref).where(F.col("tenant_id").isin(tenants) & (F.col("recorded_at") >= start))
            .groupBy("tenant_id").agg(F.sum("compute_seconds").alias("s")).collect())
    return {r["tenant_id"]: float(r["s"]) for r in rows}
