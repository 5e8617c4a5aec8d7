"""Tenant-specific models: one torch model per tenant, many tenants per Spark task.

The worker side (`train_partition`) is plain pandas + torch so it can be tested and benchmarked
without Spark; `train_tenant_models` wires it into `mapInPandas` over a packed partitioning.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tenantml.config import DatasetSpec, TrainingConfig
from tenantml.training.plan import pack_tenants

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from tenantml.training.giants import Fitter

BIN_COL = "_task_bin"

RESULT_SCHEMA = (
    "tenant_id string, status string, error string, rows long, train_rows long, test_rows long, "
    "metric_name string, metric double, baseline_metric double, metrics_json string, epochs int, "
    "best_epoch int, seconds double, n_parameters long, attempts int, sampled_from long, model binary, "
    "finished_at double, tier string, pool string, path string"
)
RESULT_COLUMNS = [c.split()[0] for c in RESULT_SCHEMA.split(", ")]
POOL_PROPERTY = "spark.scheduler.pool"
TIER_POOLS = {"small": "tenantml-small", "standard": "tenantml-standard", "giant": "tenantml-giant"}


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, shipped once per task in the closure."""

    label: str
    key: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    task: str
    event_time: str | None
    test_fraction: float
    params: dict[str, Any]
    torch_threads: int
    retries: int = 0
    quotas: dict[str, tuple[int | None, int]] | None = None  # tenant -> (max rows, max epochs)
    time_quotas: dict[str, float | None] | None = None  # tenant -> training seconds
    # Tuned-shared: fine-tune this base model instead of training from scratch.
    base_model: bytes | None = None
    tune: dict[str, Any] | None = None  # freeze, learning_rate, max_epochs, patience, min_rows
    tiers: dict[str, str] | None = None  # tenant -> small / standard / giant, recorded with the result

    def tuned(self, base_model: bytes, cfg: TrainingConfig) -> TrainJob:
        t = cfg.tuned
        return replace(self, base_model=base_model, tune={
            "freeze": list(t.freeze), "learning_rate": t.learning_rate, "max_epochs": t.max_epochs,
            "patience": t.patience, "min_rows": t.min_rows})

    @classmethod
    def from_config(cls, spec: DatasetSpec, cfg: TrainingConfig) -> TrainJob:
        params = {
            "hidden_units": tuple(cfg.hidden_units), "dropout": cfg.dropout,
            "max_embedding_dim": cfg.max_embedding_dim, "learning_rate": cfg.learning_rate,
            "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "max_epochs": cfg.max_epochs,
            "patience": cfg.patience, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
            "device": cfg.device,
        }
        return cls(label=spec.label, key=spec.entity_key, numeric=tuple(spec.numeric_features),
                   categorical=tuple(spec.categorical_features), task=spec.task,
                   event_time=spec.event_time, test_fraction=cfg.test_fraction, params=params,
                   torch_threads=cfg.torch_threads, retries=cfg.retries)

    def with_quotas(self, cfg: TrainingConfig, tenants: Iterable[str]) -> TrainJob:
        ids = list(tenants)
        return replace(self, quotas={t: cfg.quota(t) for t in ids},
                       time_quotas={t: cfg.seconds_quota(t) for t in ids})


def _short_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"[:1000]


def train_one_tenant(tenant_id: str, pdf: pd.DataFrame, job: TrainJob,
                     fitter: Fitter | None = None) -> dict[str, Any]:
    """Quota, holdout split, fit with early stopping, evaluate against a constant baseline.

    Never raises: a failure is retried ``job.retries`` times, then returned as status 'failed'.
    ``fitter`` replaces `fit_tabular` (giants train data-parallel through it).
    """
    from tenantml.models import primary_metric

    started = time.perf_counter()
    metric_name, _ = primary_metric(job.task)  # type: ignore[arg-type]
    max_rows, max_epochs = (job.quotas or {}).get(tenant_id, (None, int(job.params["max_epochs"])))
    row: dict[str, Any] = {"tenant_id": tenant_id, "rows": len(pdf), "metric_name": metric_name,
                           "sampled_from": None, "attempts": 0}
    for attempt in range(1, job.retries + 2):
        row["attempts"] = attempt
        try:
            _fit_and_evaluate(tenant_id, pdf, job, max_rows, max_epochs, attempt, row, fitter)
            break
        except Exception as exc:  # one tenant's failure is recorded, never propagated
            row.update(status="failed", error=_short_error(exc), train_rows=0, test_rows=0, metric=None,
                       baseline_metric=None, metrics_json=None, epochs=0, best_epoch=0, n_parameters=0,
                       model=None)
    row["seconds"] = time.perf_counter() - started
    row["finished_at"] = time.time()  # wall clock, so per-tenant latency can be measured across tasks
    return row


