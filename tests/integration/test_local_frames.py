"""Driver-side rows become DataFrames through Arrow, and small per-run tables are clustered by tenant."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tenantml.io.delta import read_table, replace_tenants
from tenantml.io.spark import local_frame
from tenantml.io.tables import TableRef

pytestmark = pytest.mark.spark

SCHEMA = ("tenant_id string not null, n long, x double, ok boolean, at timestamp, blob binary, "
          "names array<string>, tags map<string,string>")
ROWS = [("t1", 1, 1.5, True, datetime(2026, 1, 2, 3, 4, 5, 6), b"\x00\x01", ["p", "q"], {"k": "v"}),
        ("t2", None, None, None, None, None, None, None)]


def test_a_local_frame_holds_what_create_data_frame_holds(spark: Any) -> None:
    ours, theirs = local_frame(spark, ROWS, SCHEMA), spark.createDataFrame(ROWS, SCHEMA)
    assert ours.schema == theirs.schema
    assert ours.collect() == theirs.collect()
    assert local_frame(spark, [], SCHEMA).schema == theirs.schema and local_frame(spark, [], SCHEMA).count() == 0


def test_a_local_frame_refuses_a_short_row_and_a_null_where_none_is_allowed(spark: Any) -> None:
    with pytest.raises(ValueError, match="a row of 2 values for 8 columns"):
        local_frame(spark, [("t1", 1)], SCHEMA)
    with pytest.raises(ValueError, match="column tenant_id is not nullable"):
        local_frame(spark, [(None, *ROWS[1][1:])], SCHEMA)
    with pytest.raises((TypeError, ValueError)):  # pyarrow refuses text in a number column
        local_frame(spark, [("t1", "many", *ROWS[1][2:])], SCHEMA)


def _detail(spark: Any, path: str) -> Any:
    return spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()


def test_a_clustered_table_is_created_clustered_and_replaces_only_the_named_rows(spark: Any, tmp_path: Path) -> None:
    ref = TableRef(name="monitoring_x", path=str(tmp_path / "monitoring_x"), cluster_by=("tenant_id",))
    schema = "tenant_id string, batch_id string, v double"
    tenants = [f"t{i:03d}" for i in range(40)]
    replace_tenants(local_frame(spark, [(t, "b1", 1.0) for t in tenants], schema), ref, tenants,
                    extra_predicate="batch_id = 'b1'")
    replace_tenants(local_frame(spark, [(t, "b1", 2.0) for t in tenants[:5]], schema), ref, tenants[:5],
                    extra_predicate="batch_id = 'b1'")
    replace_tenants(local_frame(spark, [(t, "b2", 3.0) for t in tenants[:3]], schema), ref, tenants[:3],
                    extra_predicate="batch_id = 'b2'")
    detail = _detail(spark, str(ref.path))
    assert list(detail["clusteringColumns"]) == ["tenant_id"] and list(detail["partitionColumns"]) == []
    assert detail["numFiles"] < 10, detail["numFiles"]  # a few per commit, not one per tenant (40)
    rows = {(r["tenant_id"], r["batch_id"]): r["v"] for r in read_table(spark, ref).collect()}
    assert len(rows) == 43
    assert rows[("t000", "b1")] == 2.0 and rows[("t005", "b1")] == 1.0 and rows[("t002", "b2")] == 3.0
    # A tenant's rows are found through the files' statistics: a filter on one tenant of a
    # clustered-then-optimized table reads one file.
    spark.sql(f"OPTIMIZE delta.`{ref.path}`").collect()
    assert len(read_table(spark, ref).where("tenant_id = 't007'").inputFiles()) == 1


def test_a_table_created_partitioned_keeps_its_partitions_when_written_as_clustered(spark: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "retraining_x")
    schema = "tenant_id string, run_id string"
    replace_tenants(local_frame(spark, [("t1", "r1"), ("t2", "r1")], schema), TableRef(name="retraining_x", path=path),
                    ["t1", "t2"])
    clustered = TableRef(name="retraining_x", path=path, cluster_by=("tenant_id",))
    replace_tenants(local_frame(spark, [("t1", "r2")], schema), clustered, ["t1"], extra_predicate="run_id = 'r2'")
    assert list(_detail(spark, path)["partitionColumns"]) == ["tenant_id"]
    assert sorted(tuple(r) for r in read_table(spark, clustered).collect()) == [("t1", "r1"), ("t1", "r2"), ("t2", "r1")]
