"""train: a tenant-specific candidate per eligible tenant, trained only on its own rows."""

from __future__ import annotations

from tenantml.steps.base import StepOutput, StepScope, step
from tenantml.steps.candidates import skip_all, train_candidates


@step(name="train", help="train a tenant-specific candidate model per tenant", after=("monitor",),
      reads=("silver", "tenants", "retraining"), writes=("model_store", "registry"), measured=True, gated=True)
def run(scope: StepScope) -> StepOutput:
    if "tenant" not in scope.ctx.config.training.strategies:
        return skip_all(scope, "strategy 'tenant' is not in training.strategies")
    return train_candidates(scope, "tenant")
