"""Champion/challenger selection for one tenant: pure, so every branch is unit-tested.

A challenger replaces the champion only when it beats it by the promotion margin, or when the
champion may no longer serve the tenant (its strategy setting or consent changed).
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


def decide(tenant_id: str, policy: TenantPolicy, candidates: Sequence[Candidate], champion: Candidate | None,
           *, margin: float, higher_is_better: bool) -> Decision:
    """Champion/challenger for one tenant; pure so every branch is unit-tested."""
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
        order = {s: i for i, s in enumerate(("tenant", "tuned", "shared"))}
        best = sorted(scored, key=lambda c: (-_better(c.metric, 0.0, higher_is_better), order.get(c.strategy, 9)))[0]
    else:
        best = next((c for s in FALLBACK_ORDER for c in allowed if c.strategy == s), None)
    if best is None:
        if champion_ok:
            return Decision("kept", "no new entitled candidate", champion, None)
        return Decision("none", refused or "no entitled candidate model", None, None)
    if not champion_ok:
        why = refused or "no champion yet"
        how = (f"best candidate on holdout ({best.metric:.4f})" if math.isfinite(best.metric)
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
    if gain > 0 and gain >= margin:  # a tie never replaces the champion, even with margin 0
        return Decision("promoted", f"{best.strategy} beats champion by {gain:.4f} (margin {margin})", best, best)
    return Decision("kept", f"best challenger {best.strategy} ahead by {gain:.4f}, below margin {margin}",
                    champion, best)


def _same_model(a: Candidate, b: Candidate) -> bool:
    if a.model_id == b.model_id:
        return True
    shared_a = a.strategy == "shared" and (a.base_version or a.version)
    shared_b = b.strategy == "shared" and (b.base_version or b.version)
    return bool(shared_a and shared_b and shared_a == shared_b)
