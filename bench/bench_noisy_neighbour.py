#!/usr/bin/env python
"""Benchmark (not a test): one giant tenant among many small ones, measured in the same run.

One tenant holds half of all training rows. Two figures, each against its target:

  (a) makespan ratio   wall time of the training job / (sum of per-tenant task seconds / cores):
                       how close skew-aware packing keeps the job to perfect balance (target <= 1.3);
  (b) small-tenant latency   median time from job start to a small tenant's model being trained,
                       with the giant present / with the same small tenants alone (target <= 1.5).

    .venv/bin/python bench/bench_noisy_neighbour.py             # 30 small x 2,000 rows + a 60,000-row giant
    .venv/bin/python bench/bench_noisy_neighbour.py --quick
    .venv/bin/python bench/bench_noisy_neighbour.py --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

# The sibling benchmark's data helpers (a script's own folder is on sys.path).
from bench_tenant_models import tenant_frames, write_silver

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"makespan_ratio_max": 1.3, "small_latency_ratio_max": 1.5}
_OUT = sys.stdout


def say(msg: str = "") -> None:
    print(msg, file=_OUT, flush=True)


def run_job(spark: Any, silver: Any, counts: dict[str, int], spec: Any, cfg: Any) -> tuple[float, pd.DataFrame]:
    from tenantml.training.tenant_models import train_tenant_models

    start = time.time()
    res = train_tenant_models(spark, silver.where(silver.tenant_id.isin(list(counts))), counts, spec, cfg)
    wall = time.time() - start
    res["latency"] = res["finished_at"] - start
    return wall, res


def main() -> int:
    global _OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=30)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=15,
                    help="fixed epochs (no early stopping), so a tenant's work grows with its rows")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.small, args.rows, args.epochs = 12, 300, 5
    if args.json:
        _OUT = sys.stderr
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    from tenantml.config import load_config
    from tenantml.sparksession import build_local_spark
    from tenantml.tables import TableRef

    config = load_config(REPO / "conf")
    spec = config.datasets["demo"]
    cfg = config.training.model_copy(update={"max_epochs": args.epochs, "patience": args.epochs})
    cols = ["tenant_id", spec.entity_key, spec.label, *spec.numeric_features, *spec.categorical_features,
            *([spec.event_time] if spec.event_time else [])]
    small = tenant_frames(args.small, args.rows, 5, cols)
    giant_rows = args.small * args.rows  # half of all rows
    giant = next(iter(tenant_frames(1, giant_rows, 6, cols).values())).assign(tenant_id="giant")
    giant["customer_id"] = "g-" + giant["customer_id"].astype(str)
    frames = {**small, "giant": giant}
    root = Path(tempfile.mkdtemp(prefix="tenantml-bench-noisy-"))
    spark = build_local_spark(master="local[2]", app_name="bench-noisy")
    cores = spark.sparkContext.defaultParallelism
    try:
        silver = write_silver(spark, TableRef(name="silver", path=str(root / "silver")), frames)
        silver = silver.cache()
        silver.count()
        say(f"noisy-neighbour benchmark: {args.small} small tenants x {args.rows} rows + one giant of "
            f"{giant_rows} rows (half of all rows), {cores} cores")
        warm = {t: args.rows for t in list(small)[:4]}
        run_job(spark, silver, warm, spec, cfg)  # Python workers and torch imported before timing
        counts_all = {t: len(f) for t, f in frames.items()}
        counts_small = {t: len(f) for t, f in small.items()}
        wall, res = run_job(spark, silver, counts_all, spec, cfg)
        alone_wall, alone = run_job(spark, silver, counts_small, spec, cfg)
    finally:
        spark.stop()
        shutil.rmtree(root, ignore_errors=True)

    task_seconds = float(res["seconds"].sum())
    makespan_ratio = wall / (task_seconds / cores)
    small_with = res[res["tenant_id"] != "giant"]["latency"]
    lat_with, lat_alone = statistics.median(small_with), statistics.median(alone["latency"])
    latency_ratio = lat_with / lat_alone
    giant_s = float(res.loc[res["tenant_id"] == "giant", "seconds"].iloc[0])
    fig = {"cores": cores, "small_tenants": args.small, "rows_per_small": args.rows, "giant_rows": giant_rows,
           "job_wall_s": wall, "task_seconds_total": task_seconds, "giant_task_s": giant_s,
           "makespan_ratio": makespan_ratio, "small_latency_median_with_giant_s": lat_with,
           "small_latency_median_alone_s": lat_alone, "small_latency_p90_with_giant_s":
           float(small_with.quantile(0.9)), "small_latency_ratio": latency_ratio,
           "alone_job_wall_s": alone_wall, "targets": TARGETS}
    ok_a = makespan_ratio <= TARGETS["makespan_ratio_max"]
    ok_b = latency_ratio <= TARGETS["small_latency_ratio_max"]
    say(f"  (a) job wall {wall:.1f}s vs {task_seconds:.1f} task-seconds / {cores} cores = "
        f"{task_seconds / cores:.1f}s -> makespan ratio {makespan_ratio:.2f} "
        f"(target <= 1.3: {'met' if ok_a else 'MISSED'}); the giant alone took {giant_s:.1f}s")
    say(f"  (b) small-tenant median latency {lat_with:.1f}s with the giant vs {lat_alone:.1f}s alone -> "
        f"ratio {latency_ratio:.2f} (target <= 1.5: {'met' if ok_b else 'MISSED'}); "
        f"p90 with the giant {fig['small_latency_p90_with_giant_s']:.1f}s")
    if args.json:
        print(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
