"""A withdrawn consent, then an offboarded tenant: no serving model keeps what it learned from them.

One world (a copy of the session's sharing world, where all four tenants contributed to the shared
model and the tuned ones were fine-tuned from it), three nights:

1. as built: the shared champion (and every tuned model) learned from WITHDRAWN's rows;
2. WITHDRAWN sets consent_share_data=false. Before any retraining, scoring falls back (or, with
   keep_serving, keeps serving with a warning); the next run retrains the shared model without it,
   re-derives what came from the old one and re-promotes;
3. GONE is offboarded with `tenants delete --yes`; the next run does the same for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tenantml.io import read_table
from tenantml.io.context import JobContext
from tenantml.io.lineage import read_lineage
from tenantml.io.tenants import list_tenant_ids, update_tenants
from tenantml.registry.lineage import serving_lineage, serving_models_with
from tenantml.registry.tracking import champion_versions, shared_champion
from tenantml.steps.runner import run_pipeline, run_step

pytestmark = [pytest.mark.spark, pytest.mark.slow]
WITHDRAWN, GONE, KEPT = "t002", "t003", ("t000", "t001")


def _ctx(conf: Path, data: Path, spark: Any, run_id: str) -> JobContext:
    return JobContext.create(conf_dir=conf, data_dir=data, spark=spark, run_id=run_id)


def _conf_with(conf: Path, name: str, extra: str) -> Path:
    """A copy of ``conf`` with one more local file (a setting for one run)."""
    import shutil

    out = conf.parent / f"{conf.name}-{name}"
    if not out.exists():
        shutil.copytree(conf, out)
        (out / "local" / "zz_extra.yml").write_text(extra)
    return out


def _trainset_tenants(spark: Any, ctx: JobContext) -> set[str]:
    """The tenants with rows in the training set the current shared champion was trained on (read
    back from the shared training table at the version its lineage names)."""
    mv = shared_champion(ctx, "demo")
    lin = read_lineage(spark, ctx.tables.model_lineage, [(mv.name, str(mv.version))]).toPandas()
    (version,) = set(lin["trainset_version"])
    rows = read_table(spark, ctx.tables.shared_trainset("demo"), version=int(version))
    return {r[0] for r in rows.select("tenant_id").distinct().collect()}


def _served(spark: Any, ctx: JobContext, run_id: str) -> set[str]:
    preds = read_table(spark, ctx.tables.predictions("demo")).where(f"run_id = '{run_id}'")
    return {r[0] for r in preds.select("tenant_id").distinct().collect()}


@pytest.fixture(scope="module")
def world(spark: Any, copy_sharing_world: Any) -> dict[str, Any]:
    conf, data = copy_sharing_world("consent")
    ctx = _ctx(conf, data, spark, "consent-1")
    before = {"holding": [s.tenant_id for s in serving_models_with(ctx, "demo", WITHDRAWN)],
              "trainset": _trainset_tenants(spark, ctx), "shared": shared_champion(ctx, "demo").version}
    update_tenants(spark, ctx.tables.tenants, [WITHDRAWN], consent_share_data=False)

    # Between the withdrawal and the next training run, scoring alone (a `score --rescore`).
    fall_back = run_step(_ctx(conf, data, spark, "between-1"), "score", "demo", rescore=True)
    keep = run_step(_ctx(_conf_with(conf, "keep", "retraining: {tainted_models: keep_serving}\n"), data, spark,
                         "between-2"), "score", "demo", rescore=True)
    night2 = run_pipeline(_ctx(conf, data, spark, "night-2"), dataset="demo", rescore=True)
    after_withdrawal = {"holding": serving_models_with(ctx, "demo", WITHDRAWN),
                        "trainset": _trainset_tenants(spark, ctx), "shared": shared_champion(ctx, "demo").version,
                        "served": _served(spark, ctx, "night-2")}
    return {"conf": conf, "data": data, "ctx": ctx, "before": before, "fall_back": fall_back, "keep": keep,
            "night2": {r.step: r for r in night2}, "after_withdrawal": after_withdrawal}


def test_every_shared_and_tuned_model_records_whose_rows_it_learned_from(spark: Any, world: dict[str, Any]) -> None:
    ctx = world["ctx"]
    assert world["before"]["trainset"] == {"t000", "t001", "t002", "t003"}
    lin = read_lineage(spark, ctx.tables.model_lineage, dataset="demo").toPandas()
    shared = lin[lin["strategy"] == "shared"]
    assert set(shared[shared["model_tenant"] == "_shared"]["contributor"]) >= {"t000", "t001", "t002", "t003"}
    tuned = lin[lin["strategy"] == "tuned"]
    assert len(tuned) and tuned["inherited_from"].str.contains("shared").all()
    for tenant, rows in tuned.groupby("model_tenant"):  # a tuned model: its own rows plus its base's contributors
        assert {"t000", "t001", "t002", "t003"} <= set(rows["contributor"]), tenant
    assert lin["contributor_hash"].str.fullmatch("[0-9a-f]{64}").all()
    # before the withdrawal, serving models of other tenants hold WITHDRAWN's rows
    assert "_shared" in world["before"]["holding"]


def test_scoring_before_the_retrain_falls_back_or_keeps_serving_with_a_warning(world: dict[str, Any]) -> None:
    fall_back, keep = world["fall_back"], world["keep"]
    notes = {t.tenant_id: t for t in fall_back.tenants}
    tainted = fall_back.summary.get("tainted", {})
    skipped = [t for t in fall_back.tenants if t.status == "skipped" and "tainted" in (t.error or "")
               + json.dumps(t.detail)]
    assert tainted or skipped, "no champion was tainted by the withdrawal"
    for t, note in tainted.items():
        assert "withdrew consent" in note and "scored with its own model" in note
        assert notes[t].status == "ok" and "__shared" not in notes[t].detail["model"]
    kept = keep.summary.get("tainted", {})
    assert set(kept) >= set(tainted) and all("kept serving" in n for n in kept.values())


def test_after_the_next_run_no_serving_model_holds_the_withdrawn_tenants_rows(spark: Any,
                                                                             world: dict[str, Any]) -> None:
    after, night2 = world["after_withdrawal"], world["night2"]
    assert all(r.status in ("ok", "skipped") for r in night2.values()), {
        s: r.to_dict()["failures"] for s, r in night2.items()}
    assert after["holding"] == []
    assert after["shared"] != world["before"]["shared"]
    assert WITHDRAWN not in after["trainset"] and after["trainset"] >= set(KEPT)
    assert set(KEPT) <= after["served"]
    ctx = world["ctx"]
    for s in serving_lineage(ctx, "demo"):
        assert s.tainted is None, s
        if s.tenant_id != WITHDRAWN:
            assert WITHDRAWN not in s.contributors, s
    # the decision and its reason are in the tables
    retraining = read_table(spark, ctx.tables.retraining("demo")).where("run_id = 'night-2'").toPandas()
    why = retraining[retraining["reasons"].str.contains("withdrew consent", regex=False)]
    assert len(why) >= 1 and why["retrain"].all()
    decisions = read_table(spark, ctx.tables.promotions).where("run_id = 'night-2'").toPandas()
    shared_decision = decisions[decisions["tenant_id"] == "_shared"]["reason"].iloc[0]
    assert "withdrew consent" in shared_decision and "replaced" in shared_decision


def test_the_run_report_names_the_retraining_because_of_consent(world: dict[str, Any]) -> None:
    from tenantml.apps.report import write_run_report

    page = write_run_report(_ctx(world["conf"], world["data"], world["ctx"].spark, "night-2"), "demo",
                            "night-2").read_text()
    assert "withdrew consent or was offboarded" in page


def test_an_offboarded_tenant_leaves_every_serving_model_after_the_next_run(
        spark: Any, world: dict[str, Any], capsys: Any, restore_spark_conf: None) -> None:
    from tenantml.apps.cli import run

    conf, data, ctx = world["conf"], world["data"], world["ctx"]
    base = ["--conf-dir", str(conf), "--data-dir", str(data)]
    assert run(["lineage", *base, "--dataset", "demo", "--contains", GONE, "--json"]) == 0
    holding_before = json.loads(capsys.readouterr().out)
    assert "_shared" in {r["serves"] for r in holding_before}

    assert run(["tenants", "delete", GONE, "--yes", *base, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any("__shared" in m for m in report.get("serving_models_to_retrain", [])), report
    assert GONE not in list_tenant_ids(spark, ctx.tables.tenants)
    lin = read_lineage(spark, ctx.tables.model_lineage, dataset="demo").toPandas()
    assert GONE not in set(lin["contributor"].dropna()) and GONE not in set(lin["model_tenant"])

    # still tainted (by hash) until the next run
    assert run(["lineage", *base, "--dataset", "demo", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any("offboarded" in r["tainted"] for r in listed), listed

    night3 = run_pipeline(_ctx(conf, data, spark, "night-3"), dataset="demo", rescore=True)
    assert all(r.status in ("ok", "skipped") for r in night3), {r.step: r.to_dict()["failures"] for r in night3}
    assert serving_models_with(ctx, "demo", GONE) == []
    assert GONE not in _trainset_tenants(spark, ctx)
    assert set(KEPT) <= _served(spark, ctx, "night-3")
    assert all(s.tainted is None for s in serving_lineage(ctx, "demo"))
    assert run(["lineage", *base, "--dataset", "demo", "--contains", GONE, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert set(champion_versions(ctx, "demo", list(KEPT))) == set(KEPT)
