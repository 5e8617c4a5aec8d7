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
