"""Bad input never crashes a run and is never silently dropped.

Every case ends either in a clear ``TenantMLError`` whose message names the dataset, file, column,
config key or tenant at fault, or in quarantine rows carrying a reason; for every tenant id
(the NULL group of missing/invalid ids included) bronze rows = silver rows + quarantine rows.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tenantml.apps import cli
from tenantml.core.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    ConfigError,
    InvalidTenantIdError,
    SourceError,
    TableNotFoundError,
    TenantMLError,
    UnknownTenantError,
)
from tenantml.io import read_table, table_exists
from tenantml.io.context import JobContext
from tenantml.io.delta import latest_commit
from tenantml.steps.base import StepResult
from tenantml.steps.runner import run_step

pytestmark = pytest.mark.spark

COLUMNS = ["customer_id", "tenant", "tenure_months", "monthly_spend", "plan", "churned", "notes"]

PROJECT_YML = """\
project: {name: badinput, data_dir: .data, default_dataset: acct}
spark: {master: "local[2]", shuffle_partitions: 2}
training: {min_rows: 20, max_epochs: 3, patience: 2, batch_size: 64, hidden_units: [8]}
scoring: {device: cpu, parallelism: 2}
tracking: {experiment: badinput}
"""

DATASET_YML = """\
datasets:
  acct:
    source: {path: "${data_dir}/sources/acct", format: csv}
    scoring_source: {path: "${data_dir}/sources/acct_scoring", format: csv}
    tenant_column: tenant
    entity_key: customer_id
    label: churned
    task: binary
    numeric_features: [tenure_months, monthly_spend]
    categorical_features: [plan]
    rules:
      ranges:
        monthly_spend: {min: 0}
      allowed_values:
        plan: [basic, pro]
"""

PARQUET_YML = """\
datasets:
  acctpq:
    source: {path: "${data_dir}/sources/acctpq", format: parquet}
    tenant_column: tenant
    entity_key: customer_id
    label: churned
    task: binary
    numeric_features: [tenure_months, monthly_spend]
    categorical_features: [plan]
"""

TENANT_REASON = "tenant id in column 'tenant' is missing or invalid"
# Tenant ids found in the data that must never reach a path, predicate or model name.
HOSTILE_IN_DATA = ["acme corp", "o'brien", 'say"hi', "a/b", "..", "../escape", "", " alpha"]
# Tenant ids handed in by a caller (CLI --tenants or the tenants= argument).
HOSTILE_ARGS = ["../../etc", "a b", "x'; DROP TABLE t; --", "a/b", "..", "acme\n", "é"]
# zeta: a valid id with rows to score only (never registered: its scoring rows are quarantined)
VALID_PARTITIONS = {"alpha", "beta", "gamma", "omega", "zeta", "__HIVE_DEFAULT_PARTITION__"}
OVERFLOW_CUSTOMER = "O-inf"


# --------------------------------------------------------------------------- helpers


def make_conf(root: Path, *, project: str = PROJECT_YML, datasets: dict[str, str] | None = None,
              local: dict[str, str] | None = None) -> Path:
    conf = root / "conf"
    (conf / "base" / "datasets").mkdir(parents=True, exist_ok=True)
    (conf / "local").mkdir(parents=True, exist_ok=True)
    (conf / "base" / "project.yml").write_text(project)
    for name, text in (datasets if datasets is not None else {"acct": DATASET_YML}).items():
        (conf / "base" / "datasets" / f"{name}.yml").write_text(text)
    for name, text in (local or {}).items():
        (conf / "local" / name).write_text(text)
    return conf


def good_row(rng: random.Random, tenant: str | None, customer: str) -> dict[str, Any]:
    tenure = rng.randint(1, 60)
    churned = 1 if rng.random() < (0.7 if tenure < 12 else 0.15) else 0
    return {"customer_id": customer, "tenant": tenant, "tenure_months": str(tenure),
            "monthly_spend": f"{rng.uniform(10, 200):.2f}", "plan": rng.choice(["basic", "pro"]),
            "churned": str(churned), "notes": "ok"}


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] = COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r[c]) for c in columns})
    return path


def counts(spark: Any, ref: Any) -> dict[str | None, int]:
    if not table_exists(spark, ref):
        return {}
    df = read_table(spark, ref)
    return {r["tenant_id"]: int(r["count"]) for r in df.groupBy("tenant_id").count().collect()}


def history_quarantine(ctx: JobContext, dataset: str) -> Any:
    """The quarantined history rows (the table also holds rejected rows to score, `_purpose` scoring)."""
    q = read_table(ctx.spark, ctx.tables.quarantine(dataset))
    return q.where("_purpose = 'history'") if "_purpose" in q.columns else q


def counts_of(df: Any) -> dict[str | None, int]:
    return {r["tenant_id"]: int(r["count"]) for r in df.groupBy("tenant_id").count().collect()}


def assert_reconciled(ctx: JobContext, dataset: str) -> tuple[dict, dict, dict]:
    """bronze = silver + quarantine for every tenant id, the NULL (invalid id) group included."""
    spark = ctx.spark
    bronze = counts(spark, ctx.tables.bronze(dataset))
    silver = counts(spark, ctx.tables.silver(dataset))
    quarantine = counts_of(history_quarantine(ctx, dataset))
    assert None not in silver, "rows without a valid tenant id reached silver"
    assert set(silver) <= set(bronze) and set(quarantine) <= set(bronze)
    mismatched = {t: (n, silver.get(t, 0), quarantine.get(t, 0)) for t, n in bronze.items()
                  if n != silver.get(t, 0) + quarantine.get(t, 0)}
    assert not mismatched, f"rows lost or duplicated: tenant -> (bronze, silver, quarantine) {mismatched}"
    return bronze, silver, quarantine


def quarantine_frame(ctx: JobContext, dataset: str) -> pd.DataFrame:
    return history_quarantine(ctx, dataset).toPandas()


def outcome(result: StepResult, tenant: str | None) -> Any:
    found = [t for t in result.tenants if t.tenant_id == tenant]
    assert len(found) == 1, f"{result.step}: expected one outcome for tenant {tenant!r}, got {found}"
    return found[0]


def all_names(root: Path) -> list[str]:
    names = []
    for _dirpath, dirnames, filenames in os.walk(root):
        names += dirnames + filenames
    return names


class SparkTouched(AssertionError):
    """Raised by NoSpark: a step used Spark before rejecting its arguments."""


class NoSpark:
    """Stands in for a SparkSession; any use of it is a test failure."""

    def __init__(self) -> None:
        self.touched: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.touched.append(name)
        raise SparkTouched(f"Spark was used (attribute {name!r}) before the bad argument was rejected")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = cli.run([*argv, "--env", "local", "--json", "--quiet"])
    out = capsys.readouterr().out
    return code, json.loads(out[out.index("{"):])


# --------------------------------------------------------------------------- the messy batch


def messy_rows() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows of three tenants plus hostile ids; ``expected`` maps customer -> expected reason fragment."""
    rng = random.Random(11)
    rows: list[dict[str, Any]] = []
    expected: dict[str, str] = {}
    for tenant, prefix in (("alpha", "A"), ("beta", "B")):
        rows += [good_row(rng, tenant, f"{prefix}{i:03d}") for i in range(40)]

    def bad(tenant: str | None, customer: str, reason: str, **values: str | None) -> None:
        rows.append({**good_row(rng, tenant, customer), **values})
        expected[customer] = reason

    # Wrong types in numeric columns and nulls in the label.
    bad("alpha", "A-bad-1", "column 'tenure_months' is not a number", tenure_months="abc")
    bad("alpha", "A-bad-2", "column 'monthly_spend' is not a number", monthly_spend="12,5")
    bad("alpha", "A-bad-3", "label 'churned' is empty", churned=None)
    bad("beta", "B-bad-1", "label 'churned' is not a binary value", churned="maybe")
    bad("beta", "B-bad-2", "column 'monthly_spend' is outside", monthly_spend="-5")
    bad("beta", "B-bad-3", "column 'tenure_months' is not a number", tenure_months="12 months")
    # An earlier copy of B005 in the same batch: the later row wins, this one is quarantined.
    dup = {**good_row(rng, "beta", "B005")}
    rows.insert(3, dup)
    # gamma: every row rejected -> blocked, never a crash.
    for i in range(6):
        bad("gamma", f"G{i:03d}", "label 'churned' is empty" if i % 2 else "is not a number",
            churned=None if i % 2 else "1", tenure_months="n/a" if i % 2 == 0 else "3")
    # Hostile tenant ids in the data.
    for j, tenant in enumerate(HOSTILE_IN_DATA):
        for k in range(2):
            bad(tenant, f"H{j}-{k}", TENANT_REASON)
    # omega: below training.min_rows, so never trained; one value overflows a double (see
    # test_numeric_overflow_is_quarantined); other tests only check that it reconciles.
    rows += [good_row(rng, "omega", f"O{i:03d}") for i in range(4)]
    rows.append({**good_row(rng, "omega", OVERFLOW_CUSTOMER), "tenure_months": "1e999"})
    return rows, expected


