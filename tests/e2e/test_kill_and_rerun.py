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

pytestmark = [pytest.mark.slow, pytest.mark.spark]
REPO = Path(__file__).resolve().parents[2]
# (phase text printed on stderr when the step is under way, seconds to wait before the kill)
KILL_POINTS = [
    ("ingest demo: writing batch", 0.5),
    ("validate demo: writing silver", 1.0),
    ("logging", 0.2),  # train: artifacts logged, registration under way
    ("promote demo: evaluating", 1.0),  # promote: candidates judged, aliases about to move
    ("score demo: scoring", 1.0),
]
ARGS = ["--tenants-count", "5", "--largest", "900", "--smallest", "20"]


def _cmd(command: str, data: Path) -> list[str]:
    return [sys.executable, "-m", "tenantml.cli", command, "--data-dir", str(data)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "COLUMNS": "200"}


def _kill_during(workdir: Path, data: Path, marker: str, delay: float) -> int | None:
    """Run the pipeline and SIGKILL its whole process group (driver JVM included) at ``marker``."""
    proc = subprocess.Popen([*_cmd("pipeline", data)], cwd=workdir, env=_env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
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


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill")
    shutil.copytree(REPO / "conf", root / "conf")
    (root / "conf" / "local" / "fast.yml").write_text("training: {min_rows: 100, max_epochs: 4, patience: 2}\n")
    crashed, clean = root / "crashed", root / "clean"
    for d in (crashed, clean):  # the same source files in both
        gen = subprocess.run([*_cmd("demo", d), "--generate-only", *ARGS], cwd=root, env=_env(),
                             capture_output=True, text=True, timeout=600, check=False)
        assert gen.returncode == 0, gen.stderr[-2000:]
    kills = [_kill_during(root, crashed, marker, delay) for marker, delay in KILL_POINTS]
    assert all(code == -signal.SIGKILL for code in kills), kills
    for d in (crashed, clean):
        done = subprocess.run(_cmd("pipeline", d), cwd=root, env=_env(), capture_output=True, text=True,
                              timeout=900, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    return {"crashed": crashed, "clean": clean}


def _table(spark: Any, data: Path, name: str) -> Any:
    return spark.read.format("delta").load(str(data / "warehouse" / name))


@pytest.mark.parametrize(("table", "key"), [
    ("bronze_demo", ["_tenant_raw", "customer_id", "churned", "tenure_months"]),
    ("silver_demo", ["tenant_id", "customer_id", "churned", "tenure_months", "plan"]),
    ("quarantine_demo", ["_tenant_raw", "customer_id", "_reason"]),
    ("quality_demo", ["tenant_id", "rows_in", "rows_valid", "rows_quarantined", "blocked"]),
    ("predictions_demo", ["tenant_id", "entity_key"]),
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
