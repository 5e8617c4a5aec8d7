"""Tenant policy: what a tenant allows (strategies, consents), who may serve it, and its budget.

Pure rules over plain values, so every branch is unit-tested and every layer (training, scoring,
promotion, the steps' eligibility) applies the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tenantml.core.ids import TenantId

STRATEGIES = ("tenant", "shared", "tuned")
CROSS_TENANT_STRATEGIES = ("shared", "tuned")  # trained on other tenants' rows


@dataclass(frozen=True)
class TenantPolicy:
    """What a tenant allows: which strategies may serve it and whether its rows may be shared."""

    tenant_id: TenantId
    strategy: str
    consent_share_data: bool
    consent_shared_inference: bool

    def allows(self, strategy: str) -> bool:
        """Whether a model of ``strategy`` may serve this tenant (its setting and its consent)."""
        if strategy in CROSS_TENANT_STRATEGIES and not self.consent_shared_inference:
            return False
        return self.strategy in ("auto", strategy)


def entitled(tenant_id: str, version_tags: dict[str, str], policy: TenantPolicy | None = None,
             shared_name: str | None = None) -> str | None:
    """None when the tenant may be served by this model version, else why not.

    Checked at scoring time whatever the registry's alias says: a version registered for another
    tenant is refused; a shared or tuned-shared version is refused for a tenant that does not
    consent to models trained on other tenants' data; a "shared" or "tuned" version must derive
    from the dataset's shared model.
    """
    owner = version_tags.get("tenant_id")
    strategy = version_tags.get("strategy", "tenant")
    if owner != tenant_id:
        return f"champion of tenant {tenant_id!r} was registered for tenant {owner!r}: refused"
    if strategy not in STRATEGIES:
        return f"champion of tenant {tenant_id!r} has unknown strategy {strategy!r}: refused"
    if strategy in CROSS_TENANT_STRATEGIES:
        if policy is not None and not policy.consent_shared_inference:
            return (f"champion of tenant {tenant_id!r} is a {strategy} model, but the tenant does not consent "
                    f"to models trained on other tenants' data (consent_shared_inference=false): refused")
        if shared_name is not None and version_tags.get("base_model") != shared_name:
            return (f"champion of tenant {tenant_id!r} claims strategy {strategy!r} but derives from "
                    f"{version_tags.get('base_model')!r}, not {shared_name!r}: refused")
    return None


def no_model_possible(policy: TenantPolicy, rows: int, strategies: Sequence[str], min_rows: int,
                      tuned_min_rows: int) -> str | None:
    """Why none of the strategies a run trains can give this tenant a model yet, or None.

    A tenant below every row minimum that allows no shared model would otherwise be "retrained"
    every night for want of a champion, with nothing to train; it waits for rows instead."""
    needs = []
    for strategy in strategies:
        if not policy.allows(strategy):
            continue
        if strategy == "shared":
            return None  # the shared model serves a consenting tenant whatever its size
        need, key = (tuned_min_rows, "training.tuned.min_rows") if strategy == "tuned" else (min_rows, "training.min_rows")
        if rows >= need:
            return None
        needs.append(f"{strategy!r} needs {key}={need}")
    allowed = needs or [f"no strategy in training.strategies {list(strategies)} is allowed for the tenant"]
    return f"no model possible yet: {rows} labelled rows; " + ", ".join(allowed)


def monthly_budget(budgets: dict[str, float], default: float | None, tenant_id: str) -> float | None:
    """Compute seconds a tenant may use per calendar month: its own budget, else the default."""
    return budgets.get(tenant_id, default)


def over_budget(tenant_id: str, used: float, budget: float | None) -> str | None:
    """Why a tenant is over its budget, or None."""
    if budget is None or used <= budget:
        return None
    return f"tenant {tenant_id!r} used {used:.1f}s of compute this month, over its budget of {budget:.1f}s"
