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

from tenantml.steps.runner import pipeline_steps

pytestmark = [pytest.mark.slow]


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tenantml.apps.cli", *args], cwd=cwd, env=cli_env(), text=True,
                          capture_output=True, timeout=900, check=False)


# Several commands through the CLI's entry point (`tenantml.apps.cli.run`, the exit code of
# `python -m tenantml.apps.cli`) in one separate process: one Python start-up and one JVM for all of them
# instead of one each. Each command's stdout is captured on its own; the results go to a file, as
# the JVM writes to the same file descriptors.
_BATCH = """
import contextlib, io, json, sys
from tenantml.apps.cli import run
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run(argv)
    results.append({"argv": argv, "code": code, "stdout": out.getvalue()})
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
"""


def _cli_batch(commands: list[list[str]], cwd: Path) -> list[dict[str, Any]]:
    out = cwd / "batch.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", _BATCH, json.dumps(commands), str(out)], cwd=cwd, env=cli_env(),
                          text=True, capture_output=True, timeout=900, check=False)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(out.read_text())
    assert [r["argv"] for r in results] == commands
    return results


@pytest.fixture(scope="module")
def workdir(demo_cli_run: dict[str, Any]) -> Path:
    """Where `tenantml demo --data-dir data` ran (tests/e2e/conftest.py), with conf/ in it."""
    return Path(demo_cli_run["root"])


@pytest.fixture(scope="module")
def demo(demo_cli_run: dict[str, Any]) -> dict[str, Any]:
    return dict(demo_cli_run["summary"])


LISTINGS = ("models", "decisions", "tenants", "runs")
# `tenants` filtered by dataset and as a table (the compact default columns, then every column).
TENANT_LISTINGS = {"tenants demo": ["tenants", "--dataset", "demo", "--json"],
                   "tenants other": ["tenants", "--dataset", "mlc_churn", "--json"],
                   "tenants table": ["tenants", "--dataset", "demo"],
                   "tenants all columns": ["tenants", "--all-columns"]}


