"""Judge every candidate model of a tenant on that tenant's one holdout, in Spark tasks.

The holdout comes from `tenant_split`, the function training used, so a tenant model, the shared
model, a tuned model and the current champion are all scored on exactly the same rows.

The models travel with the data, not in a broadcast (which Spark Connect does not have): each
tenant's rows are cogrouped with one row per model to evaluate for it (its id and bytes), so a
tenant's group holds all its rows and exactly its models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tenantml.config import DatasetSpec, TrainingConfig
from tenantml.io.spark import default_parallelism, local_frame
from tenantml.training.plan import row_quota

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from tenantml.models import TabularModel

MODELS_SCHEMA = "tenant_id string, model_id string, model binary"
EVAL_SCHEMA = ("tenant_id string, model_id string, metric_name string, metric double, "
               "baseline_metric double, holdout_rows long, metrics_json string, error string, profile_json string")


@dataclass(frozen=True)
class EvalJob:
    label: str
    key: str
    task: str
    event_time: str | None
    test_fraction: float
    seed: int
    quotas: dict[str, int | None]
    wanted: dict[str, tuple[str, ...]]  # tenant -> model ids to evaluate
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    profile_for: frozenset[str] = frozenset()  # model ids whose reference profile (tenant's train split) is wanted


def evaluate_partition(batches: Iterable[pd.DataFrame], job: EvalJob, blobs: dict[str, bytes]) -> Iterator[pd.DataFrame]:
    """One task: each tenant's holdout once, each model deserialised once per task."""
    frames = [b for b in batches if len(b)]
    if not frames:
        return
    data = pd.concat(frames, ignore_index=True)
    cache: dict[str, TabularModel] = {}
    out = [row for tenant, pdf in data.groupby("tenant_id", sort=True)
           for row in _evaluate_tenant(str(tenant), pdf.reset_index(drop=True), job, blobs, cache)]
    yield pd.DataFrame(out, columns=_EVAL_COLUMNS)


def evaluate_group(data: pd.DataFrame, models: pd.DataFrame, job: EvalJob,
                   cache: dict[str, TabularModel] | None = None) -> pd.DataFrame:
    """One tenant's cogroup: its rows and its models' rows (MODELS_SCHEMA). A model met before in
    the same task (``cache``) is not deserialised again."""
    if not len(data):
        return pd.DataFrame(columns=_EVAL_COLUMNS)
    blobs = {str(m): bytes(b) for m, b in zip(models["model_id"], models["model"], strict=True)}
    tenant = str(data["tenant_id"].iloc[0])
    return pd.DataFrame(_evaluate_tenant(tenant, data.reset_index(drop=True), job, blobs,
                                         {} if cache is None else cache), columns=_EVAL_COLUMNS)


_EVAL_COLUMNS = [c.split()[0] for c in EVAL_SCHEMA.split(", ")]


def _evaluate_tenant(tenant: str, pdf: pd.DataFrame, job: EvalJob, blobs: dict[str, bytes],
                     cache: dict[str, TabularModel]) -> list[dict[str, object]]:
    """The tenant's rows out of its holdout, one per wanted model, with the constant baseline's metric."""
    import torch

    from tenantml.models import TabularModel, baseline_predictions, evaluate, primary_metric, tenant_split

    torch.set_num_threads(1)
    metric_name, _ = primary_metric(job.task)  # type: ignore[arg-type]
    train, test, _ = tenant_split(pdf, tenant, job.key, test_fraction=job.test_fraction, seed=job.seed,
                                  event_time=job.event_time, max_rows=job.quotas.get(tenant))
    y = test[job.label].to_numpy(dtype=np.float64)
    base = evaluate(y, baseline_predictions(train[job.label].to_numpy(dtype=np.float64), len(test),
                                            job.task), job.task)  # type: ignore[arg-type]
    out: list[dict[str, object]] = []
    for model_id in job.wanted.get(tenant, ()):
        row: dict[str, object] = {"tenant_id": tenant, "model_id": model_id, "metric_name": metric_name,
                                  "baseline_metric": base.get(metric_name, math.nan), "holdout_rows": len(test),
                                  "metric": math.nan, "metrics_json": None, "error": None, "profile_json": None}
        try:
            if model_id not in cache:
                cache[model_id] = TabularModel.from_bytes(blobs[model_id])
            pred = cache[model_id].predict(test)
            metrics = evaluate(y, pred, job.task)  # type: ignore[arg-type]
            row.update(metric=float(metrics[metric_name]), metrics_json=json.dumps(metrics))
            if model_id in job.profile_for and len(train):
                from tenantml.monitoring import reference_profile

                row["profile_json"] = json.dumps(reference_profile(
                    train, list(job.numeric), list(job.categorical), scores=cache[model_id].predict(train),
                    task=job.task), allow_nan=False)
        except Exception as exc:  # a broken candidate loses, it does not stop the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        out.append(row)
    return out


def evaluate_candidates(spark: SparkSession, silver: DataFrame, spec: DatasetSpec, cfg: TrainingConfig,
                        wanted: dict[str, list[str]], blobs: dict[str, bytes],
                        profile_for: set[str] | None = None) -> pd.DataFrame:
    """One row per (tenant, model id) with the model's holdout metric and the constant baseline's."""
    from pyspark.sql import functions as F

    wanted = {t: ids for t, ids in wanted.items() if ids}
    if not wanted:
        return pd.DataFrame(columns=_EVAL_COLUMNS)
    job = EvalJob(label=spec.label, key=spec.entity_key, task=spec.task, event_time=spec.event_time,
                  test_fraction=cfg.test_fraction, seed=cfg.seed,
                  quotas={t: row_quota(cfg, t) for t in wanted}, wanted={t: tuple(v) for t, v in wanted.items()},
                  numeric=tuple(spec.numeric_features), categorical=tuple(spec.categorical_features),
                  profile_for=frozenset(profile_for or ()))
    cols = list(dict.fromkeys(["tenant_id", spec.entity_key, spec.label, *spec.feature_columns,
                               *([spec.event_time] if spec.event_time else [])]))
    # Both sides hash-partitioned alike: the cogroup adds no shuffle, and the explicit partition
    # count (not adaptive execution's coalescing) sets how many tasks evaluate at once.
    parts = max(1, min(default_parallelism(spark), len(wanted)))
    data = (silver.where(F.col("tenant_id").isin(list(wanted))).select(*[F.col(f"`{c}`") for c in cols])
            .repartition(parts, "tenant_id"))
    models = local_frame(spark, [(t, m, blobs[m]) for t, ids in sorted(wanted.items()) for m in ids],
                                   MODELS_SCHEMA).repartition(parts, "tenant_id")
    cache: dict[str, TabularModel] = {}  # each task unpickles its own copy of the function, and of this

    def per_tenant(pdf: pd.DataFrame, mdf: pd.DataFrame) -> pd.DataFrame:
        return evaluate_group(pdf, mdf, job, cache)

    result = data.groupBy("tenant_id").cogroup(models.groupBy("tenant_id")).applyInPandas(per_tenant,
                                                                                         schema=EVAL_SCHEMA)
    return result.toPandas()
