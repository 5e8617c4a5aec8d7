"""One tenant's candidate, start to end: quota, holdout split, fit, evaluation against a baseline.

Plain pandas + torch (no Spark), so the same code runs inside a Spark task, in a test and in a
benchmark; it takes the typed :class:`TrainingPlan` the driver built and returns one result row.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tenantml.training.plan import TrainingPlan

if TYPE_CHECKING:
    from tenantml.models import FeatureSpec, FitResult, TrainParams

Fitter = Callable[[pd.DataFrame, str, "FeatureSpec", "TrainParams"], "FitResult"]

RESULT_SCHEMA = (
    "tenant_id string, status string, error string, rows long, train_rows long, test_rows long, "
    "metric_name string, metric double, baseline_metric double, metrics_json string, epochs int, "
    "best_epoch int, seconds double, n_parameters long, attempts int, sampled_from long, model binary, "
    "finished_at double, tier string, pool string, path string, profile_json string"
)
RESULT_COLUMNS = [c.split()[0] for c in RESULT_SCHEMA.split(", ")]


def short_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"[:1000]


def train_one_tenant(tenant_id: str, pdf: pd.DataFrame, plan: TrainingPlan, base_model: bytes | None = None,
                     fitter: Fitter | None = None) -> dict[str, Any]:
    """Quota, holdout split, fit with early stopping, evaluate against a constant baseline.

    Never raises: a failure is retried ``plan.retries`` times (a new optimisation seed, the same
    holdout), then returned as status 'failed'. With ``base_model`` (a tuned plan) the tenant's
    model is that model fine-tuned; ``fitter`` replaces `fit_tabular` (giants train data-parallel).
    """
    from tenantml.models import primary_metric

    started = time.perf_counter()
    metric_name, _ = primary_metric(plan.task)  # type: ignore[arg-type]
    row: dict[str, Any] = {"tenant_id": tenant_id, "rows": len(pdf), "metric_name": metric_name,
                           "sampled_from": None, "attempts": 0}
    for attempt in range(1, plan.retries + 2):
        row["attempts"] = attempt
        try:
            _fit_and_evaluate(tenant_id, pdf, plan, attempt, row, base_model, fitter)
            break
        except Exception as exc:  # one tenant's failure is recorded, never propagated
            row.update(status="failed", error=short_error(exc), train_rows=0, test_rows=0, metric=None,
                       baseline_metric=None, metrics_json=None, epochs=0, best_epoch=0, n_parameters=0,
                       model=None, profile_json=None)
    row["seconds"] = time.perf_counter() - started
    row["finished_at"] = time.time()  # wall clock, so per-tenant latency can be measured across tasks
    return row


def training_device(setting: str) -> str:
    """Where batched groups train, as for one tenant's fit (`resolve_device`): 'auto' is CUDA when a
    GPU is present, else CPU; an explicit 'cuda' is a requirement, so a CPU-only node fails the
    tenants loudly instead of training them somewhere the config did not ask for."""
    from tenantml.models.tabular import resolve_device

    return resolve_device(setting)


def train_tenants_batched(frames: Sequence[tuple[str, pd.DataFrame]], plan: TrainingPlan,
                          base_model: bytes | None = None) -> list[dict[str, Any]]:
    """Many tenants' candidates at once: the per-tenant steps of :func:`train_one_tenant`, one fit.

    Each tenant gets the quota and holdout of `split_tenant` and the seed and quotas of
    `tenant_params` (first attempt), exactly as alone; the fits run as stacked networks
    (`fit_tabular_batched`, or `fine_tune_batched` from ``base_model`` for a tuned plan), then each
    model is judged by `evaluate_fit` on its own holdout. A tenant whose split, batched fit or
    evaluation raises is trained again alone by `train_one_tenant`, with its retries (``attempts``
    then counts the batched try too), so one tenant's failure never fails the others. Rows come
    back in input order, with `train_one_tenant`'s columns plus ``path`` ('batched', or 'task'
    for a tenant that was retrained alone).
    """
    from tenantml.models import primary_metric
    from tenantml.models.batched import BatchTask, fine_tune_batched, fit_tabular_batched

    metric_name, _ = primary_metric(plan.task)  # type: ignore[arg-type]
    rows: list[dict[str, Any] | None] = [None] * len(frames)
    pending: list[tuple[int, str, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any], float]] = []
    failed: dict[int, float] = {}  # index -> seconds already spent on the tenant
    for i, (tenant_id, pdf) in enumerate(frames):
        started = time.perf_counter()
        row: dict[str, Any] = {"tenant_id": tenant_id, "rows": len(pdf), "metric_name": metric_name,
                               "sampled_from": None, "attempts": 1}
        try:
            train, test, sampled_from = split_tenant(tenant_id, pdf, plan)
        except Exception:
            failed[i] = time.perf_counter() - started
            continue
        row.update(sampled_from=sampled_from, rows=len(train) + len(test))
        pending.append((i, tenant_id, pdf, train, test, row, time.perf_counter() - started))
    if pending:
        device = training_device(plan.params.device)
        tasks = [BatchTask(t, train, tenant_params(plan, t, 1)) for _, t, _, train, _, _, _ in pending]
        fits: Sequence[FitResult | BaseException]
        try:
            if base_model is not None and plan.tune is not None:
                from tenantml.models import TabularModel

                tune = plan.tune
                fits = fine_tune_batched(TabularModel.from_bytes(base_model), tasks, plan.label, freeze=tune.freeze,
                                         learning_rate=tune.learning_rate, max_epochs=tune.max_epochs,
                                         patience=tune.patience, device=device,
                                         max_group_size=plan.batched_group_size)
            else:
                fits = fit_tabular_batched(tasks, plan.label, plan.features, device=device,
                                           max_group_size=plan.batched_group_size)
        except Exception as exc:  # e.g. a base model that cannot load: every tenant tries alone
            fits = [exc] * len(tasks)
        for (i, tenant_id, _, train, test, row, spent), fit in zip(pending, fits, strict=True):
            started = time.perf_counter()
            try:
                if isinstance(fit, BaseException):
                    raise fit
                evaluate_fit(tenant_id, fit, train, test, plan, row)
            except Exception:
                failed[i] = spent + time.perf_counter() - started
                continue
            row.update(path="batched", seconds=spent + fit.seconds + time.perf_counter() - started,
                       finished_at=time.time())
            rows[i] = row
    # The batched fit was each failed tenant's first attempt: alone, it has the retries that are left.
    alone_plan = replace(plan, retries=max(plan.retries - 1, 0))
    for i, spent in sorted(failed.items()):
        tenant_id, pdf = frames[i]
        alone = train_one_tenant(tenant_id, pdf, alone_plan, base_model)
        if alone["status"] == "ok":
            alone["metrics_json"] = json.dumps({**json.loads(alone["metrics_json"]), "batched_fallback": 1.0})
        alone.update(attempts=int(alone["attempts"]) + 1, seconds=float(alone["seconds"]) + spent, path="task")
        rows[i] = alone
    return [r for r in rows if r is not None]


def tenant_params(plan: TrainingPlan, tenant_id: str, attempt: int = 1) -> TrainParams:
    """The tenant's TrainParams: its seed (stable per tenant, new per retry) and its quotas."""
    from dataclasses import replace

    from tenantml.models import stable_seed

    tp = plan.tenants.get(tenant_id)
    seed = stable_seed(tenant_id, plan.seed) + attempt - 1
    return replace(plan.params, seed=seed, max_epochs=tp.max_epochs if tp else plan.params.max_epochs,
                   max_seconds=tp.max_seconds if tp else None)


