#!/usr/bin/env python
"""Benchmark (not a test): what a quiet night costs against a full retrain of the same tenants.

One run, one machine, one Spark session:

  night 1   the demo's tenants (history + one batch of rows to score) through the whole pipeline;
  quiet     the same pipeline again with no new data: ingest and validation find nothing new; the
            monitor retrains only the tenants whose night-1 batch drifted (measured when it was scored);
  quiet 2   once more: the monitor runs again (quiet's retraining changed 8 champions), nothing
            else has anything to answer, so the steps whose tables did not change are skipped;
  quiet 3   once more: nothing changed at all since quiet 2, so every step but ingest is skipped;
  full      the same pipeline again, every tenant retrained (`retraining.force`), the behaviour a
            platform without a retraining policy has every night.

The figures are each quiet night's / the full night's wall time (target <= 0.1). Nothing is asserted.

    .venv/bin/python bench/bench_production_loop.py                 # 1,000 tenants of 20 to 2,000 rows
    .venv/bin/python bench/bench_production_loop.py --quick         # 30 tenants: a smoke run
    .venv/bin/python bench/bench_production_loop.py --json          # figures as JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.1


def _runner_marks(clock: Any) -> None:
    """The runner logs (at DEBUG) when a step's set-up and its run-log writes begin; they become
    phases of ``clock`` so those fixed costs are not counted in the phase before them."""
    import logging

    class Marks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            clock.phase(record.getMessage())

    runner_log = logging.getLogger("tenantml.steps.runner")
    runner_log.addHandler(Marks(level=logging.DEBUG))
    runner_log.setLevel(logging.DEBUG)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    runner_log.addHandler(warnings)
    runner_log.propagate = False  # the marks are for the clock; only warnings go to stderr


def night(ctx: Any, label: str, out: Any, clock: Any) -> dict[str, Any]:
    from tenantml.steps.runner import run_pipeline

    started = time.perf_counter()
    results = run_pipeline(ctx, dataset="demo")
    seconds = time.perf_counter() - started
    steps = {r.step: round(r.seconds, 1) for r in results}
    trained = sum(int(r.summary.get("models_trained", 0) or 0) for r in results)
    scored = sum(int(r.summary.get("rows_scored", 0) or 0) for r in results)
    retrain = [r.summary for r in results if r.step == "monitor"]
    decided = {k: retrain[0].get(k) for k in ("tenants_retrained", "tenants_kept", "tenants_waiting_for_rows",
                                              "drifted")} if retrain else {}
    if decided.get("drifted") is not None:
        decided["drifted"] = len(decided["drifted"] or [])
    split = clock.split(started, time.perf_counter())
    phases = {m: round(sec, 1) for m, sec in sorted(split, key=lambda x: -x[1])[:8]}
    print(f"{label:8s} {seconds:8.1f} s  models trained {trained:5d}  rows scored {scored:7d}  "
          f"steps {steps}\n         monitor {decided}\n         slowest phases {phases}", file=out, flush=True)
    return {"seconds": seconds, "steps": steps, "models_trained": trained, "rows_scored": scored,
            "monitor": decided, "slowest_phases": phases}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=None, help="default 1000 (--quick: 30)")
    ap.add_argument("--largest", type=int, default=2000)
    ap.add_argument("--smallest", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = sys.stderr if args.json else sys.stdout
    tenants = args.tenants or (30 if args.quick else 1000)

    from tenantml.apps.demo import DemoSpec, write_demo_source
    from tenantml.io.context import JobContext

    root = Path(tempfile.mkdtemp(prefix="tenantml-bench-loop-"))
    try:
        conf = root / "conf"
        shutil.copytree(REPO / "conf", conf)
        (conf / "local" / "bench.yml").write_text(
            "training: {max_epochs: 10, patience: 3, strategies: [tenant]}\n"
            "spark: {shuffle_partitions: 4}\n")
        data = root / "data"
        from bench_scale import PhaseClock  # bench/ is the script's directory, first on sys.path

        timer = PhaseClock()
        _runner_marks(timer)
        ctx = JobContext.create(conf_dir=conf, data_dir=data, run_id="bench-night-1", progress=timer)
        write_demo_source(ctx.source_path("demo"), DemoSpec(tenants=tenants, largest=args.largest,
                                                            smallest=args.smallest))
        print(f"{tenants} tenants ({args.smallest} to {args.largest} rows), data in {data}", file=out, flush=True)
        first = night(ctx, "night 1", out, timer)
        quiet = night(JobContext.create(conf_dir=conf, data_dir=data, run_id="bench-quiet", spark=ctx.spark,
                                        progress=timer), "quiet", out, timer)
        steady = night(JobContext.create(conf_dir=conf, data_dir=data, run_id="bench-quiet-2", spark=ctx.spark,
                                         progress=timer), "quiet 2", out, timer)
        still = night(JobContext.create(conf_dir=conf, data_dir=data, run_id="bench-quiet-3", spark=ctx.spark,
                                        progress=timer), "quiet 3", out, timer)
        (conf / "local" / "force.yml").write_text("retraining: {force: true}\n")
        full = night(JobContext.create(conf_dir=conf, data_dir=data, run_id="bench-full", spark=ctx.spark,
                                       progress=timer), "full", out, timer)
        ratios = {}
        for label, q in (("quiet", quiet), ("quiet 2", steady), ("quiet 3", still)):
            ratio = ratios[label] = q["seconds"] / full["seconds"] if full["seconds"] else float("nan")
            met = "met" if ratio <= TARGET else "MISSED"
            print(f"\n{label} night / full retrain = {q['seconds']:.1f} / "
                  f"{full['seconds']:.1f} s = {ratio:.3f} (target <= {TARGET}: {met}); {q['models_trained']} models "
                  f"trained", file=out, flush=True)
        if args.json:
            print(json.dumps({"tenants": tenants, "night_1": first, "quiet": quiet, "quiet_2": steady,
                              "quiet_3": still, "full": full,
                              "loop": {"quiet_over_full": ratios["quiet"], "quiet_2_over_full": ratios["quiet 2"],
                                       "quiet_3_over_full": ratios["quiet 3"], "target": TARGET}}, indent=2))
        ctx.spark.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
