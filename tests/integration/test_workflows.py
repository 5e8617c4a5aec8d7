"""The nightly Databricks job (workflows/), run through the local runner on tiny demo data.

The real bundle, resolved for the prod target, with its tasks' config environment mapped to
`local`: every task runs its jobs/<step>.py in this process on the session's local Spark, as the
tasks of a Databricks job run share their job cluster, under one job run id.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tenantml.context import JobContext
from tenantml.demo import DemoSpec, write_demo_source
from tenantml.io import read_table
from tenantml.pipeline import STEPS
from tenantml.workflows import load_bundle, run_job

pytestmark = [pytest.mark.spark, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nightly(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    conf = tmp_path_factory.mktemp("conf")
    shutil.copytree(REPO / "conf", conf, dirs_exist_ok=True)
    # Small and fast. No tenant consents to sharing (the default), so the shared and tuned tasks run
    # their entry points but train nothing: tests/integration/test_strategies.py trains them.
    # Spark and Arrow settings equal the session fixture's: the tasks reuse that session.
    (conf / "local" / "workflow.yml").write_text(
        "training: {min_rows: 100, max_epochs: 3, patience: 2, shared: {max_epochs: 2}}\n"
        "spark: {shuffle_partitions: 2}\n"
        "scoring: {arrow_batch_size: 10000}\n")
    data_dir = tmp_path_factory.mktemp("nightly")
    ctx = JobContext.create(conf_dir=conf, data_dir=data_dir, spark=spark)
    write_demo_source(ctx.source_path("demo"), DemoSpec(tenants=5, largest=900, smallest=20))
    run = run_job(load_bundle(REPO / "workflows", "prod"), "nightly", conf_dir=str(conf), data_dir=str(data_dir))
    return {"run": run, "ctx": ctx, "conf": str(conf)}


def test_every_task_succeeds_in_dependency_order_under_one_run_id(nightly: dict[str, Any]) -> None:
    run = nightly["run"]
    assert (run.status, run.exit_code) == ("success", 0), [(t.task_key, t.status, t.message) for t in run.tasks]
    assert [t.task_key for t in run.tasks] == ["ingest", "validate", "train_shared", "train", "train_tuned",
                                              "promote", "score", "publish"]
    results = [s for t in run.tasks for r in (t.iterations or [t]) for s in r.steps]
    assert [s["step"] for s in results] == list(STEPS)
    assert {s["run_id"] for s in results} == {run.run_id}
    assert all(s["status"] == "ok" for s in results)
    by_step = {s["step"]: s for s in results}
    assert by_step["train"]["models_trained"] >= 3 and by_step["promote"]["tenants_ok"] >= 3
    assert by_step["train_shared"]["models_trained"] == 0 == by_step["train_tuned"]["models_trained"]
    assert [it.task_key for it in run.task("score").iterations] == ["score[0]"]  # one batch: every tenant
    for t in run.tasks:  # prod's --env and workspace volume became the embedded default
        args = dict(zip(t.argv[::2], t.argv[1::2], strict=True)) if t.argv else {}
        assert not args or (args["--env"] == "local" and not args["--data-dir"].startswith("/Volumes"))


def test_the_run_produces_predictions_and_a_complete_run_log(spark: Any, nightly: dict[str, Any]) -> None:
    run, ctx = nightly["run"], nightly["ctx"]
    score = run.task("score").iterations[0].steps[0]
    preds = read_table(spark, ctx.tables.predictions("demo")).toPandas()
    assert len(preds) == score["rows_scored"] > 0
    assert set(preds["run_id"]) == {run.run_id}
    assert preds["tenant_id"].nunique() == score["tenants_ok"] >= 3
    log = read_table(spark, ctx.tables.run_log).where(f"run_id = '{run.run_id}'").toPandas()
    assert set(log["step"]) == set(STEPS)
    assert not (log["status"] == "failed").any()


def test_score_fans_out_over_tenant_batches_under_one_run_id(spark: Any, nightly: dict[str, Any]) -> None:
    """One score task per batch; each batch's run_log rows survive the others' (same run, same step)."""
    ctx, conf = nightly["ctx"], nightly["conf"]
    run = run_job(load_bundle(REPO / "workflows"), "nightly", only=["score"], conf_dir=conf,
                  data_dir=str(ctx.data_dir), params={"tenant_batches": '["t000,t001", "t002"]'})
    score = run.task("score")
    assert run.status == "success" and [it.status for it in score.iterations] == ["success", "success"]
    assert [it.steps[0]["tenants_ok"] for it in score.iterations] == [2, 1]
    log = read_table(spark, ctx.tables.run_log).where(f"run_id = '{run.run_id}' AND step = 'score'").toPandas()
    assert sorted(log["tenant_id"]) == ["t000", "t001", "t002"]
    assert {t.task_key: t.status for t in run.tasks if t.task_key != "score"} == dict.fromkeys(
        ["ingest", "validate", "train_shared", "train", "train_tuned", "promote", "publish"], "excluded")
