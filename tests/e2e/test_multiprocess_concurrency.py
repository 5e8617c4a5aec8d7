"""Concurrent runs in separate OS processes, each with its own SparkSession and JVM, on one data
directory: the same Delta tables and the same MLflow SQLite store.

Two `tenantml` processes start together and run, each under its own run id:

1. ingest, on disjoint tenant sets: both succeed; bronze, the tenants table and run_log hold each
   tenant's rows once, from its own run (every one of these tables is created by this race);
2. validate, both on the same tenants: each succeeds or fails cleanly naming the conflict (exit 1);
   silver, quarantine and quality hold no duplicate key and each tenant's rows from one run only;
   a rerun afterwards converges to a clean state.

Two processes opening a new MLflow SQLite store at once (the tracking side of a first training run)
get one schema and one experiment.

Each process runs the CLI entry point (`tenantml.apps.cli.run`) once per command, in one JVM to keep the
test short, and the processes meet at a file barrier before every command, after their JVMs are up,
so the commands really start together; the test checks from the recorded step times that they
overlapped, so it cannot pass with runs that happened one after the other.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
# Few shuffle partitions, and the JIT's quick tier only: C2 compilation costs these short-lived JVMs
# more CPU than it saves (about a third of their CPU time on 2 cores).
FAST = "spark: {shuffle_partitions: 2, conf: {spark.driver.extraJavaOptions: '-XX:TieredStopAtLevel=1'}}\n"
# Balanced halves of the 4 demo tenants (400, 289, 208, 150 rows): the two processes do about the
# same work, so their steps stay side by side after each barrier.
SETS = {"a": ["t000", "t003"], "b": ["t001", "t002"]}
ALL = sorted(SETS["a"] + SETS["b"])
RUNS = {"a": "mp-a", "b": "mp-b"}
PLAN = [("ingest", "own"), ("validate", "all")]  # (step, tenants) per command

# Runs in each child process: start the JVM, then for every command wait at a file barrier for the
# other process and run the CLI; exit codes and --json summaries go to a result file. A process that
# dies releases every barrier on its way out, so the other never waits for it.
LAUNCHER = r'''
import contextlib, io, json, sys, time, traceback
from pathlib import Path

barrier, name, result, commands = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])

def arrive(k):
    (barrier / f"{k}.{name}").touch()

def wait_for_peers(k):
    arrive(k)
    deadline = time.monotonic() + 300
    while len(list(barrier.glob(f"{k}.*"))) < 2:
        if time.monotonic() > deadline:
            raise SystemExit(f"barrier {k}: the other process never arrived")
        time.sleep(0.02)

out = []
try:
    from tenantml.apps import cli
    from tenantml.io.context import JobContext

    first = cli._parser().parse_args(commands[0])
    JobContext.create(conf_dir=first.conf_dir, env=first.env, data_dir=first.data_dir).spark
    for k, argv in enumerate(commands):
        wait_for_peers(k)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                code = cli.run(argv)
            out.append({"argv": argv, "code": code, "summary": json.loads(buf.getvalue())})
        except BaseException:
            out.append({"argv": argv, "code": 1, "uncaught": traceback.format_exc()})
            raise
finally:
    for k in range(len(commands)):
        arrive(k)
    result.write_text(json.dumps(out))
'''


def _env() -> dict[str, str]:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "TENANTML_LOG_LEVEL": "WARNING",
            "COLUMNS": "200"}


def _table(spark: Any, data: Path, name: str) -> Any:
    return spark.read.format("delta").load(str(data / "warehouse" / name))


@pytest.fixture(scope="module")
def race(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo source (4 tenants), nothing ingested and no MLflow store yet; then the two processes."""
    import pandas as pd

    from tenantml.apps.demo import DemoSpec, write_demo_source
    from tenantml.io.context import JobContext

    root = tmp_path_factory.mktemp("multiproc")
    shutil.copytree(REPO / "conf", root / "conf")
    (root / "conf" / "local" / "fast.yml").write_text(FAST)
    data = root / "data"
    src = write_demo_source(JobContext.create(conf_dir=root / "conf", data_dir=data).source_path("demo"),
                            DemoSpec(tenants=4, largest=400, smallest=150))
    source_rows = pd.concat([pd.read_csv(f, dtype=str) for f in sorted(src.glob("*.csv"))])["tenant"]

    barrier = root / "barrier"
    barrier.mkdir()
    procs = {}
    for name, own in SETS.items():
        commands = [[step, "--data-dir", str(data), "--tenants", ",".join(own if which == "own" else ALL),
                     "--run-id", RUNS[name], "--json"] for step, which in PLAN]
        err = (root / f"{name}.stderr").open("w")
        procs[name] = (subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(barrier), name, str(root / f"{name}.json"), json.dumps(commands)],
            cwd=root, env=_env(), stdout=subprocess.DEVNULL, stderr=err), err)
    outcomes = {}
    for name, (proc, err) in procs.items():
        proc.wait(timeout=600)
        err.close()
        stderr = (root / f"{name}.stderr").read_text()
        result = root / f"{name}.json"
        assert result.exists(), f"process {name} left no result (exit {proc.returncode}): {stderr[-3000:]}"
        results = json.loads(result.read_text())
        outcomes[name] = {"results": dict(zip([s for s, _ in PLAN], results, strict=False)),
                          "stderr": stderr, "exit": proc.returncode}
        retries = [line for line in stderr.splitlines() if "concurrent commit on" in line]
        print(f"process {name}: {len(retries)} Delta conflict retries", *retries, sep="\n  ")
    return {"data": data, "conf": root / "conf", "outcomes": outcomes,
            "source_rows": source_rows.value_counts().to_dict()}


