"""Tenant tiers: FAIR pools per tier, giants trained data-parallel last, scoring concurrency quotas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[2]


def _frames(sizes: dict[str, int], seed: int = 3) -> pd.DataFrame:
    """Silver-typed rows of the demo dataset (the demo generator's signal, without its dirt)."""
    from tenantml.apps.demo import _tenant_frame

    rng = np.random.default_rng(seed)
    out = []
    for tid, n in sizes.items():
        raw = _tenant_frame(tid, n, rng, rng.normal(0.0, [0.6, 0.3, 0.8]))
        out.append(pd.DataFrame({
            "tenant_id": tid, "customer_id": raw["customer_id"], "churned": raw["churned"].astype(np.float64),
            **{c: raw[c].astype(np.float64) for c in
               ("tenure_months", "monthly_spend", "support_tickets", "logins_30d", "seats")},
            "plan": raw["plan"], "region": raw["region"],
            "event_date": pd.to_datetime(raw["event_date"]).astype("datetime64[ns]"),
        }))
    return pd.concat(out, ignore_index=True)


def test_fair_scheduler_is_on_with_one_pool_per_tier(spark: Any) -> None:
    from tenantml.io.spark import SCHEDULER_POOLS_FILE

    assert spark.conf.get("spark.scheduler.mode") == "FAIR"
    xml = SCHEDULER_POOLS_FILE.read_text()
    for pool in ("tenantml-small", "tenantml-standard", "tenantml-giant"):
        assert f'name="{pool}"' in xml


def test_tiers_train_in_their_pools_and_giants_go_data_parallel_last(spark: Any) -> None:
    from tenantml.config import TenantQuota, load_config
    from tenantml.models import TabularModel
    from tenantml.training.plan import TrainingPlan
    from tenantml.training.tenant_models import train_tenant_models

    config = load_config(REPO / "conf")
    spec = config.datasets["demo"]
    sizes = {"s1": 120, "s2": 150, "s3": 180, "m1": 700, "m2": 800, "g1": 4000, "forced": 300}
    cfg = config.training.model_copy(update={
        "max_epochs": 3, "patience": 3, "min_rows": 50,
        "tiers": config.training.tiers.model_copy(update={"small_max_rows": 400, "giant_min_rows": 3000,
                                                           "giant_share": 0.5,
                                                           "giant_path": "distributed"}),
        # An operator can put a tenant in a tier by hand, whatever its size.
        "tenant_quotas": {"forced": TenantQuota(tier="standard")}})
    pdf = _frames(sizes)
    silver = spark.createDataFrame(pdf)
    res = train_tenant_models(spark, silver, TrainingPlan.build(spec, cfg, sizes), spec, cfg).set_index("tenant_id")

    assert (res["status"] == "ok").all(), res[["status", "error"]]
    expected = {"s1": "small", "s2": "small", "s3": "small", "m1": "standard", "m2": "standard",
                "forced": "standard", "g1": "giant"}
    assert res["tier"].to_dict() == expected
    assert res["pool"].to_dict() == {t: f"tenantml-{tier}" for t, tier in expected.items()}
    assert res.loc["g1", "path"] == f"distributed x{spark.sparkContext.defaultParallelism}"
    # The other tiers' tenants train in stacked groups inside their tasks (training.batched).
    assert set(res.drop(index="g1")["path"]) == {"batched"}
    # Giants go after every other tier, so small tenants never wait behind them.
    assert res.loc["g1", "finished_at"] >= res.drop(index="g1")["finished_at"].max()
    # The giant's model is a real, usable model judged on its own holdout like the others.
    giant = TabularModel.from_bytes(bytes(res.loc["g1", "model"]))
    scores = giant.predict(pdf[pdf["tenant_id"] == "g1"])
    assert np.isfinite(scores).all() and 0.0 < scores.min() <= scores.max() < 1.0
    assert res.loc["g1", "test_rows"] > 0 and np.isfinite(res.loc["g1", "metric"])
    assert res.loc["g1", "metric"] > res.loc["g1", "baseline_metric"]


def test_a_data_parallel_giant_keeps_to_its_time_quota(spark: Any) -> None:
    """Every process stops after the same epoch once the quota is used up (one stopping alone would
    leave the other waiting in its next all-reduce), and the result says the quota cut it short."""
    import json

    from tenantml.config import TenantQuota, load_config
    from tenantml.training.plan import TrainingPlan
    from tenantml.training.tenant_models import train_tenant_models

    config = load_config(REPO / "conf")
    sizes = {"s1": 150, "capped": 3000}
    cfg = config.training.model_copy(update={
        "max_epochs": 6, "patience": 6, "min_rows": 50,
        "tiers": config.training.tiers.model_copy(update={"small_max_rows": 400, "giant_min_rows": 2000,
                                                           "giant_share": 0.5, "giant_path": "distributed"}),
        "tenant_quotas": {"capped": TenantQuota(max_seconds=1e-6)}})
    res = train_tenant_models(spark, spark.createDataFrame(_frames(sizes)),
                              TrainingPlan.build(config.datasets["demo"], cfg, sizes), config.datasets["demo"],
                              cfg).set_index("tenant_id")

    assert (res["status"] == "ok").all(), res[["status", "error"]]
    assert res.loc["capped", "path"].startswith("distributed x") and res.loc["capped", "epochs"] == 1
    assert json.loads(res.loc["capped", "metrics_json"]).get("time_quota_hit") == 1.0
    assert res.loc["s1", "epochs"] > 1 and "time_quota_hit" not in json.loads(res.loc["s1", "metrics_json"])


def test_scoring_concurrency_quota_caps_the_tasks_a_tenant_spreads_over(spark: Any) -> None:
    from pyspark.sql import functions as F

    from tenantml.scoring.batch import SLICE_COL, scoring_slices, with_slices

    rows = {"big": 2400, "capped": 2400, "tiny": 20}
    slices = scoring_slices(rows, partitions=8, concurrency={"capped": 2}, default_concurrency=None,
                            rows_per_slice=400)
    # Default: half of the tasks; a tenant's own quota wins; small tenants stay in one task.
    assert slices == {"big": 4, "capped": 2, "tiny": 1}
    pdf = pd.DataFrame({"tenant_id": [t for t, n in rows.items() for _ in range(n)],
                        "customer_id": [f"{t}-{i}" for t, n in rows.items() for i in range(n)]})
    laid_out = with_slices(spark.createDataFrame(pdf), slices, "customer_id").repartition(8, "tenant_id", SLICE_COL)
    assert laid_out.groupBy("tenant_id").agg(F.countDistinct(SLICE_COL).alias("n")).where("n > 4").count() == 0
    placed = set(laid_out.select("tenant_id").rdd.mapPartitionsWithIndex(
        lambda i, it: {(r["tenant_id"], i) for r in it}).collect())
    used = {t: sum(1 for tt, _ in placed if tt == t) for t in rows}
    assert used["tiny"] == 1
    assert 1 < used["capped"] <= 2
    assert 2 < used["big"] <= 4
    assert laid_out.count() == sum(rows.values())