@dataclass
class Messy:
    conf: Path
    data: Path
    ctx: JobContext
    expected: dict[str, str]
    results: dict[str, StepResult]


@pytest.fixture(scope="module")
def messy(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Messy]:
    root = tmp_path_factory.mktemp("messy")
    conf = make_conf(root)
    data = root / "data"
    rows, expected = messy_rows()
    write_csv(data / "sources" / "acct" / "batch1.csv", rows)
    write_csv(data / "sources" / "acct_scoring" / "b1.csv", scoring_rows(), SCORING_COLUMNS)
    ctx = JobContext.create(env="local", conf_dir=conf, data_dir=data, spark=spark)
    results = {step: run_step(ctx, step, dataset="acct")
               for step in ("ingest", "ingest_scoring", "validate", "validate_scoring", "train", "promote", "score")}
    yield Messy(conf, data, ctx, expected, results)


SCORING_COLUMNS = [c for c in COLUMNS if c != "churned"]


def scoring_rows() -> list[dict[str, Any]]:
    """Rows to score: 30 of alpha and of beta, 5 of gamma, and what rows to score get wrong: a tenant
    no one registered, hostile ids, a repeated key, a value that is not a number."""
    rng = random.Random(12)
    rows = [{k: v for k, v in good_row(rng, t, f"{t[0].upper()}-new-{i:03d}").items() if k != "churned"}
            for t, n in (("alpha", 30), ("beta", 30), ("gamma", 5)) for i in range(n)]
    rows += [{k: v for k, v in good_row(rng, "zeta", f"Z-new-{i}").items() if k != "churned"} for i in range(3)]
    rows += [{k: v for k, v in good_row(rng, h, f"H-new-{i}").items() if k != "churned"}
             for i, h in enumerate(HOSTILE_IN_DATA[:2])]
    rows.append({**rows[0]})  # alpha's first key twice: the later copy is scored, the other quarantined
    rows.append({k: v for k, v in good_row(rng, "beta", "B-new-bad").items() if k != "churned"} | {"tenure_months": "x"})
    return rows


# --------------------------------------------------------------------------- source errors


