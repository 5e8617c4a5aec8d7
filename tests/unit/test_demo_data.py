"""The demo data has the skew and the dirt the pipeline must cope with."""

from __future__ import annotations

from tenantml.apps.demo import DIRTY_TENANT, HOSTILE_TENANT_IDS, DemoSpec, generate, tenant_sizes
from tenantml.core.ids import is_valid_tenant_id


def test_sizes_span_three_orders_of_magnitude() -> None:
    sizes = tenant_sizes(DemoSpec())
    assert max(sizes.values()) / min(sizes.values()) >= 1000
    assert sum(n < 50 for n in sizes.values()) >= 3


def test_dirty_rows_and_hostile_ids_present() -> None:
    df = generate(DemoSpec(tenants=6, largest=600, smallest=30))
    assert df["churned"].isna().sum() > 0
    assert (df["tenure_months"] == "twelve").sum() > 0
    assert set(HOSTILE_TENANT_IDS) - {""} <= set(df["tenant"].dropna())
    assert not all(is_valid_tenant_id(t) for t in df["tenant"])
    assert DIRTY_TENANT in set(df["tenant"])
    assert df.duplicated(["tenant", "customer_id"]).sum() == 5
    labels = df["churned"].dropna().astype(int)
    assert 0.05 < labels.mean() < 0.8
