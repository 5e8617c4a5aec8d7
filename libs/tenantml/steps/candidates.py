"""What `train` and `train_tuned` share: plan the eligible tenants, train them in Spark tasks,
track and register every candidate, store its bytes. Never moves a champion alias: that is the
promote step's decision, made on the same holdout for all candidates."""

from __future__ import annotations

from typing import Any

from tenantml.io.context import git_commit
from tenantml.io.model_store import write_models
from tenantml.io.spark import SparkTaskProgress, default_parallelism
from tenantml.registry.tracking import track_training
from tenantml.steps.base import StepOutput, StepScope, TenantOutcome
from tenantml.training.plan import TrainingPlan
from tenantml.training.tenant_models import train_tenant_models


def train_candidates(scope: StepScope, strategy: str, base: dict[str, Any] | None = None) -> StepOutput:
    """Train a ``strategy`` ('tenant' or 'tuned') candidate for every eligible tenant that allows it."""
    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    cfg = ctx.config.training
    outcomes: list[TenantOutcome] = []
    min_rows = cfg.tuned.min_rows if strategy == "tuned" else cfg.min_rows
    trainable: dict[str, int] = {}
    for t in scope.eligible:
        n = scope.rows[t]
        p = scope.policies[t]
        if not p.allows(strategy):
            why = ("tenant refuses models trained on other tenants' data (consent_shared_inference=false)"
                   if strategy == "tuned" and not p.consent_shared_inference else f"tenant strategy is {p.strategy!r}")
            outcomes.append(scope.skipped(t, why))
        elif n < min_rows:
            key = "training.tuned.min_rows" if strategy == "tuned" else "training.min_rows"
            outcomes.append(scope.skipped(t, f"{n} rows, below {key}={min_rows}"))
        else:
            trainable[t] = n
    plan = TrainingPlan.build(spec, cfg, trainable, strategy=strategy,
                              tune_base=(base["name"], base["version"]) if base else None)
    what = "tuned-shared" if strategy == "tuned" else "tenant"
    silver = scope.input
    scope.phase(f"{len(trainable)} {what} models on {default_parallelism(ctx.spark)} cores "
                f"(silver v{scope.input_version})")
    with SparkTaskProgress(ctx.spark, ctx.progress, "training tasks"):
        results = train_tenant_models(ctx.spark, silver.where(silver.tenant_id.isin(list(trainable)))
                                      if trainable else silver.limit(0), plan, spec, cfg,
                                      base_model=base["blob"] if base else None, staging_dir=ctx.staging_dir)
    lineage: dict[str, Any] = {"delta_table": scope.input_ref.display if scope.input_ref else None,
                               "delta_version": scope.input_version, "git_commit": git_commit(),
                               "config_hash": ctx.config.config_hash()}
    params: dict[str, Any] = {"dataset": name, "min_rows": min_rows, "tenants_requested": len(scope.rows),
                              **plan.to_params()}
    version_tags = {"base_model": base["name"], "base_version": base["version"]} if base else {}
    tracked = track_training(ctx, name, results, strategy=strategy, params=params, lineage=lineage,
                             version_tags=version_tags)
    store_rows = []
    for r in results.itertuples(index=False):
        if r.status != "ok":
            outcomes.append(TenantOutcome(tenant_id=r.tenant_id, status="failed", rows_in=int(r.rows),
                                          seconds=float(r.seconds), error=r.error,
                                          detail={"attempts": int(r.attempts)}))
            continue
        reg = tracked.registered[r.tenant_id]
        store_rows.append({
            "dataset": name, "tenant_id": r.tenant_id, "strategy": strategy, "model_name": reg.name,
            "model_version": reg.version, "mlflow_run_id": tracked.mlflow_run_id, "run_id": ctx.run_id,
            "metric_name": r.metric_name, "metric": float(r.metric), "baseline_metric": float(r.baseline_metric),
            "metrics_json": r.metrics_json, "train_rows": int(r.train_rows), "delta_version": scope.input_version,
            "git_commit": lineage["git_commit"], "config_hash": lineage["config_hash"], "model": bytes(r.model),
            "profile_json": r.profile_json,
        })
        sampled = r.sampled_from if r.sampled_from == r.sampled_from and r.sampled_from is not None else None
        outcomes.append(TenantOutcome(
            tenant_id=r.tenant_id, status="ok", rows_in=int(r.rows), rows_out=int(r.train_rows),
            seconds=float(r.seconds),
            detail={"model": f"{reg.name}/{reg.version}", "strategy": strategy, "attempts": int(r.attempts),
                    "tier": r.tier, "path": r.path,
                    **({"sampled_from": int(sampled)} if sampled is not None else {}),
                    **({"base_version": base["version"]} if base else {}),
                    **({"time_quota_hit": True} if "time_quota_hit" in (r.metrics_json or "") else {}),
                    "version": reg.version, r.metric_name: round(float(r.metric), 4),
                    f"baseline_{r.metric_name}": round(float(r.baseline_metric), 4), "epochs": int(r.epochs)}))
    write_models(ctx.spark, ctx.tables.model_store, store_rows, name, ctx.run_id, strategy=strategy,
                 key=ctx.signing_key, scope=scope.tenants)
    _record_lineage(scope, strategy, store_rows, base)
    return StepOutput(
        outcomes=outcomes, tables_written=[ctx.tables.model_store.display] if store_rows else [],
        mlflow_run_id=tracked.mlflow_run_id,
        summary={"models_trained": len(store_rows), "strategy": strategy,
                 **({"base_model": f"{base['name']}/{base['version']}"} if base else {}),
                 "models_registered": sorted(f"{r.name}/{r.version}" for r in tracked.registered.values())[:20]},
    )


def _record_lineage(scope: StepScope, strategy: str, store_rows: list[dict[str, Any]],
                    base: dict[str, Any] | None) -> None:
    """Each candidate learned from its tenant's rows; a tuned one also from every contributor of
    its base model, copied here so a taint check never walks a chain (io/lineage.py)."""
    from tenantml.io.lineage import Contribution, ModelLineage, contributions_of, record_lineage

    ctx = scope.ctx
    inherited = contributions_of(ctx.spark, ctx.tables.model_lineage, (base["name"], str(base["version"]))) \
        if base else []
    source = scope.input_ref.display if scope.input_ref else None
    record_lineage(ctx.spark, ctx.tables.model_lineage, [ModelLineage(
        scope.dataset, r["model_name"], str(r["model_version"]), strategy, r["tenant_id"],
        (Contribution(r["tenant_id"], int(r["train_rows"]), source, scope.input_version),
         *(c for c in inherited if c.tenant_id != r["tenant_id"])),
        inherited_from=f"{base['name']}/{base['version']}" if base else None) for r in store_rows],
        key=ctx.signing_key, run_id=ctx.run_id)


def skip_all(scope: StepScope, reason: str) -> StepOutput:
    """Every eligible tenant skipped for one reason (the strategy is off, no base model, ...)."""
    return StepOutput(outcomes=[scope.skipped(t, reason) for t in scope.eligible],
                      summary={"models_trained": 0, "reason": reason})
