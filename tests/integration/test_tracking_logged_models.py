"""`track_training`/`track_shared` on a real MLflow SQLite store: every tenant candidate is a
LoggedModel of the job run (no child runs by default), registered versions keep their tags and load
by `models:/<name>/<version>` and `models:/<model_id>`; `tracking.tenant_runs` brings child runs
back; offboarding purges one tenant's models and runs and leaves the others'."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest

from tenantml.io.context import JobContext
from tenantml.io.model_store import model_sha256
from tenantml.training.fit import RESULT_COLUMNS

pytestmark = [pytest.mark.spark]
REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
TENANTS = ("t000", "t001", "t002")
FAILED = "t003"
LINEAGE = {"delta_table": "silver_demo", "delta_version": 7, "git_commit": "abc123", "config_hash": "h1"}
PARAMS = {"dataset": "demo", "min_rows": 100, "train_max_epochs": 2, "numeric_features": ["a", "b"],
          "tenant_quotas": {"t002": {"max_rows": 50}}}


def _rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"tenure_months": rng.integers(1, 100, n).astype(float), "monthly_spend": rng.gamma(2, 30, n),
                       "support_tickets": rng.poisson(1, n).astype(float), "logins_30d": rng.poisson(9, n).astype(float),
                       "seats": rng.integers(1, 20, n).astype(float), "plan": rng.choice(["basic", "pro"], n),
                       "region": rng.choice(["eu", "us"], n)})
    df["churned"] = (df["support_tickets"] + rng.normal(0, 1, n) > 1.5).astype(float)
    return df


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    """Training results as `train_tenant_models` returns them: three tiny real models, one failure."""
    from tenantml.models import FeatureSpec, TrainParams, fit_tabular

    spec = FeatureSpec(("tenure_months", "monthly_spend", "support_tickets", "logins_30d", "seats"),
                       ("plan", "region"), "binary")
    rows = []
    for i, t in enumerate(TENANTS):
        fit = fit_tabular(_rows(200, i), "churned", spec, TrainParams(hidden_units=(8,), max_epochs=2))
        auc = 0.7 + i / 100
        rows.append({"tenant_id": t, "status": "ok", "error": None, "rows": 200, "train_rows": 150, "test_rows": 50,
                     "metric_name": "auc", "metric": auc, "baseline_metric": 0.5,
                     "metrics_json": json.dumps({"auc": auc, "baseline_auc": 0.5, "log_loss": 0.6}),
                     "epochs": fit.epochs_run, "best_epoch": fit.best_epoch, "seconds": 0.5, "n_parameters": 10,
                     "attempts": 1, "sampled_from": None, "model": fit.model.to_bytes(), "finished_at": 0.0,
                     "tier": "small", "pool": "default", "path": "spark", "profile_json": None})
    rows.append({**rows[0], "tenant_id": FAILED, "status": "failed", "error": "ValueError: no rows (at fit.py:1)",
                 "metric": None, "baseline_metric": None, "metrics_json": None, "model": None})
    return pd.DataFrame(rows)[RESULT_COLUMNS]


def _context(spark: Any, tmp: Path, local_yml: str = "") -> JobContext:
    conf = tmp / "conf"
    shutil.copytree(REPO_CONF, conf)
    (conf / "local" / "test.yml").write_text(local_yml or "{}\n")
    return JobContext.create(conf_dir=conf, data_dir=tmp / "data", spark=spark, run_id="track-1")


def _track(ctx: JobContext, results: pd.DataFrame) -> Any:
    from tenantml.registry.tracking import track_training

    return track_training(ctx, "demo", results, strategy="tenant", params=PARAMS, lineage=LINEAGE,
                          version_tags={"base_model": "none"})


@pytest.fixture(scope="module")
def default_run(spark: Any, results: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ctx = _context(spark, tmp_path_factory.mktemp("lm"))
    return {"ctx": ctx, "tracked": _track(ctx, results)}


def test_each_candidate_is_a_logged_model_of_the_job_run(default_run: dict[str, Any],
                                                         results: pd.DataFrame) -> None:
    ctx, tracked = default_run["ctx"], default_run["tracked"]
    client = ctx.mlflow
    exp = ctx.experiment_id()
    models = {m.tags["tenantml.tenant_id"]: m for m in client.search_logged_models([exp])}
    assert set(models) == {*TENANTS, FAILED} and tracked.logged_models == {t: m.model_id for t, m in models.items()}
    for t in TENANTS:
        m = models[t]
        assert str(m.status) == "READY" and m.model_type == "tenantml.tabular" and m.name == f"demo__{t}"
        assert m.source_run_id == tracked.mlflow_run_id
        assert {k: m.tags[k] for k in ("tenantml.dataset", "tenantml.strategy", "tenantml.run_id")} == {
            "tenantml.dataset": "demo", "tenantml.strategy": "tenant", "tenantml.run_id": "track-1"}
        assert m.params["delta_version"] == "7" and m.params["train_max_epochs"] == "2" and m.params["tier"] == "small"
        assert "tenant_quotas" not in m.params  # it names another tenant: job run only
        metrics = {x.key: x for x in m.metrics}
        expected = json.loads(results.set_index("tenant_id").loc[t, "metrics_json"])
        assert {k: metrics[k].value for k in expected} == pytest.approx(expected)
        assert metrics["rows"].value == 200 and all(x.model_id == m.model_id for x in m.metrics)
        assert (Path(urlparse(m.artifact_location).path) / "MLmodel").is_file()
    failed = models[FAILED]
    assert str(failed.status) == "FAILED" and failed.tags["tenantml.error"].startswith("ValueError: no rows")
    assert not failed.metrics and FAILED not in tracked.registered


def test_no_child_runs_and_the_job_run_keeps_every_point(default_run: dict[str, Any]) -> None:
    ctx, tracked = default_run["ctx"], default_run["tracked"]
    client = ctx.mlflow
    runs = client.search_runs([ctx.experiment_id()], filter_string="tags.`tenantml.step` = 'train'")
    assert [r.info.run_id for r in runs] == [tracked.mlflow_run_id] and tracked.tenant_runs == {}
    run = client.get_run(tracked.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["tenantml.tenants_failed"] == "1"
    assert "tenant_quotas" in run.data.params
    history = client.get_metric_history(tracked.mlflow_run_id, "auc")
    assert sorted(round(p.value, 4) for p in history) == [0.7, 0.71, 0.72] and len({p.step for p in history}) == 3
    assert {o.model_id for o in run.outputs.model_outputs} == set(tracked.logged_models.values())


def test_registered_versions_keep_their_tags_and_load_by_both_uris(default_run: dict[str, Any],
                                                                    results: pd.DataFrame) -> None:
    import mlflow

    ctx, tracked = default_run["ctx"], default_run["tracked"]
    mlflow.set_tracking_uri(ctx.tracking_uri)  # another test's context may have moved the global URIs
    mlflow.set_registry_uri(ctx.registry_uri)
    rows = _rows(20, 99)
    by_tenant = results.set_index("tenant_id")
    for t in TENANTS:
        reg = tracked.registered[t]
        mv = ctx.mlflow.get_model_version(reg.name, reg.version)
        model_id = tracked.logged_models[t]
        assert mv.run_id == tracked.mlflow_run_id and mv.source == ctx.mlflow.get_logged_model(model_id).artifact_location
        assert mv.tags == {"tenant_id": t, "dataset": "demo", "strategy": "tenant",
                           "model_sha256": model_sha256(bytes(by_tenant.loc[t, "model"])), "metric_name": "auc",
                           "metric": f"{by_tenant.loc[t, 'metric']:.6g}", "baseline_metric": "0.5",
                           "tenantml_run_id": "track-1", "job_run_id": tracked.mlflow_run_id,
                           "logged_model_id": model_id, "base_model": "none",
                           **{k: str(v) for k, v in LINEAGE.items()}}
        by_version = mlflow.pyfunc.load_model(f"models:/{reg.name}/{reg.version}")
        by_id = mlflow.pyfunc.load_model(f"models:/{model_id}")
        assert by_version.model_id == by_id.model_id == model_id
        out = by_version.predict(rows)
        assert list(out.columns) == ["score", "prediction"] and out["score"].between(0, 1).all()
        pd.testing.assert_frame_equal(out, by_id.predict(rows))


def test_a_process_that_loaded_a_champion_still_imports_the_whole_platform(default_run: dict[str, Any]) -> None:
    """MLflow puts the model's `code/` first on `sys.path`, and a Spark Python worker that ran
    `spark_udf` is reused for later tasks: the model's runtime must not shadow the installed
    `tenantml` there (a partial copy of it would leave `tenantml.scoring` unimportable)."""
    import subprocess
    import sys

    ctx, tracked = default_run["ctx"], default_run["tracked"]
    source = ctx.mlflow.get_model_version(tracked.registered[TENANTS[0]].name, tracked.registered[TENANTS[0]].version).source
    model_dir = Path(urlparse(source).path)
    script = (
        "import sys, pandas as pd, mlflow.pyfunc\n"
        f"m = mlflow.pyfunc.load_model({str(model_dir)!r})\n"
        f"rows = pd.DataFrame({{c: [1.0, 2.0] for c in {list(_rows(1, 0).columns[:5])!r}}} | "
        "{'plan': ['basic', 'pro'], 'region': ['eu', 'us']})\n"
        "print(m.predict(rows)['score'].between(0, 1).all())\n"
        "import tenantml, tenantml.scoring.batch\n"
        "print(tenantml.__file__)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ok, where = proc.stdout.split()[-2:]
    assert ok == "True" and str(model_dir) not in where and Path(where).parent.name == "tenantml"


def test_the_shared_model_is_a_logged_model_too(default_run: dict[str, Any], results: pd.DataFrame,
                                                tmp_path: Path) -> None:
    import mlflow

    from tenantml.registry.tracking import track_shared

    ctx = default_run["ctx"]
    blob = bytes(results["model"].iloc[0])
    tracked = track_shared(ctx, "demo", blob, params={"strategy": "shared", "contributors": 3},
                           metrics={"train_seconds": 1.5}, lineage=LINEAGE,
                           artifacts={"trainset.json": {"contributors": {"t000": 10}}})
    lm = ctx.mlflow.get_logged_model(tracked.logged_models["_shared"])
    assert str(lm.status) == "READY" and lm.source_run_id == tracked.mlflow_run_id and lm.name == "demo___shared"
    assert lm.tags["tenantml.tenant_id"] == "_shared" and {m.key: m.value for m in lm.metrics} == {"train_seconds": 1.5}
    reg = tracked.registered["_shared"]
    mv = ctx.mlflow.get_model_version(reg.name, reg.version)
    assert mv.source == lm.artifact_location and mv.run_id == tracked.mlflow_run_id
    assert mv.tags["model_sha256"] == model_sha256(blob) and mv.tags["tenant_id"] == "_shared"
    trainset = ctx.mlflow.download_artifacts(tracked.mlflow_run_id, "trainset.json", str(tmp_path))
    assert json.loads(Path(trainset).read_text()) == {"contributors": {"t000": 10}}  # offboarding reads it
    mlflow.set_tracking_uri(ctx.tracking_uri)
    mlflow.set_registry_uri(ctx.registry_uri)
    assert mlflow.pyfunc.load_model(f"models:/{reg.name}/{reg.version}").model_id == lm.model_id


def _db_rows_naming(db: Path, needles: list[str]) -> list[tuple[str, str]]:
    """(table, value) of every text cell in the SQLite store that contains one of ``needles``."""
    hits = []
    with sqlite3.connect(db) as con:
        for (table,) in con.execute("select name from sqlite_master where type = 'table'"):
            cols = [c[1] for c in con.execute(f"pragma table_info('{table}')")]
            for row in con.execute(f"select * from '{table}'"):
                hits += [(table, f"{c}={v}") for c, v in zip(cols, row, strict=True)
                         if isinstance(v, str) and any(n in v for n in needles)]
    return hits


def test_tenant_runs_bring_child_runs_back_and_offboarding_purges_one_tenant(
        spark: Any, results: pd.DataFrame, tmp_path: Path) -> None:
    from tenantml.apps.offboarding import offboard_tenant
    from tenantml.registry.tracking import registered_model_exists, tenant_logged_model_ids, tenant_run_ids

    ctx = _context(spark, tmp_path, "tracking: {tenant_runs: true}\n")
    tracked = _track(ctx, results)
    client = ctx.mlflow
    assert set(tracked.tenant_runs) == {*TENANTS, FAILED}
    for t, cid in tracked.tenant_runs.items():
        child = client.get_run(cid)
        assert child.data.tags["mlflow.parentRunId"] == tracked.mlflow_run_id
        assert child.info.status == ("FAILED" if t == FAILED else "FINISHED")
        assert client.get_logged_model(tracked.logged_models[t]).source_run_id == cid
        if t != FAILED:
            assert child.data.metrics["auc"] == pytest.approx(results.set_index("tenant_id").loc[t, "metric"])
            assert client.get_model_version(f"demo__{t}", tracked.registered[t].version).run_id == cid
    assert not client.get_run(tracked.mlflow_run_id).data.metrics  # the metric copy is per tenant here
    gone = "t001"
    assert tenant_run_ids(ctx, gone) == [tracked.tenant_runs[gone]]
    assert tenant_logged_model_ids(ctx, gone) == [tracked.logged_models[gone]]
    artifacts = {t: Path(urlparse(client.get_logged_model(m).artifact_location).path)
                 for t, m in tracked.logged_models.items()}

    plan = offboard_tenant(ctx, gone)
    assert plan.logged_models == [tracked.logged_models[gone]] and plan.runs == [tracked.tenant_runs[gone]]
    assert plan.to_dict()["logged_models"] == plan.logged_models
    assert tenant_logged_model_ids(ctx, gone) == plan.logged_models  # a dry run changes nothing
    report = offboard_tenant(ctx, gone, confirm=True)
    assert report.logged_models == plan.logged_models and report.models == [f"demo__{gone}"]
    assert tenant_logged_model_ids(ctx, gone) == [] and tenant_run_ids(ctx, gone, include_deleted=True) == []
    assert not registered_model_exists(ctx, f"demo__{gone}") and not artifacts[gone].exists()
    assert ctx.tracking_uri == f"sqlite:///{ctx.data_dir / 'mlflow' / 'mlflow.db'}"
    assert _db_rows_naming(ctx.data_dir / "mlflow" / "mlflow.db",
                           [gone, tracked.logged_models[gone], tracked.tenant_runs[gone]]) == [
        ("inputs", f"destination_id={tracked.logged_models[gone]}")]  # the job run's output list keeps the bare id
    for t in ("t000", "t002", FAILED):
        assert tenant_logged_model_ids(ctx, t) == [tracked.logged_models[t]]
        assert tenant_run_ids(ctx, t) == [tracked.tenant_runs[t]]
        assert t == FAILED or (registered_model_exists(ctx, f"demo__{t}") and artifacts[t].exists())