def _fit_and_evaluate(tenant_id: str, pdf: pd.DataFrame, job: TrainJob, max_rows: int | None,
                      max_epochs: int, attempt: int, row: dict[str, Any], fitter: Fitter | None = None) -> None:
    from tenantml.models import (
        FeatureSpec,
        TrainParams,
        baseline_predictions,
        evaluate,
        fit_tabular,
        stable_seed,
        tenant_split,
    )

    metric_name = row["metric_name"]
    seed = stable_seed(tenant_id, int(job.params["seed"]))
    # Quota sampling and the holdout come from the one function every strategy uses.
    train, test, sampled_from = tenant_split(pdf, tenant_id, job.key, test_fraction=job.test_fraction,
                                             seed=int(job.params["seed"]), event_time=job.event_time,
                                             max_rows=max_rows)
    row.update(sampled_from=sampled_from, rows=len(train) + len(test))
    spec = FeatureSpec(numeric=job.numeric, categorical=job.categorical, task=job.task)  # type: ignore[arg-type]
    # A retry changes only the optimisation seed, never the holdout, so metrics stay comparable.
    params = TrainParams(**{**job.params, "seed": seed + attempt - 1, "max_epochs": max_epochs,
                            "max_seconds": (job.time_quotas or {}).get(tenant_id)})
    if job.base_model is not None and job.tune is not None:
        from tenantml.models import TabularModel, fine_tune

        start = TabularModel.from_bytes(job.base_model)
        fit = fine_tune(start, train, job.label, freeze=job.tune["freeze"],
                        learning_rate=float(job.tune["learning_rate"]),
                        max_epochs=min(int(job.tune["max_epochs"]), max_epochs),
                        patience=int(job.tune["patience"]), batch_size=params.batch_size,
                        val_fraction=params.val_fraction, seed=params.seed, max_seconds=params.max_seconds)
    else:
        fit = (fitter or fit_tabular)(train, job.label, spec, params)
    y_test = test[job.label].to_numpy(dtype=np.float64)
    pred = fit.model.predict(test)
    base = baseline_predictions(train[job.label].to_numpy(dtype=np.float64), len(test), job.task)  # type: ignore[arg-type]
    metrics = evaluate(y_test, pred, job.task)  # type: ignore[arg-type]
    base_metrics = evaluate(y_test, base, job.task)  # type: ignore[arg-type]
    if not np.isfinite(pred).all():
        raise FloatingPointError(f"tenant {tenant_id!r}: model produced non-finite predictions (diverged)")
    row.update(
        status="ok", error=None, train_rows=len(train), test_rows=len(test),
        metric=float(metrics[metric_name]), baseline_metric=float(base_metrics[metric_name]),
        metrics_json=json.dumps({**metrics, **{f"baseline_{k}": v for k, v in base_metrics.items()},
                                 "best_val_loss": fit.best_val_loss,
                                 **({"time_quota_hit": 1.0} if fit.time_quota_hit else {})}),
        epochs=fit.epochs_run, best_epoch=fit.best_epoch, n_parameters=fit.model.n_parameters,
        model=fit.model.to_bytes(),
    )


