#!/usr/bin/env python
"""Benchmark (not a test): a tenant-keyed table that gains a batch per night, in four layouts.

Tables such as the rows to score, the predictions and the monitoring rows gain a batch for every
tenant every night. Partitioned by tenant, each batch adds one small file per tenant, and every
later scan opens them all. This measures, side by side in one run on the same rows, through the
platform's own writer (`io.delta.replace_tenants`, one commit per batch, as the score step writes):

  partitioned            partitioned by tenant_id (the layout of most tenant tables today);
  partitioned+compact    the same, with `OPTIMIZE` after every batch (bin-packing each tenant's
                         files into one), its time counted in the write;
  clustered              liquid clustering by tenant_id (`TableRef.cluster_by`), no maintenance;
  clustered+optimize     the same, with `OPTIMIZE` after every batch (clustering the new rows).

Per layout: wall seconds to write every batch (maintenance included), to scan the latest batch
(rows per tenant, what scoring and monitoring read), to read one tenant's whole history (what a
tenant's scope and a BI drill-down read), and the files the table holds at the end. Each read is
the median of three. Ratios are the baseline's wall time over the layout's (above 1: faster than
`partitioned`); nothing else counts, so a layout that saves files by spending time scores worse.

    .venv/bin/python bench/bench_table_layout.py                 # 1000 tenants x 50 rows x 5 batches
    .venv/bin/python bench/bench_table_layout.py --tenants 10000 --rows 5
    .venv/bin/python bench/bench_table_layout.py --quick --json  # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

LAYOUTS = ("partitioned", "partitioned+compact", "clustered", "clustered+optimize")
_OUT = sys.stdout


def _say(text: str) -> None:
    print(text, file=_OUT, flush=True)


def _batch(spark: Any, tenants: int, rows: int, batch: int) -> Any:
    """``rows`` per tenant for one batch, built inside Spark (no driver-side rows)."""
    from pyspark.sql import functions as F

    ids = spark.range(tenants * rows)
    return ids.select(
        F.format_string("t%05d", (F.col("id") % tenants).cast("int")).alias("tenant_id"),
        F.format_string("e%07d", (F.col("id") / tenants).cast("int")).alias("entity_key"),
        F.lit(f"b{batch:04d}").alias("batch_id"),
        F.rand(batch).alias("score"), F.rand(batch + 1000).alias("f1"), F.randn(batch + 2000).alias("f2"),
        F.current_timestamp().alias("scored_at"))


def _median_seconds(fn: Any, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(spark: Any, root: Path, layout: str, tenants: int, rows: int, batches: int) -> dict[str, Any]:
    """Write ``batches`` batches in ``layout``, then time the two reads; returns the figures."""
    from pyspark.sql import functions as F

    from tenantml.io.delta import read_table, replace_tenants
    from tenantml.io.tables import TableRef

    ref = TableRef(name=layout.replace("+", "_"), path=str(root / layout.replace("+", "_")))
    if layout.startswith("clustered"):
        ref = replace(ref, cluster_by=("tenant_id",))
    ids = [f"t{i:05d}" for i in range(tenants)]
    frames = [_batch(spark, tenants, rows, b).localCheckpoint(eager=True) for b in range(batches)]
    write_seconds = maintenance_seconds = 0.0
    for b, df in enumerate(frames):
        started = time.perf_counter()
        replace_tenants(df, ref, ids, extra_predicate=f"batch_id = 'b{b:04d}'")
        if layout.endswith(("+compact", "+optimize")):
            before = time.perf_counter()
            spark.sql(f"OPTIMIZE delta.`{ref.path}`").collect()
            maintenance_seconds += time.perf_counter() - before
        write_seconds += time.perf_counter() - started
    last = f"b{batches - 1:04d}"
    target = ids[len(ids) // 2]

    def scan_batch() -> None:
        got = read_table(spark, ref).where(F.col("batch_id") == last).groupBy("tenant_id").count().collect()
        assert len(got) == tenants, (layout, len(got))

    def read_tenant() -> None:
        got = read_table(spark, ref).where(F.col("tenant_id") == target).collect()
        assert len(got) == rows * batches, (layout, len(got))

    batch_scan, tenant_read = _median_seconds(scan_batch), _median_seconds(read_tenant)
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{ref.path}`").collect()[0]
    return {"write_s": round(write_seconds, 3), "maintenance_s": round(maintenance_seconds, 3),
            "batch_scan_s": round(batch_scan, 3), "tenant_read_s": round(tenant_read, 3),
            "files": int(detail["numFiles"]), "rows": tenants * rows * batches}


def main() -> None:
    global _OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=None, help="default 1000 (--quick: 40)")
    ap.add_argument("--rows", type=int, default=None, help="rows per tenant and batch; default 50 (--quick: 10)")
    ap.add_argument("--batches", type=int, default=None, help="default 5 (--quick: 3)")
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    ap.add_argument("--json", action="store_true", help="figures as JSON on stdout, the report on stderr")
    args = ap.parse_args()
    if args.json:
        _OUT = sys.stderr
    tenants = args.tenants or (40 if args.quick else 1000)
    rows = args.rows or (10 if args.quick else 50)
    batches = args.batches or (3 if args.quick else 5)

    from tenantml.io.spark import build_local_spark

    root = Path(tempfile.mkdtemp(prefix="tenantml-layout-"))
    try:
        spark = build_local_spark(master="local[2]", shuffle_partitions=2, warehouse_dir=str(root / "wh"))
        _say(f"{tenants} tenants x {rows} rows x {batches} batches, one commit per batch")
        figures: dict[str, dict[str, Any]] = {}
        for layout in LAYOUTS:
            figures[layout] = measure(spark, root, layout, tenants, rows, batches)
            f = figures[layout]
            _say(f"  {layout:20s} write {f['write_s']:7.2f} s (maintenance {f['maintenance_s']:6.2f} s)  "
                 f"latest batch {f['batch_scan_s']:6.2f} s  one tenant {f['tenant_read_s']:6.2f} s  "
                 f"{f['files']:6d} files")
        base = figures["partitioned"]
        ratios = {layout: {k: round(base[k] / max(f[k], 1e-9), 3) for k in ("write_s", "batch_scan_s", "tenant_read_s")}
                  for layout, f in figures.items() if layout != "partitioned"}
        _say("speed-up against partitioned (its wall time / the layout's):")
        for layout, r in ratios.items():
            _say(f"  {layout:20s} write {r['write_s']:6.2f}x  latest batch {r['batch_scan_s']:6.2f}x  "
                 f"one tenant {r['tenant_read_s']:6.2f}x")
        spark.stop()
        if args.json:
            print(json.dumps({"tenants": tenants, "rows_per_tenant": rows, "batches": batches,
                              "layouts": figures, "speedup_vs_partitioned": ratios}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