@pytest.fixture(scope="module")
def after_demo(demo_cli_run: dict[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """On the demo's data as the demo process left it: the listing commands, then (on a machine
    without CUDA) a train asked to run on CUDA, so that every tenant fails. All in one separate
    process, in that order: `runs` lists the latest run."""
    import torch

    data = str(demo_cli_run["cli_data"])
    commands = [[name, "--json", "--data-dir", data, "--quiet"] for name in LISTINGS]
    commands += [[*argv, "--data-dir", data, "--quiet"] for argv in TENANT_LISTINGS.values()]
    if not torch.cuda.is_available():
        conf = workdir / "conf-cuda"
        shutil.copytree(workdir / "conf", conf)
        (conf / "local" / "zz.yml").write_text("training: {device: cuda}\n")
        commands.append(["train", "--json", "--conf-dir", str(conf), "--data-dir", data, "--tenants", "t000,t001"])
    results = _cli_batch(commands, workdir)
    named = [*LISTINGS, *TENANT_LISTINGS, *(["train"] if len(results) > len(LISTINGS) + len(TENANT_LISTINGS) else [])]
    return dict(zip(named, results, strict=True))


def test_demo_summary_is_machine_readable(demo: dict[str, Any], workdir: Path) -> None:
    steps = {s["step"]: s for s in demo["steps"]}
    assert demo["status"] == "ok" and list(steps) == list(pipeline_steps())
    # Rows whose label is empty are not training rows: neither kept in silver nor counted as rejected.
    validate = steps["validate"]
    assert validate["rows_unlabelled"] > 0
    assert steps["ingest"]["rows_in"] == validate["rows_out"] + validate["rows_quarantined"] + validate["rows_unlabelled"]
    assert steps["validate"]["tenants_blocked"] == 1
    assert steps["train"]["models_trained"] >= 3 and steps["train"]["mlflow_run_id"]
    # The demo's consents: every tenant but t003 contributes, so a shared model and tuned ones exist.
    assert steps["train_shared"]["models_trained"] == 1 and steps["train_tuned"]["models_trained"] >= 3
    assert steps["score"]["rows_scored"] > 0
    assert any("predictions_demo" in t for t in steps["score"]["tables_written"])
    assert len({s["run_id"] for s in demo["steps"]}) == 1
    assert (workdir / "data" / "mlflow" / "mlflow.db").exists()


def test_listing_commands(after_demo: dict[str, dict[str, Any]]) -> None:
    assert all(after_demo[name]["code"] == 0 for name in LISTINGS), {n: after_demo[n]["code"] for n in LISTINGS}
    models = json.loads(after_demo["models"]["stdout"])
    assert {m["tenant_id"] for m in models} >= {"t000", "t001", "t002"}
    assert all(m["champion"] and m["strategy"] in ("tenant", "tuned", "shared") for m in models)
    decisions = json.loads(after_demo["decisions"]["stdout"])
    by_tenant = {d["tenant_id"]: d for d in decisions}
    assert {"t000", "t001", "t002"} <= set(by_tenant)
    assert all(by_tenant[t]["decision"] == "promoted" and by_tenant[t]["tenant"] is not None
               and by_tenant[t]["tuned"] is not None for t in ("t000", "t001", "t002"))
    tenants = json.loads(after_demo["tenants"]["stdout"])
    assert "t-dirty" in {t["tenant_id"] for t in tenants}
    runs = json.loads(after_demo["runs"]["stdout"])
    assert {r["step"] for r in runs} == set(pipeline_steps())


def test_tenants_by_dataset_and_compact_columns(after_demo: dict[str, dict[str, Any]]) -> None:
    assert all(after_demo[name]["code"] == 0 for name in TENANT_LISTINGS), \
        {n: (after_demo[n]["code"], after_demo[n]["stdout"][-500:]) for n in TENANT_LISTINGS}
    everyone = json.loads(after_demo["tenants"]["stdout"])
    demo = json.loads(after_demo["tenants demo"]["stdout"])
    # Every registered tenant came from the demo's rows (bronze/silver); no other dataset has rows.
    assert sorted(t["tenant_id"] for t in demo) == sorted(t["tenant_id"] for t in everyone)
    assert "t-dirty" in {t["tenant_id"] for t in demo} and json.loads(after_demo["tenants other"]["stdout"]) == []
    assert set(demo[0]) >= {"consent_share_data", "created_at"}  # --json keeps every column
    table = after_demo["tenants table"]["stdout"].splitlines()
    (header,) = [line for line in table if "tenant_id" in line]
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["tenant_id", "strategy", "consents", "status"]
    rows = {line.split("│")[1].strip(): line for line in table if line.startswith("│")}
    assert set(rows) == {t["tenant_id"] for t in demo}  # one line per tenant: nothing wrapped
    # The demo's consents: t003 does not share its data, everyone else does, all accept shared models.
    assert "│ shared inference " in rows["t003"] and "share data, shared inference" in rows["t000"]
    wide = after_demo["tenants all columns"]["stdout"]
    assert all(c in wide for c in ("consent_share_data", "consent_shared_inference", "created_at", "updated_at"))


def test_the_demo_starts_quietly(demo_cli_run: dict[str, Any]) -> None:
    """With the jar folder set-up fills, the command's first stderr line is its own: no Ivy report,
    no Spark banner."""
    from tenantml.io.spark import local_delta_jars

    if local_delta_jars() is None:
        pytest.skip("no Delta jars in the jar folder (run `make setup`): sessions resolve them through Ivy")
    err = demo_cli_run["stderr"].splitlines()
    noise = [line for line in err if any(s in line for s in (":: resolving dependencies", "found io.delta",
                                                               "downloading", "Ivy Default Cache",
                                                               "log4j profile", "Setting default log level",
                                                               "incubator modules"))]
    assert not noise, "\n".join(noise[:20])
    assert err and "demo data written to" in err[0], err[:5]


def test_hostile_tenant_argument_is_a_usage_error(workdir: Path) -> None:
    proc = _cli("train", "--data-dir", "data", "--tenants", "t000,../../etc", cwd=workdir)
    assert proc.returncode == 2
    assert "invalid tenant id '../../etc'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pipeline_from_a_step_rejects_unknown_steps_and_misplaced_options(workdir: Path) -> None:
    unknown = _cli("pipeline", "--data-dir", "data", "--from", "deploy", cwd=workdir)
    assert unknown.returncode == 2 and "invalid choice: 'deploy'" in unknown.stderr
    source = _cli("pipeline", "--data-dir", "data", "--from", "train", "--source", "elsewhere", cwd=workdir)
    assert source.returncode == 2 and "--source 'elsewhere': no step from train on takes it" in source.stderr
    assert "Traceback" not in unknown.stderr + source.stderr


def test_failure_exit_code_when_every_tenant_fails(after_demo: dict[str, dict[str, Any]]) -> None:
    if "train" not in after_demo:
        pytest.skip("needs a machine without CUDA to make every tenant's training fail")
    train = after_demo["train"]
    summary = json.loads(train["stdout"])
    assert train["code"] == 1 and summary["status"] == "failed"
    assert set(summary["steps"][0]["failures"]) == {"t000", "t001"}
