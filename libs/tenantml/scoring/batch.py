"""Distributed scoring: Arrow in and out, every tenant's rows of a batch in one batched forward pass.

Models travel with the data instead of in a broadcast (which Spark Connect does not have): each
tenant's model row (its bytes, read from `model_store` inside Spark) is put into every partition
that holds rows of that tenant, sorted before them. A task (`mapInArrow`) deserialises the models
it meets once, then scores each Arrow batch, all its tenants together, with a `BatchedScorer`
that gives every row its own tenant's weights and refuses a row whose tenant has no model here.
Per-tenant compute seconds come back as a column, not an accumulator.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tenantml.io.spark import local_frame

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

PREDICTION_SCHEMA = (
    "tenant_id string, entity_key string, batch_id string, prediction double, score double, model_name string, "
    "model_version string, strategy string, mlflow_run_id string, run_id string"
)
# What the Python workers return; the per-model constants are joined on in the JVM, which is
# cheaper than materialising them in every output batch. `_seconds` carries each tenant's compute
# time on one of its rows per output batch (0 elsewhere).
WORKER_SCHEMA = "tenant_id string, entity_key string, batch_id string, prediction double, score double, _seconds double"
SLICE_COL, IS_MODEL, BLOB = "_slice", "_is_model", "_model"


@dataclass(frozen=True)
class ServingModel:
    """What a task may use for one tenant: decided on the driver after the entitlement check."""

    tenant_id: str
    model_name: str
    model_version: str
    strategy: str
    mlflow_run_id: str | None


class ModelCache:
    """A task's models, read once each; counts loads so tests can prove 'once per task'.

    Tenants served by the same bytes (the shared model) share one model. Models are read as
    `ScoringModel` (weights and preprocessing statistics straight from the bytes, no nn.Module):
    a task may meet thousands and uses each only through the stacked scorer."""

    def __init__(self, device: str) -> None:
        self._device = device
        self.models: dict[str, Any] = {}
        self._by_blob: dict[bytes, Any] = {}
        self.loads = 0
        self._scorer: Any = None

    def add(self, tenant_id: str, blob: bytes) -> None:
        if tenant_id in self.models:
            return
        model = self._by_blob.get(blob)
        if model is None:
            from tenantml.models.batched import ScoringModel

            model = ScoringModel.from_bytes(blob)
            self._by_blob[blob] = model
            self.loads += 1
        self.models[tenant_id] = model
        self._scorer = None

    def scorer(self) -> Any:
        """The stacked scorer over every model met so far (rebuilt only after new models arrived)."""
        if self._scorer is None:
            from tenantml.models.batched import BatchedScorer

            self._scorer = BatchedScorer(self.models, device=self._device)
        return self._scorer


def score_arrow(batches: Iterable[pa.RecordBatch], *, key: str, features: list[str], task: str,
                device: str, threshold: float = 0.5, torch_threads: int = 1) -> Iterator[pa.RecordBatch]:
    """One task: model rows first (they sort before data rows), then data rows scored batch by batch,
    each batch's tenants together, Arrow in and out (no pandas, no per-tenant loop)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    torch.set_num_threads(torch_threads)
    cache = ModelCache(device)
    out_schema = pa.schema([("tenant_id", pa.string()), ("entity_key", pa.string()), ("batch_id", pa.string()),
                            ("prediction", pa.float64()), ("score", pa.float64()), ("_seconds", pa.float64())])
    for rb in batches:
        if rb.num_rows == 0:
            continue
        is_model = rb.column(IS_MODEL)
        models = rb.filter(pc.equal(is_model, 1))
        for tenant, blob in zip(models.column("tenant_id").to_pylist(), models.column(BLOB).to_pylist(), strict=True):
            cache.add(str(tenant), bytes(blob))
        data = rb.filter(pc.equal(is_model, 0))
        if data.num_rows == 0:
            continue
        started = time.perf_counter()
        # Only the declared features reach the models; KeyError for a row whose tenant has no model here.
        score = cache.scorer().predict_arrow(data.select(["tenant_id", *features]))
        pred = (score >= threshold).astype(np.float64) if task == "binary" else score
        seconds = time.perf_counter() - started
        # The batch's compute time, split over its tenants by rows, on each tenant's first row.
        codes = pc.dictionary_encode(data.column("tenant_id")).indices.to_numpy(zero_copy_only=False)
        counts = np.bincount(codes)
        first = np.unique(codes, return_index=True)[1]
        cost = np.zeros(data.num_rows)
        cost[first] = counts[codes[first]] / data.num_rows * seconds
        yield pa.RecordBatch.from_arrays(
            [data.column("tenant_id"), pc.cast(data.column(key), pa.string()), data.column("_batch_id"),
             pa.array(pred, pa.float64()), pa.array(score, pa.float64()),
             pa.array(cost, pa.float64())], schema=out_schema)


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


