"""The gold star schema on real components: a pipeline on demo data, `publish`, and a real SQL
endpoint (Spark Thrift Server) queried with a real HiveServer2 client."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest

from tenantml.apps.demo import DIRTY_TENANT, HOSTILE_TENANT_IDS
from tenantml.core.errors import InvalidTenantIdError, UnknownTenantError
from tenantml.core.ids import is_valid_tenant_id
from tenantml.gold.star import model_dim, model_dim_rows
from tenantml.io import read_table, table_version
from tenantml.io.context import JobContext
from tenantml.io.tenants import update_tenants
from tenantml.steps.runner import run_step

pytestmark = pytest.mark.spark
REPO = Path(__file__).resolve().parents[2]

# The published contract, spelled out here on purpose: a change to the code alone fails.
CONTRACT = {
    "gold_<ds>_prediction_fact": [
        ("tenant_id", "string"), ("tenant_key", "bigint"), ("entity_key", "string"),
        ("scoring_run_id", "string"), ("scoring_batch_id", "string"), ("score_date_key", "int"), ("scored_at", "timestamp"),
        ("model_key", "bigint"), ("strategy", "string"), ("prediction", "double"), ("score", "double")],
    "gold_tenant_dim": [
        ("tenant_key", "bigint"), ("tenant_id", "string"), ("display_name", "string"), ("strategy", "string"),
        ("consent_share_data", "boolean"), ("consent_shared_inference", "boolean"), ("status", "string"),
        ("is_active", "boolean"), ("created_at", "timestamp"), ("updated_at", "timestamp")],
    "gold_<ds>_model_dim": [
        ("model_key", "bigint"), ("model_name", "string"), ("model_version", "int"), ("dataset", "string"),
        ("tenant_key", "bigint"), ("tenant_id", "string"), ("strategy", "string"),
        ("is_shared_model", "boolean"), ("metric_name", "string"), ("metric_value", "double"),
        ("baseline_metric_value", "double"), ("train_rows", "bigint"), ("training_data_version", "bigint"),
        ("base_model_key", "bigint"), ("base_model_name", "string"), ("base_model_version", "int"),
        ("mlflow_run_id", "string"), ("trained_run_id", "string"), ("is_champion", "boolean"),
        ("created_at", "timestamp")],
    "gold_date_dim": [
        ("date_key", "int"), ("date", "date"), ("year", "int"), ("quarter", "int"), ("quarter_name", "string"),
        ("month", "int"), ("month_name", "string"), ("year_month", "string"), ("day", "int"),
        ("weekday", "int"), ("weekday_name", "string"), ("day_of_year", "int"), ("iso_week", "int"),
        ("is_weekend", "boolean")],
}


@pytest.fixture(scope="module")
def published(spark: Any, nightly_run: dict[str, Any]) -> dict[str, Any]:
    """What the nightly job (conftest.py: the whole pipeline on 5 demo tenants, publish last) left
    behind, on a copy of its data directory: these tests publish and score again.

    `results` holds the job's publish and score steps (their summaries) and `outcomes` each tenant's
    outcome of those steps, as the job recorded them in the run log."""
    run = nightly_run["run"]
    conf, data_dir = Path(nightly_run["conf"]), Path(nightly_run["data_copy"])
    ctx = JobContext.create(conf_dir=conf, data_dir=data_dir, spark=spark, run_id=run.run_id)
    results = {"publish": run.task("publish").steps[0], "score": run.task("score").iterations[0].steps[0]}
    log = read_table(spark, ctx.tables.run_log).where(f"run_id = '{run.run_id}'").collect()
    outcomes = {step: {r["tenant_id"]: r for r in log if r["step"] == step} for step in results}
    return {"ctx": ctx, "results": results, "outcomes": outcomes, "conf": conf, "data_dir": data_dir}


def _tables(ctx: JobContext) -> dict[str, Any]:
    t = ctx.tables
    return {"gold_<ds>_prediction_fact": t.gold_prediction_fact("demo"), "gold_tenant_dim": t.gold_tenant_dim,
            "gold_<ds>_model_dim": t.gold_model_dim("demo"), "gold_date_dim": t.gold_date_dim}


def _read(spark: Any, ctx: JobContext, name: str) -> Any:
    return read_table(spark, _tables(ctx)[name])


def _schema(df: Any) -> list[tuple[str, str]]:
    return [(f.name, f.dataType.simpleString()) for f in df.schema.fields]


def test_publish_step_reports_every_tenant(published: dict[str, Any]) -> None:
    pub = published["results"]["publish"]
    assert pub["status"] == "ok" and pub["step"] == "publish"
    outcome, score = published["outcomes"]["publish"], published["outcomes"]["score"]
    scored = {t: o["rows_out"] for t, o in score.items() if o["status"] == "ok"}
    assert scored and {t: o["rows_out"] for t, o in outcome.items() if o["status"] == "ok"} == scored
    assert outcome[DIRTY_TENANT]["status"] == "skipped"  # registered, blocked by validation: no predictions
    assert pub["fact_rows"] == sum(scored.values())
    assert len(pub["tables_written"]) == 4


def test_gold_tables_have_the_documented_schema(spark: Any, published: dict[str, Any]) -> None:
    docs = (REPO / "docs" / "data-contracts.md").read_text()
    section = docs[docs.index("## Gold tables (BI)"):]
    for name, expected in CONTRACT.items():
        assert _schema(_read(spark, published["ctx"], name)) == expected, name
        body = section[section.index(f"### {name}"):]
        body = body[:body.find("\n### ", 1)] if "\n### " in body[1:] else body
        documented = re.findall(r"^\| `([a-z_]+)` \| ([a-z]+) \|", body, flags=re.M)
        assert documented == expected, f"docs/data-contracts.md section {name}"


def test_fact_grain_is_one_row_per_tenant_entity_and_scoring_run(spark: Any, published: dict[str, Any]) -> None:
    ctx = published["ctx"]
    fact = _read(spark, ctx, "gold_<ds>_prediction_fact")
    preds = read_table(spark, ctx.tables.predictions("demo"))
    n = fact.count()
    assert n == preds.count() > 0
    assert fact.select("tenant_id", "entity_key", "scoring_run_id").distinct().count() == n
    assert fact.where("tenant_key IS NULL OR model_key IS NULL OR score_date_key IS NULL").count() == 0
    # The measures are the predictions', row for row.
    joined = fact.join(preds, on=["tenant_id", "entity_key"]).where(
        (fact.score != preds.score) | (fact.prediction != preds.prediction) | (fact.scoring_run_id != preds.run_id))
    assert joined.count() == 0


def test_every_fact_key_is_in_its_dimension(spark: Any, published: dict[str, Any]) -> None:
    ctx = published["ctx"]
    fact = _read(spark, ctx, "gold_<ds>_prediction_fact")
    tenants = _read(spark, ctx, "gold_tenant_dim")
    models = _read(spark, ctx, "gold_<ds>_model_dim")
    dates = _read(spark, ctx, "gold_date_dim")
    for dim, key, fk in ((tenants, "tenant_key", "tenant_key"), (models, "model_key", "model_key"),
                         (dates, "date_key", "score_date_key")):
        assert dim.select(key).distinct().count() == dim.count(), key  # a key, not just a column
        orphans = fact.join(dim.select(dim[key].alias(fk)), on=fk, how="left_anti")
        assert orphans.count() == 0, fk
    model_owners = models.where("tenant_key IS NOT NULL").select("tenant_key")
    assert model_owners.join(tenants, on="tenant_key", how="left_anti").count() == 0
    # The fact's model is the one predictions named, and it was the champion that served it.
    served = fact.join(models, on="model_key").select(
        fact.tenant_id, models.tenant_id.alias("owner"), models.model_name, models.is_champion).distinct().collect()
    assert served and all(r["owner"] == r["tenant_id"] and r["model_name"] == f"demo__{r['tenant_id']}"
                          and r["is_champion"] for r in served)
    # The date dimension is whole contiguous years.
    row = dates.selectExpr("min(date) AS a", "max(date) AS b", "count(*) AS n").first()
    assert (row["a"].month, row["a"].day, row["b"].month, row["b"].day) == (1, 1, 12, 31)
    assert row["n"] == (row["b"] - row["a"]).days + 1
    d = date(row["a"].year, 3, 15)
    day = dates.where(f"date_key = {d:%Y%m%d}").first()
    assert (day["date"], day["year"], day["quarter"], day["quarter_name"], day["month"], day["month_name"],
            day["year_month"], day["day"], day["weekday"], day["weekday_name"], day["day_of_year"],
            day["iso_week"], day["is_weekend"]) == (
        d, d.year, 1, "Q1", 3, "March", f"{d.year}-03", 15, d.isoweekday(), d.strftime("%A"),
        d.timetuple().tm_yday, d.isocalendar()[1], d.isoweekday() >= 6)


def test_fact_is_partitioned_by_tenant(spark: Any, published: dict[str, Any]) -> None:
    from delta.tables import DeltaTable

    ref = published["ctx"].tables.gold_prediction_fact("demo")
    detail = DeltaTable.forPath(spark, ref.path).detail().first()
    assert list(detail["partitionColumns"]) == ["tenant_id"]
    files = read_table(spark, ref).where("tenant_id = 't001'").inputFiles()
    assert files and all("/tenant_id=t001/" in f for f in files)  # a tenant filter reads only its partition


def test_no_hostile_or_invalid_tenant_id_is_published(spark: Any, published: dict[str, Any]) -> None:
    ctx = published["ctx"]
    registered = {r[0] for r in read_table(spark, ctx.tables.tenants).select("tenant_id").collect()}
    for name in ("gold_<ds>_prediction_fact", "gold_tenant_dim", "gold_<ds>_model_dim"):
        ids = {r[0] for r in _read(spark, ctx, name).select("tenant_id").distinct().collect()}
        assert None not in ids or name == "gold_<ds>_model_dim", name
        ids.discard(None)
        assert ids and all(is_valid_tenant_id(t) for t in ids) and ids <= registered, name
        assert not ids & set(HOSTILE_TENANT_IDS), name
    names = {r[0] for r in _read(spark, ctx, "gold_tenant_dim").select("display_name").collect()}
    assert not names & set(HOSTILE_TENANT_IDS)
    assert not any(p.name.startswith("tenant_id=") and not is_valid_tenant_id(p.name[len("tenant_id="):])
                   for p in Path(ctx.tables.gold_prediction_fact("demo").path or "").iterdir())
    before = {n: table_version(spark, ref) for n, ref in _tables(ctx).items()}
    with pytest.raises(InvalidTenantIdError):
        run_step(ctx, "publish", dataset="demo", tenants=["x'; DROP TABLE tenants; --"])
    with pytest.raises(InvalidTenantIdError):
        run_step(ctx, "publish", dataset="demo", tenants=["../../etc"])
    with pytest.raises(UnknownTenantError):
        run_step(ctx, "publish", dataset="demo", tenants=["t999"])
    assert {n: table_version(spark, ref) for n, ref in _tables(ctx).items()} == before


def test_rerun_writes_the_same_rows(spark: Any, published: dict[str, Any]) -> None:
    ctx = published["ctx"]

    def snapshot() -> dict[str, list[tuple[Any, ...]]]:
        return {n: sorted((tuple(r) for r in _read(spark, ctx, n).collect()), key=repr) for n in CONTRACT}

    def versions() -> dict[str, int]:
        return {n: table_version(spark, ref) for n, ref in _tables(ctx).items()}

    before, committed = snapshot(), versions()
    again = run_step(ctx, "publish", dataset="demo")
    assert again.status == "ok" and again.summary["fact_rows"] == published["results"]["publish"]["fact_rows"]
    assert snapshot() == before
    assert versions() == committed and again.tables_written == []  # nothing changed: nothing committed
    one = run_step(ctx, "publish", dataset="demo", tenants=["t001"])  # a tenant-scoped rerun too
    assert [o.tenant_id for o in one.tenants] == ["t001"] and one.status == "ok"
    assert snapshot() == before and versions() == committed
    # A change is published, and only that change.
    update_tenants(spark, ctx.tables.tenants, ["t002"], status="paused")
    try:
        changed = run_step(ctx, "publish", dataset="demo")
        assert changed.tables_written == [ctx.tables.gold_tenant_dim.display]
        after = snapshot()
        dim = {r["tenant_id"]: r for r in _read(spark, ctx, "gold_tenant_dim").collect()}
        assert (dim["t002"]["status"], dim["t002"]["is_active"]) == ("paused", False)
        assert {n: v for n, v in after.items() if n != "gold_tenant_dim"} == \
            {n: v for n, v in before.items() if n != "gold_tenant_dim"}
        assert len(after["gold_tenant_dim"]) == len(before["gold_tenant_dim"])
    finally:
        update_tenants(spark, ctx.tables.tenants, ["t002"], status="active")
        run_step(ctx, "publish", dataset="demo")


def test_model_dim_resolves_tuned_and_shared_lineage(spark: Any) -> None:
    at = datetime(2026, 3, 1, 12)

    def row(tenant: str, strategy: str, name: str, version: str, **kw: Any) -> dict[str, Any]:
        return {"dataset": "demo", "tenant_id": tenant, "strategy": strategy, "model_name": name,
                "model_version": version, "mlflow_run_id": kw.get("run"), "run_id": "r1", "metric_name": "auc",
                "metric": 0.8, "baseline_metric": 0.5, "metrics_json": kw.get("metrics_json", "{}"),
                "train_rows": kw.get("rows", 100), "delta_version": 3, "created_at": at}

    store = [row("_shared", "shared", "demo___shared", "2", run="run-s", rows=900),
             row("t1", "tenant", "demo__t1", "1", run="run-a"),
             row("t1", "tuned", "demo__t1", "3", run="run-t"),
             row("t2", "shared", "demo__t2", "1", rows=0, metrics_json='{"base_model": "demo___shared/2"}')]
    tags = {("demo__t1", "3"): {"base_model": "demo___shared", "base_version": "2"}}
    rows = model_dim_rows(store, {"demo__t2": "1", "demo___shared": "2", "demo__t1": "1"}, tags)
    df = model_dim(spark, rows)
    assert _schema(df) == CONTRACT["gold_<ds>_model_dim"]
    got = {(r["model_name"], r["model_version"]): r for r in df.collect()}
    shared, tuned, serving, own = (got[k] for k in (("demo___shared", 2), ("demo__t1", 3), ("demo__t2", 1),
                                                    ("demo__t1", 1)))
    assert shared["tenant_id"] is None and shared["tenant_key"] is None and shared["is_shared_model"]
    assert tuned["base_model_key"] == shared["model_key"] == serving["base_model_key"]
    assert (tuned["base_model_name"], tuned["base_model_version"]) == ("demo___shared", 2)
    assert (serving["train_rows"], serving["mlflow_run_id"]) == (900, "run-s")  # taken from its base
    assert own["base_model_key"] is None and own["is_champion"] and not tuned["is_champion"]
    assert len({r["model_key"] for r in got.values()}) == 4
    assert len({r["tenant_key"] for r in got.values()}) == 3  # t1, t2 and NULL for the shared model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.1, deadline - time.monotonic()))
        if ready:
            line = proc.stdout.readline()
            if not line:
                break  # exited
            if line.startswith("{"):
                return dict(json.loads(line))
    raise AssertionError(f"serve-sql did not become ready (exit code {proc.poll()})")


@pytest.mark.slow
def test_serve_sql_exposes_the_gold_tables_to_a_hiveserver2_client(spark: Any, published: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    from pyhive import hive

    ctx = published["ctx"]
    expected = {ref.name: read_table(spark, ref).count() for ref in _tables(ctx).values()}
    expected["predictions_demo"] = read_table(spark, ctx.tables.predictions("demo")).count()
    t001 = _read(spark, ctx, "gold_<ds>_prediction_fact").where("tenant_id = 't001'").count()
    port = _free_port()
    err = (tmp_path / "serve.err").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tenantml.apps.cli", "serve-sql", "--json", "--quiet", "--port", str(port),
         "--conf-dir", str(published["conf"]), "--data-dir", str(published["data_dir"])],
        stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    try:
        info = _ready_line(proc, timeout=180)
        assert info["status"] == "serving" and info["transport"] == "binary"
        assert info["jdbc_url"] == f"jdbc:hive2://127.0.0.1:{port}/tenantml"
        assert set(info["tables"]) == set(expected)
        conn = hive.connect(host="127.0.0.1", port=port, username="powerbi", database="tenantml")
        cur = conn.cursor()
        cur.execute("SHOW TABLES")
        assert {r[1] for r in cur.fetchall()} == set(expected)
        for name, n in expected.items():
            cur.execute(f"SELECT count(*) FROM {name}")
            assert cur.fetchall() == [(n,)], name
        cur.execute("SELECT count(*) FROM gold_demo_prediction_fact WHERE tenant_id = %(t)s", {"t": "t001"})
        assert cur.fetchall() == [(t001,)] and 0 < t001 < expected["gold_demo_prediction_fact"]
        cur.execute("SELECT d.year, count(*) FROM gold_demo_prediction_fact f "
                    "JOIN gold_tenant_dim t ON f.tenant_key = t.tenant_key "
                    "JOIN gold_date_dim d ON f.score_date_key = d.date_key "
                    "WHERE t.tenant_id = %(t)s GROUP BY d.year", {"t": "t001"})
        assert sum(r[1] for r in cur.fetchall()) == t001  # the star joins a BI model makes
        conn.close()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and '"stopped"' in out
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the port is released
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        err.close()
    assert "Traceback" not in (tmp_path / "serve.err").read_text()


def test_a_new_scoring_run_adds_facts_and_keeps_the_earlier_run(spark: Any, published: dict[str, Any]) -> None:
    ctx = published["ctx"]
    fact_ref = ctx.tables.gold_prediction_fact("demo")
    before = read_table(spark, fact_ref).groupBy("tenant_id").count().collect()
    rescore = JobContext.create(conf_dir=published["conf"], data_dir=published["data_dir"], spark=spark,
                                run_id="rescore-1")
    assert run_step(rescore, "score", dataset="demo", tenants=["t001"], rescore=True).status == "ok"
    assert run_step(rescore, "publish", dataset="demo", tenants=["t001"]).status == "ok"
    assert run_step(rescore, "publish", dataset="demo", tenants=["t001"]).status == "ok"  # rerun: replaced
    fact = read_table(spark, fact_ref)
    after = {r["tenant_id"]: r["count"] for r in fact.groupBy("tenant_id").count().collect()}
    old = {r["tenant_id"]: r["count"] for r in before}
    assert after == {**old, "t001": 2 * old["t001"]}
    runs = {r[0] for r in fact.where("tenant_id = 't001'").select("scoring_run_id").distinct().collect()}
    assert runs == {ctx.run_id, "rescore-1"}
    assert fact.select("tenant_id", "entity_key", "scoring_run_id").distinct().count() == fact.count()
