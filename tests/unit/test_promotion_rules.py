"""Champion/challenger rules and scoring entitlement: every branch, no Spark needed."""

from __future__ import annotations

import math

import pytest

from tenantml.core.policy import TenantPolicy, entitled
from tenantml.training.selection import Candidate, decide

AUTO = TenantPolicy("t1", "auto", True, True)
NO_SHARED = TenantPolicy("t1", "auto", True, False)


def cand(strategy: str, metric: float, version: str = "1", owner: str | None = "t1") -> Candidate:
    name = "ds___shared" if strategy == "shared" else "ds__t1"
    return Candidate(f"{name}/{version}", strategy, name, version, metric=metric,
                     owner=None if strategy == "shared" else owner,
                     base_version=version if strategy == "shared" else None)


def test_best_candidate_is_promoted_when_there_is_no_champion() -> None:
    d = decide("t1", AUTO, [cand("tenant", 0.70), cand("tuned", 0.80, "2"), cand("shared", 0.75)], None,
               margin=0.01, higher_is_better=True)
    assert d.decision == "promoted" and d.serving is not None and d.serving.strategy == "tuned"
    assert "no champion yet" in d.reason


def test_challenger_must_beat_champion_by_the_margin() -> None:
    champion = cand("tenant", 0.80, "1")
    close = decide("t1", AUTO, [cand("tuned", 0.805, "2")], champion, margin=0.01, higher_is_better=True)
    assert close.decision == "kept" and close.serving == champion and "below margin" in close.reason
    clear = decide("t1", AUTO, [cand("tuned", 0.82, "2")], champion, margin=0.01, higher_is_better=True)
    assert clear.decision == "promoted" and clear.serving is not None and clear.serving.version == "2"


def test_lower_is_better_metrics_are_oriented() -> None:
    champion = cand("tenant", 10.0, "1")
    d = decide("t1", AUTO, [cand("tuned", 9.0, "2"), cand("shared", 11.0)], champion, margin=0.5,
               higher_is_better=False)
    assert d.decision == "promoted" and d.serving is not None and d.serving.strategy == "tuned"


def test_refused_inference_excludes_shared_and_tuned_and_replaces_such_a_champion() -> None:
    shared_champion = cand("shared", 0.9, "7")
    shared_champion = Candidate("ds__t1/3", "shared", "ds__t1", "3", metric=0.9, owner="t1", base_version="7")
    d = decide("t1", NO_SHARED, [cand("tenant", 0.6), cand("tuned", 0.95, "2"), cand("shared", 0.99)],
               shared_champion, margin=0.01, higher_is_better=True)
    assert d.decision == "promoted" and d.serving is not None and d.serving.strategy == "tenant"
    assert "may no longer serve" in d.reason
    only_shared = decide("t1", NO_SHARED, [cand("shared", 0.99)], None, margin=0.0, higher_is_better=True)
    assert only_shared.decision == "none" and only_shared.serving is None


def test_tenant_strategy_setting_limits_candidates() -> None:
    pol = TenantPolicy("t1", "shared", False, True)
    d = decide("t1", pol, [cand("tenant", 0.99), cand("shared", 0.6)], None, margin=0.0, higher_is_better=True)
    assert d.serving is not None and d.serving.strategy == "shared"


def test_another_tenants_model_is_never_a_candidate() -> None:
    foreign = Candidate("ds__t2/1", "tenant", "ds__t2", "1", metric=0.99, owner="t2")
    d = decide("t1", AUTO, [foreign, cand("tenant", 0.5)], None, margin=0.0, higher_is_better=True)
    assert d.serving is not None and d.serving.owner == "t1"