def train_partition(batches: Iterable[pd.DataFrame], job: TrainJob) -> Iterator[pd.DataFrame]:
    """One Spark task: gather its tenants' rows, then train them one after another.

    Smallest tenants first (ties by id): the task's total time is the same, but small tenants,
    the many, finish early instead of waiting behind a big one (shortest-processing-time order).
    """
    import torch
    from pyspark import TaskContext

    torch.set_num_threads(job.torch_threads)
    frames = [b for b in batches if len(b)]
    if not frames:
        return
    context = TaskContext.get()
    pool = context.getLocalProperty(POOL_PROPERTY) if context is not None else None
    data = pd.concat(frames, ignore_index=True)
    groups = sorted(data.groupby("tenant_id", sort=True), key=lambda kv: (len(kv[1]), str(kv[0])))
    out = [{**train_one_tenant(str(t), g.drop(columns=[BIN_COL], errors="ignore").reset_index(drop=True), job),
            "tier": (job.tiers or {}).get(str(t)), "pool": pool, "path": "task"} for t, g in groups]
    yield pd.DataFrame(out, columns=RESULT_COLUMNS)


def partition_keys(spark: SparkSession, partitions: int) -> list[int]:
    """For each partition p, a key that Spark's hash partitioning sends to p.

    ``repartition(n, col)`` places a row by ``pmod(hash(col), n)``; packing bins onto these keys
    turns the plan into exactly one task per bin instead of hoping hashes don't collide.
    """
    from pyspark.sql import functions as F

    found: dict[int, int] = {}
    rows = (spark.range(0, 64 * partitions)
            .select("id", F.expr(f"pmod(hash(id), {int(partitions)})").alias("p")).collect())
    for r in rows:
        found.setdefault(int(r["p"]), int(r["id"]))
    missing = [p for p in range(partitions) if p not in found]
    if missing:
        raise RuntimeError(f"no hash key found for partitions {missing}")
    return [found[p] for p in range(partitions)]


def plan_tiers(row_counts: dict[str, int], cfg: TrainingConfig) -> dict[str, str]:
    """Each tenant's tier, judged on the rows it will train on (after its row quota)."""
    rows = {}
    for t, n in row_counts.items():
        max_rows, _ = cfg.quota(t)
        rows[t] = min(n, max_rows) if max_rows else n
    total = sum(rows.values())
    return {t: cfg.tier(t, n, total) for t, n in rows.items()}


def giants_go_distributed(cfg: TrainingConfig, giants: int, cores: int) -> bool:
    """Whether this job's giants train data-parallel after the other tiers (``giant_path``).

    ``auto``: a giant in its own task holds one core until it ends, leaving ``cores - giants`` to
    everyone else; past a third of the cores that slows the other tenants more than 1.5x (on 2
    cores one giant halves them), so the giants wait and then use every core.
    """
    if giants == 0 or cfg.tiers.giant_path == "task":
        return False
    if cfg.tiers.giant_path == "distributed":
        return True
    return cores > 1 and 3 * giants > cores  # one core: nothing to spread over


def train_tenant_models(spark: SparkSession, silver: DataFrame, row_counts: dict[str, int],
                        spec: DatasetSpec, cfg: TrainingConfig, parallelism: int | None = None,
                        base_model: bytes | None = None) -> pd.DataFrame:
    """Train every tenant in ``row_counts`` in parallel; returns one result row per tenant.

    Tenants are tiered (small / standard / giant). Each tier's tenants are packed into tasks of
    one Spark job that runs in the tier's FAIR pool, all tiers at once, so small tenants keep
    their share of the cores. Giants on the distributed path then train one after another,
    data-parallel across the cores. With ``base_model`` each tenant's model is that model
    fine-tuned on the tenant's rows (tuned-shared); tuned giants train in their own task.
    """
    if not row_counts:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    cores = parallelism or cfg.parallelism or spark.sparkContext.defaultParallelism
    tiers = plan_tiers(row_counts, cfg)
    job = TrainJob.from_config(spec, cfg).with_quotas(cfg, row_counts)
    job = replace(job, tiers=tiers)
    if base_model is not None:
        job = job.tuned(base_model, cfg)
    giants = sorted(t for t, tier in tiers.items() if tier == "giant" and base_model is None)
    distributed = giants if giants_go_distributed(cfg, len(giants), cores) else []
    groups: dict[str, dict[str, int]] = {}
    for t, n in row_counts.items():
        if t not in distributed:
            groups.setdefault(tiers[t], {})[t] = n
    frames = _run_tier_jobs(spark, silver, groups, spec, job, cores)
    if distributed:
        frames.append(_train_giants(spark, silver, {t: row_counts[t] for t in distributed}, spec, job, cfg, cores))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)


