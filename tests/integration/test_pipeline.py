"""The whole path on real components: Delta tables, GX, torch training in Spark tasks, MLflow."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tenantml.apps.demo import DIRTY_TENANT, DemoSpec, write_demo_source
from tenantml.core.errors import InvalidTenantIdError, TenantIsolationError
from tenantml.io import read_table
from tenantml.io.context import JobContext
from tenantml.io.scope import TenantScope
from tenantml.steps.runner import pipeline_steps, run_pipeline, run_step

pytestmark = pytest.mark.spark
REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def small_conf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    conf = tmp_path_factory.mktemp("conf")
    shutil.copytree(REPO_CONF, conf, dirs_exist_ok=True)
    (conf / "local" / "test.yml").write_text("training: {min_rows: 100, max_epochs: 6, patience: 2}\n")
    return conf


@pytest.fixture(scope="module")
def run(spark: Any, small_conf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data_dir = tmp_path_factory.mktemp("pipeline")
    ctx = JobContext.create(conf_dir=small_conf, data_dir=data_dir, spark=spark)
    write_demo_source(ctx.source_path("demo"), DemoSpec(tenants=6, largest=1500, smallest=20))
    results = run_pipeline(ctx, dataset="demo")
    return {"ctx": ctx, "results": {r.step: r for r in results}, "data_dir": data_dir}


def _counts(df: Any) -> dict[Any, int]:
    return {r["tenant_id"]: r["count"] for r in df.groupBy("tenant_id").count().collect()}


def test_every_step_succeeds_and_dirty_tenant_is_blocked(run: dict[str, Any]) -> None:
    res = run["results"]
    assert [res[s].status for s in ("ingest", "validate", "train", "score")] == ["ok"] * 4
    blocked = {t.tenant_id for t in res["validate"].tenants if t.status == "blocked"}
    assert blocked == {DIRTY_TENANT}
    train = {t.tenant_id: t for t in res["train"].tenants}
    assert train[DIRTY_TENANT].status == "blocked"
    assert {t for t, o in train.items() if o.status == "skipped"} == {"t004", "t005"}  # below min_rows
    assert res["train"].summary["models_trained"] == 4
    # The rows scored are the new batch's valid rows (rows to score), never the training history.
    assert res["score"].summary["rows_scored"] == sum(
        t.rows_out for t in res["validate_scoring"].tenants if t.tenant_id in {"t000", "t001", "t002", "t003"})


def test_valid_plus_quarantined_equals_ingested_per_tenant(spark: Any, run: dict[str, Any]) -> None:
    t = run["ctx"].tables
    bronze = _counts(read_table(spark, t.bronze("demo")))
    silver = _counts(read_table(spark, t.silver("demo")))
    history_q = read_table(spark, t.quarantine("demo")).where("_purpose = 'history'")
    quarantine = _counts(history_q)
    assert None in bronze and None not in silver  # hostile ids only ever reach quarantine
    for tenant, n in bronze.items():
        assert silver.get(tenant, 0) + quarantine.get(tenant, 0) == n, tenant
    reasons = {(r["_reason"], r["_kind"]) for r in history_q.select("_reason", "_kind").distinct().collect()}
    assert any("is not a number" in r and k == "rejected" for r, k in reasons)
    # A history row without a label is not a training row, and not a rejected one either.
    assert ("label 'churned' is empty: not a training row (not counted as rejected)", "unlabelled") in reasons
    assert any("duplicate entity key" in r for r, _ in reasons)
    # Rows to score: the same reconciliation, per batch.
    inference = _counts(read_table(spark, t.inference("demo")))
    scoring = _counts(read_table(spark, t.scoring("demo")))
    scoring_q = _counts(read_table(spark, t.quarantine("demo")).where("_purpose = 'scoring'"))
    for tenant, n in inference.items():
        assert scoring.get(tenant, 0) + scoring_q.get(tenant, 0) == n, tenant


def test_no_path_is_named_after_a_hostile_tenant(run: dict[str, Any]) -> None:
    names = {p.name for p in Path(run["data_dir"]).rglob("*")}
    assert not any(n.startswith("tenant_id=") and ("%" in n or " " in n or ".." in n) for n in names
                   if "HIVE_DEFAULT" not in n)
    assert not (Path(run["data_dir"]).parent / "etc").exists()


def test_cost_ledger_measures_train_and_score_per_tenant(spark: Any, run: dict[str, Any]) -> None:
    ctx = run["ctx"]
    ledger = read_table(spark, ctx.tables.cost_ledger).where(f"run_id = '{ctx.run_id}'").toPandas()
    by_step = {s: g.set_index("tenant_id") for s, g in ledger.groupby("step")}
    assert set(by_step) == {"ingest", "ingest_scoring", "validate", "validate_scoring", "monitor", "train", "promote",
                            "score", "publish"}
    for step in ("train", "score"):
        assert set(by_step[step]["method"]) == {"measured"}
        assert set(by_step[step].index) == {"t000", "t001", "t002", "t003"}
        assert (by_step[step]["compute_seconds"] > 0).all()
    trained = {t.tenant_id: t.seconds for t in run["results"]["train"].tenants if t.status == "ok"}
    assert by_step["train"]["compute_seconds"].to_dict() == pytest.approx(trained)
    assert set(by_step["validate"]["method"]) == {"allocated"}
    scored = {t.tenant_id: t.rows_in for t in run["results"]["score"].tenants if t.status == "ok"}
    assert by_step["score"]["rows"].to_dict() == scored


def test_reruns_replace_and_never_duplicate(spark: Any, run: dict[str, Any]) -> None:
    ctx, t = run["ctx"], run["ctx"].tables
    tables = {"bronze": t.bronze("demo"), "silver": t.silver("demo"), "inference": t.inference("demo"),
              "scoring": t.scoring("demo"), "pred": t.predictions("demo"), "latest": t.latest_predictions("demo")}
    before = {name: read_table(spark, ref).count() for name, ref in tables.items()}
    assert run_step(ctx, "ingest", dataset="demo").summary["unchanged"]  # the same files: the same batch
    assert run_step(ctx, "ingest_scoring", dataset="demo").summary["unchanged"]
    assert run_step(ctx, "validate", dataset="demo").summary["rows_validated"] == 0  # nothing new to read
    assert run_step(ctx, "validate", dataset="demo", full=True).summary["rows_validated"] == before["bronze"]
    run_step(ctx, "validate_scoring", dataset="demo")
    assert run_step(ctx, "score", dataset="demo").summary["rows_scored"] == 0  # every batch is scored
    assert run_step(ctx, "score", dataset="demo", rescore=True).summary["rows_scored"] > 0  # the same batch again
    after = {name: read_table(spark, ref).count() for name, ref in tables.items()}
    assert after == before
    preds = read_table(spark, t.predictions("demo"))
    assert preds.select("tenant_id", "entity_key", "batch_id").distinct().count() == preds.count()


def test_champions_load_by_standard_uri_and_match_scores(spark: Any, run: dict[str, Any]) -> None:
    import mlflow
    import pandas as pd

    ctx = run["ctx"]
    mlflow.set_tracking_uri(ctx.tracking_uri)
    mlflow.set_registry_uri(ctx.registry_uri)
    model = mlflow.pyfunc.load_model("models:/demo__t001@champion")
    rows = read_table(spark, ctx.tables.scoring("demo")).where("tenant_id = 't001'").limit(50).toPandas()
    out = model.predict(rows)
    assert list(out.columns) == ["score", "prediction"] and len(out) == len(rows) > 10
    assert out["score"].between(0, 1).all()
    preds = read_table(spark, ctx.tables.predictions("demo")).where("tenant_id = 't001'").toPandas()
    merged = pd.DataFrame({"entity_key": rows["customer_id"], "uri_score": out["score"]}).merge(
        preds, on="entity_key")
    assert len(merged) == len(rows)
    assert (merged["uri_score"] - merged["score"]).abs().max() < 1e-5
    mv = ctx.mlflow.get_model_version_by_alias("demo__t001", "champion")
    assert mv.tags["tenant_id"] == "t001" and mv.tags["strategy"] == "tenant"
    assert {"delta_version", "git_commit", "config_hash"} <= set(mv.tags)


def test_mlflow_run_holds_per_tenant_logged_models(run: dict[str, Any]) -> None:
    ctx = run["ctx"]
    mrun = ctx.mlflow.get_run(run["results"]["train"].mlflow_run_id)
    assert mrun.info.status == "FINISHED" and mrun.data.tags["tenantml.tenants_trained"] == "4"
    assert mrun.data.params["delta_version"] == str(run["results"]["train"].summary["silver_version"])
    assert not any(k.startswith("t00") for k in mrun.data.metrics)  # tenant figures live in LoggedModels
    children = ctx.mlflow.search_runs([mrun.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{mrun.info.run_id}'")
    assert children == []  # tracking.tenant_runs is off by default
    models = ctx.mlflow.search_logged_models([mrun.info.experiment_id],
                                             filter_string=f"source_run_id = '{mrun.info.run_id}'")
    by_tenant = {m.tags["tenantml.tenant_id"]: m for m in models}
    assert set(by_tenant) == {"t000", "t001", "t002", "t003"}
    assert {o.model_id for o in mrun.outputs.model_outputs} == {m.model_id for m in models}
    for tenant, m in by_tenant.items():
        assert str(m.status) == "READY" and m.tags["tenantml.status"] == "ok"
        metrics = {x.key: x.value for x in m.metrics}
        assert metrics["auc"] > metrics["baseline_auc"]
        mv = ctx.mlflow.search_model_versions(f"name = 'demo__{tenant}'")
        assert any(v.run_id == mrun.info.run_id and v.tags["logged_model_id"] == m.model_id
                   and v.source == m.artifact_location for v in mv)  # the version is lineage-linked


def test_run_log_records_every_step_and_tenant(spark: Any, run: dict[str, Any]) -> None:
    ctx = run["ctx"]
    log = read_table(spark, ctx.tables.run_log).where(f"run_id = '{ctx.run_id}'").toPandas()
    assert set(log["step"]) == set(pipeline_steps())
    train = log[log["step"] == "train"].set_index("tenant_id")
    assert train.loc[DIRTY_TENANT, "status"] == "blocked"
    assert train.loc["t000", "status"] == "ok" and train.loc["t000", "seconds"] > 0
    assert (log.groupby(["step", "tenant_id"], dropna=False).size() == 1).all()


def test_scoring_refuses_another_tenants_model(spark: Any, run: dict[str, Any]) -> None:
    """Point t002's champion alias at a version built from t003's model: t002 must not be scored."""
    ctx = run["ctx"]
    client = ctx.mlflow
    other = client.get_model_version_by_alias("demo__t003", "champion")
    mv = client.create_model_version("demo__t002", source=other.source, run_id=other.run_id,
                                     tags={**other.tags})
    client.set_registered_model_alias("demo__t002", "champion", mv.version)
    before = read_table(spark, ctx.tables.predictions("demo")).where("tenant_id = 't002'").toPandas()
    try:
        result = run_step(ctx, "score", dataset="demo", rescore=True)
        outcome = {t.tenant_id: t for t in result.tenants}
        assert outcome["t002"].status == "failed" and "registered for tenant 't003'" in outcome["t002"].error
        assert outcome["t003"].status == "ok" and result.status == "partial" and result.exit_code == 3
        after = read_table(spark, ctx.tables.predictions("demo")).where("tenant_id = 't002'").toPandas()
        assert len(after) == len(before) and set(after["model_name"]) == {"demo__t002"}
    finally:
        prev = [v for v in client.search_model_versions("name = 'demo__t002'") if v.version != mv.version]
        client.set_registered_model_alias("demo__t002", "champion", max(int(v.version) for v in prev))


def _store_row(spark: Any, ctx: JobContext, tenant: str, version: str) -> Any:
    return (read_table(spark, ctx.tables.model_store)
            .where(f"tenant_id = '{tenant}' AND model_version = '{version}' AND dataset = 'demo'").toPandas())


def _put_store_rows(spark: Any, ctx: JobContext, rows: Any, predicate: str) -> None:
    """What someone with write access to the table (not the platform) could do: replace rows as given."""
    df = spark.createDataFrame(rows, read_table(spark, ctx.tables.model_store).schema)
    df.write.format("delta").mode("overwrite").option("replaceWhere", predicate).save(ctx.tables.model_store.path)


def test_forged_registry_tags_and_a_forged_store_row_are_refused(spark: Any, run: dict[str, Any]) -> None:
    """A version of t002's model tagged as t002's own (tenant, strategy, digest all claiming t002) but
    built from t003's artifacts: without a model_store row it has no bytes; with a forged row (t003's
    row relabelled) the signature gives it away. t002 is never scored with t003's model."""
    ctx = run["ctx"]
    client = ctx.mlflow
    own = client.get_model_version_by_alias("demo__t002", "champion")
    other = client.get_model_version_by_alias("demo__t003", "champion")
    forged_tags = {**own.tags, "model_sha256": other.tags["model_sha256"]}
    mv = client.create_model_version("demo__t002", source=other.source, run_id=other.run_id, tags=forged_tags)
    client.set_registered_model_alias("demo__t002", "champion", mv.version)
    where = f"tenant_id = 't002' AND model_version = '{mv.version}'"
    try:
        out = {t.tenant_id: t for t in run_step(ctx, "score", dataset="demo", tenants=["t002", "t003"], rescore=True).tenants}
        assert out["t002"].status == "failed" and "missing from" in out["t002"].error, out["t002"]
        forged = _store_row(spark, ctx, "t003", str(other.version)).assign(
            tenant_id="t002", model_name="demo__t002", model_version=str(mv.version))
        _put_store_rows(spark, ctx, forged, where)
        out = {t.tenant_id: t for t in run_step(ctx, "score", dataset="demo", tenants=["t002", "t003"], rescore=True).tenants}
        assert out["t002"].status == "failed" and "signature does not match" in out["t002"].error, out["t002"]
        assert out["t003"].status == "ok"
        preds = read_table(spark, ctx.tables.predictions("demo")).where("tenant_id = 't002'").toPandas()
        assert set(preds["model_name"]) == {"demo__t002"} and set(preds["model_version"]) == {str(own.version)}
    finally:
        client.set_registered_model_alias("demo__t002", "champion", own.version)
        spark.sql(f"DELETE FROM delta.`{ctx.tables.model_store.path}` WHERE {where}")


