"""Tenant-specific models: one torch model per tenant, many tenants per Spark task.

The worker side (`train_partition`) is plain pandas + torch so it can be tested and benchmarked
without Spark; `train_tenant_models` wires it into `mapInPandas` over a packed partitioning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import pandas as pd

from tenantml.config import DatasetSpec, TrainingConfig
from tenantml.io.spark import default_parallelism, local_frame, scheduler_pool
from tenantml.models.batched import group_size
from tenantml.training.fit import (
    RESULT_COLUMNS,
    RESULT_SCHEMA,
    train_one_tenant,
    train_tenants_batched,
    training_device,
)
from tenantml.training.plan import TIER_POOLS, TrainingPlan, giants_go_distributed, pack_tenants

if TYPE_CHECKING:
    from pathlib import Path

    from pyspark.sql import DataFrame, SparkSession

BIN_COL = "_task_bin"
POOL_PROPERTY = "spark.scheduler.pool"


def train_partition(batches: Iterable[pd.DataFrame], plan: TrainingPlan,
                    base_model: bytes | None = None) -> Iterator[pd.DataFrame]:
    """One Spark task: gather its tenants' rows, then train them, smallest first.

    Smallest tenants first (ties by id): the task's total time is the same, but small tenants,
    the many, finish early instead of waiting behind a big one (shortest-processing-time order).
    With ``plan.batched`` the non-giant tenants train in groups of up to ``batched_group_size``
    stacked networks (`train_tenants_batched`: per-tenant split, seed, quotas and evaluation as
    alone, a failed tenant retrained alone), each group's rows yielded as soon as it is done;
    giants, and every tenant when batching is off, train one after another (`train_one_tenant`).
    """
    import torch
    from pyspark import TaskContext

    torch.set_num_threads(plan.torch_threads)
    frames = [b for b in batches if len(b)]
    if not frames:
        return
    context = TaskContext.get()
    pool = context.getLocalProperty(POOL_PROPERTY) if context is not None else None
    data = pd.concat(frames, ignore_index=True)
    groups = [(str(t), g.drop(columns=[BIN_COL], errors="ignore").reset_index(drop=True))
              for t, g in sorted(data.groupby("tenant_id", sort=True), key=lambda kv: (len(kv[1]), str(kv[0])))]
    del data, frames

    def tier(t: str) -> str | None:
        return plan.tenants[t].tier if t in plan.tenants else None

    def rows_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
        return pd.DataFrame([{**r, "tier": tier(str(r["tenant_id"])), "pool": pool, "path": r.get("path", "task")}
                             for r in rows], columns=RESULT_COLUMNS)

    batchable = [(t, g) for t, g in groups if plan.batched and tier(t) != "giant"]
    alone = [(t, g) for t, g in groups if not (plan.batched and tier(t) != "giant")]
    if batchable:
        size = group_size(plan.batched_group_size, training_device(plan.params.device))
        for start in range(0, len(batchable), size):
            yield rows_frame(train_tenants_batched(batchable[start:start + size], plan, base_model))
    for t, g in alone:
        yield rows_frame([train_one_tenant(t, g, plan, base_model)])


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


def train_tenant_models(spark: SparkSession, silver: DataFrame, plan: TrainingPlan, spec: DatasetSpec,
                        cfg: TrainingConfig, parallelism: int | None = None,
                        base_model: bytes | None = None, staging_dir: Path | None = None) -> pd.DataFrame:
    """Train every tenant of ``plan`` in parallel; returns one result row per tenant.

    Tenants are tiered (small / standard / giant). Each tier's tenants are packed into tasks of
    one Spark job that runs in the tier's FAIR pool, all tiers at once, so small tenants keep
    their share of the cores. Giants on the distributed path then train one after another,
    data-parallel across the cores. With ``base_model`` (a tuned plan) each tenant's model is that
    model fine-tuned on the tenant's rows; tuned giants train in their own task. Giants on the
    distributed path keep their shards and checkpoints in ``staging_dir`` (`train_giant`).
    """
    if not plan.tenants:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    cores = parallelism or cfg.parallelism or default_parallelism(spark)
    giants = sorted(t for t, p in plan.tenants.items() if p.tier == "giant" and base_model is None)
    giant_rows = [plan.tenants[t].rows for t in giants]
    other_rows = sum(p.rows for t, p in plan.tenants.items() if t not in giants)
    distributed = giants if giants_go_distributed(cfg, len(giants), cores, giant_rows, other_rows) else []
    groups: dict[str, dict[str, int]] = {}
    for t, p in plan.tenants.items():
        if t not in distributed:
            groups.setdefault(p.tier, {})[t] = p.rows
    frames = _run_tier_jobs(spark, silver, groups, spec, plan, cores, base_model)
    if distributed:
        frames.append(_train_giants(spark, silver, distributed, spec, plan, cfg, cores, staging_dir))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)


def _feature_columns(spec: DatasetSpec) -> list[str]:
    cols = ["tenant_id", spec.entity_key, spec.label, *spec.numeric_features, *spec.categorical_features]
    return [*cols, spec.event_time] if spec.event_time else cols


def _run_tier_jobs(spark: SparkSession, silver: DataFrame, groups: dict[str, dict[str, int]],
                   spec: DatasetSpec, plan: TrainingPlan, cores: int,
                   base_model: bytes | None) -> list[pd.DataFrame]:
    """One Spark job per tier, submitted together, each from its own thread in its own pool."""
    from concurrent.futures import ThreadPoolExecutor

    def run(tier: str) -> pd.DataFrame:
        with scheduler_pool(spark, TIER_POOLS[tier]):
            # Beside another tier's job, finer tasks let the scheduler hand a core that frees up to
            # whichever pool is due, instead of one long task per core per tier.
            return _train_packed(spark, silver, groups[tier], spec, plan.only(groups[tier]), cores,
                                 1 if len(order) == 1 else 4, base_model)

    order = [t for t in ("small", "standard", "giant") if groups.get(t)]
    if len(order) == 1:
        return [run(order[0])]
    with ThreadPoolExecutor(max_workers=len(order), thread_name_prefix="tenantml-tier") as pool:
        return list(pool.map(run, order))


def _train_packed(spark: SparkSession, silver: DataFrame, row_counts: dict[str, int], spec: DatasetSpec,
                  plan: TrainingPlan, cores: int, tasks_per_core: int = 1,
                  base_model: bytes | None = None) -> pd.DataFrame:
    from pyspark.sql import functions as F

    bins = max(1, min(cores * tasks_per_core, len(row_counts)))
    packing = pack_tenants({t: float(n) for t, n in row_counts.items()}, bins)
    keys = partition_keys(spark, bins)
    plan_df = local_frame(spark, sorted((t, keys[b]) for t, b in packing.items()),
                                    f"tenant_id string, {BIN_COL} long")
    data = (silver.select(*[F.col(f"`{c}`") for c in _feature_columns(spec)])
            .join(F.broadcast(plan_df), on="tenant_id", how="inner")
            .repartition(bins, BIN_COL))
    result = data.mapInPandas(lambda it: train_partition(it, plan, base_model), schema=RESULT_SCHEMA)
    return result.toPandas()


def _train_giants(spark: SparkSession, silver: DataFrame, giants: list[str], spec: DatasetSpec,
                  plan: TrainingPlan, cfg: TrainingConfig, cores: int,
                  staging_dir: Path | None = None) -> pd.DataFrame:
    """Giants after the other tiers, each data-parallel on all cores (its rows gathered once)."""
    from pyspark.sql import functions as F

    from tenantml.training.giants import train_giant

    processes = cfg.tiers.giant_processes or cores
    rows = []
    with scheduler_pool(spark, TIER_POOLS["giant"]):  # the gather (and any barrier job) too
        for tenant in sorted(giants, key=lambda t: (plan.tenants[t].rows, t)):
            pdf = (silver.where(F.col("tenant_id") == F.lit(tenant))
                   .select(*[F.col(f"`{c}`") for c in _feature_columns(spec)]).toPandas())
            row = train_giant(tenant, pdf, plan, cfg, processes, staging_dir)
            rows.append({**row, "tier": "giant", "pool": TIER_POOLS["giant"],
                         "path": f"distributed x{processes}"})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