def test_missing_source_path_names_dataset_and_path(spark: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    conf = make_conf(tmp_path)
    data = tmp_path / "data"
    ctx = JobContext.create(env="local", conf_dir=conf, data_dir=data, spark=spark)
    with pytest.raises(SourceError) as err:
        run_step(ctx, "ingest", dataset="acct")
    msg = str(err.value)
    assert "'acct'" in msg and str(data / "sources" / "acct") in msg and "does not exist" in msg
    # The failure is recorded, not lost.
    log = read_table(spark, ctx.tables.run_log).toPandas()
    assert list(log["status"]) == ["failed"] and "does not exist" in log["error"].iloc[0]
    assert not table_exists(spark, ctx.tables.bronze("acct"))

    code, payload = run_cli(capsys, "ingest", "--dataset", "acct", "--conf-dir", str(conf),
                            "--data-dir", str(data))
    assert code == EXIT_USAGE and payload["status"] == "error"  # a path that does not exist: usage
    assert "does not exist" in payload["error"] and "'acct'" in payload["error"]


def test_misspelled_source_column_is_named_with_close_match(spark: Any, tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = [good_row(rng, "alpha", f"A{i}") for i in range(5)]
    for r in rows:
        r["tenure_month"] = r.pop("tenure_months")
    columns = [c if c != "tenure_months" else "tenure_month" for c in COLUMNS]
    write_csv(tmp_path / "data" / "sources" / "acct" / "b.csv", rows, columns)
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=tmp_path / "data",
                            spark=spark)
    with pytest.raises(SourceError) as err:
        run_step(ctx, "ingest", dataset="acct")
    msg = str(err.value)
    assert "'acct'" in msg
    assert "'tenure_months' (did you mean 'tenure_month'?)" in msg
    assert not table_exists(spark, ctx.tables.bronze("acct")), "a partial bronze was written"


def test_missing_column_error_names_the_overriding_source(spark: Any, tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = [good_row(rng, "alpha", f"A{i}") for i in range(3)]
    other = write_csv(tmp_path / "elsewhere" / "upload.csv", rows, [c for c in COLUMNS if c != "plan"])
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=tmp_path / "data",
                            spark=spark)
    with pytest.raises(SourceError) as err:
        run_step(ctx, "ingest", dataset="acct", source_path=str(other))
    assert "lacks declared column(s) 'plan'" in str(err.value)
    assert str(other) in str(err.value), str(err.value)


# --------------------------------------------------------------------------- row-level problems


def test_every_tenant_reconciles_bronze_to_silver_plus_quarantine(messy: Messy) -> None:
    bronze, silver, quarantine = assert_reconciled(messy.ctx, "acct")
    assert bronze == {"alpha": 43, "beta": 44, "gamma": 6, "omega": 5, None: 2 * len(HOSTILE_IN_DATA)}
    assert {t: n for t, n in silver.items() if t != "omega"} == {"alpha": 40, "beta": 40}
    assert {t: n for t, n in quarantine.items() if t != "omega"} == {
        "alpha": 3, "beta": 4, "gamma": 6, None: 2 * len(HOSTILE_IN_DATA)}
    # The step results tell the same story.
    val = messy.results["validate"]
    for t, n in bronze.items():
        o = outcome(val, t)
        assert (o.rows_in, o.rows_out) == (n, silver.get(t, 0))
        # Quarantined = rejected (counted against the tenant) + unlabelled (not training rows).
        assert o.rows_quarantined + o.detail["rows_unlabelled"] == quarantine.get(t, 0)
    assert outcome(val, "alpha").detail["rows_unlabelled"] == 1 and outcome(val, "gamma").detail["rows_unlabelled"] == 3
    assert messy.results["ingest"].to_dict()["rows_in"] == sum(bronze.values())


def test_wrong_types_and_null_labels_are_quarantined_with_reasons(messy: Messy) -> None:
    q = quarantine_frame(messy.ctx, "acct").set_index("customer_id")
    for customer, reason in messy.expected.items():
        assert customer in q.index, f"row {customer} was dropped instead of quarantined"
        assert reason in q.loc[customer, "_reason"], (customer, q.loc[customer, "_reason"])
    # The duplicate keeps its raw values and says why it was set aside.
    dup = q.loc[["B005"]]
    assert len(dup) == 1 and "duplicate entity key 'customer_id'" in dup["_reason"].iloc[0]
    # Raw values are kept as given for analysts.
    assert q.loc["A-bad-1", "tenure_months"] == "abc"
    assert q.loc["A-bad-2", "monthly_spend"] == "12,5"
    # Nothing unparsable reached silver: numeric columns are all set, labels are 0/1.
    silver = read_table(messy.ctx.spark, messy.ctx.tables.silver("acct")).toPandas()
    assert silver[["tenure_months", "monthly_spend", "churned"]].notna().all().all()
    assert set(silver["churned"]) <= {0.0, 1.0}
    assert silver.groupby(["tenant_id", "customer_id"]).size().max() == 1


def test_tenant_with_every_row_rejected_is_blocked_not_crashing(messy: Messy) -> None:
    val, trn, sco = (messy.results[s] for s in ("validate", "train", "score"))
    g = outcome(val, "gamma")
    # Three rows rejected, three without a label: every usable row rejected.
    assert g.status == "blocked" and g.rows_out == 0 and g.rows_quarantined == 3
    assert "'gamma'" in g.error and "blocked" in g.error
    o = outcome(trn, "gamma")
    assert o.status == "blocked" and "gamma" in o.detail["reason"] and trn.exit_code == 0
    # Blocked from training is not blocked from scoring; gamma has no champion to score with.
    s_gamma = outcome(sco, "gamma")
    assert s_gamma.status == "skipped" and "no champion" in s_gamma.detail["reason"] and sco.exit_code == 0
    assert outcome(trn, "alpha").status == "ok" and outcome(trn, "beta").status == "ok"
    assert outcome(sco, "alpha").rows_out == 30 and outcome(sco, "beta").rows_out == 30
    preds = counts(messy.ctx.spark, messy.ctx.tables.predictions("acct"))
    assert preds == {"alpha": 30, "beta": 30}
    assert outcome(trn, "omega").status == "skipped" and "min_rows" in outcome(trn, "omega").detail["reason"]
    quality = (read_table(messy.ctx.spark, messy.ctx.tables.quality("acct")).where("purpose = 'history'")
               .toPandas().set_index("tenant_id"))
    assert bool(quality.loc["gamma", "blocked"]) and quality.loc["gamma", "rejected_fraction"] == 1.0
    # Asking for the blocked tenant by name is answered, not refused or crashed.
    again = run_step(messy.ctx, "train", dataset="acct", tenants=["gamma"])
    assert [(o.tenant_id, o.status) for o in again.tenants] == [("gamma", "blocked")]


def test_hostile_tenant_ids_in_data_are_quarantined_and_never_become_paths(messy: Messy) -> None:
    q = quarantine_frame(messy.ctx, "acct")
    invalid = q[q["tenant_id"].isna()]
    assert len(invalid) == 2 * len(HOSTILE_IN_DATA)
    assert invalid["_reason"].str.contains(TENANT_REASON, regex=False).all()
    raw = {None if pd.isna(v) else v for v in invalid["_tenant_raw"]}
    # CSV reads an empty field as NULL; every other raw id is kept exactly as given.
    assert raw == {None if h == "" else h for h in HOSTILE_IN_DATA}
    # Ingest reported the NULL group instead of dropping it.
    assert outcome(messy.results["ingest"], None).rows_in == 2 * len(HOSTILE_IN_DATA)

    names = all_names(messy.data)
    partitions = {n.split("=", 1)[1] for n in names if n.startswith("tenant_id=")}
    assert partitions <= VALID_PARTITIONS, partitions
    hostile = {h for h in HOSTILE_IN_DATA if h not in ("", "..")} | {"escape", "b", "hi"}
    assert not hostile & set(names), hostile & set(names)
    assert not any(h in n for n in names for h in ("acme corp", "o'brien", 'say"hi', " alpha"))
    assert not (messy.data.parent / "escape").exists()
    # Only valid ids were registered as tenants.
    tenants = read_table(messy.ctx.spark, messy.ctx.tables.tenants).toPandas()
    assert sorted(tenants["tenant_id"]) == ["alpha", "beta", "gamma", "omega"]


def test_reingesting_the_same_files_is_idempotent(messy: Messy) -> None:
    """The fixture ingested the batch once; a second ingest of the same files replaces it."""
    ctx = JobContext.create(env="local", conf_dir=messy.conf, data_dir=messy.data, spark=messy.ctx.spark)
    before = counts(ctx.spark, ctx.tables.bronze("acct"))
    version = latest_commit(ctx.spark, ctx.tables.bronze("acct"))
    again = run_step(ctx, "ingest", dataset="acct")
    assert again.summary["batch_id"] == messy.results["ingest"].summary["batch_id"]
    # The batch is held already: nothing is read or written, and one step-level row says so with
    # what is held (every tenant's rows), not a row per tenant.
    assert again.summary["unchanged"] is True and again.summary["rows_ingested"] == 0
    assert latest_commit(ctx.spark, ctx.tables.bronze("acct")) == version
    assert counts(ctx.spark, ctx.tables.bronze("acct")) == before
    assert sum(before.values()) == len(messy_rows()[0])
    assert [(o.tenant_id, o.status) for o in again.tenants] == [(None, "skipped")]
    assert again.summary["tenants_held"] == len(before) and again.summary["rows_held"] == sum(before.values())


# --------------------------------------------------------------------------- tenant arguments


def test_unknown_tenants_are_named_by_validate_and_train(messy: Messy,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    ctx = JobContext.create(env="local", conf_dir=messy.conf, data_dir=messy.data, spark=messy.ctx.spark)
    silver_version = read_table(ctx.spark, ctx.tables.silver("acct")).count()
    with pytest.raises(UnknownTenantError) as err:
        run_step(ctx, "validate", dataset="acct", tenants=["alpha", "nope", "zeta"])
    assert "['nope', 'zeta']" in str(err.value) and "'acct'" in str(err.value)
    with pytest.raises(UnknownTenantError) as err:
        run_step(ctx, "train", dataset="acct", tenants=["nope", "beta"])
    assert "['nope']" in str(err.value)
    with pytest.raises(UnknownTenantError) as err:
        run_step(ctx, "score", dataset="acct", tenants=["nope"])  # zeta has rows to score: it is known there
    assert "['nope']" in str(err.value)
    assert read_table(ctx.spark, ctx.tables.silver("acct")).count() == silver_version

    for step in ("validate", "train"):
        code, payload = run_cli(capsys, step, "--dataset", "acct", "--tenants", "alpha,nope",
                                "--conf-dir", str(messy.conf), "--data-dir", str(messy.data))
        assert code == EXIT_USAGE, payload
        assert payload["status"] == "error" and "'nope'" in payload["error"]


# "acme\n" is left out: the CLI strips whitespace around each comma-separated id.
@pytest.mark.parametrize("bad_id", [b for b in HOSTILE_ARGS if b != "acme\n"])
def test_hostile_tenant_argument_rejected_by_cli(tmp_path: Path, bad_id: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    conf = make_conf(tmp_path)
    data = tmp_path / "data"
    for step in ("ingest", "validate", "train", "score"):
        code, payload = run_cli(capsys, step, "--dataset", "acct", "--tenants", f"alpha,{bad_id}",
                                "--conf-dir", str(conf), "--data-dir", str(data))
        assert code == EXIT_USAGE, payload
        assert "invalid tenant id" in payload["error"] and repr(bad_id) in payload["error"]
    assert not data.exists() or not any(data.iterdir()), "a rejected command left files behind"


@pytest.mark.parametrize("step", ["ingest", "validate", "train", "score"])
def test_hostile_tenant_argument_raises_invalid_tenant_id(spark: Any, messy: Messy, step: str) -> None:
    """With a real session: InvalidTenantIdError naming the id, and no table changes."""
    ctx = JobContext.create(env="local", conf_dir=messy.conf, data_dir=messy.data, spark=spark)
    tables = ("bronze", "silver", "quarantine", "predictions")
    before = {n: counts(spark, getattr(ctx.tables, n)("acct")) for n in tables}
    for bad in [*HOSTILE_ARGS, ""]:
        with pytest.raises(InvalidTenantIdError) as err:
            run_step(ctx, step, dataset="acct", tenants=["alpha", bad])
        assert repr(bad) in str(err.value)
    after = {n: counts(spark, getattr(ctx.tables, n)("acct")) for n in tables}
    assert after == before


@pytest.mark.parametrize("step", ["ingest", "validate", "train", "score"])
def test_hostile_tenant_argument_raises_before_any_spark_work(tmp_path: Path, step: str) -> None:
    rng = random.Random(5)
    write_csv(tmp_path / "data" / "sources" / "acct" / "b.csv", [good_row(rng, "alpha", "A1")])
    no_spark = NoSpark()
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=tmp_path / "data",
                            spark=no_spark)  # type: ignore[arg-type]
    with pytest.raises(InvalidTenantIdError, match=r"\.\./\.\./etc"):
        run_step(ctx, step, dataset="acct", tenants=["alpha", "../../etc"])
    assert no_spark.touched == []


# --------------------------------------------------------------------------- configuration errors


def test_unknown_and_missing_dataset_keys_name_file_and_key(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    misspelled = DATASET_YML.replace("acct:", "x:").replace("label:", "labels:")
    conf = make_conf(tmp_path, datasets={"x": misspelled})
    with pytest.raises(ConfigError) as err:
        JobContext.create(env="local", conf_dir=conf, data_dir=tmp_path / "data")
    msg = str(err.value)
    dataset_file = str(conf / "base" / "datasets" / "x.yml")
    assert f"{dataset_file}: unknown key 'datasets.x.labels'" in msg
    assert f"{dataset_file}: missing key 'datasets.x.label'" in msg
    code, payload = run_cli(capsys, "validate", "--conf-dir", str(conf), "--data-dir", str(tmp_path / "d"))
    assert code == EXIT_USAGE and "unknown key 'datasets.x.labels'" in payload["error"]
    assert not (tmp_path / "d").exists()


def test_missing_dataset_key_names_its_file(tmp_path: Path) -> None:
    text = DATASET_YML.replace("    task: binary\n", "")
    conf = make_conf(tmp_path, datasets={"acct": text})
    with pytest.raises(ConfigError) as err:
        JobContext.create(env="local", conf_dir=conf, data_dir=tmp_path / "data")
    assert f"{conf / 'base' / 'datasets' / 'acct.yml'}: missing key 'datasets.acct.task'" in str(err.value)


def test_unknown_key_in_an_env_layer_names_that_file(tmp_path: Path) -> None:
    conf = make_conf(tmp_path, local={"override.yml": "training:\n  min_row: 5\n"})
    with pytest.raises(ConfigError) as err:
        JobContext.create(conf_dir=conf, env="local", data_dir=tmp_path / "data")
    assert f"{conf / 'local' / 'override.yml'}: unknown key 'training.min_row'" in str(err.value)


def test_rules_naming_an_undeclared_column_is_a_config_error(tmp_path: Path) -> None:
    text = DATASET_YML.replace("plan: [basic, pro]", "plann: [basic, pro]")
    conf = make_conf(tmp_path, datasets={"acct": text})
    with pytest.raises(ConfigError) as err:  # at load time, before any step or Spark work
        JobContext.create(env="local", conf_dir=conf, data_dir=tmp_path / "data")
    assert "datasets.acct" in str(err.value) and "'plann'" in str(err.value)
    assert str(conf / "base" / "datasets" / "acct.yml") in str(err.value)
    assert isinstance(err.value, TenantMLError) and err.value.exit_code == EXIT_USAGE


# --------------------------------------------------------------------------- steps out of order


@pytest.mark.parametrize("step", [
    "validate",
    "train",
])
def test_step_before_its_input_table_exists_names_the_table(spark: Any, tmp_path: Path, step: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    conf = make_conf(tmp_path)
    data = tmp_path / "data"
    ctx = JobContext.create(env="local", conf_dir=conf, data_dir=data, spark=spark)
    missing = ctx.tables.bronze("acct") if step == "validate" else ctx.tables.silver("acct")
    with pytest.raises(TableNotFoundError, match=re.escape(missing.display)):
        run_step(ctx, step, dataset="acct")
    code, payload = run_cli(capsys, step, "--dataset", "acct", "--conf-dir", str(conf),
                            "--data-dir", str(data))
    assert code == EXIT_FAILURE and missing.display in payload["error"]


def test_score_before_any_rows_to_score_says_what_to_do(spark: Any, tmp_path: Path) -> None:
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=tmp_path / "data", spark=spark)
    result = run_step(ctx, "score", dataset="acct")
    assert result.status == "ok" and result.summary["rows_scored"] == 0
    assert "no rows to score yet" in result.summary["reason"] and "score --source" in result.summary["reason"]


# --------------------------------------------------------------------------- values the checks must not pass


def test_csv_doubled_quotes_keep_values_in_their_columns(spark: Any, tmp_path: Path) -> None:
    rng = random.Random(4)
    rows = [good_row(rng, "alpha", f"A{i}") for i in range(3)]
    rows[1]["notes"] = 'said "hi", then left'
    rows[1]["plan"] = "pro"
    columns = ["customer_id", "tenant", "notes", "plan", "tenure_months", "monthly_spend", "churned"]
    write_csv(tmp_path / "data" / "sources" / "acct" / "b.csv", rows, columns)
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=tmp_path / "data",
                            spark=spark)
    run_step(ctx, "ingest", dataset="acct")
    bronze = read_table(spark, ctx.tables.bronze("acct")).toPandas().set_index("customer_id")
    for r in rows:
        got = bronze.loc[r["customer_id"]]
        assert (got["plan"], got["tenure_months"], got["monthly_spend"], got["churned"]) == (
            r["plan"], r["tenure_months"], r["monthly_spend"], r["churned"]), r["customer_id"]


def test_tenant_id_with_trailing_newline_is_quarantined(spark: Any, tmp_path: Path) -> None:
    rng = random.Random(9)
    rows = [good_row(rng, "alpha", f"A{i}") for i in range(30)]
    rows += [good_row(rng, "evil\n", "E1"), good_row(rng, "alpha\n", "E2")]
    src = tmp_path / "data" / "sources" / "acctpq"
    src.mkdir(parents=True)
    pd.DataFrame(rows)[COLUMNS].to_parquet(src / "b.parquet", index=False)
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path, datasets={"acctpq": PARQUET_YML}),
                            data_dir=tmp_path / "data", spark=spark)
    result = run_step(ctx, "ingest", dataset="acctpq")
    assert outcome(result, None).rows_in == 2
    run_step(ctx, "validate", dataset="acctpq")
    bronze, _, quarantine = assert_reconciled(ctx, "acctpq")
    assert bronze == {"alpha": 30, None: 2} and quarantine == {None: 2}