def test_a_strategy_tag_that_lies_is_refused(spark: Any, run: dict[str, Any]) -> None:
    ctx = run["ctx"]
    client = ctx.mlflow
    own = client.get_model_version_by_alias("demo__t002", "champion")
    mv = client.create_model_version("demo__t002", source=own.source, run_id=own.run_id,
                                     tags={**own.tags, "strategy": "shared"})
    client.set_registered_model_alias("demo__t002", "champion", mv.version)
    try:
        out = {t.tenant_id: t for t in run_step(ctx, "score", dataset="demo", tenants=["t002"], rescore=True).tenants}
        assert out["t002"].status == "failed" and "claims strategy 'shared'" in out["t002"].error, out["t002"]
    finally:
        client.set_registered_model_alias("demo__t002", "champion", own.version)


def test_a_tampered_model_store_row_is_refused(spark: Any, run: dict[str, Any]) -> None:
    """t002's champion row given t003's bytes: first as is (the digest gives it away), then with the
    digest recomputed by someone without the signing key (the signature does)."""
    import hashlib

    ctx = run["ctx"]
    own = ctx.mlflow.get_model_version_by_alias("demo__t002", "champion")
    other = ctx.mlflow.get_model_version_by_alias("demo__t003", "champion")
    original = _store_row(spark, ctx, "t002", str(own.version))
    swapped_bytes = bytes(_store_row(spark, ctx, "t003", str(other.version)).iloc[0]["model"])
    where = f"tenant_id = 't002' AND model_version = '{own.version}' AND dataset = 'demo'"
    try:
        _put_store_rows(spark, ctx, original.assign(model=[swapped_bytes]), where)
        out = {t.tenant_id: t for t in run_step(ctx, "score", dataset="demo", tenants=["t002"], rescore=True).tenants}
        assert out["t002"].status == "failed" and "do not match the digest" in out["t002"].error, out["t002"]
        _put_store_rows(spark, ctx, original.assign(model=[swapped_bytes],
                                                    model_sha256=hashlib.sha256(swapped_bytes).hexdigest()), where)
        out = {t.tenant_id: t for t in run_step(ctx, "score", dataset="demo", tenants=["t002"], rescore=True).tenants}
        assert out["t002"].status == "failed" and "signature does not match" in out["t002"].error, out["t002"]
    finally:
        _put_store_rows(spark, ctx, original, where)
    assert run_step(ctx, "score", dataset="demo", tenants=["t002"], rescore=True).status == "ok"


