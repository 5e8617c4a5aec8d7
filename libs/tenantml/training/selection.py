"""Champion/challenger selection for one tenant: pure, so every branch is unit-tested.

A challenger replaces the champion only when it beats it by the promotion margin, or when the
champion may no longer serve the tenant (its strategy setting or consent changed).

Small holdouts are noisy: on 60 rows two models' AUCs differ by 0.05 by chance alone. So a gain
only counts when it clears the margin *plus* ``noise_z`` standard errors of the difference, each
metric's standard error coming from the holdout it was measured on (Hanley & McNeil for AUC, the
normal approximation for RMSE), and among new candidates the one that saw the most relevant data
(tuned, then shared, then the tenant's own) serves unless another beats it by that much. On a large
holdout the standard errors vanish and the rule is the plain margin rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tenantml.core.policy import TenantPolicy

# When holdout metrics cannot tell candidates apart (tiny tenants), prefer the model that saw most
# relevant data: tuned, then shared, then the tenant's own.
FALLBACK_ORDER = ("tuned", "shared", "tenant")


@dataclass(frozen=True)
class Candidate:
    model_id: str          # "<registered name>/<version>" of the model actually evaluated
    strategy: str
    name: str
    version: str
    source: str = ""
    metric: float = math.nan
    owner: str | None = None  # tenant the version was trained for (None: the shared model)
    base_version: str | None = None
    se: float = math.nan      # standard error of ``metric`` on this holdout (nan: unknown, taken as 0)

    @property
    def label(self) -> str:
        return f"{self.strategy}:{self.name}/{self.version}"


@dataclass
class Decision:
    decision: str  # promoted | kept | none
    reason: str
    serving: Candidate | None
    challenger: Candidate | None


def _better(a: float, b: float, higher_is_better: bool) -> float:
    """How much a beats b, positive when a is better."""
    return (a - b) if higher_is_better else (b - a)


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982): the standard error of an AUC measured on ``positives`` + ``negatives``
    rows, from the AUC alone (its exponential approximation of the score distributions)."""
    if positives < 1 or negatives < 1 or not math.isfinite(auc):
        return math.nan
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1.0 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) / (
        positives * negatives)
    return math.sqrt(max(var, 0.0))


def metric_standard_error(metric_name: str, metric: float, holdout_rows: int | None,
                          positives: int | None = None) -> float:
    """Standard error of a holdout metric, nan when it cannot be told (then the rule ignores noise).

    AUC: Hanley & McNeil from the holdout's class counts. RMSE: ``rmse / sqrt(2 n)``, the delta
    method for normal errors (heavy-tailed errors make it optimistic). Others: unknown.
    """
    if holdout_rows is None or holdout_rows < 2 or not math.isfinite(metric):
        return math.nan
    if metric_name == "auc":
        if positives is None:
            return math.nan
        return auc_standard_error(metric, int(positives), int(holdout_rows - positives))
    if metric_name == "rmse":
        return metric / math.sqrt(2.0 * holdout_rows)
    return math.nan


def required_gain(a: Candidate, b: Candidate, margin: float, noise_z: float) -> float:
    """What ``a`` must beat ``b`` by: the margin plus ``noise_z`` standard errors of the difference.

    The two metrics are measured on the same rows, so they are positively correlated and the
    independent-errors sum used here overstates the difference's error: the rule errs towards
    keeping what serves, or what saw more data.
    """
    ses = [x.se if math.isfinite(x.se) else 0.0 for x in (a, b)]
    return margin + noise_z * math.sqrt(ses[0] ** 2 + ses[1] ** 2)


def _pick(scored: Sequence[Candidate], margin: float, higher_is_better: bool, noise_z: float) -> Candidate:
    """The new candidate to put forward: the one that saw the most relevant data (tuned, shared,
    tenant), unless another beats it by the noise-aware margin (then the best of those that do)."""
    rank = {s: i for i, s in enumerate(FALLBACK_ORDER)}
    default = sorted(scored, key=lambda c: (rank.get(c.strategy, len(rank)),
                                            -_better(c.metric, 0.0, higher_is_better)))[0]
    beat = [c for c in scored if c is not default
            and _better(c.metric, default.metric, higher_is_better) > 0
            and _better(c.metric, default.metric, higher_is_better) >= required_gain(c, default, margin, noise_z)]
    if not beat:
        return default
    return sorted(beat, key=lambda c: (-_better(c.metric, 0.0, higher_is_better), rank.get(c.strategy, len(rank))))[0]


