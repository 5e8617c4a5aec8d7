"""The registry call pattern is the one Unity Catalog's registry accepts: the pipeline trains,
promotes, scores, publishes and offboards against a test double of it (tests/integration/
uc_registry_double.py: MLflow's SQL store refusing what the Unity Catalog store refuses), with
`catalog.schema.` model names."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tenantml.io import read_table
from tenantml.io.context import JobContext
from tenantml.steps.runner import pipeline_steps, run_pipeline

pytestmark = [pytest.mark.spark, pytest.mark.slow]
PREFIX = "main.tenantml."


@pytest.fixture(scope="module")
def uc_run(spark: Any, nightly_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import uc_registry_double as double

    from worlds import copy_world

    double.register()
    root = tmp_path_factory.mktemp("uc")
    conf = root / "conf"
    shutil.copytree(nightly_run["conf"], conf)
    (conf / "local" / "uc.yml").write_text(
        f"tracking: {{registry_uri: 'uc-double://{root / 'registry.db'}', model_name_prefix: '{PREFIX}'}}\n"
        "retraining: {force: true}\n")
    data = copy_world(Path(nightly_run["pristine"]), root / "data")
    ctx = JobContext.create(conf_dir=conf, data_dir=data, spark=spark, run_id="uc-1")
    double.calls.clear()
    # The copy's batch of rows to score was scored by the nightly run: rescore it with the UC models.
    results = {r.step: r for r in run_pipeline(ctx, dataset="demo", steps=pipeline_steps(start="monitor"),
                                               rescore=True)}
    return {"ctx": ctx, "results": results, "calls": list(double.calls), "double": double}


def test_the_pipeline_runs_against_the_unity_catalog_registry(spark: Any, uc_run: dict[str, Any]) -> None:
    results = uc_run["results"]
    assert all(r.status == "ok" for r in results.values()), {s: r.to_dict()["failures"] for s, r in results.items()}
    assert results["train"].summary["models_trained"] >= 3 and results["score"].summary["rows_scored"] > 0
    ctx = uc_run["ctx"]
    store = read_table(spark, ctx.tables.model_store).where("run_id = 'uc-1'").toPandas()
    assert store["model_name"].str.fullmatch(r"main\.tenantml\.demo__t_[a-z0-9_]+").all()
    preds = read_table(spark, ctx.tables.predictions("demo")).where("run_id = 'uc-1'").toPandas()
    assert preds["model_name"].str.startswith(PREFIX).all()
    # Registered, and searched only the way the double (and Unity Catalog) allows.
    assert {"create_registered_model", "create_model_version"} <= set(uc_run["calls"])


def test_the_double_refuses_what_unity_catalog_refuses(uc_run: dict[str, Any]) -> None:
    from mlflow.exceptions import MlflowException

    client = uc_run["ctx"].mlflow
    with pytest.raises(MlflowException, match="filter_string"):
        client.search_registered_models(filter_string="name LIKE 'main.tenantml.%'")
    with pytest.raises(MlflowException, match="only name ="):
        client.search_model_versions("tags.tenant_id = 't000'")
    with pytest.raises(MlflowException, match="three-level"):
        client.create_registered_model("demo__t000")


def test_offboarding_against_the_unity_catalog_registry(spark: Any, uc_run: dict[str, Any]) -> None:
    from tenantml.apps.offboarding import offboard_tenant
    from tenantml.core.ids import model_name
    from tenantml.registry.tracking import registered_model_exists

    ctx = uc_run["ctx"]
    report = offboard_tenant(ctx, "t001", confirm=True)
    assert report.models == [model_name(PREFIX, "demo", "t001")]
    assert not registered_model_exists(ctx, model_name(PREFIX, "demo", "t001"))
    assert registered_model_exists(ctx, model_name(PREFIX, "demo", "t000"))
