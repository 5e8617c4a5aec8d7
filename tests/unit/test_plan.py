"""The training plan packs tiny tenants together and gives giants their own task."""

from __future__ import annotations

from tenantml.training.plan import bin_loads, pack_tenants


def test_giant_gets_its_own_bin_and_small_ones_share() -> None:
    costs = {"giant": 1000.0, **{f"s{i}": 10.0 for i in range(50)}}
    plan = pack_tenants(costs, 2)
    giant_bin = plan["giant"]
    assert all(b != giant_bin for t, b in plan.items() if t != "giant")
    loads = bin_loads(costs, plan)
    assert sorted(loads.values()) == [500.0, 1000.0]


def test_makespan_close_to_balanced() -> None:
    costs = {f"t{i}": float(n) for i, n in enumerate(range(1, 200))}
    loads = bin_loads(costs, pack_tenants(costs, 4))
    assert max(loads.values()) <= sum(costs.values()) / 4 * 1.05


def test_every_tenant_assigned_once_and_deterministic() -> None:
    costs = {f"t{i}": float(i % 7) for i in range(30)}
    a, b = pack_tenants(costs, 3), pack_tenants(dict(reversed(list(costs.items()))), 3)
    assert a == b and set(a) == set(costs) and set(a.values()) <= {0, 1, 2}


def test_tiers_by_share_of_the_job_and_after_row_quota() -> None:
    from tenantml.config import TenantQuota, TierConfig, TrainingConfig
    from tenantml.training.plan import plan_tiers

    cfg = TrainingConfig(tiers=TierConfig(small_max_rows=1_000, giant_min_rows=50_000, giant_share=0.25),
                         tenant_quotas={"capped": TenantQuota(max_rows=10_000), "vip": TenantQuota(tier="giant")})
    rows = {"huge": 120_000, "big": 60_000, "capped": 200_000, "mid": 5_000, "tiny": 200, "vip": 300}
    tiers = plan_tiers(rows, cfg)
    # 120k of ~195k rows (61%) and 60k (31%) are giants; "capped" is judged on its 10k quota rows.
    assert tiers == {"huge": "giant", "big": "giant", "capped": "standard", "mid": "standard",
                     "tiny": "small", "vip": "giant"}
    # The same 60k tenant among much bigger ones packs fine: not a giant.
    assert plan_tiers({"big": 60_000, **{f"o{i}": 100_000 for i in range(10)}}, cfg)["big"] == "standard"


def test_tier_thresholds_must_be_ordered() -> None:
    import pytest
    from pydantic import ValidationError

    from tenantml.config import TierConfig

    with pytest.raises(ValidationError, match="giant_min_rows"):
        TierConfig(small_max_rows=10_000, giant_min_rows=5_000)


def test_auto_giant_path_picks_the_plan_with_the_lower_estimated_wall_time() -> None:
    from tenantml.config import TierConfig, TrainingConfig
    from tenantml.training.plan import giant_plan_estimates, giants_go_distributed

    auto = TrainingConfig()
    assert auto.tiers.giant_path == "auto"
    # 2 CPU cores at the measured efficiency: data-parallel is slower than one process, so the giant
    # keeps its own task (the benchmark's case: half of all rows in one tenant).
    est = giant_plan_estimates(auto, [60_000], 60_000, cores=2)
    assert est == {"task": 60_000.0, "distributed": 30_000 + 60_000 / (2 * 0.37)}
    assert not giants_go_distributed(auto, giants=1, cores=2, giant_rows=[60_000], other_rows=60_000)
    assert not giants_go_distributed(auto, giants=1, cores=2)  # no rows given: the same case
    # Efficient data parallelism (a GPU cluster) on 8 cores: the giant's one task would be the makespan.
    fast = TrainingConfig(tiers=TierConfig(data_parallel_efficiency=0.9))
    assert giants_go_distributed(fast, giants=1, cores=8, giant_rows=[60_000], other_rows=60_000)
    # ... but not when the giant is small next to everyone else: the task plan already packs well.
    assert not giants_go_distributed(fast, giants=1, cores=8, giant_rows=[60_000], other_rows=1_000_000)
    assert not giants_go_distributed(auto, giants=0, cores=2)
    assert not giants_go_distributed(fast, giants=1, cores=1, giant_rows=[60_000], other_rows=0)
    forced = {p: TrainingConfig(tiers=TierConfig(giant_path=p)) for p in ("task", "distributed")}
    assert not giants_go_distributed(forced["task"], giants=2, cores=2)
    assert giants_go_distributed(forced["distributed"], giants=1, cores=16)
