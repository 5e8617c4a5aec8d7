"""The CLI as a user runs it: a separate process, its own Spark session, the demo data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tenantml.pipeline import STEPS

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    return subprocess.run([sys.executable, "-m", "tenantml.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    shutil.copytree(REPO / "conf", root / "conf")
    (root / "conf" / "local" / "fast.yml").write_text("training: {min_rows: 100, max_epochs: 5, patience: 2}\n")
    return root


@pytest.fixture(scope="module")
def demo(workdir: Path) -> dict[str, Any]:
    proc = _cli("demo", "--json", "--data-dir", "data", "--tenants-count", "5", "--largest", "1200",
                "--smallest", "20", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_demo_summary_is_machine_readable(demo: dict[str, Any], workdir: Path) -> None:
    steps = {s["step"]: s for s in demo["steps"]}
    assert demo["status"] == "ok" and list(steps) == list(STEPS)
    assert steps["ingest"]["rows_in"] == steps["validate"]["rows_out"] + steps["validate"]["rows_quarantined"]
    assert steps["validate"]["tenants_blocked"] == 1
    assert steps["train"]["models_trained"] >= 3 and steps["train"]["mlflow_run_id"]
    # The demo's consents: every tenant but t003 contributes, so a shared model and tuned ones exist.
    assert steps["train_shared"]["models_trained"] == 1 and steps["train_tuned"]["models_trained"] >= 3
    assert steps["score"]["rows_scored"] > 0
    assert any("predictions_demo" in t for t in steps["score"]["tables_written"])
    assert len({s["run_id"] for s in demo["steps"]}) == 1
    assert (workdir / "data" / "mlflow" / "mlflow.db").exists()


def test_listing_commands(demo: dict[str, Any], workdir: Path) -> None:
    models = json.loads(_cli("models", "--json", "--data-dir", "data", "--quiet", cwd=workdir).stdout)
    assert {m["tenant_id"] for m in models} >= {"t000", "t001", "t002"}
    assert all(m["champion"] and m["strategy"] in ("tenant", "tuned", "shared") for m in models)
    decisions = json.loads(_cli("decisions", "--json", "--data-dir", "data", "--quiet", cwd=workdir).stdout)
    by_tenant = {d["tenant_id"]: d for d in decisions}
    assert {"t000", "t001", "t002"} <= set(by_tenant)
    assert all(by_tenant[t]["decision"] == "promoted" and by_tenant[t]["tenant"] is not None
               and by_tenant[t]["tuned"] is not None for t in ("t000", "t001", "t002"))
    tenants = json.loads(_cli("tenants", "--json", "--data-dir", "data", "--quiet", cwd=workdir).stdout)
    assert "t-dirty" in {t["tenant_id"] for t in tenants}
    runs = json.loads(_cli("runs", "--json", "--data-dir", "data", "--quiet", cwd=workdir).stdout)
    assert {r["step"] for r in runs} == set(STEPS)


def test_hostile_tenant_argument_is_a_usage_error(workdir: Path) -> None:
    proc = _cli("train", "--data-dir", "data", "--tenants", "t000,../../etc", cwd=workdir)
    assert proc.returncode == 2
    assert "invalid tenant id '../../etc'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_failure_exit_code_when_every_tenant_fails(demo: dict[str, Any], workdir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to make every tenant's training fail")
    conf = workdir / "conf-cuda"
    if not conf.exists():
        shutil.copytree(workdir / "conf", conf)
        (conf / "local" / "zz.yml").write_text("training: {device: cuda}\n")
    proc = _cli("train", "--json", "--conf-dir", str(conf), "--data-dir", "data", "--tenants", "t000,t001",
                cwd=workdir)
    summary = json.loads(proc.stdout)
    assert proc.returncode == 1 and summary["status"] == "failed"
    assert set(summary["steps"][0]["failures"]) == {"t000", "t001"}