def test_a_later_batch_supersedes_earlier_rows_without_quarantining_them(spark: Any, run: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    import pandas as pd

    ctx, t = run["ctx"], run["ctx"].tables
    first = pd.concat(pd.read_csv(p, dtype=str) for p in sorted(ctx.source_path("demo").glob("*.csv")))
    update = first[(first["tenant"] == "t001") & first["churned"].notna()].drop_duplicates("customer_id").head(10)
    update = update.assign(churned=(1 - update["churned"].astype(float).astype(int)).astype(str))
    (tmp_path / "batch2").mkdir()
    update.to_csv(tmp_path / "batch2" / "part-0000.csv", index=False)
    silver_before = _counts(read_table(spark, t.silver("demo")))
    quarantine_before = _counts(read_table(spark, t.quarantine("demo")))
    bronze_before = read_table(spark, t.bronze("demo")).count()

    ing = run_step(ctx, "ingest", dataset="demo", source_path=str(tmp_path / "batch2"))
    val = run_step(ctx, "validate", dataset="demo")

    assert read_table(spark, t.bronze("demo")).count() == bronze_before + 10
    assert ing.summary["batch_id"] != run["results"]["ingest"].summary["batch_id"]
    assert _counts(read_table(spark, t.silver("demo"))) == silver_before
    assert _counts(read_table(spark, t.quarantine("demo"))) == quarantine_before
    assert val.summary["rows_superseded"] == 10
    current = read_table(spark, t.silver("demo")).where("tenant_id = 't001'").toPandas().set_index("customer_id")
    flipped = update.set_index("customer_id")["churned"].astype(float)
    assert (current.loc[flipped.index, "churned"] == flipped).all()


def _ctx_with(run: dict[str, Any], tmp_path: Path, override: str, run_id: str | None = None) -> JobContext:
    conf = tmp_path / "conf"
    shutil.copytree(REPO_CONF, conf)
    (conf / "local" / "test.yml").write_text(override)
    return JobContext.create(conf_dir=conf, data_dir=run["data_dir"], spark=run["ctx"].spark, run_id=run_id)


def test_quota_samples_a_giant_tenant_and_caps_epochs(spark: Any, run: dict[str, Any], tmp_path: Path) -> None:
    ctx = _ctx_with(run, tmp_path, "training: {min_rows: 100, max_epochs: 6, patience: 2,"
                                   " tenant_quotas: {t000: {max_rows: 300, max_epochs: 2},"
                                   " t002: {max_seconds: 0.000001}}}\n")
    result = run_step(ctx, "train", dataset="demo", tenants=["t000", "t001", "t002"])
    out = {t.tenant_id: t for t in result.tenants}
    silver = _counts(read_table(spark, ctx.tables.silver("demo")))
    assert out["t000"].detail["sampled_from"] == silver["t000"] and out["t000"].rows_in == 300
    assert out["t000"].detail["epochs"] <= 2
    assert "sampled_from" not in out["t001"].detail and out["t001"].rows_in == silver["t001"]
    # A seconds quota: no epoch starts once it is used up; the model of the first epoch is kept.
    assert out["t002"].status == "ok" and out["t002"].detail["epochs"] == 1 and out["t002"].detail["time_quota_hit"]
    assert "time_quota_hit" not in out["t001"].detail


def test_resume_reruns_only_the_tenants_that_failed(spark: Any, run: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import torch

    from tenantml.apps.cli import run as cli_run

    if torch.cuda.is_available():
        pytest.skip("the failure is induced by asking for CUDA on a machine without it")
    run_id = "resume-test-1"
    ok_ctx = _ctx_with(run, tmp_path / "ok", "training: {min_rows: 100, max_epochs: 3}\n", run_id)
    bad_ctx = _ctx_with(run, tmp_path / "bad", "training: {min_rows: 100, max_epochs: 3, device: cuda,"
                                               " retries: 2}\n", run_id)
    first = run_step(ok_ctx, "train", dataset="demo", tenants=["t000"])
    failed = run_step(bad_ctx, "train", dataset="demo", tenants=["t001", "t002"])
    assert failed.status == "failed" and all(t.detail["attempts"] == 3 for t in failed.tenants)
    log = read_table(spark, ok_ctx.tables.run_log).where(f"run_id = '{run_id}'").toPandas()
    assert dict(zip(log["tenant_id"], log["status"], strict=True)) == {"t000": "ok", "t001": "failed",
                                                                     "t002": "failed"}
    t000_version = first.tenants[0].detail["version"]

    code = cli_run(["train", "--resume", "--run-id", run_id, "--json", "--quiet", "--conf-dir",
                    str(tmp_path / "ok" / "conf"), "--data-dir", str(run["data_dir"])])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["steps"][0]["tenants_processed"] == 2
    log = read_table(spark, ok_ctx.tables.run_log).where(f"run_id = '{run_id}'").toPandas()
    assert set(log["status"]) == {"ok"} and len(log) == 3
    store = read_table(spark, ok_ctx.tables.model_store).where(f"run_id = '{run_id}'").toPandas()
    assert sorted(store["tenant_id"]) == ["t000", "t001", "t002"]  # the resume kept t000's model
    assert store.set_index("tenant_id").loc["t000", "model_version"] == t000_version  # not retrained
    spark.conf.set("spark.sql.shuffle.partitions", "2")


def test_budget_stop_leaves_an_over_budget_tenant_out(spark: Any, run: dict[str, Any], tmp_path: Path) -> None:
    ctx = _ctx_with(run, tmp_path, "training: {min_rows: 100, max_epochs: 2}\n"
                                   "tenants: {budgets: {t001: 0.001}, budget_action: stop}\n")
    result = run_step(ctx, "train", dataset="demo", tenants=["t001", "t002"])
    out = {t.tenant_id: t for t in result.tenants}
    assert out["t001"].status == "skipped" and "over its budget" in out["t001"].detail["reason"]
    assert out["t002"].status == "ok"
    warn = _ctx_with(run, tmp_path / "w", "training: {min_rows: 100, max_epochs: 2}\n"
                                          "tenants: {budgets: {t001: 0.001}}\n")
    assert {t.tenant_id: t.status for t in run_step(warn, "train", dataset="demo", tenants=["t001"]).tenants} \
        == {"t001": "ok"}


def test_concurrent_runs_on_disjoint_tenants_both_succeed(spark: Any, run: dict[str, Any], tmp_path: Path) -> None:
    """Two scoring runs at once, each on its own tenants: Delta commits race, retries resolve them."""
    from concurrent.futures import ThreadPoolExecutor

    ctx_a = _ctx_with(run, tmp_path / "a", "training: {min_rows: 100}\n", run_id="concurrent-a")
    ctx_b = _ctx_with(run, tmp_path / "b", "training: {min_rows: 100}\n", run_id="concurrent-b")
    t = ctx_a.tables
    before = read_table(spark, t.predictions("demo")).toPandas()
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(run_step, ctx_a, "score", "demo", ["t000", "t001"], rescore=True)
        fb = pool.submit(run_step, ctx_b, "score", "demo", ["t002", "t003"], rescore=True)
        ra, rb = fa.result(timeout=600), fb.result(timeout=600)
    assert ra.status == rb.status == "ok", (ra.to_dict()["failures"], rb.to_dict()["failures"])
    after = read_table(spark, t.predictions("demo")).toPandas()
    assert len(after) == len(before)
    assert after.duplicated(["tenant_id", "entity_key"]).sum() == 0
    runs = after.groupby("tenant_id")["run_id"].first().to_dict()
    assert {runs["t000"], runs["t001"]} == {"concurrent-a"} and {runs["t002"], runs["t003"]} == {"concurrent-b"}
    log = read_table(spark, t.run_log).where("run_id LIKE 'concurrent-%'").toPandas()
    assert sorted(log["tenant_id"]) == ["t000", "t001", "t002", "t003"]


def test_concurrent_runs_on_the_same_tenant_never_duplicate(spark: Any, run: dict[str, Any],
                                                            tmp_path: Path) -> None:
    """Two scoring runs on the same tenants at once: Delta serialises the commits (the loser
    retries with backoff or fails cleanly); the table ends with exactly one run's rows per tenant."""
    from concurrent.futures import ThreadPoolExecutor

    ctx_a = _ctx_with(run, tmp_path / "a", "training: {min_rows: 100}\n", run_id="same-a")
    ctx_b = _ctx_with(run, tmp_path / "b", "training: {min_rows: 100}\n", run_id="same-b")
    t = ctx_a.tables
    before = read_table(spark, t.predictions("demo")).where("tenant_id IN ('t000', 't001')").count()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_step, c, "score", "demo", ["t000", "t001"], rescore=True) for c in (ctx_a, ctx_b)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=600).status)
            except Exception as exc:  # a clean failure must name the conflict, not corrupt anything
                assert "Concurrent" in type(exc).__name__ + str(exc), exc
                outcomes.append("conflict")
    assert "ok" in outcomes
    after = read_table(spark, t.predictions("demo")).where("tenant_id IN ('t000', 't001')").toPandas()
    assert len(after) == before and after.duplicated(["tenant_id", "entity_key"]).sum() == 0
    per_tenant_runs = after.groupby("tenant_id")["run_id"].nunique()
    assert (per_tenant_runs == 1).all()  # each tenant holds one whole run's predictions, never a mix
    assert set(after["run_id"]) <= {"same-a", "same-b"}


