"""Every benchmark in bench/ runs in its quick mode, so none can rot between the runs that record figures.

Each one is run as a user runs it (its own process, `--quick --json`) and must exit 0 and print its
figures as JSON with at least one finite number. Times are never asserted: the figures' meaning is
the benchmark's own business (ratios against a baseline measured in the same run); this only proves
the code path still works against today's library.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # three small pipelines for bench_scale

REPO = Path(__file__).resolve().parents[2]
BENCHES = sorted(p.name for p in (REPO / "bench").glob("bench_*.py"))
# Smaller still than --quick for the benchmarks that run whole pipelines or several training jobs:
# the point here is that every code path still runs, not the figures.
SMOKE_ARGS = {
    "bench_production_loop.py": ["--tenants", "6", "--largest", "300", "--smallest", "120"],
    "bench_scale.py": ["--sizes", "4,8", "--largest", "300", "--smallest", "120", "--max-epochs", "2"],
    "bench_tenant_models.py": ["--tenants", "12", "--rows", "300", "--score-rows", "6000"],
    "bench_tracking.py": ["--tenants", "20"],
    "bench_shared_models.py": ["--tenants", "6", "--largest", "1200", "--epochs", "1"],
    "bench_noisy_neighbour.py": ["--small", "4", "--rows", "200", "--epochs", "2"],
    "bench_table_layout.py": ["--tenants", "8", "--rows", "5", "--batches", "2"],
}


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def test_every_benchmark_is_covered() -> None:
    # A new benchmark is picked up by the glob; this guards against the folder being moved or emptied.
    assert len(BENCHES) >= 8, BENCHES


@pytest.mark.parametrize("bench", BENCHES)
def test_benchmark_runs_in_quick_mode(bench: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "libs"), str(REPO / "tools")]),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / bench), "--quick", "--json", *SMOKE_ARGS.get(bench, [])],
                          cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{bench} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    figures = json.loads(proc.stdout)
    numbers = _numbers(figures)
    assert numbers and all(math.isfinite(n) for n in numbers), figures