def test_tiny_tenant_without_comparable_metric_falls_back_to_tuned_then_shared() -> None:
    nan = math.nan
    d = decide("t1", AUTO, [cand("shared", nan), cand("tuned", nan, "2")], None, margin=0.0, higher_is_better=True)
    assert d.decision == "promoted" and d.serving is not None and d.serving.strategy == "tuned"
    assert "fallback" in d.reason
    d2 = decide("t1", AUTO, [cand("shared", nan)], None, margin=0.0, higher_is_better=True)
    assert d2.serving is not None and d2.serving.strategy == "shared"
    kept = decide("t1", AUTO, [cand("shared", nan)], cand("tenant", 0.7), margin=0.0, higher_is_better=True)
    assert kept.decision == "kept"


def test_same_shared_model_is_not_re_promoted() -> None:
    champion = Candidate("ds__t1/4", "shared", "ds__t1", "4", metric=0.8, owner="t1", base_version="7")
    d = decide("t1", AUTO, [cand("shared", 0.8, "7")], champion, margin=0.0, higher_is_better=True)
    assert d.decision == "kept" and "already the best" in d.reason


@pytest.mark.parametrize(("tags", "policy", "expected"), [
    ({"tenant_id": "t1", "strategy": "tenant"}, AUTO, None),
    ({"tenant_id": "t2", "strategy": "tenant"}, AUTO, "registered for tenant 't2'"),
    ({"tenant_id": "t1", "strategy": "shared", "base_model": "ds__shared"}, AUTO, None),
    ({"tenant_id": "t1", "strategy": "shared", "base_model": "ds__t2"}, AUTO, "derives from 'ds__t2'"),
    ({"tenant_id": "t1", "strategy": "tuned", "base_model": "ds__shared"}, NO_SHARED, "consent_shared_inference"),
    ({"tenant_id": "t1", "strategy": "shared", "base_model": "ds__shared"}, NO_SHARED, "consent_shared_inference"),
    ({"tenant_id": "t1", "strategy": "magic"}, AUTO, "unknown strategy"),
])
def test_entitlement_at_scoring_time(tags: dict[str, str], policy: TenantPolicy, expected: str | None) -> None:
    why = entitled("t1", tags, policy, "ds__shared")
    assert (why is None) if expected is None else (why is not None and expected in why)


def test_a_tie_never_replaces_the_champion_even_with_zero_margin() -> None:
    champion = cand("tenant", 0.8, "1")
    d = decide("t1", AUTO, [cand("tenant", 0.8, "2")], champion, margin=0.0, higher_is_better=True)
    assert d.decision == "kept"


# --------------------------------------------------------------------------- noise-aware rule


def judged(strategy: str, metric: float, rows: int, positives: int, version: str = "1") -> Candidate:
    from dataclasses import replace

    from tenantml.training.selection import metric_standard_error

    return replace(cand(strategy, metric, version), se=metric_standard_error("auc", metric, rows, positives))


def test_hanley_mcneil_is_exact_for_a_useless_model_and_tracks_the_spread_of_real_aucs() -> None:
    import numpy as np

    from tenantml.training.selection import auc_standard_error

    # At AUC 0.5 Hanley-McNeil is the exact Mann-Whitney variance (n1 + n2 + 1) / (12 n1 n2).
    assert auc_standard_error(0.5, 20, 80) == pytest.approx(math.sqrt(101 / (12 * 20 * 80)), rel=1e-12)
    # For a useful model it matches the spread of AUCs over resampled 60-row holdouts.
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(15), np.zeros(45)]
    scores = rng.normal(y, 1.0, size=(4000, 60))  # binormal scores, no ties: AUC from the ranks
    ranks = scores.argsort(axis=1).argsort(axis=1) + 1
    aucs = (ranks[:, :15].sum(axis=1) - 15 * 16 / 2) / (15 * 45)
    observed = float(np.std(aucs))
    assert auc_standard_error(float(np.mean(aucs)), 15, 45) == pytest.approx(observed, rel=0.15)
    assert auc_standard_error(0.76, 15, 45) > 5 * auc_standard_error(0.76, 1500, 4500)  # shrinks as 1/sqrt(n)
    assert math.isnan(auc_standard_error(0.7, 0, 60))


