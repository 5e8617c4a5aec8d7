"""Drift profiles, PSI and the pandas realised-metrics twin; no Spark."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tenantml.models import rmse, roc_auc
from tenantml.monitoring import (
    OTHER,
    SCORE_FEATURE,
    bin_counts,
    classify_psi,
    drift_report,
    psi,
    psi_noise_level,
    realised_metrics_pandas,
    reference_profile,
)

NUMERIC = ("spend", "tickets")
CATEGORICAL = ("plan", "seats")
PLANS = ("basic", "pro", "enterprise")


def frame(n: int, seed: int, shift_sd: float = 0.0, plan_p: tuple[float, ...] = (0.5, 0.35, 0.15)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "spend": rng.normal(50.0 + 10.0 * shift_sd, 10.0, n),
        "tickets": rng.poisson(1.5, n).astype(np.float64),
        "plan": rng.choice(PLANS, n, p=list(plan_p)),
        "seats": rng.integers(1, 4, n).astype(np.float64),  # a float column of integral categories
    })


def plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def psis(profile: dict, df: pd.DataFrame, scores: np.ndarray | None = None) -> dict[str, float]:
    return {r["feature"]: r["psi"] for r in drift_report(profile, df, NUMERIC, CATEGORICAL, scores)}


@pytest.fixture(scope="module")
def profile() -> dict:
    train = frame(20_000, seed=1)
    scores = np.random.default_rng(2).beta(2, 5, len(train))
    return reference_profile(train, NUMERIC, CATEGORICAL, scores=scores, task="binary")


def test_profile_is_plain_json_and_round_trips(profile: dict) -> None:
    assert plain(profile)
    assert json.loads(json.dumps(profile, allow_nan=False)) == profile
    assert profile["version"] == 1 and profile["rows"] == 20_000
    spend = profile["numeric"]["spend"]
    assert len(spend["edges"]) == 9 and spend["edges"] == sorted(set(spend["edges"]))
    assert len(spend["shares"]) == 11 and math.isclose(sum(spend["shares"]), 1.0)
    # Poisson ticks tie at the quantiles: the edges are deduplicated.
    assert len(profile["numeric"]["tickets"]["edges"]) < 9
    assert profile["categorical"]["plan"]["categories"] == ["basic", "pro", "enterprise"]
    assert set(profile["categorical"]["seats"]["categories"]) == {"1", "2", "3"}  # integral floats as ints
    batch = frame(3000, seed=9)
    assert drift_report(json.loads(json.dumps(profile)), batch, NUMERIC, CATEGORICAL) == \
        drift_report(profile, batch, NUMERIC, CATEGORICAL)


def test_psi_small_for_same_distribution_large_for_shift(profile: dict) -> None:
    scores = np.random.default_rng(3).beta(2, 5, 5000)
    same = psis(profile, frame(5000, seed=4), scores)
    assert max(same.values()) < 0.02, same
    shifted = psis(profile, frame(5000, seed=5, shift_sd=2.0, plan_p=(0.1, 0.3, 0.6)))
    assert shifted["spend"] > 0.25 and shifted["plan"] > 0.25
    assert shifted["tickets"] < 0.02 and shifted["seats"] < 0.02
    assert classify_psi(shifted["spend"]) == "drift" and classify_psi(same["spend"]) == "stable"


def test_psi_monotone_in_shift(profile: dict) -> None:
    values = [psis(profile, frame(5000, seed=6, shift_sd=s))["spend"] for s in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)]
    assert values == sorted(values) and values[0] < 0.02 < values[1], values


def test_psi_function() -> None:
    assert psi([0.5, 0.5], [10, 10]) == 0.0
    assert psi([0.5, 0.5], [0.5, 0.5]) == psi([0.5, 0.5], [3, 3])
    # An empty bin is smoothed with eps, not infinite.
    assert math.isfinite(psi([0.5, 0.5, 0.0], [5, 5, 5])) and psi([0.5, 0.5, 0.0], [5, 5, 5]) > 1.0
    assert math.isnan(psi([0.5, 0.5], [0, 0]))
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1, 1, 1])


def _null_false_alarms(shares: np.ndarray, rows: int, reference_rows: int, confidence: float,
                       draws: int = 4000) -> float:
    """Share of batches drawn from the reference's own distribution whose (smoothed) PSI exceeds
    `psi_noise_level`: what a monitor would flag with no drift at all."""
    rng = np.random.default_rng(rows * 7 + reference_rows)
    level = psi_noise_level(shares, rows, reference_rows, confidence)
    flagged = 0
    for _ in range(draws):
        ref = rng.multinomial(reference_rows, shares) / reference_rows
        batch = rng.multinomial(rows, shares)
        flagged += psi(ref, batch, expected_rows=reference_rows, smoothing=0.5) > level
    return flagged / draws


@pytest.mark.parametrize("rows,reference_rows", [(50, 400), (80, 2000), (300, 300), (2000, 2000)])
def test_noise_level_holds_its_confidence_on_batches_without_drift(rows: int, reference_rows: int) -> None:
    deciles = np.r_[np.full(10, 0.1), 0.0]  # a numeric feature's quantile bins, nothing missing
    skewed = np.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.01, 0.005, 0.005, 0.0, 0.0])  # a categorical one
    for shares in (deciles, skewed):
        rate = _null_false_alarms(shares, rows, reference_rows, 0.99)
        assert rate <= 0.02, (shares, rows, reference_rows, rate)
    # The textbook PSI and its usual 0.25 alert flag a third of 50-row batches that did not drift.
    rng = np.random.default_rng(3)
    textbook = np.mean([psi(deciles, rng.multinomial(50, deciles)) > 0.25 for _ in range(2000)])
    assert textbook > 0.2


def test_noise_level_shrinks_with_rows_and_a_real_shift_clears_it(profile: dict) -> None:
    levels = [psi_noise_level(np.full(10, 0.1), n, 5000) for n in (50, 200, 1000, 10_000)]
    assert levels == sorted(levels, reverse=True) and levels[0] > 0.4 > 0.01 > levels[-1]
    assert math.isnan(psi_noise_level([0.5, 0.5], 0))
    with pytest.raises(ValueError):
        psi_noise_level([0.5, 0.5], 10, confidence=1.0)
    # A shift of two standard deviations in a 60-row batch is drift beyond any noise.
    report = {r["feature"]: r for r in drift_report(profile, frame(60, seed=9, shift_sd=2.0), NUMERIC, CATEGORICAL)}
    assert report["spend"]["psi"] > report["spend"]["noise_psi"] > 0.25
    calm = {r["feature"]: r for r in drift_report(profile, frame(60, seed=10), NUMERIC, CATEGORICAL)}
    assert all(r["psi"] < r["noise_psi"] for r in calm.values()), calm


def test_smoothed_psi_keeps_an_empty_bin_of_a_small_batch_finite_and_modest() -> None:
    shares = np.full(10, 0.1)
    one_empty = np.array([0, 6, 6, 6, 6, 6, 5, 5, 5, 5])  # 50 rows, one decile happened to stay empty
    assert psi(shares, one_empty) > 0.6  # eps-floored: the empty bin alone is ~0.69
    assert psi(shares, one_empty, expected_rows=1000, smoothing=0.5) < 0.3
    big = np.array([480, 520, 500, 505, 495, 510, 490, 500, 500, 500])  # thousands of rows: the textbook PSI
    assert psi(shares, big, expected_rows=100_000, smoothing=0.5) == pytest.approx(psi(shares, big), abs=1e-4)
    with pytest.raises(ValueError):
        psi(shares, one_empty, smoothing=-1.0)


def test_classify_psi() -> None:
    assert [classify_psi(v) for v in (0.0, 0.1, 0.2, 0.25, 3.0)] == ["stable", "warn", "warn", "drift", "drift"]
    assert classify_psi(0.2, warn=0.05, alert=0.15) == "drift"
    assert classify_psi(math.nan) == "stable"
    with pytest.raises(ValueError):
        classify_psi(0.1, warn=0.3, alert=0.2)


def test_missing_values_are_their_own_bin() -> None:
    train = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0, np.nan, np.inf, 5.0, 6.0, 7.0, 8.0],
                          "c": ["a", "b", None, "a", "b", "a", np.nan, "c", "a", "b"]})
    profile = reference_profile(train, ["x"], ["c"], bins=4)
    assert profile["numeric"]["x"]["missing_share"] == pytest.approx(0.2)
    assert profile["categorical"]["c"]["missing_share"] == pytest.approx(0.2)
    fp = profile["numeric"]["x"]
    # Strings that do not parse, None, NaN and infinities are missing; numeric strings are numbers.
    counts = bin_counts(pd.Series(["1.5", "twelve", None, "nan", "-inf", 100.0], dtype=object), fp)
    assert counts[-1] == 4 and counts.sum() == 6 and counts[0] == 1 and counts[-2] == 1
    batch = pd.DataFrame({"x": [np.nan] * 5 + [2.0] * 5, "c": [None] * 5 + ["a"] * 5})
    rows = {r["feature"]: r for r in drift_report(profile, batch, ["x"], ["c"])}
    assert rows["x"]["missing_share"] == 0.5 and rows["c"]["missing_share"] == 0.5
    assert rows["x"]["rows"] == 10 and rows["x"]["psi"] > 0.25


def test_bins_are_open_at_both_ends_and_left_closed() -> None:
    fp = {"kind": "numeric", "edges": [1.0, 2.0], "shares": [0.25, 0.25, 0.5, 0.0]}
    assert bin_counts([-1e300, 0.999, 1.0, 1.5, 2.0, 1e300, np.nan], fp).tolist() == [2, 2, 2, 1]


def test_unseen_categories_go_to_other() -> None:
    train = pd.DataFrame({"c": list("aaabbbccd")})
    profile = reference_profile(train, [], ["c"], max_categories=2)
    fp = profile["categorical"]["c"]
    assert fp["categories"] == ["a", "b"] and fp["other_share"] == pytest.approx(3 / 9)
    assert bin_counts(pd.Series(["a", "z", "c", "y", None]), fp).tolist() == [1, 0, 3, 1]
    assert OTHER == "__other__"
    # Integral floats match int keys, as in the model's vocabulary.
    ints = reference_profile(pd.DataFrame({"k": [1, 2, 2]}), [], ["k"])["categorical"]["k"]
    assert bin_counts(pd.Series([2.0, 1.0, np.nan, 2.5]), ints).tolist() == [1, 1, 1, 1]


def test_score_bins_binary_and_regression() -> None:
    train = frame(2000, seed=7)
    binary = reference_profile(train, NUMERIC, [], scores=np.linspace(0, 1, 2000), task="binary")["prediction"]
    assert binary["edges"] == pytest.approx([i / 10 for i in range(1, 10)])
    assert binary["shares"][:10] == pytest.approx([0.1] * 10, abs=1e-3)
    values = np.random.default_rng(8).lognormal(3.0, 1.0, 2000)
    regression = reference_profile(train, NUMERIC, [], scores=values, task="regression")["prediction"]
    assert regression["edges"] == pytest.approx(list(np.quantile(values, np.linspace(0, 1, 11)[1:-1])))
    assert regression["shares"][:10] == pytest.approx([0.1] * 10)
    rows = drift_report({"prediction": regression}, train.iloc[:1000], [], [], scores=values[:1000] * 3)
    assert rows[0]["feature"] == SCORE_FEATURE and rows[0]["kind"] == "prediction" and rows[0]["psi"] > 0.25
    assert reference_profile(train, NUMERIC, [])["prediction"] is None
    with pytest.raises(ValueError, match="not in the reference profile"):
        drift_report(reference_profile(train, NUMERIC, []), train, NUMERIC, [], scores=values)


def test_profile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        reference_profile(frame(10, 0).iloc[:0], NUMERIC, [])
    with pytest.raises(ValueError):
        reference_profile(frame(10, 0), ["nope"], [])
    with pytest.raises(ValueError):
        reference_profile(frame(10, 0), NUMERIC, [], task="multiclass")


def test_module_imports_without_spark() -> None:
    code = ("import sys; import tenantml.monitoring; "
            "assert not any(m == 'pyspark' or m.startswith('pyspark.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_realised_pandas_rules() -> None:
    scored = pd.DataFrame({
        "tenant_id": ["a"] * 6 + ["b"] * 3,
        "entity_key": ["1", "2", "3", "4", "1", "1", "9", "8", "7"],
        "batch_id": ["b1", "b1", "b1", "b1", "b2", "b2", "b1", "b1", "b1"],
        "score": [0.9, 0.4, 0.4, 0.1, 0.7, 0.2, 0.5, np.nan, 0.3],
    })
    labels = pd.DataFrame({
        "tenant_id": ["a", "a", "a", "a", "a", "b", "b", "b"],
        "entity_key": ["1", "2", "3", "3", "5", "9", "7", "6"],
        "label": [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0],
    })
    out = realised_metrics_pandas(scored, labels, "binary")
    assert list(out.columns) == ["tenant_id", "batch_id", "metric", "value", "rows", "unlabelled", "positives"]
    a1 = out.iloc[0]
    # Entity 3's conflicting labels collapse to 1; entity 4 has no label yet.
    assert (a1.tenant_id, a1.batch_id, a1.rows, a1.unlabelled, a1.positives) == ("a", "b1", 3, 1, 2)
    assert a1.value == pytest.approx(roc_auc([1, 0, 1], [0.9, 0.4, 0.4])) and a1.value == pytest.approx(0.75)
    a2 = out.iloc[1]  # entity 1 sent twice in b2: the greatest score counts, once
    assert (a2.rows, a2.positives) == (1, 1) and math.isnan(a2.value)
    b1 = out.iloc[2]  # the NaN score is ignored; both labels are positive: no AUC
    assert (b1.rows, b1.unlabelled) == (2, 0) and math.isnan(b1.value)
    assert out.attrs["unmatched_labels"] == {"a": 1, "b": 1}
    reg = realised_metrics_pandas(scored, labels, "regression")
    assert "positives" not in reg.columns and reg.metric.tolist() == ["rmse"] * 3
    assert reg.value.iloc[0] == pytest.approx(rmse([1, 0, 1], [0.9, 0.4, 0.4]))
    with pytest.raises(ValueError):
        realised_metrics_pandas(scored, labels, "multiclass")
