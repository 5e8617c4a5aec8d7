"""A quiet night: a step none of whose tables, config or tenants changed since its last clean run is
skipped (one run-log row naming the run whose result stands); any change, or a failure last time,
runs it again. A train or promote step in a run whose monitor kept every champion logs one row
that says so. On a private copy of the nightly job's world (five demo tenants after the whole
pipeline, through the local workflow runner; conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tenantml.apps.report import gather, render
from tenantml.io import read_table, table_version
from tenantml.io.context import JobContext
from tenantml.steps.base import StepResult, TenantOutcome, get_step
from tenantml.steps.runner import input_versions, run_step, write_run_log

pytestmark = [pytest.mark.spark, pytest.mark.slow]
QUIET = ("validate", "validate_scoring", "promote", "score", "publish")


def _ctx(spark: Any, conf: Path, data: Path, run_id: str) -> JobContext:
    return JobContext.create(conf_dir=conf, data_dir=data, spark=spark, run_id=run_id)


def _whole_step_skip(result: StepResult) -> dict[str, Any] | None:
    """The detail of the one row a step skipped as unchanged logs; None when it ran."""
    rows = [t for t in result.tenants if t.tenant_id is None and t.status == "skipped"]
    if len(rows) == 1 and len(result.tenants) == 1 and "unchanged_since" in rows[0].detail:
        return rows[0].detail
    return None


def _versions(spark: Any, ctx: JobContext) -> dict[str, int]:
    refs = [ctx.tables.silver("demo"), ctx.tables.predictions("demo"), ctx.tables.model_lineage,
            ctx.tables.promotions, ctx.tables.quality("demo"), ctx.tables.gold_prediction_fact("demo")]
    return {r.display: table_version(spark, r) for r in refs}


@pytest.fixture(scope="module")
def quiet(spark: Any, nightly_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from worlds import copy_world

    conf = Path(nightly_run["conf"])
    data = copy_world(Path(nightly_run["pristine"]), tmp_path_factory.mktemp("unchanged") / "data")
    # Night 2 reruns what the job ran for tenant batches (a workflow's for-each score); night 3
    # sees nothing new at all.
    second = {s: run_step(_ctx(spark, conf, data, "share-2"), s, "demo") for s in QUIET}
    ctx3 = _ctx(spark, conf, data, "share-3")
    before = _versions(spark, ctx3)
    third = {s: run_step(ctx3, s, "demo") for s in QUIET}
    fourth = {s: run_step(_ctx(spark, conf, data, "share-4"), s, "demo") for s in QUIET}
    after = _versions(spark, ctx3)
    return {"job_run_id": nightly_run["run"].run_id, "conf": conf, "data": data, "second": second, "third": third, "fourth": fourth, "before": before,
            "after": after}


def test_a_night_with_nothing_new_skips_every_step_and_writes_nothing(spark: Any, quiet: dict[str, Any]) -> None:
    for name, result in quiet["third"].items():
        detail = _whole_step_skip(result)
        assert detail is not None, (name, [(t.tenant_id, t.status) for t in result.tenants])
        assert detail["unchanged_since"] in {"share-2", quiet["job_run_id"]}, detail
        assert result.summary["unchanged_since"] == detail["unchanged_since"]
        assert detail["reason"] == f"nothing it reads or writes changed since run {detail['unchanged_since']}"
    # Night 4, as quiet, names the run whose result stands (night 3's own), not night 3's skip.
    for name, result in quiet["fourth"].items():
        assert _whole_step_skip(result) == _whole_step_skip(quiet["third"][name]), name
        assert result.summary["unchanged_since"] == quiet["third"][name].summary["unchanged_since"]
    assert quiet["after"] == quiet["before"]


def test_the_run_report_names_the_run_a_skipped_step_stands_on(spark: Any, quiet: dict[str, Any]) -> None:
    ctx = _ctx(spark, quiet["conf"], quiet["data"], "share-3")
    html = render(gather(ctx, "demo", "share-3"))
    since = quiet["third"]["score"].summary["unchanged_since"]
    assert f"score (unchanged since run {since})" in html
    rows = read_table(spark, ctx.tables.run_log).where("run_id = 'share-3'").collect()
    assert len(rows) == len(QUIET) and {r["tenant_id"] for r in rows} == {None}
    assert {json.loads(r["detail"])["unchanged_since"] for r in rows} == {
        quiet["third"][s].summary["unchanged_since"] for s in QUIET}


def test_a_config_change_or_rerun_runs_the_step(spark: Any, quiet: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(quiet["conf"], conf)
    with (conf / "local" / "test.yml").open("a") as f:
        f.write("validation: {max_rejected_fraction: 0.3}\n")
    result = run_step(_ctx(spark, conf, quiet["data"], "share-5"), "validate", "demo")
    assert _whole_step_skip(result) is None and result.status == "ok"
    again = run_step(_ctx(spark, conf, quiet["data"], "share-6"), "validate", "demo")
    assert (_whole_step_skip(again) or {}).get("unchanged_since") == "share-5"
    forced = run_step(_ctx(spark, conf, quiet["data"], "share-6b"), "validate", "demo", rerun=True)  # `--rerun`
    assert _whole_step_skip(forced) is None and forced.status == "ok"
    for run_id in ("share-6c", "share-6d"):  # an option that asks for the work runs it every time
        rescored = run_step(_ctx(spark, conf, quiet["data"], run_id), "score", "demo", tenants=["t000"], rescore=True)
        assert _whole_step_skip(rescored) is None and rescored.summary["rows_scored"] > 0


def test_a_failure_last_time_or_asking_for_other_tenants_reruns_the_step(spark: Any, quiet: dict[str, Any]) -> None:
    ctx = _ctx(spark, quiet["conf"], quiet["data"], "share-7")
    # What the runner logs when a tenant fails (the run log is the record it reads back).
    write_run_log(spark, ctx.tables.run_log, StepResult(step="score", dataset="demo", run_id="share-7", tenants=[
        TenantOutcome(tenant_id="t002", status="failed", error="killed", detail={"inputs": "x"})]))
    result = run_step(_ctx(spark, quiet["conf"], quiet["data"], "share-8"), "score", "demo")
    # It ran: every batch is scored already, so it found nothing new to score (and says so).
    assert _whole_step_skip(result) is None and result.status == "ok" and "unchanged_since" not in result.summary
    assert result.summary["rows_scored"] == 0
    one = run_step(_ctx(spark, quiet["conf"], quiet["data"], "share-9"), "score", "demo", tenants=["t000"])
    assert _whole_step_skip(one) is None and "unchanged_since" not in one.summary
    assert {t.tenant_id for t in one.tenants} <= {"t000", None}


def test_a_step_that_reads_files_always_runs(spark: Any, quiet: dict[str, Any]) -> None:
    ctx = _ctx(spark, quiet["conf"], quiet["data"], "share-10")
    assert input_versions(ctx, get_step("ingest"), "demo") is None  # a source folder has no Delta version
    assert not get_step("ingest").skip_unchanged and not get_step("train").skip_unchanged
    versions = input_versions(ctx, get_step("score"), "demo")
    assert versions is not None and ctx.tables.promotions.display in versions


def _decide(spark: Any, ctx: JobContext, retrain: set[str]) -> list[str]:
    """What the monitor writes for the run (the record the gated steps read): ``retrain`` are
    retrained, every other tenant keeps its champion."""
    from datetime import datetime

    from tenantml.io.tenants import list_tenant_ids
    from tenantml.steps.monitor import RETRAINING_SCHEMA

    tenants = sorted(list_tenant_ids(spark, ctx.tables.tenants))
    rows = [(ctx.run_id, "demo", t, t in retrain, "forced by the test" if t in retrain else "champion current",
             None, None, 0, 0, None, None, None, datetime(2026, 1, 1)) for t in tenants]
    (spark.createDataFrame(rows, RETRAINING_SCHEMA).write.format("delta").mode("append")
     .save(str(ctx.tables.retraining("demo").path)))
    return tenants


def test_a_run_whose_monitor_keeps_every_champion_trains_nothing_and_says_so(spark: Any, quiet: dict[str, Any]) -> None:
    ctx = _ctx(spark, quiet["conf"], quiet["data"], "share-11")
    tenants = _decide(spark, ctx, set())
    store = table_version(spark, ctx.tables.model_store)
    for name in ("train", "train_tuned", "promote"):
        result = run_step(ctx, name, "demo")
        (row,) = result.tenants  # one step-level row, not one "skipped" row per tenant
        assert row.tenant_id is None and row.status == "skipped", (name, row)
        assert row.detail["reason"] == "the monitor of run share-11 decided that no tenant needs retraining"
        assert result.summary["tenants_kept"] == len(tenants) and result.summary["models_trained"] == 0
    assert table_version(spark, ctx.tables.model_store) == store  # nothing trained, nothing promoted
    # One tenant to retrain: the step runs as ever, for it alone; asking for a kept tenant by name
    # is answered by the same one row.
    ctx = _ctx(spark, quiet["conf"], quiet["data"], "share-12")
    _decide(spark, ctx, {tenants[1]})
    kept = run_step(ctx, "train", "demo", tenants=[tenants[0]])
    assert [(t.tenant_id, t.status) for t in kept.tenants] == [(None, "skipped")]
    trained = {t.tenant_id: t for t in run_step(ctx, "train", "demo").tenants}
    assert trained[tenants[1]].status == "ok", trained[tenants[1]]
    others = {t: o for t, o in trained.items() if t != tenants[1]}
    kept_ones = [o for o in others.values() if o.status != "blocked"]  # blocked by validation come first
    assert kept_ones and all(o.status == "skipped" and "no retraining needed" in o.detail["reason"]
                             for o in kept_ones), [(o.tenant_id, o.status, o.detail) for o in others.values()]


def test_a_monitor_with_nothing_new_is_skipped_its_decisions_stand_until_a_champion_comes_of_age(
        spark: Any, quiet: dict[str, Any]) -> None:
    from datetime import UTC, datetime, timedelta

    from tenantml.steps.runner import decisions_run, retraining_decisions

    ctx_a = _ctx(spark, quiet["conf"], quiet["data"], "share-20")
    first = run_step(ctx_a, "monitor", "demo")  # champions changed since the job's monitor: it runs
    assert _whole_step_skip(first) is None and first.summary["tenants_kept"] + first.summary["tenants_retrained"] > 0
    # Its decisions stand until the oldest champion is `retraining.max_age_days` (30) old.
    store = read_table(spark, ctx_a.tables.model_store).where("dataset = 'demo'").toPandas()
    serving = {tuple(d["champion"].split("/")) for d in
               read_table(spark, ctx_a.tables.retraining("demo")).where("run_id = 'share-20'").collect()
               if d["champion"]}
    created = store[[(m, str(v)) in serving for m, v in zip(store["model_name"], store["model_version"], strict=True)]]
    assert first.summary["valid_until"] == (created["created_at"].min().to_pydatetime() + timedelta(days=30)).isoformat()
    assert all(t.detail["valid_until"] == first.summary["valid_until"] for t in first.tenants)

    ctx_b = _ctx(spark, quiet["conf"], quiet["data"], "share-21")
    second = run_step(ctx_b, "monitor", "demo")
    assert (_whole_step_skip(second) or {}).get("unchanged_since") == "share-20"
    # The train steps of the run read the decisions the skip stood on.
    assert decisions_run(ctx_b, "demo") == "share-20"
    assert retraining_decisions(ctx_b, "demo") == retraining_decisions(ctx_a, "demo")
    html = render(gather(ctx_b, "demo", "share-21"))
    assert "The monitor was skipped: nothing it reads changed since run share-20" in html

    # When that time has come (here: the skip's record says it came a minute ago), the monitor runs.
    past = (datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=1)).isoformat()
    (row,) = second.tenants
    write_run_log(spark, ctx_b.tables.run_log, StepResult(step="monitor", dataset="demo", run_id="share-21", tenants=[
        TenantOutcome(tenant_id=None, status="skipped", detail={**row.detail, "valid_until": past})]))
    third = run_step(_ctx(spark, quiet["conf"], quiet["data"], "share-22"), "monitor", "demo")
    assert _whole_step_skip(third) is None and third.summary["tenants_kept"] == first.summary["tenants_kept"]