# --------------------------------------------------------------------------- one tenant's scope
# Code acting for tenant A (a notebook, an export) through its scope: every reach for tenant B is
# refused, nothing leaks.
A, B = "t000", "t001"


@pytest.fixture(scope="module")
def gate(run: dict[str, Any]) -> TenantScope:
    return run["ctx"].scope([A], "analyst")


def test_reads_return_only_the_scopes_tenant(spark: Any, run: dict[str, Any], gate: TenantScope) -> None:
    t = run["ctx"].tables
    for ref in (t.silver("demo"), t.predictions("demo"), t.quarantine("demo"), t.run_log, t.model_store):
        rows = gate.read(ref).select("tenant_id").distinct().collect()
        assert {r["tenant_id"] for r in rows} <= {A}, ref.name
    b_keys = {r["customer_id"] for r in read_table(spark, t.silver("demo")).where(f"tenant_id = '{B}'")
              .select("customer_id").collect()}
    a_keys = {r["customer_id"] for r in gate.read(t.silver("demo")).select("customer_id").collect()}
    assert a_keys and not (a_keys & b_keys)
    shared = gate.read(t.model_store, shared=True).select("tenant_id").distinct().collect()
    assert {r["tenant_id"] for r in shared} <= {A, "_shared"}


def test_writing_into_another_tenants_partition_is_refused(spark: Any, run: dict[str, Any],
                                                           gate: TenantScope) -> None:
    ref = run["ctx"].tables.predictions("demo")
    before = read_table(spark, ref).where(f"tenant_id = '{B}'").count()
    b_rows = read_table(spark, ref).where(f"tenant_id = '{B}'").limit(3)
    with pytest.raises(TenantIsolationError, match=f"\\[{A}\\].*row of tenant {B} into .*predictions_demo"):
        gate.write(b_rows, ref)
    with pytest.raises(TenantIsolationError, match=f"tenant\\(s\\) \\['{B}'\\]"):
        gate.write(b_rows, ref, tenants=[B])
    mixed = read_table(spark, ref).where(f"tenant_id IN ('{A}', '{B}')")
    with pytest.raises(TenantIsolationError):
        gate.write(mixed, ref)
    assert read_table(spark, ref).where(f"tenant_id = '{B}'").count() == before


