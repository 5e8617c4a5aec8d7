#!/usr/bin/env python
"""Benchmark (not a test): the whole pipeline at two tenant counts, per-tenant cost side by side.

One process, one Spark session, one run per size, each in its own data directory:

  warm-up   a 5-tenant pipeline (not timed): JVM, Python workers, MLflow store, imports;
  small     the demo generator's sources for ``--sizes`` first count (default 1,000 tenants of 20 to
            2,000 rows: sizes log-spaced, so per-tenant work has the same distribution at any count);
  large     the same at the second count (default 10,000).

Every step of ``pipeline_steps()`` runs through ``run_step`` as the CLI runs it (the demo's
consents applied after validate, as ``tenantml demo`` does), and is timed. The figure is
per-tenant wall time at the large size over the small size (target <= 1.2: the platform's cost
grows with tenants, not faster). Per step the same ratio says where it does not; within a step the
time between its progress phases narrows it further. Tracking cost per model is the wall time of
``track_training`` inside train/train_tuned divided by the models it logged.

Nothing is asserted; a step that fails is reported with its error and the run goes on.

    .venv/bin/python bench/bench_scale.py                   # 1,000 and 10,000 tenants (an hour or more)
    .venv/bin/python bench/bench_scale.py --quick           # 30 and 100 tenants: a smoke run for CI
    .venv/bin/python bench/bench_scale.py --sizes 200,2000 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tenant_models import Meter, memory_gib  # noqa: E402

TARGET = 1.2  # per-tenant wall at the large size / at the small size
_OUT = sys.stdout


def say(msg: str = "") -> None:
    print(msg, file=_OUT, flush=True)


class PhaseClock:
    """A Progress that records when each phase of a step began, so a step's wall time can be split."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, str]] = []

    def phase(self, message: str) -> None:
        self.marks.append((time.perf_counter(), message))

    def start(self, label: str, total: int) -> None:
        self.marks.append((time.perf_counter(), f"{label} ({total})"))

    def advance(self, n: int = 1) -> None:
        return None

    def update(self, completed: int, total: int) -> None:
        return None

    def done(self) -> None:
        return None

    def split(self, since: float, until: float) -> list[tuple[str, float]]:
        """(phase message, seconds) for the phases that began in [since, until]; the time before the
        first phase is '(step set-up)'."""
        inside = [(t, m) for t, m in self.marks if since <= t <= until]
        out: list[tuple[str, float]] = []
        edges = [since, *[t for t, _ in inside], until]
        labels = ["(step set-up)", *[m for _, m in inside]]
        for label, a, b in zip(labels, edges[:-1], edges[1:], strict=True):
            out.append((label, b - a))
        return out