def split_tenant(tenant_id: str, pdf: pd.DataFrame, plan: TrainingPlan) -> tuple[pd.DataFrame, pd.DataFrame, int | None]:
    """The holdout every strategy and promotion use, after the tenant's row quota."""
    from tenantml.models import tenant_split

    tp = plan.tenants.get(tenant_id)
    return tenant_split(pdf, tenant_id, plan.key, test_fraction=plan.test_fraction, seed=plan.seed,
                        event_time=plan.event_time, max_rows=tp.max_rows if tp else None)


def _fit_and_evaluate(tenant_id: str, pdf: pd.DataFrame, plan: TrainingPlan, attempt: int, row: dict[str, Any],
                      base_model: bytes | None, fitter: Fitter | None) -> None:
    from tenantml.models import fit_tabular

    train, test, sampled_from = split_tenant(tenant_id, pdf, plan)
    row.update(sampled_from=sampled_from, rows=len(train) + len(test))
    params = tenant_params(plan, tenant_id, attempt)
    if base_model is not None and plan.tune is not None:
        from tenantml.models import TabularModel, fine_tune

        tune = plan.tune
        fit = fine_tune(TabularModel.from_bytes(base_model), train, plan.label, freeze=tune.freeze,
                        learning_rate=tune.learning_rate, max_epochs=min(tune.max_epochs, params.max_epochs),
                        patience=tune.patience, batch_size=params.batch_size, val_fraction=params.val_fraction,
                        seed=params.seed, max_seconds=params.max_seconds)
    else:
        fit = (fitter or fit_tabular)(train, plan.label, plan.features, params)
    evaluate_fit(tenant_id, fit, train, test, plan, row)


