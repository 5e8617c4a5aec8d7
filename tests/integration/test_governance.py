"""Generated Unity Catalog rules: checked as text, and the views executed on local Spark."""

from __future__ import annotations

from typing import Any

import pytest

from tenantml.apps.governance import AccessPolicy, governance_sql, tenant_view_name, tenant_views_sql
from tenantml.core.errors import InvalidTenantIdError

pytestmark = pytest.mark.spark


def test_statements_name_each_tenants_group_and_filter_every_table() -> None:
    stmts = governance_sql(AccessPolicy("prod", "tenantml"), ["predictions_demo", "silver_demo"],
                           ["acme-eu", "acme_eu"])
    text = "\n".join(stmts)
    assert "is_account_group_member(concat('tenant-', tenant_id))" in stmts[0]
    assert text.count("SET ROW FILTER prod.tenantml.tenant_row_filter ON (tenant_id)") == 2
    assert "GRANT SELECT ON VIEW prod.tenantml.predictions_demo__t_acme_1eu TO `tenant-acme-eu`" in text
    assert "GRANT SELECT ON VIEW prod.tenantml.predictions_demo__t_acme_0eu TO `tenant-acme_eu`" in text


@pytest.mark.parametrize("bad", ["x'; DROP TABLE t; --", "a`b", "../x", "a b"])
def test_hostile_ids_and_identifiers_are_refused(bad: str) -> None:
    with pytest.raises(InvalidTenantIdError):
        governance_sql(AccessPolicy("prod", "tenantml"), ["predictions_demo"], [bad])
    with pytest.raises(ValueError):
        AccessPolicy("prod", bad)
    with pytest.raises(ValueError):
        governance_sql(AccessPolicy("prod", "tenantml"), [bad], ["t1"])


def test_generated_views_show_each_tenant_only_its_rows(spark: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "predictions")
    rows = [("acme-eu", "k1"), ("acme-eu", "k2"), ("acme_eu", "k3"), ("globex", "k4")]
    spark.createDataFrame(rows, "tenant_id string, entity_key string").write.format("delta").save(path)
    spark.sql("CREATE DATABASE IF NOT EXISTS spark_catalog.gov_test")
    policy = AccessPolicy("spark_catalog", "gov_test")
    stmts = tenant_views_sql(policy, "predictions_demo", ["acme-eu", "acme_eu", "globex"],
                             source=f"delta.`{path}`")
    for s in stmts:
        if s.startswith("CREATE"):
            spark.sql(s)  # GRANT needs Unity Catalog; the view definitions run on plain Spark
    seen = {t: sorted(r.entity_key for r in spark.sql(
        f"SELECT entity_key FROM spark_catalog.gov_test.{tenant_view_name('predictions_demo', t)}").collect())
        for t in ("acme-eu", "acme_eu", "globex")}
    assert seen == {"acme-eu": ["k1", "k2"], "acme_eu": ["k3"], "globex": ["k4"]}
