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