def test_numeric_overflow_is_quarantined(messy: Messy) -> None:
    silver = read_table(messy.ctx.spark, messy.ctx.tables.silver("acct")).toPandas()
    assert np.isfinite(silver[["tenure_months", "monthly_spend"]].to_numpy(dtype=float)).all(), \
        silver[silver["customer_id"] == OVERFLOW_CUSTOMER]
    q = quarantine_frame(messy.ctx, "acct").set_index("customer_id")
    assert OVERFLOW_CUSTOMER in q.index and "tenure_months" in q.loc[OVERFLOW_CUSTOMER, "_reason"]


# --------------------------------------------------------------------------- truncated files

JSON_YML = """\
datasets:
  acctjs:
    source: {path: "${data_dir}/sources/acctjs", format: json}
    tenant_column: tenant
    entity_key: customer_id
    label: churned
    task: binary
    numeric_features: [tenure_months, monthly_spend]
    categorical_features: [plan]
"""
MALFORMED_REASON = "malformed source line"


def tenant_rows(tenant: str, prefix: str, n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [good_row(rng, tenant, f"{prefix}{i:03d}") for i in range(n)]


def truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]], dtypes: dict[str, Any] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)[COLUMNS].astype(dtypes or {})
    frame.to_parquet(path, index=False)
    return path