class TrackingTimer:
    """Wraps ``track_training`` where the candidate steps call it: seconds and models per call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def install(self) -> None:
        import tenantml.steps.candidates as candidates

        inner: Callable[..., Any] = candidates.track_training

        def timed(ctx: Any, dataset: str, results: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = inner(ctx, dataset, results, **kwargs)
            self.calls.append({"strategy": kwargs.get("strategy"), "models": len(out.registered),
                               "seconds": time.perf_counter() - started})
            return out

        candidates.track_training = timed  # type: ignore[assignment]


def write_conf(root: Path, max_epochs: int, patience: int) -> Path:
    conf = root / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "local" / "bench_scale.yml").write_text(
        f"training: {{max_epochs: {max_epochs}, patience: {patience}, shared: {{max_epochs: {max_epochs}}}, "
        f"tuned: {{max_epochs: {max_epochs}}}}}\n")
    return conf


def run_size(spark: Any, conf: Path, data: Path, tenants: int, largest: int, smallest: int, label: str,
             tracking: TrackingTimer) -> dict[str, Any]:
    """The pipeline once over fresh demo sources of ``tenants`` tenants; per-step and per-phase times."""
    from tenantml.apps.cli import _apply_demo_consents
    from tenantml.apps.demo import DemoSpec, write_demo_source
    from tenantml.io.context import JobContext
    from tenantml.steps.runner import pipeline_steps, run_step

    clock = PhaseClock()
    ctx = JobContext.create(conf_dir=conf, data_dir=data, spark=spark, run_id=f"bench-scale-{label}",
                            progress=clock)
    t0 = time.perf_counter()
    write_demo_source(ctx.source_path("demo"), DemoSpec(tenants=tenants, largest=largest, smallest=smallest))
    gen_s = time.perf_counter() - t0
    say(f"\n[{label}] {tenants:,} tenants ({smallest} to {largest} rows) written in {gen_s:.1f}s (not timed); "
        f"data in {data}")
    steps: list[dict[str, Any]] = []
    first_tracking = len(tracking.calls)
    total = Meter(f"{label} pipeline")
    total.__enter__()
    for name in pipeline_steps():
        if name == "monitor":
            _apply_demo_consents(ctx)  # as `tenantml demo` does: once the tenants exist, before training
        m = Meter(f"{label} {name}")
        m.__enter__()
        error = None
        result = None
        try:
            result = run_step(ctx, name, dataset="demo")
        except Exception as exc:  # report and go on: a scale bench must show every step it can
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            traceback.print_exc(file=sys.stderr)
        m.__exit__(None, None, None)
        phases = clock.split(m._t, m._t + m.wall)
        row: dict[str, Any] = {
            "step": name, "wall_s": round(m.wall, 2), "per_tenant_ms": round(m.wall * 1000 / tenants, 3),
            "other_processes_cores": round(m.others, 2), "our_jvm_cores": round(m.jvm, 2),
            "our_python_cores": round(m.python, 2), "error": error,
            "phases": [{"phase": p[:120], "seconds": round(s, 2)} for p, s in phases],
        }
        if result is not None:
            row.update({"status": result.status, "tenants_ok": result.count("ok"),
                        "tenants_failed": result.count("failed"), "tenants_skipped": result.count("skipped"),
                        "summary": {k: v for k, v in result.summary.items()
                                    if isinstance(v, int | float | str | bool) or v is None}})
        steps.append(row)
        say(f"  {name:17s} {m.wall:8.1f}s  {m.wall * 1000 / tenants:8.2f} ms/tenant  {m.note}"
            + (f"  FAILED: {error}" if error else f"  ok {row.get('tenants_ok', 0)}, failed "
               f"{row.get('tenants_failed', 0)}, skipped {row.get('tenants_skipped', 0)}"))
        for p, s in phases:
            if s >= max(1.0, 0.05 * m.wall):
                say(f"      {s:7.1f}s  {p[:100]}")
    total.__exit__(None, None, None)
    calls = tracking.calls[first_tracking:]
    models = sum(c["models"] for c in calls)
    track_s = sum(c["seconds"] for c in calls)
    out = {
        "tenants": tenants, "largest": largest, "smallest": smallest, "wall_s": round(total.wall, 2),
        "per_tenant_ms": round(total.wall * 1000 / tenants, 3), "other_processes_cores": round(total.others, 2),
        "steps": steps, "tracking": {"calls": calls, "models": models, "seconds": round(track_s, 2),
                                     "ms_per_model": round(track_s * 1000 / models, 2) if models else None},
        "source_rows": _source_rows(ctx),
    }
    say(f"  total {total.wall:.1f}s = {total.wall * 1000 / tenants:.1f} ms/tenant {total.note}; tracking "
        f"{models} models in {track_s:.1f}s"
        + (f" = {track_s * 1000 / models:.1f} ms/model" if models else ""))
    return out


def _source_rows(ctx: Any) -> dict[str, int]:
    """Rows of history and rows to score the generator wrote (read back from the CSV files)."""
    out: dict[str, int] = {}
    for what, folder in (("history", ctx.source_path("demo")),
                         ("scoring", ctx.source_path("demo").with_name(ctx.source_path("demo").name + "_scoring"))):
        n = 0
        for f in Path(folder).glob("*.csv"):
            with open(f, "rb") as fh:
                n += sum(1 for _ in fh) - 1
        out[what] = n
    return out


def main(argv: list[str] | None = None) -> int:
    global _OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="two tenant counts, small,large (default 1000,10000; --quick 30,100)")
    ap.add_argument("--largest", type=int, default=2000, help="rows of the largest tenant (default 2000)")
    ap.add_argument("--smallest", type=int, default=20, help="rows of the smallest tenant (default 20)")
    ap.add_argument("--max-epochs", type=int, default=10, help="training epochs cap for every strategy (default 10)")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--keep", default=None, help="keep the data directories under this folder")
    ap.add_argument("--quick", action="store_true", help="30 and 100 tenants: a smoke run")
    ap.add_argument("--json", action="store_true", help="figures as JSON on stdout (the report goes to stderr)")
    args = ap.parse_args(argv)
    if args.json:
        _OUT = sys.stderr
    sizes = [int(s) for s in (args.sizes or ("30,100" if args.quick else "1000,10000")).split(",")]
    if len(sizes) != 2 or not 0 < sizes[0] < sizes[1]:
        ap.error("--sizes takes two counts, small,large")
    os.environ.setdefault("TENANTML_LOG_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    for name in ("mlflow", "alembic", "py4j"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from tenantml.config import load_config
    from tenantml.io.spark import build_local_spark

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tenantml-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    conf = write_conf(root, args.max_epochs, args.patience)
    config = load_config(conf)
    fig: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(memory_gib() or 0, 1),
                    "python": platform.python_version(), "loadavg_at_start": os.getloadavg()},
        "params": {"sizes": sizes, "largest": args.largest, "smallest": args.smallest,
                   "max_epochs": args.max_epochs, "patience": args.patience,
                   "strategies": list(config.training.strategies), "spark_master": config.spark.master,
                   "shuffle_partitions": config.spark.shuffle_partitions},
    }
    say(f"tenantml scale benchmark  {fig['date']}  cpus={os.cpu_count()}  load average "
        f"{os.getloadavg()[0]:.1f}  sizes {sizes}  max_epochs {args.max_epochs}")
    spark = build_local_spark(master=config.spark.master, app_name="tenantml-bench-scale",
                              shuffle_partitions=config.spark.shuffle_partitions,
                              arrow_batch_size=config.scoring.arrow_batch_size,
                              warehouse_dir=str(root / "spark-warehouse"), extra_conf=config.spark.conf)
    tracking = TrackingTimer()
    tracking.install()
    try:
        t0 = time.perf_counter()
        run_size(spark, conf, root / "warmup", 5, min(args.largest, 400), args.smallest, "warm-up", tracking)
        say(f"warm-up (not in the figures) {time.perf_counter() - t0:.1f}s")
        runs = [run_size(spark, conf, root / f"n{n}", n, args.largest, args.smallest, f"n={n}", tracking)
                for n in sizes]
    finally:
        spark.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    small, large = runs
    fig["runs"] = {str(r["tenants"]): r for r in runs}
    ratio = large["per_tenant_ms"] / small["per_tenant_ms"]
    say(f"\nper-tenant wall, {sizes[1]:,} / {sizes[0]:,} tenants (target <= {TARGET}):")
    say(f"  {'step':17s} {'ms/tenant':>10s} {'ms/tenant':>10s} {'ratio':>7s}")
    per_step: dict[str, float | None] = {}
    for a, b in zip(small["steps"], large["steps"], strict=True):
        r = b["per_tenant_ms"] / a["per_tenant_ms"] if a["per_tenant_ms"] else None
        per_step[a["step"]] = round(r, 3) if r is not None else None
        flag = "  <-- grows faster than tenants" if r is not None and r > TARGET and b["wall_s"] >= 5 else ""
        say(f"  {a['step']:17s} {a['per_tenant_ms']:10.2f} {b['per_tenant_ms']:10.2f} "
            f"{r if r is not None else float('nan'):7.2f}{flag}")
    say(f"  {'pipeline':17s} {small['per_tenant_ms']:10.2f} {large['per_tenant_ms']:10.2f} {ratio:7.2f}  "
        f"({'met' if ratio <= TARGET else 'MISSED'})")
    for r in runs:
        t = r["tracking"]
        if t["models"]:
            say(f"  tracking at {r['tenants']:,} tenants: {t['models']} models, {t['ms_per_model']:.1f} ms/model")
    say("  other processes' CPU during the runs (cores): "
        + ", ".join(f"{r['tenants']:,} tenants {r['other_processes_cores']:.1f}" for r in runs))
    fig["scale"] = {"per_tenant_ratio": round(ratio, 3), "target_max": TARGET, "met": ratio <= TARGET,
                    "per_step_ratio": per_step}
    if args.json:
        print(json.dumps(fig, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
