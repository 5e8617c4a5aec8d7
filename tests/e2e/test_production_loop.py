"""The production loop on a real public dataset with a time column (New York's 2013 flights, the
airline as the tenant): train on January-October, score November-December as unlabelled rows,
watch drift, retrain only the tenant whose data moved, then ingest the labels and compare the
realised metric with the holdout metric each champion was promoted with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tenantml.apps.samples import export_sample
from tenantml.io import read_table
from tenantml.io.context import JobContext
from tenantml.io.tenants import list_tenant_ids, update_tenants
from tenantml.steps.runner import pipeline_steps, run_pipeline, run_step

pytestmark = [pytest.mark.spark, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SHIFTED = "DL"  # the airline whose second batch of rows to score moves


def _results(results: list[Any]) -> dict[str, Any]:
    return {r.step: r for r in results}


@pytest.fixture(scope="module")
def loop(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("flights")
    conf = root / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "local" / "test.yml").write_text(
        "training: {min_rows: 150, max_epochs: 6, patience: 2, shared: {max_epochs: 3}, tuned: {max_epochs: 2}}\n"
        "monitoring: {min_labelled_rows: 20, min_drift_rows: 40}\n"
        "spark: {shuffle_partitions: 2}\nscoring: {arrow_batch_size: 10000}\n")
    data = root / "data"
    ctx = JobContext.create(conf_dir=conf, data_dir=data, spark=spark, run_id="night-1")
    export_sample("flights", ctx.source_path("flights"), 600)
    first = run_pipeline(ctx, dataset="flights", steps=pipeline_steps(stop="validate_scoring"))
    update_tenants(spark, ctx.tables.tenants, list_tenant_ids(spark, ctx.tables.tenants), consent_share_data=True)
    first += run_pipeline(ctx, dataset="flights", steps=pipeline_steps(start="monitor"))
    store_after_first = read_table(spark, ctx.tables.model_store).where("dataset = 'flights'").drop("model").toPandas()

    # Night 2: a new batch of rows to score, drawn like each airline's history, except one airline
    # whose flights moved to other hours and longer routes. (November's real flights drift on their own:
    # winter schedules move hours and routes for several airlines.)
    batch1 = pd.read_parquet(ctx.resolve_path("${data_dir}/sources/flights_scoring"))
    history = pd.read_parquet(ctx.source_path("flights"))
    batch2 = (history.sample(frac=1.0, random_state=5).groupby("carrier").head(300).drop(columns=["delayed"])
              .assign(flight_id=lambda d: d["flight_id"] + "-b2"))
    moved = batch2["carrier"] == SHIFTED
    batch2.loc[moved, "hour"] = (batch2.loc[moved, "hour"] + 9) % 24
    batch2.loc[moved, "distance"] = batch2.loc[moved, "distance"] * 4
    second_dir = root / "batch2"
    second_dir.mkdir()
    batch2.to_parquet(second_dir / "part-0000.parquet", index=False)
    ctx2 = JobContext.create(conf_dir=conf, data_dir=data, spark=spark, run_id="night-2")
    second = run_pipeline(ctx2, dataset="flights", scoring_source_path=str(second_dir))

    # Night 3: the labels of the first batch arrive as history.
    ctx3 = JobContext.create(conf_dir=conf, data_dir=data, spark=spark, run_id="night-3")
    third = [run_step(ctx3, "ingest", "flights", source_path=str(ctx.resolve_path("${data_dir}/sources/flights_labels"))),
             run_step(ctx3, "validate", "flights"), run_step(ctx3, "monitor", "flights")]
    return {"ctx": ctx, "conf": conf, "data": data, "first": _results(first), "second": _results(second),
            "third": _results(third), "store_after_first": store_after_first, "batch1": batch1, "root": root}


def test_every_tenant_including_tiny_ones_gets_predictions_for_the_new_rows(spark: Any, loop: dict[str, Any]) -> None:
    ctx, first = loop["ctx"], loop["first"]
    assert all(r.status == "ok" for r in first.values()), {s: r.to_dict()["failures"] for s, r in first.items()}
    preds = read_table(spark, ctx.tables.predictions("flights")).where("run_id = 'night-1'").toPandas()
    batch1 = loop["batch1"]
    assert set(preds["tenant_id"]) == set(batch1["carrier"])  # 16 airlines, the smallest with a handful of flights
    assert preds.groupby("tenant_id").size().min() < 10
    # The rows scored are the new rows (November, December), never the labelled history.
    assert set(preds["entity_key"]) == set(batch1["flight_id"])
    assert preds.duplicated(["tenant_id", "entity_key", "batch_id"]).sum() == 0
    strategies = preds.groupby("tenant_id")["strategy"].first()
    assert {"tenant", "shared"} <= set(strategies) or {"tenant", "tuned"} <= set(strategies)


def test_one_tenants_drift_is_flagged_and_only_it_is_retrained(spark: Any, loop: dict[str, Any]) -> None:
    monitor = loop["second"]["monitor"]
    assert monitor.summary["drifted"] == [SHIFTED], monitor.summary
    assert monitor.summary["retrain"] == [SHIFTED]
    mon = read_table(spark, loop["ctx"].tables.monitoring("flights")).toPandas()
    # Night 1's batch was measured by night 1's score step (no champion existed when the monitor
    # ran); batch 2 is the moved one.
    preds = read_table(spark, loop["ctx"].tables.predictions("flights")).toPandas()
    (batch2,) = preds[preds["entity_key"].str.endswith("-b2")]["batch_id"].unique()
    moved = mon[(mon["tenant_id"] == SHIFTED) & (mon["run_id"] == "night-2") & (mon["batch_id"] == batch2)
                & mon["feature"].isin(["hour", "distance"])]
    assert (moved["status"] == "drift").all() and len(moved) == 2, moved
    shared = loop["second"]["train_shared"].summary  # one of 16 contributors: the shared model stays
    assert shared["models_trained"] == 0 and "1 of 16 contributing tenants" in shared["reason"], shared
    train = {t.tenant_id: t for t in loop["second"]["train"].tenants}
    assert train[SHIFTED].status == "ok"
    assert all(o.status == "skipped" and "no retraining needed" in o.detail["reason"]
               for t, o in train.items() if t != SHIFTED)
    store = read_table(spark, loop["ctx"].tables.model_store).where("dataset = 'flights'").drop("model").toPandas()
    new = store.merge(loop["store_after_first"], how="left", indicator=True)
    new = new[new["_merge"] == "left_only"]
    assert set(new["tenant_id"]) == {SHIFTED}  # only its candidates are new; every other version is untouched
    retraining = read_table(spark, loop["ctx"].tables.retraining("flights")).where("run_id = 'night-2'").toPandas()
    why = retraining.set_index("tenant_id")["reasons"]
    assert "drift" in why[SHIFTED] and "hour" in why[SHIFTED] and retraining["retrain"].sum() == 1
    # The second batch was scored for everyone, with earlier predictions kept (history per batch).
    preds = read_table(spark, loop["ctx"].tables.predictions("flights")).toPandas()
    assert preds["batch_id"].nunique() == 2 and set(preds[preds["run_id"] == "night-2"]["tenant_id"]) == set(
        loop["batch1"]["carrier"])
    latest = read_table(spark, loop["ctx"].tables.latest_predictions("flights")).toPandas()
    assert len(latest) == len(preds) and latest.duplicated(["tenant_id", "entity_key"]).sum() == 0


def test_labels_that_arrive_later_give_the_realised_metric_next_to_the_promoted_one(spark: Any,
                                                                                    loop: dict[str, Any]) -> None:
    mon = read_table(spark, loop["ctx"].tables.monitoring("flights")).where("kind = 'realised'").toPandas()
    assert loop["third"]["monitor"].summary["realised_metrics"] == len(mon) >= 12
    assert (mon["metric_name"] == "auc").all() and mon["value"].between(0, 1).all()
    assert mon["promoted_value"].notna().all() and (mon["rows"] >= 20).all()
    big = mon[mon["rows"] >= 100]
    # November and December are not September and October (holiday traffic): the realised AUC
    # runs a little below the holdout's, but it is the same model quality, far from chance.
    assert (big["value"] - big["promoted_value"]).abs().mean() < 0.12, big[["tenant_id", "value", "promoted_value"]]
    assert big["value"].median() > 0.55
    degraded = set(loop["third"]["monitor"].summary["degraded"])
    worse = set(big[big["promoted_value"] - big["value"] > 0.05]["tenant_id"])
    assert worse <= degraded
    # The first batch's feature drift was measured on night 1, by the score step, against the
    # champion that scored it; night 3's realised metrics of that batch left those rows as they were.
    everything = read_table(spark, loop["ctx"].tables.monitoring("flights")).toPandas()
    first = everything[(everything["batch_id"].isin(mon["batch_id"])) & everything["kind"].isin(["numeric", "categorical"])]
    assert set(first["run_id"]) == {"night-1"} and set(mon["tenant_id"]) <= set(first["tenant_id"])
    assert first.duplicated(["tenant_id", "batch_id", "feature"]).sum() == 0
    # Clustered by tenant, not partitioned: three nights of every tenant's rows sit in a few files,
    # not one per tenant and night, and a tenant's rows are still found by the files' statistics.
    tables = loop["ctx"].tables
    for ref in (tables.monitoring("flights"), tables.retraining("flights"), tables.inference("flights"),
                tables.scoring("flights"), tables.predictions("flights"), tables.latest_predictions("flights")):
        detail = spark.sql(f"DESCRIBE DETAIL delta.`{ref.path}`").first()
        assert list(detail["clusteringColumns"]) == ["tenant_id"] and not list(detail["partitionColumns"]), ref
        assert detail["numFiles"] < everything["tenant_id"].nunique(), (ref, detail["numFiles"])
    preds = read_table(spark, loop["ctx"].tables.predictions("flights")).where("run_id = 'night-1'").toPandas()
    scored_by = preds.groupby("tenant_id")["model_version"].first().astype(str).to_dict()
    assert all(scored_by[t] == v for t, v in first.groupby("tenant_id")["model_version"].first().items())


def test_a_champion_loads_the_standard_way_on_integer_float_and_string_columns(spark: Any, loop: dict[str, Any]) -> None:
    import mlflow.pyfunc

    ctx = loop["ctx"]
    assert ctx.mlflow is not None  # the context sets MLflow's URIs to its store
    uri = "models:/flights__AA@champion"
    rows = pd.DataFrame({"weekday": [0, 3, 6], "hour": [6, 13, 21], "distance": [200, 1089, 2475],
                         "origin": ["JFK", "LGA", "EWR"], "dest": ["MIA", "ORD", "LAX"]})
    assert rows["hour"].dtype == "int64"
    out = mlflow.pyfunc.load_model(uri).predict(rows)
    assert list(out.columns) == ["score", "prediction"] and out["score"].between(0, 1).all()
    as_float = mlflow.pyfunc.load_model(uri).predict(rows.astype({"hour": "float64", "distance": "float32"}))
    assert (as_float["score"] - out["score"]).abs().max() < 1e-6
    udf = mlflow.pyfunc.spark_udf(spark, uri, result_type="double", env_manager="local")
    sdf = spark.createDataFrame(rows)
    scored = sdf.withColumn("score", udf(*rows.columns)).toPandas()
    assert (scored["score"] - out["score"]).abs().max() < 1e-6 and len(scored) == 3


def test_a_champion_is_served_in_a_separate_process(loop: dict[str, Any], tmp_path: Path) -> None:
    """`mlflow models predict` in its own process, from the model's own directory and code: the
    loader and the model code ship with the model (`code/`), its requirements name only packages an
    index serves (no local build, no `tenantml` pin)."""
    from urllib.parse import urlparse

    ctx = loop["ctx"]
    source = ctx.mlflow.get_model_version_by_alias("flights__US", "champion").source
    model_dir = Path(urlparse(source).path)
    reqs = (model_dir / "requirements.txt").read_text()
    assert "tenantml" not in reqs and "+" not in reqs and "torch>=" in reqs, reqs
    loader = model_dir / "code" / "tenantml_pyfunc" / "registry" / "pyfunc_flavor.py"
    assert loader.is_file() and not (model_dir / "code" / "tenantml").exists()  # never shadows the platform
    assert "from tenantml_pyfunc.models import" in loader.read_text()
    payload = tmp_path / "input.json"
    payload.write_text(json.dumps({"dataframe_split": {"columns": ["weekday", "hour", "distance", "origin", "dest"],
                                                       "data": [[1, 8, 500, "JFK", "BOS"], [4, 18, 1400, "EWR", "IAH"]]}}))
    out = tmp_path / "out.json"
    proc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m", str(model_dir), "-i",
                           str(payload), "-t", "json", "-o", str(out), "--env-manager", "local"],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**__import__("os").environ, "MLFLOW_TRACKING_URI": ctx.tracking_uri,
                               "MLFLOW_REGISTRY_URI": ctx.registry_uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = json.loads(out.read_text())["predictions"]
    assert len(predictions) == 2 and all(0 <= p["score"] <= 1 for p in predictions)


def test_the_monitoring_notebook_and_the_run_report_show_the_drift_and_the_realised_metric(
        spark: Any, loop: dict[str, Any], tmp_path: Path, check_png: Any) -> None:
    from tenantml.apps.notebook_runner import run_notebook
    from tenantml.apps.report import NONE, write_run_report

    out = tmp_path / "figures"
    ns = run_notebook(REPO / "notebooks" / "monitoring.py",
                      {"dataset": "flights", "conf_dir": str(loop["conf"]), "data_dir": str(loop["data"]),
                       "output_dir": str(out)}, namespace={"spark": spark})
    assert sorted(p.name for p in out.iterdir()) == ["drift_heatmap.png", "prediction_drift.png", "realised_metrics.png"]
    for p in out.iterdir():
        check_png(p)
    drift = ns["drift"]
    assert {"hour", "distance"} <= set(drift.columns)
    assert drift.loc[SHIFTED, "hour"] > 0.25 and drift.loc[SHIFTED, "distance"] > 0.25
    realised = read_table(spark, loop["ctx"].tables.monitoring("flights")).where("kind = 'realised'").toPandas()
    assert sorted(ns["realised"]["tenant_id"]) == sorted(realised["tenant_id"])
    assert ns["realised"]["value"].sum() == pytest.approx(realised["value"].sum())
    # Night 3 (the latest decisions): the labels of batch 1 arrived, new rows that retrain it; batch 2's
    # drift is no longer a reason (night 2's retrain answered it, though it kept the champion).
    latest = ns["decisions"].set_index("tenant_id").loc[SHIFTED]
    assert latest["run_id"] == "night-3" and "new labelled rows" in latest["reasons"], latest.to_dict()
    assert "drift" not in latest["reasons"]

    ctx2 = JobContext.create(conf_dir=loop["conf"], data_dir=loop["data"], spark=spark, run_id="night-2")
    page = write_run_report(ctx2, "flights", "night-2").read_text()
    section = page[page.index('<section id="monitoring">'):page.index('<section id="failures">')]
    assert "1 retrained this run" in section and 'id="chart-drift"' in section
    first_row = section.split('id="drift-table"')[1].split("</tr>")[1]
    assert f'data-tenant="{SHIFTED}"' in first_row  # worst drift first
    assert f'<td>{SHIFTED}</td><td class="num">300</td>' in first_row  # the rows of its batch
    # A tiny airline's PSI over a handful of rows is noise: no largest PSI, ranked last.
    last_row = section.split('id="drift-table"')[1].split("</table>")[0].split("</tr>")[-2]
    assert f'<td class="num">{NONE}</td><td>' in last_row, last_row
    page3 = write_run_report(JobContext.create(conf_dir=loop["conf"], data_dir=loop["data"], spark=spark,
                                               run_id="night-3"), "flights", "night-3").read_text()
    assert 'id="chart-realised"' in page3 and page3.count('class="baseline"') >= 12


def test_the_cli_lists_the_retraining_decisions(loop: dict[str, Any], capsys: Any, restore_spark_conf: None) -> None:
    from tenantml.apps.cli import run

    base = ["--conf-dir", str(loop["conf"]), "--data-dir", str(loop["data"]), "--dataset", "flights"]
    assert run(["retraining", *base, "--run-id", "night-2", "--flagged", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["tenant_id"] for r in rows] == [SHIFTED] and "drift" in rows[0]["reasons"]
    assert run(["retraining", *base, "--run-id", "night-2", "--json"]) == 0
    everyone = json.loads(capsys.readouterr().out)
    assert len(everyone) == len(loop["batch1"]["carrier"].unique()) and sum(r["retrain"] for r in everyone) == 1


def test_score_with_a_source_ingests_validates_and_scores_new_rows_under_one_run(
        spark: Any, loop: dict[str, Any], capsys: Any, restore_spark_conf: None) -> None:
    from tenantml.apps.cli import run

    batch3 = loop["batch1"].groupby("carrier").head(5).assign(flight_id=lambda d: d["flight_id"] + "-b3")
    batch3.loc[batch3.index[0], "carrier"] = "ZZ"  # a tenant the platform does not know: quarantined, not scored
    folder = loop["root"] / "batch3"
    folder.mkdir()
    batch3.to_parquet(folder / "rows.parquet", index=False)  # the dataset's scoring source format
    code = run(["score", "--conf-dir", str(loop["conf"]), "--data-dir", str(loop["data"]), "--dataset", "flights",
                "--source", str(folder), "--run-id", "night-3b", "--json", "--quiet"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert [s["step"] for s in summary["steps"]] == ["ingest_scoring", "validate_scoring", "score"]
    preds = read_table(spark, loop["ctx"].tables.predictions("flights")).where("run_id = 'night-3b'").toPandas()
    assert len(preds) == len(batch3) - 1 and preds["entity_key"].str.endswith("-b3").all()
    quarantined = read_table(spark, loop["ctx"].tables.quarantine("flights")).where(
        "_purpose = 'scoring' AND _run_id = 'night-3b'").toPandas()
    assert len(quarantined) == 1