def write_csv_gz(path: Path, rows: list[dict[str, Any]]) -> Path:
    import gzip

    plain = write_csv(path.with_suffix(""), rows)
    path.write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    return path


def bronze_state(ctx: JobContext, dataset: str) -> tuple[int, dict[str | None, int]]:
    from tenantml.io import table_version

    ref = ctx.tables.bronze(dataset)
    return table_version(ctx.spark, ref), counts(ctx.spark, ref)


def assert_nothing_ingested(ctx: JobContext, dataset: str, before: tuple[int, dict[str | None, int]]) -> None:
    assert bronze_state(ctx, dataset) == before, "a failed ingest changed bronze"


@pytest.mark.parametrize("cut", ["first", "last"])
def test_truncated_parquet_file_fails_the_ingest_naming_file_and_dataset(spark: Any, tmp_path: Path,
                                                                         cut: str) -> None:
    """A parquet file cut in half has no footer: nothing of it is readable, so the batch is refused."""
    data = tmp_path / "data"
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path, datasets={"acctpq": PARQUET_YML}),
                            data_dir=data, spark=spark)
    write_parquet(data / "sources" / "acctpq" / "b1.parquet", tenant_rows("alpha", "A", 12, 1))
    run_step(ctx, "ingest", dataset="acctpq")
    before = bronze_state(ctx, "acctpq")

    batch2 = tmp_path / "batch2"
    files = [write_parquet(batch2 / f"part-{i}.parquet", tenant_rows(t, t[0].upper(), 40, 10 + i))
             for i, t in enumerate(["alpha", "beta", "gamma"])]
    broken = truncate(files[0] if cut == "first" else files[-1], 0.5)
    with pytest.raises(SourceError) as err:
        run_step(ctx, "ingest", dataset="acctpq", source_path=str(batch2))
    msg = str(err.value)
    assert "'acctpq'" in msg and str(broken) in msg, msg
    assert "not a complete parquet file" in msg and "truncated" in msg, msg
    assert sum(str(f) in msg for f in files) == 1, "only the broken file is blamed"
    assert isinstance(err.value, TenantMLError) and err.value.exit_code == EXIT_FAILURE
    assert_nothing_ingested(ctx, "acctpq", before)
    log = read_table(spark, ctx.tables.run_log).toPandas()
    failed = log[log["status"] == "failed"]
    assert len(failed) == 1 and str(broken) in failed["error"].iloc[0]


