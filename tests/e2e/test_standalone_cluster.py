"""The whole pipeline on a real multi-process Spark cluster: a standalone master and two workers
started from PySpark's own `spark-class`, each a JVM of its own whose executor runs its own Python
workers. The shared model trains with `training.shared.local_mode: false` (TorchDistributor barrier
tasks on the executors, torchrun in each, gloo between them) and a giant tenant goes down the
data-parallel path the same way; what the torch processes read lives in the staging folder
(`training.staging_dir`), never in a driver temp folder.

The driver runs in a process of its own (as in tests/integration/test_spark_connect.py): this test
process already holds a local session, and the driver needs its own TMPDIR, so that nothing it
leaves in a temp folder goes unseen. Every cluster process is stopped in the fixture's finalizer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Minutes on two idle cores; the cluster's start and the driver's run count towards the first test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
REPO = Path(__file__).resolve().parents[2]
TENANTS = ["t000", "t001", "t002", "t003"]
GIANT = "t000"
CONF = """\
training:
  min_rows: 100
  max_epochs: 2
  patience: 2
  shared: {{max_epochs: 2, num_processes: 2, local_mode: false}}
  strategies: [tenant, shared]
  tiers: {{giant_path: distributed}}
  tenant_quotas: {{{giant}: {{tier: giant}}}}
spark:
  master: "spark://127.0.0.1:{port}"
  shuffle_partitions: 2
  conf:
    spark.driver.memory: 1g
    spark.executor.memory: 1g
    spark.ui.enabled: "true"
    spark.ui.port: "{ui_port}"
    # The session starts once both executors are in (the cores the app expects: spark.cores.max).
    spark.cores.max: "2"
    spark.scheduler.minRegisteredResourcesRatio: "1.0"
    spark.scheduler.maxRegisteredResourcesWaitingTime: 120s
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read().decode())


# --------------------------------------------------------------------------- the driver (child)


def _jvm_ancestor() -> int | None:
    """The pid of the nearest `java` process above this one (an executor's, from its Python worker)."""
    pid = os.getppid()
    while pid > 1:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if comm == "java":
            return pid
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None


def _executor_identity(_: Any) -> Any:
    import os

    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    ctx.barrier()  # both tasks at once: one per executor (one core each)
    yield {"partition": ctx.partitionId(), "python_pid": os.getpid(), "jvm_pid": _jvm_ancestor(),
           "address": ctx.getTaskInfos()[ctx.partitionId()].address}


