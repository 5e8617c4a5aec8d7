"""Training plans: built once on the driver from config, shipped to the workers as typed objects.

The config is data; this module is where its training rules apply: per-tenant quotas (rows, epochs,
seconds), tiers (small / standard / giant), the giant path, and skew-aware packing of tenants
into tasks. What a worker receives is a frozen :class:`TrainingPlan`, and MLflow logs that plan
(:meth:`TrainingPlan.to_params`), so what was logged is what was run.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from tenantml.config import DatasetSpec, TrainingConfig
from tenantml.models import FeatureSpec, TrainParams

Tier = Literal["small", "standard", "giant"]
TIER_POOLS = {"small": "tenantml-small", "standard": "tenantml-standard", "giant": "tenantml-giant"}


# --------------------------------------------------------------------------- per-tenant rules


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's quotas: its own `training.tenant_quotas` entry, else the platform defaults."""

    max_rows: int | None
    max_epochs: int
    max_seconds: float | None
    tier: Tier | None = None                 # an explicit tier overrides the one from rows
    scoring_concurrency: int | None = None


def tenant_limits(cfg: TrainingConfig, tenant_id: str) -> TenantLimits:
    q = cfg.tenant_quotas.get(tenant_id)
    return TenantLimits(
        max_rows=q.max_rows if q and q.max_rows is not None else cfg.max_rows_per_tenant,
        max_epochs=q.max_epochs if q and q.max_epochs is not None else cfg.max_epochs,
        max_seconds=q.max_seconds if q and q.max_seconds is not None else cfg.max_seconds_per_tenant,
        tier=q.tier if q else None,
        scoring_concurrency=q.scoring_concurrency if q else None,
    )


def row_quota(cfg: TrainingConfig, tenant_id: str) -> int | None:
    """Rows a tenant trains on at most (the rest are sampled away, seeded)."""
    return tenant_limits(cfg, tenant_id).max_rows


def tier_of(cfg: TrainingConfig, tenant_id: str, rows: int, total_rows: int) -> Tier:
    """small / standard / giant: the tenant's own setting, else by its share of the job's rows.

    A giant is big in absolute terms AND holds a large share of the job's rows: only then does its
    one task outlast everything the other cores can do (a big tenant among bigger ones packs fine).
    """
    explicit = tenant_limits(cfg, tenant_id).tier
    if explicit:
        return explicit
    if rows >= cfg.tiers.giant_min_rows and rows >= cfg.tiers.giant_share * total_rows:
        return "giant"
    return "small" if rows < cfg.tiers.small_max_rows else "standard"


def plan_tiers(row_counts: Mapping[str, int], cfg: TrainingConfig) -> dict[str, Tier]:
    """Each tenant's tier, judged on the rows it will train on (after its row quota)."""
    rows = {}
    for t, n in row_counts.items():
        cap = row_quota(cfg, t)
        rows[t] = min(n, cap) if cap else n
    total = sum(rows.values())
    return {t: tier_of(cfg, t, n, total) for t, n in rows.items()}


def giant_plan_estimates(cfg: TrainingConfig, giant_rows: Sequence[int], other_rows: int,
                         cores: int) -> dict[str, float]:
    """Estimated job wall time of each giant plan, in row-epochs per core (training cost grows with rows).

    ``task``: every giant holds one core, everyone else packs around it (longest-first packing keeps
    the makespan near ``max(largest giant, all rows / cores)``). ``distributed``: the other tenants
    on every core first, then each giant data-parallel on ``giant_processes`` processes at
    ``tiers.data_parallel_efficiency`` (wall-time speedup over one process = processes x efficiency;
    on CPU, launch and all-reduce make it < 1 on 2 cores: the measured 0.37 in docs/benchmarks.md).
    """
    giants = [max(int(r), 0) for r in giant_rows]
    if not giants:
        return {"task": other_rows / max(cores, 1), "distributed": other_rows / max(cores, 1)}
    cores = max(cores, 1)
    task = max(max(giants), (sum(giants) + max(other_rows, 0)) / cores)
    processes = cfg.tiers.giant_processes or cores
    speedup = max(processes * cfg.tiers.data_parallel_efficiency, 1e-9)
    distributed = max(other_rows, 0) / cores + sum(g / speedup for g in giants)
    return {"task": float(task), "distributed": float(distributed)}


def giants_go_distributed(cfg: TrainingConfig, giants: int, cores: int,
                          giant_rows: Sequence[int] | None = None, other_rows: int = 0) -> bool:
    """Whether this job's giants train data-parallel after the other tiers (``giant_path``).

    ``auto`` picks the plan with the lower estimated job wall time (`giant_plan_estimates`, ties to
    ``task``, the cheaper in compute); on one core there is nothing to spread over. Without row
    counts every giant is taken to hold half the job's rows (the benchmark's case).
    """
    if giants == 0 or cfg.tiers.giant_path == "task":
        return False
    if cfg.tiers.giant_path == "distributed":
        return True
    if cores <= 1:
        return False
    rows = list(giant_rows) if giant_rows is not None else [1] * giants
    other = other_rows if giant_rows is not None else giants
    est = giant_plan_estimates(cfg, rows, other, cores)
    return est["distributed"] < est["task"]


# --------------------------------------------------------------------------- packing


