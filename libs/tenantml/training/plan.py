"""Skew-aware assignment of tenants to training tasks (no Spark here, so it is unit-testable)."""

from __future__ import annotations

import heapq
from collections.abc import Mapping


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
