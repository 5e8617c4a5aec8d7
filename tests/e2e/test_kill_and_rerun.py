"""SIGKILL the pipeline inside each step, rerun it, and get exactly what a clean run produces."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tenantml.steps.runner import pipeline_steps

pytestmark = [pytest.mark.slow, pytest.mark.spark]
REPO = Path(__file__).resolve().parents[2]
# (the step killed, phase text printed on stderr when it is under way, seconds to wait before the
# kill). Each run after the first starts at the step the previous one was killed in, as an operator
# reruns a crashed pipeline (`pipeline --from STEP`): that step is rerun over what the kill left
# behind, then the run is killed in the next one.
KILL_POINTS = [
    ("ingest", "ingest demo: writing batch", 0.5),
    ("ingest_scoring", "ingest_scoring demo: writing batch", 0.5),
    ("validate", "validate demo: writing silver", 1.0),
    ("monitor", "monitor demo: realised metrics", 0.5),
    # Tenant models being logged, registration next. (A bare "logging" would match Spark's
    # start-up banner, "To adjust logging level ...", and kill before any step.)
    ("train", "tenant models (", 0.2),
    ("promote", "promote demo: evaluating", 1.0),  # candidates judged, aliases about to move
    ("score", "score demo: scoring", 1.0),
]
ARGS = ["--tenants-count", "5", "--largest", "900", "--smallest", "20"]


def _cmd(command: str, data: Path) -> list[str]:
    return [sys.executable, "-m", "tenantml.apps.cli", command, "--data-dir", str(data)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "COLUMNS": "200"}


def _kill_during(workdir: Path, data: Path, run_id: str, start: str, marker: str, delay: float) -> int | None:
    """Run the pipeline from ``start`` and SIGKILL its whole process group (driver JVM included) at
    ``marker``."""
    proc = subprocess.Popen([*_cmd("pipeline", data), "--from", start.replace("_", "-"), "--run-id", run_id], cwd=workdir,
                            env=_env(), text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stderr is not None
    killed = False
    for line in proc.stderr:
        if marker in line:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=600)
    return proc.returncode if killed else None


def _finished_steps(spark: Any, data: Path) -> dict[str, set[str]]:
    """Per run id, the steps it finished: a step writes its `run_log` rows when it ends (ok, skipped
    or blocked per tenant), so a step killed mid-way has none, and a step that failed has a failed one."""
    rows = _table(spark, data, "run_log").select("run_id", "step", "status").distinct().collect()
    logged: dict[str, set[str]] = {}
    failed: dict[str, set[str]] = {}
    for row in rows:
        logged.setdefault(row["run_id"], set()).add(row["step"])
        if row["status"] == "failed":
            failed.setdefault(row["run_id"], set()).add(row["step"])
    return {run: steps - failed.get(run, set()) for run, steps in logged.items()}


@pytest.fixture(scope="module")
def dirs(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill")
    shutil.copytree(REPO / "conf", root / "conf")
    # The tables are compared by key, never by score: two epochs are enough.
    (root / "conf" / "local" / "fast.yml").write_text("training: {min_rows: 100, max_epochs: 2, patience: 2}\n")
    crashed, clean = root / "crashed", root / "clean"
    gen = subprocess.run([*_cmd("demo", crashed), "--generate-only", *ARGS], cwd=root, env=_env(),
                         capture_output=True, text=True, timeout=600, check=False)
    assert gen.returncode == 0, gen.stderr[-2000:]
    shutil.copytree(crashed, clean)  # the same source files in both
    # The clean run: a separate process on its own data directory, side by side with the kills
    # (being slowed down by it only makes each killed step last longer).
    clean_log = root / "clean.stderr"
    with clean_log.open("w") as err:  # a file, not a pipe: the process can never block on a full one
        clean_run = subprocess.Popen(_cmd("pipeline", clean), cwd=root, env=_env(), stdout=subprocess.DEVNULL,
                                     stderr=err)
    try:
        starts = ["ingest", *[step for step, _, _ in KILL_POINTS[:-1]]]
        kills = [_kill_during(root, crashed, f"kill-{i}", start, marker, delay)
                 for i, (start, (_, marker, delay)) in enumerate(zip(starts, KILL_POINTS, strict=True))]
        assert all(code == -signal.SIGKILL for code in kills), kills
        # The rerun of the last killed step and what follows it.
        rerun = subprocess.run([*_cmd("pipeline", crashed), "--from", KILL_POINTS[-1][0], "--run-id", "rerun"],
                               cwd=root, env=_env(), capture_output=True, text=True, timeout=900, check=False)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert clean_run.wait(timeout=900) == 0, clean_log.read_text()[-3000:]
    finally:
        if clean_run.poll() is None:
            clean_run.kill()
    # Each run was killed inside its step: the steps before it in that run all finished, that one
    # not; the rerun finished the rest.
    finished = _finished_steps(spark, crashed)
    for i, (start, (killed_in, _, _)) in enumerate(zip(starts, KILL_POINTS, strict=True)):
        run = finished.get(f"kill-{i}", set())
        assert run == set(pipeline_steps()[pipeline_steps().index(start):pipeline_steps().index(killed_in)]), (i, killed_in, sorted(run))
    assert finished["rerun"] == set(pipeline_steps()[pipeline_steps().index(KILL_POINTS[-1][0]):])
    return {"crashed": crashed, "clean": clean}


def _table(spark: Any, data: Path, name: str) -> Any:
    return spark.read.format("delta").load(str(data / "warehouse" / name))


@pytest.mark.parametrize(("table", "key"), [
    ("bronze_demo", ["_tenant_raw", "customer_id", "churned", "tenure_months"]),
    ("silver_demo", ["tenant_id", "customer_id", "churned", "tenure_months", "plan"]),
    ("quarantine_demo", ["_tenant_raw", "customer_id", "_reason"]),
    ("quality_demo", ["tenant_id", "rows_in", "rows_valid", "rows_quarantined", "blocked"]),
    ("inference_demo", ["_tenant_raw", "customer_id", "_batch_id", "tenure_months"]),
    ("scoring_demo", ["tenant_id", "customer_id", "_batch_id", "tenure_months"]),
    ("predictions_demo", ["tenant_id", "entity_key", "batch_id"]),
    ("latest_predictions_demo", ["tenant_id", "entity_key", "batch_id"]),
    ("monitoring_demo", ["tenant_id", "batch_id", "kind", "feature"]),
])
def test_tables_equal_a_clean_run(spark: Any, dirs: dict[str, Path], table: str, key: list[str]) -> None:
    crashed = _table(spark, dirs["crashed"], table).select(*key).toPandas()
    clean = _table(spark, dirs["clean"], table).select(*key).toPandas()
    assert len(crashed) == len(clean)
    assert crashed.duplicated().sum() == clean.duplicated().sum()
    ordered = [c.sort_values(key, na_position="first").reset_index(drop=True).fillna("<null>").astype(str)
               for c in (crashed, clean)]
    assert ordered[0].equals(ordered[1])


def test_every_champion_is_in_the_model_store_and_served(spark: Any, dirs: dict[str, Path]) -> None:
    import mlflow

    data = dirs["crashed"]
    uri = f"sqlite:///{data / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # other tests move the global URIs
    store = _table(spark, data, "model_store").toPandas()
    preds = _table(spark, data, "predictions_demo").toPandas()
    served = preds.groupby("tenant_id")["model_version"].first().to_dict()
    assert served
    for tenant, version in served.items():
        champion = client.get_model_version_by_alias(f"demo__{tenant}", "champion")
        assert str(champion.version) == version
        assert ((store["tenant_id"] == tenant) & (store["model_version"] == version)).sum() == 1