def test_truncated_gzip_csv_fails_the_ingest_naming_file_and_dataset(spark: Any, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A gzip stream cut short is detected only when Spark reaches its end: still no partial batch."""
    conf = make_conf(tmp_path)
    data = tmp_path / "data"
    ctx = JobContext.create(env="local", conf_dir=conf, data_dir=data, spark=spark)
    # A complete .csv.gz is a normal source file.
    write_csv_gz(data / "sources" / "acct" / "b1.csv.gz", tenant_rows("alpha", "A", 15, 2))
    assert run_step(ctx, "ingest", dataset="acct").summary["rows_ingested"] == 15
    before = bronze_state(ctx, "acct")

    batch2 = tmp_path / "batch2"
    write_csv(batch2 / "a.csv", tenant_rows("beta", "B", 20, 3))
    broken = truncate(write_csv_gz(batch2 / "b.csv.gz", tenant_rows("gamma", "G", 2000, 4)), 0.6)
    with pytest.raises(SourceError) as err:
        run_step(ctx, "ingest", dataset="acct", source_path=str(batch2))
    msg = str(err.value)
    assert "'acct'" in msg and str(broken) in msg and str(batch2 / "a.csv") not in msg, msg
    assert "Unexpected end of input stream" in msg and "nothing was ingested" in msg, msg
    assert_nothing_ingested(ctx, "acct", before)

    code, payload = run_cli(capsys, "ingest", "--dataset", "acct", "--source", str(batch2),
                            "--conf-dir", str(conf), "--data-dir", str(data))
    assert code == EXIT_FAILURE and payload["status"] == "error", payload
    assert str(broken) in payload["error"] and "'acct'" in payload["error"]
    assert_nothing_ingested(ctx, "acct", before)


def test_csv_cut_mid_line_quarantines_the_short_line_with_its_reason(spark: Any, tmp_path: Path) -> None:
    """A CSV is readable up to the cut: the good rows go on, the cut line is quarantined as malformed."""
    data = tmp_path / "data"
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=data, spark=spark)
    src = data / "sources" / "acct"
    alpha, beta = tenant_rows("alpha", "A", 25, 5), tenant_rows("beta", "B", 25, 6)
    # alpha's file ends in the middle of its last line: its plan is cut short, label and notes are
    # missing. beta's ends just before the last (undeclared) field: every declared value is
    # present, but a line cut anywhere is not trusted (a cut "125.50" reads as "12").
    a = write_csv(src / "alpha.csv", alpha)
    a.write_text(a.read_text().rstrip("\n").rsplit(",", 2)[0][:-1])
    b = write_csv(src / "beta.csv", beta)
    b.write_text(b.read_text().rstrip("\n").rsplit(",", 1)[0])
    run_step(ctx, "ingest", dataset="acct")
    result = run_step(ctx, "validate", dataset="acct")

    bronze, silver, quarantine = assert_reconciled(ctx, "acct")
    assert bronze == {"alpha": 25, "beta": 25}
    assert silver == {"alpha": 24, "beta": 24} and quarantine == {"alpha": 1, "beta": 1}
    q = quarantine_frame(ctx, "acct").set_index("customer_id")
    for cut_row in (alpha[-1], beta[-1]):
        reason = q.loc[cut_row["customer_id"], "_reason"]
        assert f"{MALFORMED_REASON}: its number of fields does not match the header" in reason, reason
        raw = q.loc[cut_row["customer_id"], "_malformed"]
        assert raw.startswith(f"{cut_row['customer_id']},{cut_row['tenant']},"), raw
    assert [n for r, n in result.summary["rule_failures"].items() if r.startswith(MALFORMED_REASON)] == [2]
    # The rows before the cut are intact and reached silver with their values.
    s = read_table(spark, ctx.tables.silver("acct")).toPandas().set_index("customer_id")
    for r in alpha[:-1] + beta[:-1]:
        assert s.loc[r["customer_id"], "monthly_spend"] == float(r["monthly_spend"])
        assert s.loc[r["customer_id"], "plan"] == r["plan"]
    b_ok = read_table(spark, ctx.tables.bronze("acct")).where("_malformed IS NULL").count()
    assert b_ok == 48


@pytest.mark.parametrize("multiline", [False, True])
def test_truncated_json_source(spark: Any, tmp_path: Path, multiline: bool) -> None:
    """JSON lines: the cut last line is quarantined as malformed. One multiLine JSON document that is
    cut cannot be read in part: the ingest fails naming the file."""
    data = tmp_path / "data"
    text = JSON_YML.replace("format: json}", "format: json, options: {multiLine: 'true'}}") \
        if multiline else JSON_YML
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path, datasets={"acctjs": text}),
                            data_dir=data, spark=spark)
    src = data / "sources" / "acctjs"
    src.mkdir(parents=True)
    rows = tenant_rows("alpha", "A", 20, 7)
    good, cut = src / "a.json", src / "b.json"
    if multiline:
        good.write_text(json.dumps(rows[:10], indent=1))
        cut.write_text(json.dumps(rows[10:], indent=1))
        truncate(cut, 0.5)
        with pytest.raises(SourceError) as err:
            run_step(ctx, "ingest", dataset="acctjs")
        msg = str(err.value)
        assert "'acctjs'" in msg and str(cut) in msg and str(good) not in msg, msg
        assert "not valid JSON" in msg, msg
        assert not table_exists(spark, ctx.tables.bronze("acctjs"))
        return
    good.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    cut.write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    cut.write_text(cut.read_text()[:-25])
    run_step(ctx, "ingest", dataset="acctjs")
    run_step(ctx, "validate", dataset="acctjs")
    bronze, silver, quarantine = assert_reconciled(ctx, "acctjs")
    # The broken line has no readable tenant: it is kept in the NULL group with its raw text.
    assert bronze == {"alpha": 19, None: 1} and silver == {"alpha": 19} and quarantine == {None: 1}
    q = quarantine_frame(ctx, "acctjs")
    assert f"{MALFORMED_REASON}: it is not valid JSON" in q["_reason"].iloc[0]
    assert q["_malformed"].iloc[0].startswith(json.dumps(rows[-1])[:20])


# --------------------------------------------------------------------------- schema drift between batches


def batch_frame(ctx: JobContext, dataset: str, batch_id: str) -> pd.DataFrame:
    df = read_table(ctx.spark, ctx.tables.bronze(dataset)).where(f"_batch_id = '{batch_id}'").toPandas()
    return df.drop(columns=["_ingested_at"]).sort_values("_row_number").reset_index(drop=True)


def assert_reconciled_with_history(ctx: JobContext, dataset: str, result: StepResult) -> dict[str | None, int]:
    """With several batches, bronze = silver + quarantine + rows superseded by a later batch."""
    bronze = counts(ctx.spark, ctx.tables.bronze(dataset))
    silver = counts(ctx.spark, ctx.tables.silver(dataset))
    quarantine = counts_of(history_quarantine(ctx, dataset))
    superseded = {o.tenant_id: o.detail["rows_superseded"] for o in result.tenants}
    mismatched = {t: (n, silver.get(t, 0), quarantine.get(t, 0), superseded.get(t, 0))
                  for t, n in bronze.items()
                  if n != silver.get(t, 0) + quarantine.get(t, 0) + superseded.get(t, 0)}
    assert not mismatched, f"tenant -> (bronze, silver, quarantine, superseded) {mismatched}"
    return superseded


def second_batch_dir(tmp_path: Path, data: Path, dataset: str, layout: str) -> tuple[Path, str | None]:
    """Where batch 2 lands: its own folder (``--source``) or next to batch 1 in the dataset's folder."""
    if layout == "own_folder":
        return tmp_path / "batch2", str(tmp_path / "batch2")
    return data / "sources" / dataset, None


@pytest.mark.parametrize("layout", ["own_folder", "same_folder"])
def test_batch_with_an_added_column_keeps_every_value_in_its_column(spark: Any, tmp_path: Path,
                                                                     layout: str) -> None:
    data = tmp_path / "data"
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=data, spark=spark)
    batch1 = tenant_rows("alpha", "A", 20, 8) + tenant_rows("beta", "B", 20, 9)
    write_csv(data / "sources" / "acct" / "batch1.csv", batch1)
    first = run_step(ctx, "ingest", dataset="acct")
    kept1 = batch_frame(ctx, "acct", first.summary["batch_id"])

    # Batch 2 gains a column in the middle and reorders the others; it re-sends 5 alpha keys with
    # new values and adds 10 new beta rows.
    rng = random.Random(12)
    resent = [{**r, "monthly_spend": f"{150 + i}.25", "plan": "pro", "region": "emea"}
              for i, r in enumerate(batch1[:5])]
    new = [{**good_row(rng, "beta", f"B{100 + i}"), "region": "apac"} for i in range(10)]
    columns = ["tenant", "region", "churned", "customer_id", "plan", "monthly_spend", "notes", "tenure_months"]
    folder, override = second_batch_dir(tmp_path, data, "acct", layout)
    write_csv(folder / "batch2.csv", resent + new, columns)
    second = run_step(ctx, "ingest", dataset="acct", source_path=override)
    result = run_step(ctx, "validate", dataset="acct")

    pd.testing.assert_frame_equal(batch_frame(ctx, "acct", first.summary["batch_id"]), kept1)
    superseded = assert_reconciled_with_history(ctx, "acct", result)
    quarantine = quarantine_frame(ctx, "acct")
    if layout == "own_folder":
        assert superseded == {"alpha": 5, "beta": 0} and quarantine.empty
    else:
        # The folder's second batch is both files: every batch-1 row is re-sent (superseding the
        # first batch), and the 5 keys batch2.csv re-sends are duplicates within it: the later
        # file's row is kept, batch1.csv's copy is quarantined.
        assert superseded == {"alpha": 20, "beta": 20}
        assert sorted(quarantine["customer_id"]) == sorted(r["customer_id"] for r in resent)
        assert quarantine["_reason"].str.contains("duplicate entity key 'customer_id'").all()
        assert (quarantine["_source"].str.endswith("batch1.csv")).all()
    silver = read_table(spark, ctx.tables.silver("acct")).toPandas().set_index("customer_id")
    assert len(silver) == 50 and silver.index.is_unique
    for r in resent + new:
        got = silver.loc[r["customer_id"]]
        assert (got["tenant_id"], got["plan"], got["monthly_spend"], got["tenure_months"], got["churned"]) == (
            r["tenant"], r["plan"], float(r["monthly_spend"]), float(r["tenure_months"]),
            float(r["churned"])), r["customer_id"]
    for r in batch1[5:]:
        assert silver.loc[r["customer_id"], "monthly_spend"] == float(r["monthly_spend"])
    # The added column is ignored, and said so.
    assert second.summary["columns_ignored"] == ["notes", "region"]
    assert "region" not in read_table(spark, ctx.tables.bronze("acct")).columns


