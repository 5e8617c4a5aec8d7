"""Spark drift and realised metrics agree with their pandas versions, for all tenants in one query."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tenantml.monitoring import (
    SCORE_FEATURE,
    classify_psi,
    drift_by_tenant,
    drift_report,
    realised_metrics,
    realised_metrics_pandas,
    reference_profile,
)

pytestmark = pytest.mark.spark

NUMERIC = ("spend", "tickets")
CATEGORICAL = ("plan", "region")
PLANS = ("basic", "pro", "enterprise")
SHIFTED = "t-shifted"


def tenant_frame(n: int, seed: int, shifted: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    spend = rng.normal(50.0 + (20.0 if shifted else 0.0), 10.0, n)
    spend[rng.random(n) < 0.03] = np.nan
    plan = rng.choice(PLANS, n, p=[0.1, 0.3, 0.6] if shifted else [0.5, 0.35, 0.15]).astype(object)
    plan[rng.random(n) < 0.02] = None
    plan[rng.random(n) < 0.01] = "platinum"  # unseen in training: __other__
    score = np.clip(rng.beta(2, 5, n), 0, 1)
    return pd.DataFrame({"spend": spend, "tickets": rng.poisson(1.5, n).astype(np.float64),
                         "plan": plan, "region": rng.choice(["emea", "amer", "apac"], n), "score": score})


def jobs_of(spark: Any, action: Callable[[], Any]) -> tuple[Any, int]:
    sc = spark.sparkContext
    group = f"monitoring-{uuid.uuid4().hex}"
    sc.setJobGroup(group, "monitoring test")
    try:
        result = action()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    return result, len(sc.statusTracker().getJobIdsForGroup(group))


@pytest.fixture(scope="module")
def drift_case(spark: Any) -> dict[str, Any]:
    tenants = {"t-a": 11, "t-b": 12, SHIFTED: 13}
    profiles, batches = {}, []
    for tenant, seed in tenants.items():
        train = tenant_frame(4000, seed)
        profile = reference_profile(train, NUMERIC, CATEGORICAL, scores=train["score"].to_numpy())
        profiles[tenant] = json.loads(json.dumps(profile))  # as stored with the model
        batch = tenant_frame(1500 + seed, seed + 100, shifted=tenant == SHIFTED)
        batches.append(batch.assign(tenant_id=tenant))
    batches.append(tenant_frame(50, 99).assign(tenant_id="t-unprofiled"))
    profiles["t-not-scored"] = profiles["t-a"]
    pdf = pd.concat(batches, ignore_index=True)
    schema = "tenant_id string, spend double, tickets double, plan string, region string, score double"
    df = spark.createDataFrame(pdf[["tenant_id", "spend", "tickets", "plan", "region", "score"]], schema)
    return {"profiles": profiles, "pdf": pdf, "df": df.cache()}


def test_drift_by_tenant_matches_pandas_in_one_query(spark: Any, drift_case: dict[str, Any]) -> None:
    df, profiles, pdf = drift_case["df"], drift_case["profiles"], drift_case["pdf"]
    df.count()
    out, jobs = jobs_of(spark, lambda: drift_by_tenant(df, profiles, NUMERIC, CATEGORICAL, "score"))
    assert list(out.columns) == ["tenant_id", "feature", "kind", "psi", "rows", "missing_share", "noise_psi"]
    assert sorted(out.tenant_id.unique()) == ["t-a", "t-b", SHIFTED]
    assert out.attrs["missing_profile"] == ["t-unprofiled"] and out.attrs["missing_features"] == {}
    for tenant, got in out.groupby("tenant_id"):
        part = pdf[pdf.tenant_id == tenant]
        expected = pd.DataFrame(drift_report(profiles[tenant], part, NUMERIC, CATEGORICAL,
                                             part["score"].to_numpy()))
        got = got.reset_index(drop=True)
        assert got.feature.tolist() == [*NUMERIC, *CATEGORICAL, SCORE_FEATURE]
        assert got.kind.tolist() == expected.kind.tolist()
        assert got.rows.tolist() == expected.rows.tolist() == [len(part)] * 5
        np.testing.assert_allclose(got.psi, expected.psi, rtol=0, atol=1e-9)
        np.testing.assert_allclose(got.missing_share, expected.missing_share, rtol=0, atol=1e-9)
        np.testing.assert_allclose(got.noise_psi, expected.noise_psi, rtol=0, atol=1e-12)
    status = {(r.tenant_id, r.feature): classify_psi(r.psi) for r in out.itertuples()}
    assert {k for k, v in status.items() if v == "drift"} == {(SHIFTED, "spend"), (SHIFTED, "plan")}
    assert out.loc[(out.tenant_id == "t-a") & (out.feature == "spend"), "missing_share"].iloc[0] > 0.0
    # One collect: the jobs (the query's stages under adaptive execution) do not grow with tenants.
    many = {f"{t}-{i}": p for t, p in profiles.items() for i in range(5)}
    relabelled = df.selectExpr("concat(tenant_id, '-', cast(pmod(hash(spend), 5) as string)) as tenant_id",
                               *[c for c in df.columns if c != "tenant_id"])
    more, more_jobs = jobs_of(spark, lambda: drift_by_tenant(relabelled, many, NUMERIC, CATEGORICAL, "score"))
    assert more.tenant_id.nunique() == 15
    assert jobs <= 4 and more_jobs == jobs, (jobs, more_jobs)


def test_drift_by_tenant_skips_what_profiles_lack(spark: Any, drift_case: dict[str, Any]) -> None:
    df, profiles = drift_case["df"], drift_case["profiles"]
    no_scores = {t: {**p, "prediction": None} for t, p in profiles.items()}
    no_scores["t-b"] = {**no_scores["t-b"], "categorical": {}}
    out = drift_by_tenant(df, no_scores, NUMERIC, CATEGORICAL, "score")
    assert set(out.feature) == {*NUMERIC, *CATEGORICAL}
    assert out.attrs["missing_features"] == {"t-a": [SCORE_FEATURE], "t-b": [*CATEGORICAL, SCORE_FEATURE],
                                             SHIFTED: [SCORE_FEATURE]}
    only = drift_by_tenant(df, {"t-b": profiles["t-b"]}, ["spend"], [], None)
    assert only.tenant_id.tolist() == ["t-b"] and only.feature.tolist() == ["spend"]
    assert only.attrs["missing_profile"] == ["t-a", SHIFTED, "t-unprofiled"]


def realised_case(seed: int, task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(12):
        entities = np.array([f"e{i}" for i in range(80)])
        for b in range(3):
            n = int(rng.integers(5, 60))
            keys = rng.choice(entities, n, replace=True)  # an entity may be sent twice in a batch
            score = rng.integers(0, 10, n) / 10.0 if task == "binary" else rng.normal(0, 1, n)  # ties
            frames.append(pd.DataFrame({"tenant_id": f"t{t:02d}", "entity_key": keys,
                                        "batch_id": f"b{b}", "score": score}))
    scored = pd.concat(frames, ignore_index=True)
    scored.loc[rng.random(len(scored)) < 0.02, "score"] = np.nan
    labels = pd.DataFrame({"tenant_id": np.repeat([f"t{t:02d}" for t in range(12)], 90),
                           "entity_key": np.tile([f"e{i}" for i in range(70)] + [f"new{i}" for i in range(20)], 12)})
    labels = labels.sample(frac=0.8, random_state=seed)
    labels = pd.concat([labels, labels.sample(40, random_state=seed + 1)], ignore_index=True)  # re-sent
    if task == "binary":
        labels["label"] = (rng.random(len(labels)) < 0.3).astype(np.float64)
        single = labels.tenant_id == "t03"
        labels.loc[single, "label"] = 0.0  # one class only: no AUC
    else:
        labels["label"] = rng.normal(0, 1, len(labels))
    return scored, labels


def assert_same(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(got.columns) == list(expected.columns)
    exact = [c for c in got.columns if c != "value"]
    pd.testing.assert_frame_equal(got[exact].reset_index(drop=True), expected[exact].reset_index(drop=True))
    np.testing.assert_allclose(got.value.to_numpy(), expected.value.to_numpy(), rtol=1e-12, atol=1e-12)
    assert got.attrs["unmatched_labels"] == expected.attrs["unmatched_labels"]


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_realised_metrics_match_pandas(spark: Any, task: str) -> None:
    scored, labels = realised_case(5 if task == "binary" else 6, task)
    schema_s = "tenant_id string, entity_key string, batch_id string, score double"
    s = spark.createDataFrame(scored, schema_s)
    lab = spark.createDataFrame(labels, "tenant_id string, entity_key string, label double")
    got, jobs = jobs_of(spark, lambda: realised_metrics(s, lab, task))
    expected = realised_metrics_pandas(scored, labels, task)
    assert_same(got, expected)
    assert len(got) == 36 and (got.rows > 0).all() and (got.unlabelled > 0).any()
    assert sum(expected.attrs["unmatched_labels"].values()) > 0
    if task == "binary":
        single = got[got.tenant_id == "t03"]
        assert single.value.isna().all() and (single.positives == 0).all()
        assert got[got.tenant_id != "t03"].value.notna().all()
    assert jobs <= 8, jobs


def test_realised_metrics_small_case(spark: Any) -> None:
    scored = pd.DataFrame({"tenant_id": ["a", "a", "a", "a", "a", "a", "b"],
                           "entity_key": ["1", "2", "3", "4", "1", "1", "9"],
                           "batch_id": ["b1", "b1", "b1", "b1", "b2", "b2", "b1"],
                           "score": [0.9, 0.4, 0.4, 0.1, 0.7, 0.2, 0.5]})
    labels = pd.DataFrame({"tenant_id": ["a", "a", "a", "a", "a", "b", "c"],
                           "entity_key": ["1", "2", "3", "3", "5", "8", "1"],
                           "label": [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]})
    s = spark.createDataFrame(scored, "tenant_id string, entity_key string, batch_id string, score double")
    lab = spark.createDataFrame(labels, "tenant_id string, entity_key string, label double")
    got = realised_metrics(s, lab, "binary")
    assert_same(got, realised_metrics_pandas(scored, labels, "binary"))
    assert got.value.iloc[0] == pytest.approx(0.75) and math.isnan(got.value.iloc[1])
    b = got.iloc[2]  # tenant b scored one entity that never got a label
    assert (b.tenant_id, b.rows, b.unlabelled) == ("b", 0, 1) and math.isnan(b.value)
    assert got.attrs["unmatched_labels"] == {"a": 1, "b": 1, "c": 1}
