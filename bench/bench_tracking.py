#!/usr/bin/env python
"""Benchmark (not a test): tracking N tenant candidates as LoggedModels vs one child run each.

Three variants of the same job, each on a fresh MLflow SQLite store (own data directory, store
created and warmed with a few untimed models first), measured side by side in this one run:

  child_runs     the pre-LoggedModel path, kept here verbatim: per tenant a child run, its
                 ``log_batch``, its model directory uploaded with ``log_artifacts``,
                 ``set_terminated``; then a registered model + version whose source is the child
                 run's artifacts;
  logged_models  ``track_training`` as it is (the default): per tenant a LoggedModel of the job
                 run, its directory uploaded to the model's artifact location, ``finalize``; the
                 metrics in 1000-metric ``log_batch`` chunks and one ``log_outputs`` per job; then a
                 registered model + version (source = the LoggedModel's artifact location);
  lm+tenant_runs ``track_training`` with ``tracking.tenant_runs: true`` (LoggedModels plus a child
                 run per tenant, the metrics on the child run).

Reported per variant: wall and CPU ms per model (logging + registration; setting the champion
alias is timed apart), SQL statements per model (independent of machine load), and first vs last
decile of the per-model logging and registration time (does per-model cost grow with N?). Then
the ratio logged_models / child_runs, and, on the LoggedModel store, registration with
``source="models:/<id>"`` against ``source=<artifact location>`` interleaved call by call. Every
figure records how many cores other processes kept busy (the machine may be shared). Nothing is
asserted: the script reports, and says plainly whether the 20 ms/model target is met.

    .venv/bin/python bench/bench_tracking.py                   # 1000 tenants, ~4 minutes on 2 cores
    .venv/bin/python bench/bench_tracking.py --tenants 10000   # the scale figure, ~35 minutes
    .venv/bin/python bench/bench_tracking.py --quick           # 50 tenants, a smoke run (CI)
    .venv/bin/python bench/bench_tracking.py --json            # report on stderr, JSON on stdout
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATASET = "demo"
TARGET_MS = 20.0  # the target at 10,000 tenants
VARIANTS = ("child_runs", "logged_models", "lm+tenant_runs")
_OUT = sys.stdout
_SQL = [0]


def say(msg: str = "") -> None:
    print(msg, file=_OUT, flush=True)


def count_sql() -> None:
    """Count every SQL statement any SQLAlchemy engine in this process executes."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "before_cursor_execute")
    def _count(*_a: Any, **_k: Any) -> None:
        _SQL[0] += 1


