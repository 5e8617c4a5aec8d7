"""`tenantml tenants --dataset`: the tenants table is global; the listing keeps the tenants with rows
in the dataset's bronze or silver table, in the compact default columns unless `--all-columns`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.spark]
REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"command": "tenants", "dataset": None, "all_columns": False, "json": False, **kw})


def test_tenants_of_one_dataset(spark: Any, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tenantml.apps.cli import _table_command
    from tenantml.io.context import JobContext
    from tenantml.io.tenants import register_tenants, update_tenants

    ctx = JobContext.create(conf_dir=REPO_CONF, data_dir=data_dir, spark=spark)
    register_tenants(spark, ctx.tables.tenants, ["t000", "t001", "acme"], ctx.config.tenants)
    update_tenants(spark, ctx.tables.tenants, ["t000"], consent_share_data=True)
    update_tenants(spark, ctx.tables.tenants, ["t001"], consent_shared_inference=False)
    # t000 only in bronze, t001 only in silver (its bronze batch replaced), acme in neither; a row
    # without a tenant id stays out.
    spark.createDataFrame([("t000", 1), (None, 2)], "tenant_id string, x int").write.format("delta") \
        .save(ctx.tables.bronze("demo").path)
    spark.createDataFrame([("t001", 1)], "tenant_id string, x int").write.format("delta") \
        .save(ctx.tables.silver("demo").path)

    def listing(**kw: Any) -> str:
        capsys.readouterr()
        assert _table_command(_args(**kw), ctx) == 0
        return capsys.readouterr().out

    records = json.loads(listing(dataset="demo", json=True))
    assert [r["tenant_id"] for r in records] == ["t000", "t001"]
    assert {"consent_share_data", "consent_shared_inference", "created_at"} <= set(records[0])  # all columns
    assert json.loads(listing(dataset="mlc_churn", json=True)) == []  # no table of that dataset yet
    assert [r["tenant_id"] for r in json.loads(listing(json=True))] == ["acme", "t000", "t001"]

    table = listing(dataset="demo")
    (header,) = [line for line in table.splitlines() if "tenant_id" in line]
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["tenant_id", "strategy", "consents", "status"]
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in table.splitlines() if line.startswith("│")}
    assert rows == {"t000": ["auto", "share data, shared inference", "active"], "t001": ["auto", "none", "active"]}
    wide = listing(all_columns=True)
    assert "acme" in wide and all(c in wide for c in ("consent_share_data", "display_name", "updated_at"))
