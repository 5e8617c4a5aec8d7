"""Distributed scoring with `mapInPandas`: Arrow batches stream through, models are cached per task.

Model bytes travel as one broadcast (tenant -> entitled champion); a task deserialises a tenant's
model the first time it meets that tenant and reuses it for every later batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pyspark.accumulators import Accumulator, AccumulatorParam
    from pyspark.sql import DataFrame, SparkSession

PREDICTION_SCHEMA = (
    "tenant_id string, entity_key string, prediction double, score double, model_name string, "
    "model_version string, strategy string, mlflow_run_id string, run_id string"
)
# What the Python workers return; the per-model constants are joined on in the JVM, which is
# cheaper than materialising them in every pandas output frame.
WORKER_SCHEMA = "tenant_id string, entity_key string, prediction double, score double"


@dataclass(frozen=True)
class ServingModel:
    """What a task may use for one tenant: decided on the driver after the entitlement check."""

    tenant_id: str
    model_name: str
    model_version: str
    strategy: str
    mlflow_run_id: str
    blob: bytes


class ModelCache:
    """Per-task cache; counts loads so tests can prove 'once per task, never per batch'.

    Tenants whose ServingModels share one bytes object (many tenants served by the shared model)
    share one deserialised model too.
    """

    def __init__(self, models: dict[str, ServingModel], device: str) -> None:
        self._models = models
        self._device = device
        self._loaded: dict[str, Any] = {}
        self._by_blob: dict[int, Any] = {}
        self.loads = 0

    def get(self, tenant_id: str) -> tuple[ServingModel, Any]:
        meta = self._models.get(tenant_id)
        if meta is None:
            raise PermissionError(f"tenant {tenant_id!r} has no entitled model in this scoring run")
        if tenant_id not in self._loaded:
            model = self._by_blob.get(id(meta.blob))
            if model is None:
                from tenantml.models import TabularModel

                model = TabularModel.from_bytes(meta.blob, device=self._device)
                self._by_blob[id(meta.blob)] = model
                self.loads += 1
            self._loaded[tenant_id] = model
        return meta, self._loaded[tenant_id]


def score_batches(batches: Iterable[pd.DataFrame], cache: ModelCache, key: str, task: str,
                  run_id: str, threshold: float = 0.5, costs: dict[str, float] | None = None,
                  lean: bool = False) -> Iterator[pd.DataFrame]:
    """Score tenant by tenant within each Arrow batch; ``costs`` collects seconds per tenant.

    ``lean`` yields only tenant, key, prediction and score (WORKER_SCHEMA).
    """
    import time

    for batch in batches:
        for tenant_id, rows in batch.groupby("tenant_id", sort=False):
            started = time.perf_counter()
            meta, model = cache.get(str(tenant_id))
            # The model reads only its own features; tenant id and key never reach it.
            score = model.predict(rows)
            if costs is not None:
                costs[str(tenant_id)] = costs.get(str(tenant_id), 0.0) + time.perf_counter() - started
            pred = (score >= threshold).astype(np.float64) if task == "binary" else score
            out = {"tenant_id": str(tenant_id), "entity_key": rows[key].astype(str).to_numpy(),
                   "prediction": pred, "score": score.astype(np.float64)}
            if not lean:
                out.update(model_name=meta.model_name, model_version=meta.model_version,
                           strategy=meta.strategy, mlflow_run_id=meta.mlflow_run_id, run_id=run_id)
            yield pd.DataFrame(out)


def dict_sum_param() -> AccumulatorParam[dict[str, float]]:
    """A Spark accumulator summing per-tenant seconds across tasks."""
    from pyspark.accumulators import AccumulatorParam

    class DictSum(AccumulatorParam[dict[str, float]]):
        def zero(self, value: dict[str, float]) -> dict[str, float]:
            return {}

        def addInPlace(self, a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            for k, v in b.items():
                a[k] = a.get(k, 0.0) + v
            return a

    return DictSum()


SLICE_COL = "_slice"


def scoring_slices(rows: dict[str, int], partitions: int, concurrency: dict[str, int | None],
                   default_concurrency: int | None, rows_per_slice: int) -> dict[str, int]:
    """How many scoring tasks each tenant's rows spread over: its concurrency quota.

    A tenant stays in one task (one model load) until it has ``rows_per_slice`` rows; above that
    it spreads over more, but never over more than its quota, by default half the tasks, so one
    giant tenant cannot hold every core while the others queue.
    """
    default = default_concurrency or max(1, partitions // 2)
    out: dict[str, int] = {}
    for tenant, n in rows.items():
        quota = concurrency.get(tenant) or default
        wanted = max(1, -(-int(n) // rows_per_slice))
        out[tenant] = max(1, min(quota, wanted, partitions))
    return out


def slice_frame(data: DataFrame, slices: dict[str, int], key: str, partitions: int) -> DataFrame:
    """Repartition so that tenant t's rows land in at most ``slices[t]`` partitions."""
    from pyspark.sql import functions as F

    spread = {t: n for t, n in slices.items() if n > 1}
    if not spread:
        return data.repartition(partitions, "tenant_id")
    table = F.create_map(*[x for t, n in sorted(spread.items()) for x in (F.lit(t), F.lit(n))])
    n_slices = F.coalesce(F.element_at(table, F.col("tenant_id")), F.lit(1))
    sliced = data.withColumn(SLICE_COL, F.pmod(F.xxhash64(F.col(f"`{key}`").cast("string")), n_slices))
    return sliced.repartition(partitions, "tenant_id", SLICE_COL).drop(SLICE_COL)


def score_frame(spark: SparkSession, data: DataFrame, models: dict[str, ServingModel], *, key: str,
                task: str, run_id: str, device: str, partitions: int,
                cost_accumulator: Accumulator[dict[str, float]] | None = None,
                features: list[str] | None = None, slices: dict[str, int] | None = None) -> DataFrame:
    """Rows of tenants in ``models`` only; others are filtered out before any model is touched.

    Only tenant, key and ``features`` travel to the Python workers (labels and PII never do).
    With ``cost_accumulator`` each task adds the seconds it spent per tenant once it finishes.
    ``slices`` (from `scoring_slices`) caps the tasks each tenant's rows spread over; without it
    every tenant's rows stay in one task.
    """
    from pyspark.sql import functions as F

    bmodels = spark.sparkContext.broadcast(models)

    def run(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import torch

        from tenantml.models import resolve_device

        torch.set_num_threads(1)
        cache = ModelCache(bmodels.value, resolve_device(device))
        costs: dict[str, float] = {}
        yield from score_batches(batches, cache, key, task, run_id, costs=costs, lean=True)
        if cost_accumulator is not None:
            cost_accumulator.add(costs)

    scoped = data.where(F.col("tenant_id").isin(list(models)))
    if features is not None:
        scoped = scoped.select("tenant_id", F.col(f"`{key}`"), *[F.col(f"`{c}`") for c in features])
    meta = spark.createDataFrame(
        [(m.tenant_id, m.model_name, m.model_version, m.strategy, m.mlflow_run_id) for m in models.values()],
        "tenant_id string, model_name string, model_version string, strategy string, mlflow_run_id string")
    scored = slice_frame(scoped, slices or {}, key, partitions).mapInPandas(run, schema=WORKER_SCHEMA)
    out = scored.join(F.broadcast(meta), on="tenant_id", how="inner").withColumn("run_id", F.lit(run_id))
    return out.select(*[c.split()[0] for c in PREDICTION_SCHEMA.split(", ")])
