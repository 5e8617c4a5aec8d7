"""train_tuned: the shared champion fine-tuned on each entitled tenant, in parallel Spark tasks."""

from __future__ import annotations

from tenantml.io.lineage import taints
from tenantml.registry.tracking import shared_champion_model
from tenantml.steps.base import StepOutput, StepScope, step
from tenantml.steps.candidates import skip_all, train_candidates


@step(name="train_tuned", help="fine-tune the shared champion per tenant (tuned-shared candidates)",
      after=("train_shared",), reads=("silver", "tenants", "model_store", "registry"),
      writes=("model_store", "registry"), measured=True, gated=True)
def run(scope: StepScope) -> StepOutput:
    if "tuned" not in scope.ctx.config.training.strategies:
        return skip_all(scope, "strategy 'tuned' is not in training.strategies")
    found = shared_champion_model(scope.ctx, scope.dataset)
    if found is None:
        return skip_all(scope, "no shared champion to fine-tune (train_shared has not produced one)")
    if found.blob is None:
        return skip_all(scope, str(found.problem))
    champ = found.version
    ctx = scope.ctx
    taint = taints(ctx.spark, ctx.tables.model_lineage, ctx.tables.tenants, [(champ.name, str(champ.version))],
                   key=ctx.signing_key).get((champ.name, str(champ.version)))
    if taint:  # fine-tuning it would carry the withdrawn rows into every tuned model
        return skip_all(scope, f"the shared champion {champ.name}/{champ.version} was {taint.describe()}; "
                               "nothing is tuned from it until train_shared replaces it")
    return train_candidates(scope, "tuned", {"name": champ.name, "version": str(champ.version), "blob": found.blob})