def pack_tenants(costs: Mapping[str, float], bins: int) -> dict[str, int]:
    """Longest-processing-time-first packing: tiny tenants share tasks, giants get their own.

    LPT keeps the makespan within 4/3 of optimal, so one huge tenant cannot leave the other
    cores idle while many small tenants queue behind it.
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    heap: list[tuple[float, int]] = [(0.0, b) for b in range(bins)]
    heapq.heapify(heap)
    assignment: dict[str, int] = {}
    for tenant, cost in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        load, b = heapq.heappop(heap)
        assignment[tenant] = b
        heapq.heappush(heap, (load + max(cost, 0.0), b))
    return assignment


def bin_loads(costs: Mapping[str, float], assignment: Mapping[str, int]) -> dict[int, float]:
    loads: dict[int, float] = {}
    for tenant, b in assignment.items():
        loads[b] = loads.get(b, 0.0) + costs[tenant]
    return loads


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TenantPlan:
    """One tenant's part of a training job."""

    rows: int
    tier: Tier
    max_rows: int | None
    max_epochs: int
    max_seconds: float | None


@dataclass(frozen=True)
class TunePlan:
    """Tuned-shared: fine-tune this base model (the shared champion) instead of training from scratch."""

    base_name: str
    base_version: str
    freeze: tuple[str, ...]
    learning_rate: float
    max_epochs: int
    patience: int
    min_rows: int


@dataclass(frozen=True)
class TrainingPlan:
    """Everything a training worker needs, typed; built once, shipped once per task."""

    strategy: str
    label: str
    key: str
    features: FeatureSpec
    event_time: str | None
    test_fraction: float
    seed: int
    retries: int
    torch_threads: int
    params: TrainParams
    tenants: Mapping[str, TenantPlan] = field(default_factory=dict)
    tune: TunePlan | None = None
    batched: bool = False                 # train a task's non-giant tenants as stacked groups
    batched_group_size: int | None = None  # tenants per group (None: the device's default)

    @classmethod
    def build(cls, spec: DatasetSpec, cfg: TrainingConfig, row_counts: Mapping[str, int], *,
              strategy: str = "tenant", tune_base: tuple[str, str] | None = None) -> TrainingPlan:
        """The plan for ``row_counts``' tenants; ``tune_base`` (name, version) makes it a tuned plan."""
        params = TrainParams(
            hidden_units=tuple(cfg.hidden_units), dropout=cfg.dropout, max_embedding_dim=cfg.max_embedding_dim,
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
            max_epochs=cfg.max_epochs, patience=cfg.patience, val_fraction=cfg.val_fraction, seed=cfg.seed,
            device=cfg.device)
        tiers = plan_tiers(row_counts, cfg)
        tenants = {}
        for t, n in row_counts.items():
            lim = tenant_limits(cfg, t)
            tenants[t] = TenantPlan(rows=int(n), tier=tiers[t], max_rows=lim.max_rows, max_epochs=lim.max_epochs,
                                    max_seconds=lim.max_seconds)
        tune = None
        if tune_base is not None:
            tc = cfg.tuned
            tune = TunePlan(base_name=tune_base[0], base_version=tune_base[1], freeze=tuple(tc.freeze),
                            learning_rate=tc.learning_rate, max_epochs=tc.max_epochs, patience=tc.patience,
                            min_rows=tc.min_rows)
        return cls(strategy=strategy, label=spec.label, key=spec.entity_key,
                   features=FeatureSpec(tuple(spec.numeric_features), tuple(spec.categorical_features), spec.task),
                   event_time=spec.event_time, test_fraction=cfg.test_fraction, seed=cfg.seed, retries=cfg.retries,
                   torch_threads=cfg.torch_threads, params=params, tenants=tenants, tune=tune,
                   batched=cfg.batched, batched_group_size=cfg.batched_group_size)

    @property
    def task(self) -> str:
        return self.features.task

    def only(self, tenants: Iterable[str]) -> TrainingPlan:
        """The same plan restricted to some tenants (e.g. one tier's job)."""
        keep = set(tenants)
        return replace(self, tenants={t: p for t, p in self.tenants.items() if t in keep})

    def tenant(self, tenant_id: str) -> TenantPlan:
        return self.tenants[tenant_id]

    def to_params(self) -> dict[str, str]:
        """The plan as MLflow params: job-wide settings, and the tenants' quotas where they differ
        from the defaults (one param, JSON), so the logged plan is the plan that ran."""
        out: dict[str, Any] = {
            "strategy": self.strategy, "task": self.task, "label": self.label, "entity_key": self.key,
            "numeric_features": list(self.features.numeric), "categorical_features": list(self.features.categorical),
            "event_time": self.event_time, "test_fraction": self.test_fraction, "seed": self.seed,
            "retries": self.retries, "torch_threads": self.torch_threads, "tenants_planned": len(self.tenants),
            "batched": self.batched, "batched_group_size": self.batched_group_size,
            **{f"train_{k}": v for k, v in self.params.to_dict().items()},
        }
        if self.tune is not None:
            out.update({f"tuned_{k}": v for k, v in asdict(self.tune).items()})
        tiers: dict[str, int] = {}
        for p in self.tenants.values():
            tiers[p.tier] = tiers.get(p.tier, 0) + 1
        out["tiers"] = tiers
        special = {t: {"max_rows": p.max_rows, "max_epochs": p.max_epochs, "max_seconds": p.max_seconds}
                   for t, p in sorted(self.tenants.items())
                   if (p.max_rows, p.max_epochs, p.max_seconds) != (None, self.params.max_epochs, None)}
        if special:
            out["tenant_quotas"] = special
        return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in out.items()}
