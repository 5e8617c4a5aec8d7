"""`tenants delete`: a tenant's rows, models, runs and Delta history are gone; other tenants intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tenantml.apps.offboarding import offboard_tenant, project_tables
from tenantml.io import read_table
from tenantml.io.context import JobContext
from tenantml.registry.tracking import registered_model_exists, tenant_logged_model_ids
from tenantml.steps.runner import run_step

pytestmark = [pytest.mark.spark, pytest.mark.slow]
REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
GONE = "t001"


def _tenant_rows(spark: Any, ctx: JobContext, tenant: str, version: int | None = None) -> dict[str, int]:
    from pyspark.sql import functions as F

    out = {}
    for ref in project_tables(ctx):
        df = read_table(spark, ref, version=version) if version is not None else read_table(spark, ref)
        cols = [c for c in ("tenant_id", "_tenant_raw") if c in df.columns]
        if cols:
            cond = F.lit(False)
            for c in cols:
                cond = cond | (F.col(c) == F.lit(tenant))
            out[ref.name] = df.where(cond).count()
    return out


@pytest.fixture(scope="module")
def world(spark: Any, copy_sharing_world: Any) -> dict[str, Any]:
    """A private copy of the sharing world (4 consenting tenants after one full run, report included)."""
    conf, data = copy_sharing_world("offboard")
    ctx = JobContext.create(conf_dir=conf, data_dir=data, spark=spark)
    gone_models = tenant_logged_model_ids(ctx, GONE)  # every candidate trained for the tenant
    model_dirs = [Path(urlparse(ctx.mlflow.get_logged_model(m).artifact_location).path) for m in gone_models]
    other_models = tenant_logged_model_ids(ctx, "t000")
    before_other = _tenant_rows(spark, ctx, "t000")
    figure = ctx.data_dir / "notebooks" / "tenant_overview" / "rows_per_tenant.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"\x89PNG figure that draws every tenant")
    plan = offboard_tenant(ctx, GONE)  # a dry run first: nothing may change
    after_plan = _tenant_rows(spark, ctx, GONE)
    report = offboard_tenant(ctx, GONE, confirm=True, purge_history=True)
    return {"ctx": ctx, "plan": plan, "after_plan": after_plan, "report": report, "model_dirs": model_dirs,
            "gone_models": gone_models, "other_models": other_models, "before_other": before_other,
            "figure": figure}


def test_dry_run_lists_everything_and_changes_nothing(world: dict[str, Any]) -> None:
    plan = world["plan"]
    assert not plan.executed
    assert {"bronze_demo", "silver_demo", "predictions_demo", "model_store", "run_log", "tenants",
            "shared_train_demo", "promotions", "inference_demo", "scoring_demo", "latest_predictions_demo",
            "monitoring_demo", "retraining_demo", "quality_demo"} <= set(plan.rows)
    assert world["after_plan"] == {k: plan.rows.get(k, 0) for k in world["after_plan"]}
    assert plan.models == [f"demo__{GONE}"] and plan.logged_models == world["gone_models"]
    assert plan.runs == []  # no child runs with tracking.tenant_runs off (the default)
    assert plan.shared_models_trained_with_tenant  # the shared model learned from the tenant's rows
    # ... and it serves: the shared champion (and tuned models of others, if any) must be retrained
    assert any("__shared/" in m for m in plan.serving_models_to_retrain), plan.serving_models_to_retrain
    assert plan.lineage_rows == 0 and world["report"].lineage_rows > 0  # erased only with --yes
    # the shared training set's staged copies (they held the tenant's de-identified rows) are gone
    assert any("staged copies of the demo shared training set" in n for n in world["report"].notes)
    assert not (world["ctx"].staging_dir / "shared" / "demo").exists()


def test_no_row_model_or_run_of_the_tenant_is_left(spark: Any, world: dict[str, Any]) -> None:
    from mlflow.entities import ViewType

    ctx = world["ctx"]
    assert set(_tenant_rows(spark, ctx, GONE).values()) == {0}
    assert not registered_model_exists(ctx, f"demo__{GONE}")
    exp = ctx.mlflow.get_experiment_by_name(ctx.config.tracking.experiment)
    left = ctx.mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`tenantml.tenant_id` = '{GONE}'",
                                  run_view_type=ViewType.ALL)
    assert left == []
    assert world["gone_models"] and tenant_logged_model_ids(ctx, GONE) == []
    assert world["report"].logged_models == world["gone_models"]
    assert not any(d.exists() for d in world["model_dirs"])  # mlflow gc purged the LoggedModels' artifacts
    assert not list((ctx.data_dir / "checkpoints").glob("*.pt"))


def test_time_travel_cannot_bring_the_rows_back(spark: Any, world: dict[str, Any]) -> None:
    ctx = world["ctx"]
    for ref in (ctx.tables.silver("demo"), ctx.tables.bronze("demo"), ctx.tables.predictions("demo")):
        try:
            old = read_table(spark, ref, version=0)
            n = old.where(old.tenant_id == GONE).count()
        except Exception as exc:  # files of the old version were vacuumed
            assert "FileNotFound" in type(exc).__name__ + str(exc) or "does not exist" in str(exc), exc
            continue
        assert n == 0, ref.name


def test_other_tenants_are_untouched_and_still_served(spark: Any, world: dict[str, Any]) -> None:
    ctx = world["ctx"]
    assert _tenant_rows(spark, ctx, "t000") == world["before_other"]
    assert world["other_models"] and tenant_logged_model_ids(ctx, "t000") == world["other_models"]
    result = run_step(ctx, "score", dataset="demo", tenants=["t000"])
    assert result.status == "ok"


def test_cli_refuses_an_unknown_tenant(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from tenantml.apps.cli import run as cli_run

    ctx = world["ctx"]
    code = cli_run(["tenants", "delete", "nobody", "--json", "--quiet", "--data-dir", str(ctx.data_dir),
                    "--conf-dir", str(REPO_CONF)])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and "'nobody'" in out["error"], out
    code = cli_run(["tenants", "delete", "../x", "--json", "--quiet", "--data-dir", str(ctx.data_dir),
                    "--conf-dir", str(REPO_CONF)])
    assert code == 2 and "invalid tenant id" in json.loads(capsys.readouterr().out)["error"]


def test_run_reports_are_rendered_again_without_the_tenant_and_figures_removed(world: dict[str, Any]) -> None:
    plan, report = world["plan"], world["report"]
    assert plan.reports and plan.reports == report.reports
    assert plan.figures == [str(world["figure"].parent)]
    for path in map(Path, report.reports):
        page = path.read_text(encoding="utf-8")
        assert GONE not in page and "t000" in page  # still the run's report, for the other tenants
    assert not world["figure"].exists()
    assert any("rerun the notebooks" in n for n in report.notes)
