#!/usr/bin/env python
"""Benchmark (not a test): shared-model data parallelism and tuned-shared throughput.

Measured in one run on this machine, each figure against a baseline from the same run:

  (a) DDP efficiency   shared-model training samples/s with 2 processes vs 1 process, for
                       TorchDistributor (torch DDP, gloo) and Horovod (gloo) when installed:
                       efficiency = sps(2) / (2 x sps(1)); samples/s is measured inside the
                       processes over the training epochs, launch overhead is reported apart;
  (b) tuned vs tenant  tuned-shared models per minute (the shared champion fine-tuned per tenant,
                       `train_tuned` step) vs tenant-specific models per minute (`train` step) on
                       the same tenants, same Spark session.

On a GPU machine pass --gpu to train the shared model with NCCL (use_gpu) instead of gloo.

    .venv/bin/python bench/bench_shared_models.py            # 24 tenants, ~60k rows
    .venv/bin/python bench/bench_shared_models.py --quick    # smoke run
    .venv/bin/python bench/bench_shared_models.py --json     # JSON on stdout, report on stderr
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_OUT = sys.stdout


def say(msg: str = "") -> None:
    print(msg, file=_OUT, flush=True)


def _conf(root: Path, extra: str) -> Path:
    conf = root / "conf"
    if conf.exists():
        shutil.rmtree(conf)
    shutil.copytree(REPO / "conf", conf)
    (conf / "local" / "bench.yml").write_text(extra)
    return conf


def main() -> int:
    global _OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=24)
    ap.add_argument("--largest", type=int, default=12_000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=512,
                    help="per-process batch; larger batches mean fewer all-reduces per sample")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="shared training on GPU (NCCL)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tenants, args.largest, args.epochs = min(args.tenants, 8), min(args.largest, 3000), min(args.epochs, 2)
    if args.json:
        _OUT = sys.stderr
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    from tenantml.apps.demo import DemoSpec, write_demo_source
    from tenantml.io.context import JobContext
    from tenantml.io.spark import build_local_spark
    from tenantml.io.tenants import list_tenant_ids, update_tenants
    from tenantml.steps.runner import run_step
    from tenantml.training.distributed import horovod_available

    root = Path(tempfile.mkdtemp(prefix="tenantml-bench-shared-"))
    base = ("training:\n  min_rows: 100\n  max_epochs: 6\n  patience: 50\n  promotion_margin: 0.0\n"
            "  tuned: {min_rows: 30, max_epochs: 6, patience: 50}\n")
    spark = build_local_spark(master="local[2]", app_name="bench-shared")
    ctx = JobContext.create(conf_dir=_conf(root, base), data_dir=root / "data", spark=spark)
    write_demo_source(ctx.source_path("demo"), DemoSpec(tenants=args.tenants, largest=args.largest, smallest=40))
    run_step(ctx, "ingest", dataset="demo")
    run_step(ctx, "validate", dataset="demo")
    ids = list_tenant_ids(spark, ctx.tables.tenants)
    update_tenants(spark, ctx.tables.tenants, ids, consent_share_data=True)
    say(f"tenantml shared-model benchmark: {args.tenants} tenants, up to {args.largest} rows each, "
        f"batch {args.batch_size}, {os.cpu_count()} cores{', GPU' if args.gpu else ''}")

    backends = ["torch_distributor"] + (["horovod"] if horovod_available() else [])
    figures: dict[str, Any] = {"ddp": {}, "tuned_vs_tenant": {}}
    for backend in backends:
        per_n: dict[int, dict[str, float]] = {}
        for n in (1, 2):
            shared = (f"  shared: {{backend: {backend}, num_processes: {n}, max_epochs: {args.epochs}, "
                      f"patience: 50, batch_size: {args.batch_size}, use_gpu: {'true' if args.gpu else 'false'}}}\n")
            c = JobContext.create(conf_dir=_conf(root, base + shared), data_dir=root / "data", spark=spark)
            shutil.rmtree(root / "data" / "checkpoints", ignore_errors=True)  # measure training, not resume
            t0 = time.perf_counter()
            r = run_step(c, "train_shared", dataset="demo")
            wall = time.perf_counter() - t0
            s = r.summary
            per_n[n] = {"samples_per_second": float(s["samples_per_second"]), "step_seconds": wall,
                        "trainset_rows": float(s["trainset_rows"])}
            say(f"  {backend:17s} {n} process(es): {s['samples_per_second']:>10,.0f} samples/s in training "
                f"epochs, step wall {wall:5.1f}s ({s['trainset_rows']} rows, {s['epochs_run']} epochs)")
        eff = per_n[2]["samples_per_second"] / (2 * per_n[1]["samples_per_second"])
        figures["ddp"][backend] = {"1": per_n[1], "2": per_n[2], "speedup": eff * 2, "efficiency": eff}
        say(f"  {backend:17s} speed-up x{eff * 2:.2f}, DDP efficiency {eff:.2f}")

    t0 = time.perf_counter()
    tenant = run_step(ctx, "train", dataset="demo")
    t_tenant = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = run_step(ctx, "train_tuned", dataset="demo")
    t_tuned = time.perf_counter() - t0
    n_tenant, n_tuned = tenant.summary["models_trained"], tuned.summary["models_trained"]
    tenant_rate, tuned_rate = 60 * n_tenant / t_tenant, 60 * n_tuned / t_tuned
    figures["tuned_vs_tenant"] = {"tenant_models": n_tenant, "tenant_seconds": t_tenant,
                                  "tenant_per_minute": tenant_rate, "tuned_models": n_tuned,
                                  "tuned_seconds": t_tuned, "tuned_per_minute": tuned_rate,
                                  "ratio": tuned_rate / tenant_rate}
    say(f"  tenant-specific: {n_tenant} models in {t_tenant:.1f}s = {tenant_rate:.0f}/min; tuned-shared: "
        f"{n_tuned} models in {t_tuned:.1f}s = {tuned_rate:.0f}/min; ratio {tuned_rate / tenant_rate:.2f}")
    if args.json:
        print(json.dumps(figures, indent=2))
    spark.stop()
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