def test_metric_standard_error_knows_auc_and_rmse_and_admits_what_it_cannot_tell() -> None:
    from tenantml.training.selection import metric_standard_error

    assert metric_standard_error("rmse", 2.0, 200) == pytest.approx(2.0 / math.sqrt(400))
    assert math.isnan(metric_standard_error("auc", 0.7, 60, None))  # class counts unknown
    assert math.isnan(metric_standard_error("auc", 0.7, None, 10))
    assert math.isnan(metric_standard_error("mae", 1.0, 100))


def test_a_small_holdouts_lead_for_the_tenant_model_is_noise_and_the_tuned_model_serves() -> None:
    # 60 holdout rows, 15 positives: an AUC is good to about +-0.065, so a 0.04 lead is luck.
    small = decide("t1", AUTO, [judged("tenant", 0.80, 60, 15), judged("tuned", 0.76, 60, 15, "2"),
                                judged("shared", 0.75, 60, 15)], None, margin=0.005, higher_is_better=True,
                   noise_z=1.0)
    assert small.decision == "promoted" and small.serving is not None and small.serving.strategy == "tuned"
    assert "saw more data" in small.reason and "tenant leads by 0.0400" in small.reason
    # The same lead on 6,000 rows is evidence: the tenant's own model serves.
    large = decide("t1", AUTO, [judged("tenant", 0.80, 6000, 1500), judged("tuned", 0.76, 6000, 1500, "2"),
                                judged("shared", 0.75, 6000, 1500)], None, margin=0.005, higher_is_better=True,
                   noise_z=1.0)
    assert large.serving is not None and large.serving.strategy == "tenant"
    # A big enough lead wins even on a small holdout.
    clear = decide("t1", AUTO, [judged("tenant", 0.92, 60, 15), judged("tuned", 0.70, 60, 15, "2")], None,
                   margin=0.005, higher_is_better=True, noise_z=1.0)
    assert clear.serving is not None and clear.serving.strategy == "tenant"


def test_without_standard_errors_the_rule_is_the_margin_rule() -> None:
    # No SE (nan): only the margin; a lead below it does not displace the model that saw more data.
    within = decide("t1", AUTO, [cand("tenant", 0.803), cand("shared", 0.80)], None, margin=0.005,
                    higher_is_better=True, noise_z=1.0)
    assert within.serving is not None and within.serving.strategy == "shared"
    beyond = decide("t1", AUTO, [cand("tenant", 0.81), cand("shared", 0.80)], None, margin=0.005,
                    higher_is_better=True, noise_z=1.0)
    assert beyond.serving is not None and beyond.serving.strategy == "tenant"


def test_a_challenger_must_clear_the_noise_to_replace_the_champion() -> None:
    champion = judged("tuned", 0.74, 80, 20, "3")
    noisy = decide("t1", AUTO, [judged("tenant", 0.79, 80, 20, "4")], champion, margin=0.005,
                   higher_is_better=True, noise_z=1.0)
    assert noisy.decision == "kept" and "SE" in noisy.reason and noisy.serving == champion
    plain = decide("t1", AUTO, [judged("tenant", 0.79, 80, 20, "4")], champion, margin=0.005,
                   higher_is_better=True, noise_z=0.0)
    assert plain.decision == "promoted"
    lower_better = decide("t1", AUTO, [replace_se(cand("tenant", 9.0, "4"), 0.2)], replace_se(cand("tuned", 10.0, "3"), 0.2),
                          margin=0.1, higher_is_better=False, noise_z=1.0)
    assert lower_better.decision == "promoted"  # 1.0 better, needs 0.1 + 0.28


def replace_se(c: Candidate, se: float) -> Candidate:
    from dataclasses import replace

    return replace(c, se=se)