def with_slices(data: DataFrame, slices: dict[str, int], key: str) -> DataFrame:
    """``data`` with a `_slice` column: tenant t's rows hashed by entity key into ``slices[t]`` slices."""
    from pyspark.sql import functions as F

    spread = {t: n for t, n in slices.items() if n > 1}
    if not spread:
        return data.withColumn(SLICE_COL, F.lit(0).cast("long"))
    table = F.create_map(*[x for t, n in sorted(spread.items()) for x in (F.lit(t), F.lit(n))])
    n_slices = F.coalesce(F.element_at(table, F.col("tenant_id")), F.lit(1))
    return data.withColumn(SLICE_COL, F.pmod(F.xxhash64(F.col(f"`{key}`").cast("string")), n_slices).cast("long"))


def score_frame(data: DataFrame, model_rows: DataFrame, models: dict[str, ServingModel], *, key: str,
                features: list[str], task: str, run_id: str, device: str, partitions: int,
                slices: dict[str, int] | None = None) -> DataFrame:
    """Predictions for the rows of tenants in ``models`` (others are filtered out before any model is
    touched). ``model_rows`` holds (tenant_id, model bytes as `_model`) for exactly those tenants.

    Only tenant, key, batch id and ``features`` travel to the Python workers (labels and PII never
    do). Output: PREDICTION_SCHEMA plus `_seconds` (drop it before writing).
    """
    from pyspark.sql import functions as F

    spark = data.sparkSession
    scoped = (data.where(F.col("tenant_id").isin(list(models)))
              .select("tenant_id", F.col(f"`{key}`").alias(key), "_batch_id", *[F.col(f"`{c}`") for c in features]))
    rows = with_slices(scoped, slices or {}, key).withColumn(IS_MODEL, F.lit(0)).withColumn(BLOB, F.lit(None).cast("binary"))
    slice_df = local_frame(spark, [(t, s) for t in models for s in range((slices or {}).get(t, 1))],
                                     f"tenant_id string, {SLICE_COL} long")
    model_side = (model_rows.select("tenant_id", F.col(BLOB)).join(F.broadcast(slice_df), "tenant_id")
                  .withColumn(IS_MODEL, F.lit(1)))
    both = rows.unionByName(model_side, allowMissingColumns=True)
    ordered = both.repartition(partitions, "tenant_id", SLICE_COL).sortWithinPartitions(F.col(IS_MODEL).desc())

    def run(batches: Iterable[Any]) -> Iterator[Any]:
        return score_arrow(batches, key=key, features=features, task=task, device=_device(device))

    scored = ordered.mapInArrow(run, schema=WORKER_SCHEMA)
    meta = local_frame(spark,
        [(m.tenant_id, m.model_name, m.model_version, m.strategy, m.mlflow_run_id) for m in models.values()],
        "tenant_id string, model_name string, model_version string, strategy string, mlflow_run_id string")
    out = scored.join(F.broadcast(meta), on="tenant_id", how="inner").withColumn("run_id", F.lit(run_id))
    return out.select(*[c.split()[0] for c in PREDICTION_SCHEMA.split(", ")], "_seconds")


def _device(setting: str) -> str:
    from tenantml.models import resolve_device

    return resolve_device(setting)