def _pick_reason(best: Candidate, scored: Sequence[Candidate], margin: float, higher_is_better: bool,
                 noise_z: float) -> str:
    ahead = [c for c in scored if _better(c.metric, best.metric, higher_is_better) > 0]
    if not ahead:
        return f"best candidate on holdout ({best.metric:.4f})"
    top = max(ahead, key=lambda c: _better(c.metric, 0.0, higher_is_better))
    return (f"{best.strategy} ({best.metric:.4f}) saw more data; {top.strategy} leads by "
            f"{_better(top.metric, best.metric, higher_is_better):.4f}, within the noise-aware margin "
            f"{required_gain(top, best, margin, noise_z):.4f}")


def decide(tenant_id: str, policy: TenantPolicy, candidates: Sequence[Candidate], champion: Candidate | None,
           *, margin: float, higher_is_better: bool, noise_z: float = 0.0) -> Decision:
    """Champion/challenger for one tenant; pure so every branch is unit-tested.

    ``noise_z`` (training.promotion_noise_z): standard errors of the metric difference a gain must
    clear on top of ``margin``, both when a candidate that saw less data is put forward over one
    that saw more and when a challenger replaces the champion.
    """
    allowed = [c for c in candidates if policy.allows(c.strategy)
               and (c.owner in (None, tenant_id))]
    refused = ""
    champion_ok = champion is not None and policy.allows(champion.strategy) and champion.owner == tenant_id
    if champion is not None and not champion_ok:
        refused = (f"champion {champion.label} may no longer serve tenant {tenant_id!r} "
                   f"(strategy {policy.strategy!r}, consent_shared_inference={policy.consent_shared_inference})")
    scored = [c for c in allowed if math.isfinite(c.metric)]
    best: Candidate | None
    if scored:
        best = _pick(scored, margin, higher_is_better, noise_z)
    else:
        best = next((c for s in FALLBACK_ORDER for c in allowed if c.strategy == s), None)
    if best is None:
        if champion_ok:
            return Decision("kept", "no new entitled candidate", champion, None)
        return Decision("none", refused or "no entitled candidate model", None, None)
    if not champion_ok:
        why = refused or "no champion yet"
        how = (_pick_reason(best, scored, margin, higher_is_better, noise_z) if math.isfinite(best.metric)
               else f"no comparable holdout metric; fallback to {best.strategy}")
        return Decision("promoted", f"{why}: {how}", best, best)
    assert champion is not None
    if _same_model(best, champion):
        return Decision("kept", "champion is already the best candidate", champion, best)
    if not math.isfinite(best.metric):
        return Decision("kept", "holdout too small to compare candidates; champion kept", champion, best)
    if not math.isfinite(champion.metric):
        return Decision("promoted", f"champion could not be evaluated on the holdout; {best.strategy} "
                                    f"scores {best.metric:.4f}", best, best)
    gain = _better(best.metric, champion.metric, higher_is_better)
    need = required_gain(best, champion, margin, noise_z)
    bar = f"margin {margin}" if need == margin else f"margin {margin} + {noise_z:g} SE = {need:.4f}"
    if gain > 0 and gain >= need:  # a tie never replaces the champion, even with margin 0
        return Decision("promoted", f"{best.strategy} beats champion by {gain:.4f} ({bar})", best, best)
    return Decision("kept", f"best challenger {best.strategy} ahead by {gain:.4f}, below {bar}",
                    champion, best)


def _same_model(a: Candidate, b: Candidate) -> bool:
    if a.model_id == b.model_id:
        return True
    shared_a = a.strategy == "shared" and (a.base_version or a.version)
    shared_b = b.strategy == "shared" and (b.base_version or b.version)
    return bool(shared_a and shared_b and shared_a == shared_b)