def test_the_shared_model_retrains_only_when_enough_of_its_contributors_need_it() -> None:
    import time
    from types import SimpleNamespace

    from tenantml.config.schema import RetrainingConfig
    from tenantml.steps.train_shared import _keep_shared

    rcfg = RetrainingConfig()
    contributors = [f"t{i}" for i in range(10)]
    fresh = SimpleNamespace(creation_timestamp=time.time() * 1000 - 3_600_000)  # an hour old
    one = {t: (t == "t3", "drift" if t == "t3" else "current") for t in contributors}
    kept = _keep_shared(rcfg, one, contributors, fresh, None)
    assert kept is not None and "1 of 10" in kept and "shared_min_fraction=0.5" in kept
    assert _keep_shared(rcfg, {t: (False, "") for t in contributors}, contributors, fresh, None) == (
        "no tenant needs retraining this run; the shared champion stays")
    half = {t: (i < 5, "") for i, t in enumerate(contributors)}
    assert _keep_shared(rcfg, half, contributors, fresh, None) is None  # half of them: retrain
    # No champion, a tainted one, an old one, forced, or no decisions (no monitor step): retrain.
    assert _keep_shared(rcfg, one, contributors, None, None) is None
    assert _keep_shared(rcfg, one, contributors, fresh, "taint") is None
    old = SimpleNamespace(creation_timestamp=time.time() * 1000 - 40 * 86_400_000)
    assert _keep_shared(rcfg, one, contributors, old, None) is None
    assert _keep_shared(RetrainingConfig(force=True), one, contributors, fresh, None) is None
    assert _keep_shared(rcfg, None, contributors, fresh, None) is None
    # A contributor without a decision (new since the monitor ran) counts as needing a retrain.
    assert _keep_shared(RetrainingConfig(shared_min_fraction=0.2), {"t0": (True, "")}, ["t0", "t1"],
                        fresh, None) is None


def test_a_tenant_no_strategy_can_serve_waits_for_rows_instead_of_retraining_every_night() -> None:
    from tenantml.core.policy import no_model_possible

    tenant_only = TenantPolicy("t1", "tenant", False, False)
    why = no_model_possible(tenant_only, 40, ["tenant", "shared", "tuned"], 200, 100)
    assert why is not None and "40 labelled rows" in why and "training.min_rows=200" in why
    assert no_model_possible(tenant_only, 200, ["tenant"], 200, 100) is None  # enough rows for its own model
    # A consenting tenant is served by the shared model whatever its size; the tuned one needs its minimum.
    assert no_model_possible(AUTO, 5, ["tenant", "shared", "tuned"], 200, 100) is None
    tuned = no_model_possible(AUTO, 40, ["tenant", "tuned"], 200, 100)
    assert tuned is not None and "'tuned' needs training.tuned.min_rows=100" in tuned
    assert no_model_possible(AUTO, 150, ["tenant", "tuned"], 200, 100) is None
    nothing = no_model_possible(NO_SHARED, 500, ["shared"], 200, 100)
    assert nothing is not None and "no strategy in training.strategies ['shared'] is allowed" in nothing


def test_a_psi_above_the_alert_level_but_within_a_small_batchs_noise_is_not_drift() -> None:
    from tenantml.config.schema import MonitoringConfig
    from tenantml.steps.monitor import drift_status, feature_confidence

    cfg = MonitoringConfig()
    assert drift_status(0.4, 60, cfg, noise=0.55) == "within_noise"
    assert drift_status(0.9, 60, cfg, noise=0.55) == "drift"
    assert drift_status(0.15, 60, cfg, noise=0.55) == "within_noise"
    assert drift_status(0.05, 60, cfg, noise=0.55) == "stable"
    assert drift_status(0.9, 20, cfg, noise=0.55) == "too_few_rows"
    assert drift_status(0.3, 5000, cfg, noise=0.01) == "drift"  # big batches: the thresholds decide
    off = MonitoringConfig(drift_confidence=None)
    assert drift_status(0.4, 60, off, noise=0.55) == "drift"
    # Ten features at 0.99 per tenant: each is tested at 0.999.
    assert feature_confidence(cfg, 10) == pytest.approx(0.999) and feature_confidence(cfg, 1) == pytest.approx(0.99)
