"""The nightly Databricks job (workflows/), run through the local runner on tiny demo data.

The real bundle, resolved for the prod target, with its tasks' config environment mapped to
`local`: every task runs its jobs/<step>.py in this process on the session's local Spark, as the
tasks of a Databricks job run share their job cluster, under one job run id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from localbundle import load_bundle, run_job

from tenantml.io import read_table
from tenantml.steps.runner import pipeline_steps

pytestmark = [pytest.mark.spark, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nightly(nightly_run: dict[str, Any]) -> dict[str, Any]:
    """The nightly job on 5 demo tenants (900 to 20 rows), run once per session: conftest.py."""
    return nightly_run


def test_every_task_succeeds_in_dependency_order_under_one_run_id(nightly: dict[str, Any]) -> None:
    run = nightly["run"]
    assert (run.status, run.exit_code) == ("success", 0), [(t.task_key, t.status, t.message) for t in run.tasks]
    assert [t.task_key for t in run.tasks] == ["ingest", "ingest_scoring", "validate", "validate_scoring", "monitor",
                                              "train_shared", "train", "train_tuned", "promote", "score", "publish"]
    results = [s for t in run.tasks for r in (t.iterations or [t]) for s in r.steps]
    assert [s["step"] for s in results] == list(pipeline_steps())
    assert {s["run_id"] for s in results} == {run.run_id}
    assert all(s["status"] == "ok" for s in results)
    by_step = {s["step"]: s for s in results}
    assert by_step["train"]["models_trained"] >= 3 and by_step["promote"]["tenants_ok"] >= 3
    assert by_step["train_shared"]["models_trained"] == 0 == by_step["train_tuned"]["models_trained"]
    assert [it.task_key for it in run.task("score").iterations] == ["score[0]"]  # one batch: every tenant
    for t in run.tasks:  # prod's --env and workspace volume became the embedded default
        argv = list(t.argv or [])
        if argv:
            assert argv[argv.index("--env") + 1] == "local"
            assert not argv[argv.index("--data-dir") + 1].startswith("/Volumes")
            assert argv[argv.index("--on-partial") + 1] == "continue" and "--resume-failed" in argv


def test_the_run_produces_predictions_and_a_complete_run_log(spark: Any, nightly: dict[str, Any]) -> None:
    run, ctx = nightly["run"], nightly["ctx"]
    score = run.task("score").iterations[0].steps[0]
    preds = read_table(spark, ctx.tables.predictions("demo")).toPandas()
    assert len(preds) == score["rows_scored"] > 0
    assert set(preds["run_id"]) == {run.run_id}
    assert preds["tenant_id"].nunique() == score["tenants_ok"] >= 3
    log = read_table(spark, ctx.tables.run_log).where(f"run_id = '{run.run_id}'").toPandas()
    assert set(log["step"]) == set(pipeline_steps())
    assert not (log["status"] == "failed").any()


def test_score_fans_out_over_tenant_batches_under_one_run_id(spark: Any, nightly: dict[str, Any]) -> None:
    """One score task per batch; each batch's run_log rows survive the others' (same run, same step)."""
    from tenantml.apps.demo import DemoSpec, scoring_frame
    from tenantml.io.context import JobContext
    from tenantml.steps.runner import run_step

    ctx, conf = nightly["ctx"], nightly["conf"]
    # A new batch of rows to score (the nightly run scored its batch already).
    batch = Path(ctx.data_dir) / "fan-out-batch"
    batch.mkdir()
    rows = scoring_frame(DemoSpec(tenants=5, largest=900, smallest=20), seed_offset=2)
    # Without the demo's few dirty rows: one in a small tenant's handful of new rows would block it.
    rows[rows["tenure_months"].astype(str) != "n/a"].to_csv(batch / "b.csv", index=False)
    fresh = JobContext.create(conf_dir=conf, data_dir=ctx.data_dir, spark=spark, run_id="fan-out-prep")
    run_step(fresh, "ingest_scoring", "demo", scoring_source_path=str(batch))
    run_step(fresh, "validate_scoring", "demo")
    run = run_job(load_bundle(REPO / "workflows"), "nightly", only=["score"], conf_dir=conf,
                  data_dir=str(ctx.data_dir), params={"tenant_batches": '["t000,t001", "t002"]'})
    score = run.task("score")
    assert run.status == "success" and [it.status for it in score.iterations] == ["success", "success"]
    assert [it.steps[0]["tenants_ok"] for it in score.iterations] == [2, 1]
    log = read_table(spark, ctx.tables.run_log).where(f"run_id = '{run.run_id}' AND step = 'score'").toPandas()
    assert sorted(log["tenant_id"]) == ["t000", "t001", "t002"]
    assert {t.task_key: t.status for t in run.tasks if t.task_key != "score"} == dict.fromkeys(
        ["ingest", "ingest_scoring", "validate", "validate_scoring", "monitor", "train_shared", "train", "train_tuned",
         "promote", "publish"], "excluded")
