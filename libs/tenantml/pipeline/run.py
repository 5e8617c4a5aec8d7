"""Run steps with their bookkeeping: every step's outcomes land in `run_log`, failures included."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tenantml.errors import TenantMLError
from tenantml.pipeline.ledger import write_cost_ledger
from tenantml.pipeline.result import StepResult, TenantOutcome, write_run_log

if TYPE_CHECKING:
    from tenantml.context import JobContext

log = logging.getLogger(__name__)
Step = Callable[..., StepResult]


def _steps() -> dict[str, Step]:
    from tenantml.pipeline.ingest import ingest
    from tenantml.pipeline.promote import promote
    from tenantml.pipeline.publish import publish
    from tenantml.pipeline.score import score
    from tenantml.pipeline.train import train, train_tuned
    from tenantml.pipeline.train_shared import train_shared
    from tenantml.pipeline.validate import validate

    return {"ingest": ingest, "validate": validate, "train_shared": train_shared, "train": train,
            "train_tuned": train_tuned, "promote": promote, "score": score, "publish": publish}


# Tenant and tuned candidates are independent of each other; tuned needs the shared champion.
STEPS = ("ingest", "validate", "train_shared", "train", "train_tuned", "promote", "score", "publish")


def run_step(ctx: JobContext, step: str, dataset: str | None = None,
             tenants: Sequence[str] | None = None, **kwargs: object) -> StepResult:
    """Run one step and record it; a step that raises is logged as failed, then re-raised."""
    from tenantml.tenancy import validate_tenant_ids

    fn = _steps()[step]
    name, _ = ctx.config.dataset(dataset)
    tenants = validate_tenant_ids(tenants, where="--tenants") if tenants else None
    started = time.perf_counter()
    try:
        result = fn(ctx, dataset=name, tenants=tenants, **kwargs)
    except TenantMLError as exc:
        _record_failure(ctx, step, name, str(exc), started)
        raise
    except Exception as exc:
        _record_failure(ctx, step, name, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
                        started)
        raise
    write_run_log(ctx.spark, ctx.tables.run_log, result)
    write_cost_ledger(ctx.spark, ctx.tables.cost_ledger, result)
    return result


def _record_failure(ctx: JobContext, step: str, dataset: str, error: str, started: float) -> None:
    try:
        write_run_log(ctx.spark, ctx.tables.run_log, StepResult(
            step=step, dataset=dataset, run_id=ctx.run_id, seconds=time.perf_counter() - started,
            tenants=[TenantOutcome(tenant_id=None, status="failed", error=error[:4000],
                                   seconds=time.perf_counter() - started)]))
    except Exception:  # the original error matters more than the log write
        log.exception("could not record the failure of step %s in run_log", step)


def run_pipeline(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None,
                 steps: Sequence[str] = STEPS) -> list[StepResult]:
    """Every step under one run id; tenants failing a step don't stop the others. The run report is
    written at the end, also when a step raised (its failure is in run_log by then)."""
    results = []
    try:
        for step in steps:
            results.append(run_step(ctx, step, dataset=dataset, tenants=tenants))
    except Exception:
        _write_report(ctx, dataset)
        raise
    _write_report(ctx, dataset)
    return results


def _write_report(ctx: JobContext, dataset: str | None) -> None:
    """The HTML run report; a report that cannot be written is logged, never fails the run."""
    try:
        from tenantml.report import write_run_report

        ctx.progress.phase(f"run report: {write_run_report(ctx, dataset, ctx.run_id)}")
    except TenantMLError as exc:  # e.g. a run that failed before it logged anything
        log.warning("run report of run %s not written: %s", ctx.run_id, exc)
    except Exception:
        log.exception("could not write the run report of run %s", ctx.run_id)