@pytest.mark.parametrize("layout", ["own_folder", "same_folder"])
def test_batch_missing_a_feature_column_fails_naming_file_and_column(spark: Any, tmp_path: Path,
                                                                      layout: str) -> None:
    data = tmp_path / "data"
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=data, spark=spark)
    batch1 = tenant_rows("alpha", "A", 20, 13)
    b1 = write_csv(data / "sources" / "acct" / "batch1.csv", batch1)
    run_step(ctx, "ingest", dataset="acct")
    run_step(ctx, "validate", dataset="acct")
    before = bronze_state(ctx, "acct")
    silver_before = read_table(spark, ctx.tables.silver("acct")).toPandas().sort_values("customer_id")

    folder, override = second_batch_dir(tmp_path, data, "acct", layout)
    b2 = write_csv(folder / "batch2.csv", tenant_rows("alpha", "A", 20, 14),
                   [c for c in COLUMNS if c != "plan"])
    with pytest.raises(SourceError) as err:
        run_step(ctx, "ingest", dataset="acct", source_path=override)
    msg = str(err.value)
    assert "'acct'" in msg and "lacks declared column(s) 'plan'" in msg, msg
    assert str(b2) in msg or (layout == "own_folder" and str(folder) in msg), msg
    assert str(b1) not in msg, "the batch-1 file is not at fault"
    assert_nothing_ingested(ctx, "acct", before)
    after = read_table(spark, ctx.tables.silver("acct")).toPandas().sort_values("customer_id")
    pd.testing.assert_frame_equal(after.reset_index(drop=True), silver_before.reset_index(drop=True))


@pytest.mark.parametrize("layout", ["own_folder", "same_folder"])
def test_batch_with_changed_column_types_is_cast_or_quarantined(spark: Any, tmp_path: Path,
                                                                layout: str) -> None:
    """Parquet batch 2 retypes columns: int -> double (key, tenure, label), double -> string (spend).
    Lossless changes are cast; a value that is no longer a number is quarantined naming its column."""
    data = tmp_path / "data"
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path, datasets={"acctpq": PARQUET_YML}),
                            data_dir=data, spark=spark)
    rng = random.Random(15)
    batch1 = [{**good_row(rng, "alpha" if i % 2 else "beta", str(1000 + i))} for i in range(30)]
    typed = {"customer_id": "int64", "tenure_months": "int64", "monthly_spend": "float64", "churned": "int64"}
    write_parquet(data / "sources" / "acctpq" / "batch1.parquet", batch1, typed)
    first = run_step(ctx, "ingest", dataset="acctpq")
    kept1 = batch_frame(ctx, "acctpq", first.summary["batch_id"])

    # Re-send keys 1000-1005 with new values, add 1100-1103; spend arrives as text, one not a number.
    batch2 = [{**r, "tenure_months": str(int(r["tenure_months"]) + 1), "monthly_spend": f"{20 + i}.5"}
              for i, r in enumerate(batch1[:6])]
    batch2 += [{**good_row(rng, "alpha", str(1100 + i))} for i in range(4)]
    batch2[-1]["monthly_spend"] = "abc"
    retyped = {"customer_id": "float64", "tenure_months": "float64", "monthly_spend": "str",
               "churned": "float64"}
    folder, override = second_batch_dir(tmp_path, data, "acctpq", layout)
    write_parquet(folder / "batch2.parquet", batch2, retyped)
    run_step(ctx, "ingest", dataset="acctpq", source_path=override)
    result = run_step(ctx, "validate", dataset="acctpq")

    pd.testing.assert_frame_equal(batch_frame(ctx, "acctpq", first.summary["batch_id"]), kept1)
    superseded = assert_reconciled_with_history(ctx, "acctpq", result)
    q = quarantine_frame(ctx, "acctpq").set_index("customer_id")
    assert q.loc["1103", "monthly_spend"] == "abc"
    assert "column 'monthly_spend' is not a number" in q.loc["1103", "_reason"]
    # The re-sent keys still match batch 1 ("1000", not "1000.0"): superseded, not duplicated.
    if layout == "own_folder":
        assert superseded == {"alpha": 3, "beta": 3} and list(q.index) == ["1103"]
    else:
        # Both files form the second batch: batch1.parquet's copies of the re-sent keys are
        # duplicates within it (batch2.parquet's row is kept).
        assert superseded == {"alpha": 15, "beta": 15}
        dups = q.drop(index="1103")
        assert sorted(dups.index) == sorted(r["customer_id"] for r in batch2[:6])
        assert dups["_reason"].str.contains("duplicate entity key").all()
    silver = read_table(spark, ctx.tables.silver("acctpq")).toPandas().set_index("customer_id")
    assert silver.index.is_unique and len(silver) == 30 + 3
    for r in batch2[:-1]:
        got = silver.loc[r["customer_id"]]
        assert (got["tenure_months"], got["monthly_spend"], got["churned"]) == (
            float(r["tenure_months"]), float(r["monthly_spend"]), float(r["churned"])), r["customer_id"]
    for r in batch1[6:]:
        assert silver.loc[r["customer_id"], "tenure_months"] == float(r["tenure_months"])