def _feature_columns(spec: DatasetSpec) -> list[str]:
    cols = ["tenant_id", spec.entity_key, spec.label, *spec.numeric_features, *spec.categorical_features]
    return [*cols, spec.event_time] if spec.event_time else cols


def _run_tier_jobs(spark: SparkSession, silver: DataFrame, groups: dict[str, dict[str, int]],
                   spec: DatasetSpec, job: TrainJob, cores: int) -> list[pd.DataFrame]:
    """One Spark job per tier, submitted together, each from its own thread in its own pool."""
    from concurrent.futures import ThreadPoolExecutor

    def run(tier: str) -> pd.DataFrame:
        sc = spark.sparkContext
        sc.setLocalProperty(POOL_PROPERTY, TIER_POOLS[tier])
        try:
            # Beside another tier's job, finer tasks let the scheduler hand a core that frees up to
            # whichever pool is due, instead of one long task per core per tier.
            return _train_packed(spark, silver, groups[tier], spec, job, cores, 1 if len(order) == 1 else 4)
        finally:
            sc.setLocalProperty(POOL_PROPERTY, None)  # type: ignore[arg-type]

    order = [t for t in ("small", "standard", "giant") if groups.get(t)]
    if len(order) == 1:
        return [run(order[0])]
    with ThreadPoolExecutor(max_workers=len(order), thread_name_prefix="tenantml-tier") as pool:
        return list(pool.map(run, order))


def _train_packed(spark: SparkSession, silver: DataFrame, row_counts: dict[str, int], spec: DatasetSpec,
                  job: TrainJob, cores: int, tasks_per_core: int = 1) -> pd.DataFrame:
    from pyspark.sql import functions as F

    bins = max(1, min(cores * tasks_per_core, len(row_counts)))
    plan = pack_tenants({t: float(n) for t, n in row_counts.items()}, bins)
    keys = partition_keys(spark, bins)
    plan_df = spark.createDataFrame(sorted((t, keys[b]) for t, b in plan.items()),
                                    f"tenant_id string, {BIN_COL} long")
    data = (silver.select(*[F.col(f"`{c}`") for c in _feature_columns(spec)])
            .join(F.broadcast(plan_df), on="tenant_id", how="inner")
            .repartition(bins, BIN_COL))
    result = data.mapInPandas(lambda it: train_partition(it, job), schema=RESULT_SCHEMA)
    return result.toPandas()


def _train_giants(spark: SparkSession, silver: DataFrame, giants: dict[str, int], spec: DatasetSpec,
                  job: TrainJob, cfg: TrainingConfig, cores: int) -> pd.DataFrame:
    """Giants after the other tiers, each data-parallel on all cores (its rows gathered once)."""
    from pyspark.sql import functions as F

    from tenantml.training.giants import train_giant

    processes = cfg.tiers.giant_processes or cores
    rows = []
    sc = spark.sparkContext
    sc.setLocalProperty(POOL_PROPERTY, TIER_POOLS["giant"])  # the gather (and any barrier job) too
    try:
        for tenant in sorted(giants, key=lambda t: (giants[t], t)):
            pdf = (silver.where(F.col("tenant_id") == F.lit(tenant))
                   .select(*[F.col(f"`{c}`") for c in _feature_columns(spec)]).toPandas())
            row = train_giant(tenant, pdf, job, cfg, processes)
            rows.append({**row, "tier": "giant", "pool": TIER_POOLS["giant"],
                         "path": f"distributed x{processes}"})
    finally:
        sc.setLocalProperty(POOL_PROPERTY, None)  # type: ignore[arg-type]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