def _spans(spark: Any, race: dict[str, Any], step: str) -> dict[str, tuple[Any, Any]]:
    """run -> (start, end) of ``step``: end is when run_log recorded it, start that minus the step's
    seconds (from the --json summary, or from the failure row of a step that raised)."""
    log = _table(spark, race["data"], "run_log").where(f"step = '{step}'").toPandas()
    spans = {}
    for name, run_id in RUNS.items():
        rows = log[log["run_id"] == run_id]
        assert len(rows), f"run_log holds no {step} row of run {run_id}"
        steps = race["outcomes"][name]["results"][step].get("summary", {}).get("steps", [])
        seconds = steps[0]["seconds"] if steps else float(rows["seconds"].max())
        end = rows["logged_at"].max()
        spans[run_id] = (end - timedelta(seconds=seconds), end)
    return spans


def _assert_overlap(spark: Any, race: dict[str, Any], step: str) -> None:
    (s1, e1), (s2, e2) = (spans := _spans(spark, race, step)).values()
    overlap = (min(e1, e2) - max(s1, s2)).total_seconds()
    shorter = min((e1 - s1).total_seconds(), (e2 - s2).total_seconds())
    assert overlap > 0.3 * shorter, f"the two processes' {step} did not run at the same time: {spans}"


@pytest.mark.slow
@pytest.mark.spark
def test_disjoint_tenant_sets_both_succeed(spark: Any, race: dict[str, Any]) -> None:
    data = race["data"]
    owner = {t: RUNS[n] for n, ts in SETS.items() for t in ts}
    for name, o in race["outcomes"].items():
        r = o["results"].get("ingest", {})
        assert r.get("code") == 0, (name, r, o["stderr"][-3000:])
    _assert_overlap(spark, race, "ingest")

    tenants = _table(spark, data, "tenants").toPandas()
    assert sorted(tenants["tenant_id"]) == ALL  # registered once each, by two processes at once
    bronze = _table(spark, data, "bronze_demo").toPandas()
    assert bronze.groupby("tenant_id").size().to_dict() == {t: race["source_rows"][t] for t in ALL}
    assert bronze["_batch_id"].nunique() == 1
    assert (bronze.groupby("tenant_id")["_ingested_at"].nunique() == 1).all()  # one write per tenant
    for name in ("run_log", "cost_ledger"):
        df = _table(spark, data, name).where("step = 'ingest' AND tenant_id IS NOT NULL").toPandas()
        assert len(df) == len(owner), name
        assert dict(zip(df["tenant_id"], df["run_id"], strict=True)) == owner, name
    log = _table(spark, data, "run_log").where("step = 'ingest'").toPandas()
    assert set(log["status"]) == {"ok"}