def training_profile(model: Any, train: pd.DataFrame, plan: TrainingPlan) -> str:
    """The reference the monitor compares scoring batches with: the distributions of the rows the
    model was trained on, and of its scores on them (JSON, stored with the model)."""
    from tenantml.monitoring import reference_profile

    f = plan.features
    profile = reference_profile(train, list(f.numeric), list(f.categorical), scores=model.predict(train), task=plan.task)
    return json.dumps(profile, allow_nan=False)


def evaluate_fit(tenant_id: str, fit: FitResult, train: pd.DataFrame, test: pd.DataFrame, plan: TrainingPlan,
                 row: dict[str, Any]) -> None:
    """Holdout metrics of a fitted model next to the constant baseline's, into ``row``."""
    from tenantml.models import baseline_predictions, evaluate

    metric_name = row["metric_name"]
    y_test = test[plan.label].to_numpy(dtype=np.float64)
    pred = fit.model.predict(test)
    if not np.isfinite(pred).all():
        raise FloatingPointError(f"tenant {tenant_id!r}: model produced non-finite predictions (diverged)")
    base = baseline_predictions(train[plan.label].to_numpy(dtype=np.float64), len(test), plan.task)  # type: ignore[arg-type]
    metrics = evaluate(y_test, pred, plan.task)  # type: ignore[arg-type]
    base_metrics = evaluate(y_test, base, plan.task)  # type: ignore[arg-type]
    row.update(
        status="ok", error=None, train_rows=len(train), test_rows=len(test),
        profile_json=training_profile(fit.model, train, plan),
        metric=float(metrics[metric_name]), baseline_metric=float(base_metrics[metric_name]),
        metrics_json=json.dumps({**metrics, **{f"baseline_{k}": v for k, v in base_metrics.items()},
                                 # the holdout's size and class counts: promotion's noise-aware rule
                                 # (selection.metric_standard_error) needs them, for every candidate
                                 "holdout_rows": float(len(test)),
                                 **({"holdout_positives": float(y_test.sum())} if plan.task == "binary" else {}),
                                 "best_val_loss": fit.best_val_loss,
                                 **({"time_quota_hit": 1.0} if fit.time_quota_hit else {})}),
        epochs=fit.epochs_run, best_epoch=fit.best_epoch, n_parameters=fit.model.n_parameters,
        model=fit.model.to_bytes(),
    )