# --------------------------------------------------------------------------- tenant ids and case
def test_tenant_ids_are_unique_case_insensitively(spark: Any, tmp_path: Path) -> None:
    """`Acme` and `acme` cannot both exist (Unity Catalog lower-cases names, some disks ignore case):
    the first registered keeps the name; rows of the other spelling are quarantined with a reason."""
    from tenantml.io.tenants import list_tenant_ids

    rng = random.Random(11)
    src = tmp_path / "data" / "sources" / "acct"
    write_csv(src / "b1.csv", [good_row(rng, t, f"{t}-{i}") for t in ("Acme", "acme", "beta") for i in range(12)])
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=tmp_path / "data", spark=spark)
    ing = run_step(ctx, "ingest", dataset="acct")
    assert ing.summary["tenants_registered"] == 2
    assert list_tenant_ids(spark, ctx.tables.tenants) == ["Acme", "beta"]
    val = {t.tenant_id: t for t in run_step(ctx, "validate", dataset="acct").tenants}
    assert val["Acme"].rows_quarantined == 0 and val["beta"].rows_quarantined == 0
    assert val["acme"].rows_quarantined == 12 and val["acme"].detail["case_collision_with"] == "Acme"
    q = read_table(spark, ctx.tables.quarantine("acct")).where("tenant_id = 'acme'").toPandas()
    assert len(q) == 12 and q["_reason"].str.contains("differs only in case from registered tenant 'Acme'").all()
    assert set(counts(spark, ctx.tables.silver("acct"))) == {"Acme", "beta"}
    assert_reconciled(ctx, "acct")

    # A later batch spelling it ACME: still the registered tenant's name, still quarantined.
    write_csv(tmp_path / "b2" / "b2.csv", [good_row(rng, "ACME", f"ACME-{i}") for i in range(5)])
    run_step(ctx, "ingest", dataset="acct", source_path=str(tmp_path / "b2"))
    val = {t.tenant_id: t for t in run_step(ctx, "validate", dataset="acct").tenants}
    assert val["ACME"].rows_quarantined == 5 and list_tenant_ids(spark, ctx.tables.tenants) == ["Acme", "beta"]


# --------------------------------------------------------------------------- rows to score
def test_rows_to_score_are_validated_like_history_minus_the_label(messy: Messy) -> None:
    """Unknown tenants, hostile ids, repeated keys and bad numbers in a batch of rows to score are
    quarantined with their reasons; every row of the batch is either scored input or quarantined."""
    ctx = messy.ctx
    inference = counts(ctx.spark, ctx.tables.inference("acct"))
    scoring = counts(ctx.spark, ctx.tables.scoring("acct"))
    q = read_table(ctx.spark, ctx.tables.quarantine("acct")).where("_purpose = 'scoring'").toPandas()
    quarantined = q.groupby(q["tenant_id"].where(q["tenant_id"].notna(), None), dropna=False).size().to_dict()
    quarantined = {(None if isinstance(k, float) else k): int(v) for k, v in quarantined.items()}
    for tenant, n in inference.items():
        assert scoring.get(tenant, 0) + quarantined.get(tenant, 0) == n, tenant
    assert inference == {"alpha": 31, "beta": 31, "gamma": 5, "zeta": 3, None: 2}
    assert scoring == {"alpha": 30, "beta": 30, "gamma": 5}
    reasons = q.set_index("customer_id")["_reason"]
    assert all("not registered" in reasons[f"Z-new-{i}"] for i in range(3))
    assert all(TENANT_REASON in reasons[f"H-new-{i}"] for i in range(2))
    assert "duplicate entity key" in reasons["A-new-000"] and "is not a number" in reasons["B-new-bad"]
    assert not q["_reason"].str.contains("label").any()  # rows to score are not held to label rules
    # Only the valid rows of registered tenants with a champion were scored.
    preds = read_table(ctx.spark, ctx.tables.predictions("acct")).toPandas()
    assert set(preds["entity_key"]) <= set(read_table(ctx.spark, ctx.tables.scoring("acct")).toPandas()["customer_id"])
    val = messy.results["validate_scoring"]
    assert outcome(val, "zeta").status == "blocked" and "blocked from scoring" in outcome(val, "zeta").error


@pytest.mark.parametrize("problem", ["label present", "column missing", "column extra"])
def test_a_batch_of_rows_to_score_with_the_wrong_columns(spark: Any, tmp_path: Path, problem: str) -> None:
    rng = random.Random(21)
    rows = [good_row(rng, "alpha", f"A{i}") for i in range(6)]
    columns = {"label present": COLUMNS, "column missing": [c for c in SCORING_COLUMNS if c != "monthly_spend"],
               "column extra": [*SCORING_COLUMNS, "churn_reason"]}[problem]
    for r in rows:
        r["churn_reason"] = "none"
    write_csv(tmp_path / "data" / "sources" / "acct_scoring" / "b.csv", rows, columns)
    ctx = JobContext.create(env="local", conf_dir=make_conf(tmp_path), data_dir=tmp_path / "data", spark=spark)
    if problem == "column extra":  # ignored, with a warning: the batch is ingested
        result = run_step(ctx, "ingest_scoring", dataset="acct")
        # `notes` is in the file but not declared either (as in the history source)
        assert result.summary["columns_ignored"] == ["churn_reason", "notes"] and result.summary["rows_ingested"] == 6
        return
    with pytest.raises(SourceError) as err:
        run_step(ctx, "ingest_scoring", dataset="acct")
    msg = str(err.value)
    if problem == "label present":
        assert "has the label column 'churned'" in msg and "rows to score carry no label" in msg
    else:
        assert "lacks declared column(s) 'monthly_spend'" in msg
    assert not table_exists(spark, ctx.tables.inference("acct"))  # nothing was ingested


def test_a_run_where_every_tenant_is_blocked_says_so_and_exits_cleanly(spark: Any, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Every tenant's rows are mostly garbage: no step fails on a missing table; the score step says
    that no tenant was scored because all were blocked by validation, with the reasons, and the
    pipeline exits 0 (blocked tenants are not failures: docs/operations.md, exit codes)."""
    rng = random.Random(31)
    rows = [{**good_row(rng, t, f"{t}-{i}"), "tenure_months": "n/a"} for t in ("alpha", "beta") for i in range(8)]
    rows += [good_row(rng, "alpha", "alpha-ok")]
    write_csv(tmp_path / "data" / "sources" / "acct" / "b.csv", rows)
    write_csv(tmp_path / "data" / "sources" / "acct_scoring" / "b.csv",
              [{k: v for k, v in r.items() if k != "churned"} | {"tenure_months": "x"} for r in rows[:4] + rows[8:12]],
              SCORING_COLUMNS)
    conf = make_conf(tmp_path)
    code, payload = run_cli(capsys, "pipeline", "--dataset", "acct", "--conf-dir", str(conf),
                            "--data-dir", str(tmp_path / "data"))
    assert code == 0, payload
    steps = {s["step"]: s for s in payload["steps"]}
    assert all(s["status"] != "failed" for s in steps.values()), {k: s["status"] for k, s in steps.items()}
    reason = steps["score"]["reason"]
    assert reason.startswith("no tenant was scored: all 2 with rows to score were blocked by validation"), reason
    assert "alpha" in reason and steps["score"]["tenants_blocked"] == 2
