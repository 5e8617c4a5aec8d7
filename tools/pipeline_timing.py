"""Times one whole pipeline on a small demo world (the tests' 6-tenant one), step by step.

    PYTHONPATH=libs .venv/bin/python tools/pipeline_timing.py [--tenants 6] [--largest 1500]

A developer's measure of the fixed costs every step pays (commits, bookkeeping, query planning),
which dominate small runs and the test suite; it prints wall seconds per step and the JVM's CPU time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from tenantml.apps.demo import DemoSpec, write_demo_source
from tenantml.io.context import JobContext
from tenantml.io.spark import build_local_spark
from tenantml.steps.runner import run_pipeline

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=6)
    parser.add_argument("--largest", type=int, default=1500)
    parser.add_argument("--smallest", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tenantml-timing-") as tmp:
        root = Path(tmp)
        conf = root / "conf"
        shutil.copytree(REPO / "conf", conf)
        (conf / "local" / "test.yml").write_text("training: {min_rows: 100, max_epochs: 6, patience: 2}\n")
        started = time.perf_counter()
        spark = build_local_spark(master="local[2]", shuffle_partitions=2, warehouse_dir=str(root / "wh"))
        print(f"session start      {time.perf_counter() - started:7.1f} s")
        ctx = JobContext.create(conf_dir=conf, data_dir=root / "data", spark=spark)
        write_demo_source(ctx.source_path("demo"),
                          DemoSpec(tenants=args.tenants, largest=args.largest, smallest=args.smallest))
        started = time.perf_counter()
        results = run_pipeline(ctx, dataset="demo")
        total = time.perf_counter() - started
        for r in results:
            print(f"{r.step:18s} {r.seconds:7.1f} s  {r.status}")
        print(f"{'pipeline':18s} {total:7.1f} s  (steps {sum(r.seconds for r in results):.1f} s, "
              f"the rest is the runner's bookkeeping)")
        pid = spark._jvm.java.lang.ProcessHandle.current().pid()  # type: ignore[attr-defined]
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        print(f"JVM CPU            {(int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK'):7.1f} s")
        spark.stop()


if __name__ == "__main__":
    main()