def test_loading_another_tenants_model_is_refused(run: dict[str, Any], gate: TenantScope) -> None:
    ctx = run["ctx"]
    b_version = ctx.mlflow.get_model_version_by_alias(f"demo__{B}", "champion")
    for name in (f"demo__{B}", "demo__t000x", f"demo__{A}/../demo__{B}", "demo___shared"):
        with pytest.raises(TenantIsolationError, match="not its own model"):
            gate.load_models({A: (name, str(b_version.version))})
    own = ctx.mlflow.get_model_version_by_alias(f"demo__{A}", "champion")
    rows = gate.load_models({A: (f"demo__{A}", str(own.version))})
    assert list(rows["tenant_id"]) == [A] and len(bytes(rows.iloc[0]["model"])) > 1000
    assert gate.own_model("demo", A) == f"demo__{A}"
    with pytest.raises(TenantIsolationError):
        gate.own_model("demo", B)


@pytest.mark.parametrize("part", ["..", "../t001", "/etc/passwd", "a/../../t001", "", "x\x00y"])
def test_path_injection_is_refused(gate: TenantScope, part: str) -> None:
    with pytest.raises(TenantIsolationError, match="leave its folder"):
        gate.artifact_path(A, part)
    assert gate.artifact_path(A, "exports", "scores.csv").parts[-3:] == (A, "exports", "scores.csv")
    with pytest.raises(TenantIsolationError, match="writing files"):
        gate.artifact_path(B, "exports")