class Stamps:
    """A tenantml Progress that timestamps every ``advance`` of every counted task."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[float]] = {}
        self._label = ""

    def phase(self, message: str) -> None:
        return None

    def start(self, label: str, total: int) -> None:
        self._label = label
        self.tasks[label] = [time.perf_counter()]

    def advance(self, n: int = 1) -> None:
        self.tasks[self._label].append(time.perf_counter())

    def update(self, completed: int, total: int) -> None:
        return None

    def done(self) -> None:
        return None

    def deciles(self, label: str) -> tuple[float, float]:
        """Mean ms per item over the first and the last 10 % of the task's items."""
        t = self.tasks.get(label, [])
        steps = [b - a for a, b in itertools.pairwise(t)]
        if len(steps) < 10:
            return math.nan, math.nan
        k = max(1, len(steps) // 10)
        return sum(steps[:k]) * 1000 / k, sum(steps[-k:]) * 1000 / k


# --------------------------------------------------------------------------- the job's inputs


def make_results(n: int, distinct: int, rows: int) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """N result rows as ``train_tenant_models`` returns them: ``distinct`` real tenant models
    trained with the platform's own ``train_one_tenant`` on demo data, their bytes and metrics
    reused round-robin (tracking cost depends on sizes, not on the weights); the job's params as
    ``train`` logs them (a real ``TrainingPlan``)."""
    from bench_tenant_models import tenant_frames

    from tenantml.config import load_config
    from tenantml.training.fit import RESULT_COLUMNS, train_one_tenant
    from tenantml.training.plan import TrainingPlan

    config = load_config(REPO / "conf")
    spec = config.datasets[DATASET]
    cols = ["tenant_id", spec.entity_key, spec.label, *spec.numeric_features, *spec.categorical_features,
            *([spec.event_time] if spec.event_time else [])]
    frames = tenant_frames(distinct, rows, seed=7, columns=cols)
    plan = TrainingPlan.build(spec, config.training, {t: len(f) for t, f in frames.items()})
    trained = [{**train_one_tenant(t, f, plan), "tier": plan.tenants[t].tier, "pool": "default", "path": "task"}
               for t, f in frames.items()]
    ok = [r for r in trained if r["status"] == "ok"]
    if not ok:
        raise RuntimeError(f"no demo tenant model trained: {trained[0].get('error')}")
    results = pd.DataFrame([{**ok[i % len(ok)], "tenant_id": f"t{i:05d}"} for i in range(n)])[RESULT_COLUMNS]
    params = {"dataset": DATASET, "min_rows": config.training.min_rows, "tenants_requested": n,
              **TrainingPlan.build(spec, config.training, dict.fromkeys(results["tenant_id"], rows)).to_params()}
    lineage = {"delta_table": f"silver_{DATASET}", "delta_version": 3, "git_commit": "bench",
               "config_hash": config.config_hash()}
    return results, params, lineage


# --------------------------------------------------------------------------- the child-run path


def track_with_child_runs(ctx: Any, dataset: str, results: pd.DataFrame, *, strategy: str,
                          params: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    """``track_training`` as it was before LoggedModels (one child run per tenant), verbatim but
    for progress phases and the return value: the baseline the LoggedModel path must beat."""
    import json as _json

    from mlflow.entities import Metric, RunStatus, RunTag

    from tenantml.core.ids import model_name, validate_tenant_id
    from tenantml.io.model_store import model_sha256
    from tenantml.registry.model_dir import write_model_dir
    from tenantml.registry.tracking import Registered, ensure_registered_model, log_batches, registered_names

    client = ctx.mlflow
    spec = ctx.config.datasets[dataset]
    prefix = ctx.config.tracking.model_name_prefix
    experiment = ctx.experiment_id()
    base_tags = {"tenantml.run_id": ctx.run_id, "tenantml.dataset": dataset, "tenantml.step": "train",
                 "tenantml.strategy": strategy}
    run = client.create_run(experiment, run_name=f"train-{dataset}-{strategy}-{ctx.run_id}", tags=base_tags)
    rid = run.info.run_id
    registered: dict[str, Registered] = {}
    tenant_runs: dict[str, str] = {}
    ok = results[results["status"] == "ok"]
    flat = [(k, _json.dumps(v) if not isinstance(v, str) else v) for k, v in {**params, **lineage}.items()]
    log_batches(client, rid, [], flat, [("tenantml.tenants_trained", str(len(ok))),
                                        ("tenantml.tenants_failed", str(len(results) - len(ok)))])
    ctx.progress.start("tenant models", len(results))
    now = int(time.time() * 1000)
    child_uri: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tenantml-models-") as tmp:
        for r in results.itertuples(index=False):
            tid = validate_tenant_id(r.tenant_id)
            child = client.create_run(experiment, run_name=f"{tid}", tags={
                **base_tags, "mlflow.parentRunId": rid, "tenantml.tenant_id": tid, "tenantml.status": str(r.status)})
            cid = child.info.run_id
            tenant_runs[tid] = cid
            child_uri[tid] = child.info.artifact_uri
            metrics: list[Metric] = []
            tags: list[RunTag] = []
            if r.status == "ok":
                values = {**_json.loads(r.metrics_json), "rows": r.rows, "epochs": r.epochs, "seconds": r.seconds}
                metrics = [Metric(k, float(v), now, 0) for k, v in values.items()
                           if v is not None and not (isinstance(v, float) and math.isnan(v))]
            else:
                tags = [RunTag("tenantml.error", str(r.error or "")[:5000])]
            client.log_batch(cid, metrics=metrics, tags=tags, synchronous=True)
            if r.status == "ok":
                write_model_dir(Path(tmp) / tid, bytes(r.model), run_id=cid, artifact_path="model",
                                numeric=spec.numeric_features, categorical=spec.categorical_features,
                                metadata={"tenant_id": tid, "dataset": dataset, "strategy": strategy,
                                          "tenantml_run_id": ctx.run_id})
                client.log_artifacts(cid, str(Path(tmp) / tid), "model")
            client.set_terminated(cid, RunStatus.to_string(RunStatus.FINISHED if r.status == "ok"
                                                           else RunStatus.FAILED))
            ctx.progress.advance()
    known = registered_names(ctx, dataset)
    ctx.progress.start("registering models", len(ok))
    for r in ok.itertuples(index=False):
        name = model_name(prefix, dataset, r.tenant_id)
        if name not in known:
            ensure_registered_model(client, name, {"tenant_id": r.tenant_id, "dataset": dataset})
        cid = tenant_runs[r.tenant_id]
        source = f"{child_uri[r.tenant_id]}/model"
        mv = client.create_model_version(
            name, source=source, run_id=cid,
            tags={"tenant_id": r.tenant_id, "dataset": dataset, "strategy": strategy,
                  "model_sha256": model_sha256(bytes(r.model)),
                  "metric_name": r.metric_name, "metric": f"{r.metric:.6g}",
                  "baseline_metric": f"{r.baseline_metric:.6g}", "tenantml_run_id": ctx.run_id,
                  "job_run_id": rid, **{k: str(v) for k, v in lineage.items()}})
        registered[r.tenant_id] = Registered(r.tenant_id, name, str(mv.version), source)
        ctx.progress.advance()
    client.set_terminated(rid, RunStatus.to_string(RunStatus.FINISHED))
    return {"registered": registered, "run_id": rid}


def track_with_logged_models(ctx: Any, dataset: str, results: pd.DataFrame, *, strategy: str,
                             params: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    from tenantml.registry.tracking import track_training

    out = track_training(ctx, dataset, results, strategy=strategy, params=params, lineage=lineage)
    return {"registered": out.registered, "run_id": out.mlflow_run_id, "logged_models": out.logged_models}


# --------------------------------------------------------------------------- one variant


def context(spark: Any, root: Path, variant: str, stamps: Stamps) -> Any:
    from tenantml.io.context import JobContext

    conf = root / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "local" / "bench.yml").write_text(f"tracking: {{tenant_runs: {str(variant == 'lm+tenant_runs').lower()}}}\n")
    return JobContext.create(conf_dir=conf, data_dir=root / "data", spark=spark, run_id=f"bench-{os.getpid()}",
                             progress=stamps)


def measure(spark: Any, variant: str, results: pd.DataFrame, warm: pd.DataFrame, params: dict[str, Any],
            lineage: dict[str, Any], root: Path) -> dict[str, Any]:
    """Fresh store, untimed warm-up job, then the timed job (logging + registration), then aliases."""
    from bench_tenant_models import Meter

    from tenantml.registry.tracking import set_champions

    stamps = Stamps()
    ctx = context(spark, root, variant, stamps)
    track: Callable[..., dict[str, Any]] = track_with_child_runs if variant == "child_runs" \
        else track_with_logged_models
    t0 = time.perf_counter()
    ctx.experiment_id()  # creates the store (migrations): not part of any job
    store_s = time.perf_counter() - t0
    track(ctx, DATASET, warm, strategy="tenant", params=params, lineage=lineage)
    stamps.tasks.clear()
    n = len(results)
    runs_before = len(ctx.mlflow.search_runs([ctx.experiment_id()], max_results=50_000))
    sql0, cpu0 = _SQL[0], time.process_time()
    with Meter(f"tracking {variant}") as m:
        out = track(ctx, DATASET, results, strategy="tenant", params=params, lineage=lineage)
    cpu = time.process_time() - cpu0
    sql = _SQL[0] - sql0
    with Meter(f"aliases {variant}") as m_alias:
        set_champions(ctx, out["registered"].values())
    log_first, log_last = stamps.deciles("tenant models")
    reg_first, reg_last = stamps.deciles("registering models")
    fig: dict[str, Any] = {"ms_per_model": round(m.wall * 1000 / n, 2), "cpu_ms_per_model": round(cpu * 1000 / n, 2),
           "sql_per_model": round(sql / n, 1), "alias_ms_per_model": round(m_alias.wall * 1000 / n, 2),
           "wall_s": round(m.wall, 2), "other_processes_cores": round(m.others, 2),
           "store_init_s": round(store_s, 2), "models": len(out["registered"]),
           "log_ms_first_decile": round(log_first, 2), "log_ms_last_decile": round(log_last, 2),
           "register_ms_first_decile": round(reg_first, 2), "register_ms_last_decile": round(reg_last, 2),
           "runs_per_job": len(ctx.mlflow.search_runs([ctx.experiment_id()], max_results=50_000)) - runs_before}
    say(f"  {variant:<15} {fig['ms_per_model']:7.2f} ms/model wall, {fig['cpu_ms_per_model']:6.2f} CPU ms, "
        f"{fig['sql_per_model']:5.1f} SQL/model; alias +{fig['alias_ms_per_model']:.2f} ms; per-model logging "
        f"first/last decile {log_first:.1f}/{log_last:.1f} ms, registration {reg_first:.1f}/{reg_last:.1f} ms; "
        f"{fig['runs_per_job']} runs per job {m.note}")
    if variant == "logged_models":
        fig["registration_source"] = registration_source(ctx, out, min(n, 200))
    return fig


def registration_source(ctx: Any, out: dict[str, Any], k: int) -> dict[str, float]:
    """One more version of ``k`` models each way, interleaved call by call on the same store."""
    import mlflow

    mlflow.set_tracking_uri(ctx.tracking_uri)  # `models:/<id>` resolves through the global URI
    client = ctx.mlflow
    times: dict[str, list[float]] = {"models_uri": [], "artifact_location": []}
    for tid in list(out["logged_models"])[:k]:
        mid = out["logged_models"][tid]
        name = out["registered"][tid].name
        location = client.get_logged_model(mid).artifact_location
        for how, source in (("models_uri", f"models:/{mid}"), ("artifact_location", location)):
            t0 = time.perf_counter()
            client.create_model_version(name, source=source, run_id=out["run_id"], model_id=mid,
                                        tags={"tenant_id": tid})
            times[how].append(time.perf_counter() - t0)
    fig = {f"{how}_ms": round(sum(v) * 1000 / max(1, len(v)), 2) for how, v in times.items()}
    say(f"  registration source, {k} versions each, interleaved: models:/<id> {fig['models_uri_ms']:.2f} ms, "
        f"artifact location {fig['artifact_location_ms']:.2f} ms per version")
    return fig


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, default=None, help="tenant models per job (default 1000; --quick 50)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="50 tenants: a smoke run (what CI runs)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON dict of all figures at the end (on stdout; the report goes to stderr)")
    args = p.parse_args(argv)
    if args.tenants is None:
        args.tenants = 50 if args.quick else 1000
    args.variants = [v for v in args.variants.split(",") if v]
    if args.tenants < 10 or not set(args.variants) <= set(VARIANTS) or "child_runs" not in args.variants \
            or "logged_models" not in args.variants:
        p.error(f"need --tenants >= 10 and --variants including child_runs and logged_models (of {VARIANTS})")
    return args


def main(argv: list[str] | None = None) -> int:
    global _OUT
    args = parse_args(argv)
    if args.json:
        _OUT = sys.stderr
    os.environ.setdefault("TENANTML_LOG_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    for name in ("mlflow", "alembic", "py4j"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import torch

    from tenantml.io.spark import build_local_spark

    torch.set_num_threads(1)
    count_sql()
    n = args.tenants
    say(f"bench_tracking: {n} tenant models per job, variants {', '.join(args.variants)}; "
        f"python {platform.python_version()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    results, params, lineage = make_results(n, distinct=4, rows=300)
    warm = results.head(5).assign(tenant_id=[f"w{i:04d}" for i in range(5)])
    say(f"  {len(results)} result rows from 4 real demo models ({len(bytes(results['model'].iloc[0]))} bytes each), "
        f"{len(params)} job params, {len(json.loads(results['metrics_json'].iloc[0])) + 3} metrics per model "
        f"(built in {time.perf_counter() - t0:.0f}s, not timed)")
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        spark = build_local_spark(master="local[1]", app_name="bench-tracking", shuffle_partitions=1,
                                  warehouse_dir=str(Path(tmp) / "spark-warehouse"))
        figs: dict[str, Any] = {}
        try:
            for variant in args.variants:
                root = Path(tmp) / variant.replace("+", "_")
                root.mkdir()
                figs[variant] = measure(spark, variant, results, warm, params, lineage, root)
                shutil.rmtree(root, ignore_errors=True)  # 10,000 models' artifacts: keep disk bounded
        finally:
            spark.stop()
    child, lm = figs["child_runs"], figs["logged_models"]
    ratio = lm["ms_per_model"] / child["ms_per_model"]
    met = lm["ms_per_model"] <= TARGET_MS
    say(f"\n  logged_models / child_runs: {ratio:.2f} wall ({lm['ms_per_model']:.1f} vs {child['ms_per_model']:.1f} "
        f"ms/model), {lm['cpu_ms_per_model'] / child['cpu_ms_per_model']:.2f} CPU, "
        f"{lm['sql_per_model'] / child['sql_per_model']:.2f} SQL statements")
    say(f"  MLflow runs per job: {child['runs_per_job']} with child runs, {lm['runs_per_job']} with LoggedModels")
    say(f"  target <= {TARGET_MS:.0f} ms/model (LoggedModels, at 10,000 tenants; this run: {n}): "
        f"{'met' if met else 'NOT met'} ({lm['ms_per_model']:.1f} ms/model)")
    if args.json:
        print(json.dumps({"when": datetime.now(UTC).isoformat(timespec="seconds"), "tenants": n,
                          "cores": os.cpu_count(), "variants": figs, "ratio_lm_to_child": round(ratio, 3),
                          "target_ms": TARGET_MS, "target_met": met}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