def _child(root: Path) -> dict[str, Any]:
    """The driver: the pipeline on the cluster; returns what the test checks."""
    import tempfile
    import traceback

    from pyspark.sql import functions as F

    from tenantml.apps.demo import DemoSpec, write_demo_source
    from tenantml.io import read_table
    from tenantml.io.context import JobContext
    from tenantml.io.tenants import list_tenant_ids, update_tenants
    from tenantml.steps.runner import pipeline_steps, run_pipeline

    # Every temp file or folder the driver creates, with whether tenantml's training (or the torch
    # launcher) asked for it: none of those may exist off local mode.
    temp_calls: list[dict[str, Any]] = []

    driver_tmp = os.path.realpath(tempfile.gettempdir())

    def audit(event: str, args: tuple[Any, ...]) -> None:
        # (PySpark's own spooling of large task closures to the driver JVM's local dir is not a
        # temp folder of the driver's: Spark ships those bytes to the executors itself.)
        if event in ("tempfile.mkdtemp", "tempfile.mkstemp") and \
                os.path.realpath(str(args[0])).startswith(driver_tmp + os.sep):
            frames, f = [], sys._getframe(1)
            while f is not None:
                frames.append(f"{f.f_code.co_filename}:{f.f_lineno}")
                f = f.f_back
            temp_calls.append({"event": event, "path": str(args[0]), "by_training": [
                p for p in frames if "tenantml/training/" in p or "pyspark/ml/torch/" in p]})

    sys.addaudithook(audit)
    started = time.perf_counter()
    ctx = JobContext.create(conf_dir=root / "conf", data_dir=root / "data")
    spark = ctx.spark
    sc = spark.sparkContext
    out: dict[str, Any] = {"master": sc.master, "parallelism": sc.defaultParallelism,
                           "driver_tmp": tempfile.gettempdir(), "staging_dir": str(ctx.staging_dir),
                           "driver_jvm_pid": int(spark._jvm.ProcessHandle.current().pid())}  # type: ignore[attr-defined]
    try:
        out["identities"] = sc.parallelize(range(2), 2).barrier().mapPartitions(_executor_identity).collect()
        out["executors"] = sorted(str(sc._jsc.sc().getExecutorIds().mkString(",")).split(","))  # type: ignore[union-attr]
        out["master_while_running"] = _get_json(os.environ["TEST_MASTER_WEB_URL"] + "/json/")
        write_demo_source(ctx.source_path("demo"), DemoSpec(tenants=len(TENANTS), largest=900, smallest=150))
        results = run_pipeline(ctx, dataset="demo", steps=pipeline_steps(stop="validate_scoring"))
        update_tenants(spark, ctx.tables.tenants, list_tenant_ids(spark, ctx.tables.tenants),
                       consent_share_data=True)
        results += run_pipeline(ctx, dataset="demo", steps=pipeline_steps(start="monitor"))
        out["pipeline_seconds"] = round(time.perf_counter() - started, 1)
        out["steps"] = {r.step: {"status": r.status, "summary": r.summary, "mlflow_run_id": r.mlflow_run_id,
                                 "seconds": round(r.seconds, 1),
                                 "tenants": {t.tenant_id: {"status": t.status, "detail": t.detail}
                                             for t in r.tenants if t.tenant_id},
                                 "errors": [t.error for t in r.tenants if t.error][:3]} for r in results}
        run_id = out["steps"]["train_shared"]["mlflow_run_id"]
        if run_id:
            shared_run = ctx.mlflow.get_run(run_id)
            out["shared_params"] = dict(shared_run.data.params)
            local = ctx.mlflow.download_artifacts(run_id, "read_manifest.json", str(root / "artifacts"))
            out["read_manifest"] = json.loads(Path(local).read_text(encoding="utf-8"))
        preds = read_table(spark, ctx.tables.predictions("demo")).where(F.col("run_id") == ctx.run_id)
        out["predicted"] = {r["tenant_id"]: int(r["n"]) for r in
                            preds.groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
        out["barrier_tasks"] = _barrier_tasks(spark)
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        spark.stop()
    out["temp_calls"] = temp_calls
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _barrier_tasks(spark: Any) -> list[dict[str, Any]]:
    """From the driver's REST API: the 2-task stages the torch launcher ran (torchrun in each task),
    each with the executors its tasks ran on."""
    base = spark.sparkContext.uiWebUrl.rstrip("/") + "/api/v1/applications/"
    app = spark.sparkContext.applicationId
    found = []
    for stage in _get_json(f"{base}{app}/stages?status=complete"):
        tasks = _get_json(f"{base}{app}/stages/{stage['stageId']}/{stage['attemptId']}/taskList?length=100")
        if "distributed.py" in stage.get("name", "") or "distributed.py" in stage.get("details", ""):
            found.append({"stage": stage["stageId"], "name": stage["name"],
                          "executors": sorted({t["executorId"] for t in tasks}), "tasks": len(tasks)})
    return found


# --------------------------------------------------------------------------- the cluster (fixture)


class _Cluster:
    def __init__(self, root: Path) -> None:
        import pyspark

        self.root = root
        self.spark_home = Path(pyspark.__file__).resolve().parent
        self.port, self.web_port = _free_port(), _free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "SPARK_HOME": str(self.spark_home), "SPARK_LOCAL_IP": "127.0.0.1",
                    "SPARK_DAEMON_MEMORY": "256m", "PYSPARK_PYTHON": sys.executable}
        for k in ("SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED", "SPARK_LOCAL_REMOTE", "PYSPARK_GATEWAY_PORT"):
            self.env.pop(k, None)

    def _start(self, name: str, *args: str, cwd: Path) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        log = (self.root / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(
            [str(self.spark_home / "bin" / "spark-class"), *args], cwd=cwd, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))

    def start(self, workers: int = 2, timeout: float = 180) -> None:
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                    "--port", str(self.port), "--webui-port", str(self.web_port), cwd=self.root / "master")
        for i in range(workers):
            work = self.root / f"worker{i}"
            self._start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                        "--cores", "1", "--memory", "2g", "--work-dir", str(work),
                        "--webui-port", str(_free_port()), f"spark://127.0.0.1:{self.port}", cwd=work)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args for p in self.procs if p.poll() is not None]
            assert not dead, f"a cluster process exited: {dead}\n{self.logs()}"
            try:
                if self.state()["aliveworkers"] >= workers:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"{workers} workers did not register in {timeout} s\n{self.logs()}")

    def state(self) -> dict[str, Any]:
        return dict(_get_json(f"http://127.0.0.1:{self.web_port}/json/"))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for p in reversed(self.procs):  # workers first; each in its own session with its children
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Cluster]:
    c = _Cluster(tmp_path_factory.mktemp("standalone"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster_run(cluster: _Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cluster-run")
    shutil.copytree(REPO / "conf", root / "conf")
    (root / "conf" / "local" / "test.yml").write_text(
        CONF.format(port=cluster.port, ui_port=_free_port(), giant=GIANT))
    driver_tmp = root / "driver-tmp"
    driver_tmp.mkdir()
    env = {**cluster.env, "TMPDIR": str(driver_tmp), "TEST_MASTER_WEB_URL": f"http://127.0.0.1:{cluster.web_port}"}
    proc = subprocess.run([sys.executable, __file__, str(root)], cwd=root, env=env, text=True,
                          capture_output=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads((root / "result.json").read_text(encoding="utf-8"))
    assert "error" not in out, out["error"] + "\n" + proc.stderr[-4000:] + cluster.logs()
    out["driver_tmp_left"] = sorted(p.name for p in driver_tmp.iterdir())
    out["data_dir"] = str(root / "data")
    return out


def test_the_driver_ran_on_the_standalone_master_with_two_executor_jvms(cluster_run: dict[str, Any]) -> None:
    assert cluster_run["master"].startswith("spark://127.0.0.1:")
    assert cluster_run["parallelism"] == 2 and cluster_run["executors"] == ["0", "1"]
    ids = cluster_run["identities"]
    jvms = {i["jvm_pid"] for i in ids}
    assert len(ids) == 2 and None not in jvms and len(jvms) == 2, ids  # one JVM per executor ...
    assert cluster_run["driver_jvm_pid"] not in jvms  # ... neither of them the driver's
    assert len({i["python_pid"] for i in ids}) == 2
    # While the driver ran, the master had granted its app one core on each of the two workers.
    master = cluster_run["master_while_running"]
    (app,) = master["activeapps"]
    assert app["cores"] == 2 and [w["coresused"] for w in master["workers"]] == [1, 1], master


def test_every_step_runs_ok_and_every_tenant_is_scored(cluster_run: dict[str, Any]) -> None:
    steps = cluster_run["steps"]
    assert {s: v["status"] for s, v in steps.items()} == dict.fromkeys(steps, "ok"), \
        {s: v["errors"] for s, v in steps.items() if v["status"] != "ok"}
    scored = {t for t, v in steps["score"]["tenants"].items() if v["status"] == "ok"}
    assert scored == set(TENANTS)
    assert set(cluster_run["predicted"]) == scored and all(n > 0 for n in cluster_run["predicted"].values())


def test_the_shared_model_trained_on_executors_off_local_mode(cluster_run: dict[str, Any]) -> None:
    summary = cluster_run["steps"]["train_shared"]["summary"]
    assert summary.get("contributors") == len(TENANTS), summary
    params = cluster_run["shared_params"]
    assert params["local_mode"].lower() == "false" and params["num_processes"] == "2", params
    assert params["backend"] == "torch_distributor" and params["comm"] == "gloo", params
    manifest = cluster_run["read_manifest"]
    assert sorted(m["rank"] for m in manifest) == [0, 1] and all(m["rows"] > 0 for m in manifest)
    # The processes read the shard export in the staging folder; it stays for reruns of that version.
    exports = list(Path(cluster_run["staging_dir"], "shared", "demo").glob("v*-*/_shard=*/*.parquet"))
    assert {p.parent.name for p in exports} == {"_shard=0", "_shard=1"}, exports


def test_the_giant_trained_data_parallel_on_executors(cluster_run: dict[str, Any]) -> None:
    giant = cluster_run["steps"]["train"]["tenants"][GIANT]
    assert giant["status"] == "ok" and giant["detail"]["tier"] == "giant", giant
    assert giant["detail"]["path"] == "distributed x2", giant
    others = {t: v["detail"]["path"] for t, v in cluster_run["steps"]["train"]["tenants"].items()
              if t != GIANT and v["status"] == "ok"}
    assert others and not any(p.startswith("distributed") for p in others.values()), others
    assert list(Path(cluster_run["staging_dir"], "giants").iterdir()) == []  # its shards are gone


def test_torch_ran_in_barrier_tasks_on_both_executors(cluster_run: dict[str, Any]) -> None:
    # One barrier stage for the shared model, one for the giant: each task ran torchrun on its own
    # executor (no torch process ran on the driver).
    stages = cluster_run["barrier_tasks"]
    assert len(stages) >= 2, stages
    assert all(s["tasks"] == 2 and s["executors"] == ["0", "1"] for s in stages), stages


def test_no_training_file_in_a_driver_temp_folder(cluster_run: dict[str, Any]) -> None:
    by_training = [c for c in cluster_run["temp_calls"] if c["by_training"]]
    assert by_training == [], by_training
    assert not [n for n in cluster_run["driver_tmp_left"] if n.startswith("tenantml-")], \
        cluster_run["driver_tmp_left"]


if __name__ == "__main__":  # the driver process of `cluster_run`
    _root = Path(sys.argv[1])
    sys.path.insert(0, str(REPO / "tools"))
    _result = _child(_root)
    (_root / "result.json").write_text(json.dumps(_result, indent=2, default=str), encoding="utf-8")