@pytest.mark.parametrize("hostile", [f"{A}' OR '1'='1", "../t001", f"{A}/../{B}", "t000;DROP TABLE x", " t000"])
def test_hostile_tenant_ids_never_open_a_scope(run: dict[str, Any], hostile: str) -> None:
    with pytest.raises(InvalidTenantIdError):
        run["ctx"].scope([hostile], "analyst")


# --------------------------------------------------------------------------- the batch steps' scope
# The steps act for many tenants at once through a TenantScope: a step that (by a bug) produced
# another tenant's rows or reached for another tenant's model is stopped at the gate.
def test_a_steps_scope_refuses_rows_and_models_of_tenants_outside_it(spark: Any, run: dict[str, Any]) -> None:
    from tenantml.io import table_version
    from tenantml.io.model_store import write_models

    ctx = run["ctx"]
    scope = ctx.scope([A], "score")
    ref = ctx.tables.predictions("demo")
    assert {r["tenant_id"] for r in scope.read(ref).select("tenant_id").distinct().collect()} == {A}
    version = table_version(spark, ref)
    mixed = read_table(spark, ref).where(f"tenant_id IN ('{A}', '{B}')")
    # The row-level guard runs inside the write job: the commit never happens.
    with pytest.raises(TenantIsolationError, match=f"step score .*\\[{A}\\].*row of tenant {B} into .*predictions_demo"):
        scope.write(mixed, ref)
    with pytest.raises(TenantIsolationError, match=f"replacing partitions .* tenant\\(s\\) \\['{B}'\\]"):
        scope.write(mixed, ref, tenants=[A, B])
    assert table_version(spark, ref) == version
    b_champion = ctx.mlflow.get_model_version_by_alias(f"demo__{B}", "champion")
    with pytest.raises(TenantIsolationError, match=f"model 'demo__{B}' for tenant '{A}': not its own model"):
        scope.load_models({A: (f"demo__{B}", str(b_champion.version))})
    with pytest.raises(TenantIsolationError, match=f"loading a model for tenant '{B}'"):
        scope.load_models({B: (f"demo__{B}", str(b_champion.version))})
    with pytest.raises(TenantIsolationError, match=r"writing .*model_store rows for tenant"):
        write_models(spark, ctx.tables.model_store, [{"tenant_id": B}], "demo", "scope-test", "tenant",
                     key=ctx.signing_key, scope=scope)
    own = ctx.mlflow.get_model_version_by_alias(f"demo__{A}", "champion")
    assert list(scope.load_models({A: (f"demo__{A}", str(own.version))})["tenant_id"]) == [A]