@pytest.mark.slow
@pytest.mark.spark
def test_same_tenants_never_duplicate_and_a_rerun_converges(spark: Any, race: dict[str, Any]) -> None:
    """Both processes validate every tenant at once: Delta serialises the commits, a loser retries
    with backoff or exits 1 naming the conflicting table; no tenant ends with a mix of runs."""
    from tenantml.io.context import JobContext
    from tenantml.steps.runner import run_step

    data = race["data"]
    codes = {}
    for name, o in race["outcomes"].items():
        r = o["results"]["validate"]
        assert "uncaught" not in r, (name, r["uncaught"])
        codes[name] = r["code"]
        assert r["code"] in (0, 1), (name, r, o["stderr"][-3000:])
        if r["code"] == 1:  # a clean failure: one line naming the conflict and the table
            message = r["summary"]["error"]
            assert r["summary"]["status"] == "error" and "concurrent write conflict" in message, message
            assert "_demo" in message and "Traceback" not in o["stderr"], message
    assert 0 in codes.values(), codes
    _assert_overlap(spark, race, "validate")
    bronze = _table(spark, data, "bronze_demo").groupBy("tenant_id").count().toPandas()
    expected = dict(zip(bronze["tenant_id"], bronze["count"], strict=True))

    def runs_per_table() -> dict[str, set[str]]:
        found, kept = {}, dict.fromkeys(ALL, 0)
        for name, run_col, key in (("silver_demo", "_run_id", ["tenant_id", "customer_id"]),
                                   ("quarantine_demo", "_run_id", None),  # may hold a key twice, by design
                                   ("quality_demo", "run_id", ["tenant_id"])):
            df = _table(spark, data, name).toPandas()
            assert key is None or not df.duplicated(key).any(), name
            per_tenant = df.groupby("tenant_id")[run_col].nunique()
            assert (per_tenant == 1).all(), (name, df.groupby("tenant_id")[run_col].unique())
            found[name] = set(df[run_col])
            if name != "quality_demo":
                for t, n in df.groupby("tenant_id").size().items():
                    kept[t] += n
        assert kept == expected  # silver + quarantine = bronze, per tenant: nothing lost, nothing twice
        return found

    seen = runs_per_table()
    assert all(runs <= set(RUNS.values()) for runs in seen.values()), seen

    ctx = JobContext.create(conf_dir=race["conf"], data_dir=data, spark=spark, run_id="mp-rerun")
    assert run_step(ctx, "validate", "demo", ALL).status == "ok"
    assert runs_per_table() == {n: {"mp-rerun"} for n in ("silver_demo", "quarantine_demo", "quality_demo")}


@pytest.mark.slow
def test_processes_opening_a_new_mlflow_store_at_once(tmp_path: Path) -> None:
    """Two processes open the same fresh SQLite store at once: MLflow creates its tables when they are
    missing, and without the context's lock the other fails ("table ... already exists")."""
    code = r'''
import sys, time
from pathlib import Path
import mlflow
from tenantml.io.context import JobContext
ctx = JobContext.create(conf_dir=sys.argv[1], data_dir=sys.argv[2])
Path(sys.argv[3]).touch()
while not Path(sys.argv[4]).exists():
    time.sleep(0.005)
ctx.mlflow
print(ctx.experiment_id())
'''
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(REPO / "conf"), str(tmp_path / "data"),
                               str(tmp_path / f"ready{i}"), str(go)], env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment, created once
