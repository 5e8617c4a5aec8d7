"""Train candidates per tenant: tenant-specific models, and the shared champion fine-tuned per tenant.

Both register versions in the tenant's own registered model and write `model_store`, but never
move the champion alias: that is the promote step's decision, made on the same holdout for all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tenantml.context import git_commit
from tenantml.pipeline.eligibility import open_step
from tenantml.pipeline.result import StepResult, TenantOutcome
from tenantml.progress import SparkTaskProgress
from tenantml.registry.store import write_models
from tenantml.registry.tracking import shared_champion_model, track_training
from tenantml.tenants import tenant_policies
from tenantml.training.tenant_models import train_tenant_models

if TYPE_CHECKING:
    from tenantml.context import JobContext


def train(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None) -> StepResult:
    """Tenant-specific candidates: one model per tenant trained only on its own rows."""
    return _train_candidates(ctx, "train", "tenant", dataset, tenants)


def train_tuned(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None) -> StepResult:
    """Tuned-shared candidates: the shared champion fine-tuned on each entitled tenant, in parallel."""
    return _train_candidates(ctx, "train_tuned", "tuned", dataset, tenants)


def _train_candidates(ctx: JobContext, step: str, strategy: str, dataset: str | None,
                      tenants: Sequence[str] | None) -> StepResult:
    started = time.perf_counter()
    name, spec, silver_ref, version, silver, elig, outcomes, scope = open_step(ctx, dataset, tenants, step)
    cfg = ctx.config.training
    spark = ctx.spark

    def skip_all(reason: str) -> StepResult:
        outcomes.extend(TenantOutcome(tenant_id=t, status="skipped", rows_in=elig.rows[t],
                                      detail={"reason": reason}) for t in elig.eligible)
        outcomes.sort(key=lambda o: o.tenant_id or "")
        return StepResult(step=step, dataset=name, run_id=ctx.run_id, tenants=outcomes,
                          seconds=time.perf_counter() - started, summary={"models_trained": 0, "reason": reason})

    if strategy not in cfg.strategies:
        return skip_all(f"strategy {strategy!r} is not in training.strategies")
    base: dict[str, Any] | None = None
    if strategy == "tuned":
        found = shared_champion_model(ctx, name)
        if found is None:
            return skip_all("no shared champion to fine-tune (train_shared has not produced one)")
        champ, blob = found
        if blob is None:
            return skip_all(f"shared champion {champ.name} v{champ.version} is missing from the model store")
        base = {"name": champ.name, "version": str(champ.version), "blob": blob}
    min_rows = cfg.tuned.min_rows if strategy == "tuned" else cfg.min_rows
    policies = tenant_policies(spark, ctx.tables.tenants, elig.eligible, ctx.config.tenants)
    trainable: dict[str, int] = {}
    for t in elig.eligible:
        n = elig.rows[t]
        if not policies[t].allows(strategy):
            p = policies[t]
            why = ("tenant refuses models trained on other tenants' data (consent_shared_inference=false)"
                   if strategy == "tuned" and not p.consent_shared_inference else f"tenant strategy is {p.strategy!r}")
            outcomes.append(TenantOutcome(tenant_id=t, status="skipped", rows_in=n, detail={"reason": why}))
        elif n < min_rows:
            key = "training.tuned.min_rows" if strategy == "tuned" else "training.min_rows"
            outcomes.append(TenantOutcome(tenant_id=t, status="skipped", rows_in=n, detail={
                "reason": f"{n} rows, below {key}={min_rows}"}))
        else:
            trainable[t] = n
    what = "tuned-shared" if strategy == "tuned" else "tenant"
    ctx.progress.phase(f"{step} {name}: {len(trainable)} {what} models on "
                       f"{spark.sparkContext.defaultParallelism} cores (silver v{version})")
    with SparkTaskProgress(spark, ctx.progress, "training tasks"):
        results = train_tenant_models(spark, silver.where(silver.tenant_id.isin(list(trainable)))
                                      if trainable else silver.limit(0), trainable, spec, cfg,
                                      base_model=base["blob"] if base else None)
    lineage: dict[str, Any] = {"delta_table": silver_ref.display, "delta_version": version,
                               "git_commit": git_commit(), "config_hash": ctx.config.config_hash()}
    params: dict[str, Any] = {"dataset": name, "strategy": strategy, "task": spec.task, "min_rows": min_rows,
                              "hidden_units": cfg.hidden_units, "learning_rate": cfg.learning_rate,
                              "max_epochs": cfg.max_epochs, "patience": cfg.patience,
                              "batch_size": cfg.batch_size, "test_fraction": cfg.test_fraction,
                              "tenants_requested": len(elig.rows)}
    version_tags: dict[str, str] = {}
    if base:
        version_tags = {"base_model": base["name"], "base_version": base["version"]}
        params.update({"tuned_" + k: v for k, v in cfg.tuned.model_dump().items()}, **version_tags)
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
            "metrics_json": r.metrics_json, "train_rows": int(r.train_rows), "delta_version": version,
            "git_commit": lineage["git_commit"], "config_hash": lineage["config_hash"], "model": bytes(r.model),
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
    write_models(spark, ctx.tables.model_store, store_rows, name, ctx.run_id, strategy=strategy, scope=scope)
    outcomes.sort(key=lambda o: o.tenant_id or "")
    return StepResult(
        step=step, dataset=name, run_id=ctx.run_id, tenants=outcomes,
        tables_written=[ctx.tables.model_store.display] if store_rows else [],
        mlflow_run_id=tracked.mlflow_run_id, seconds=time.perf_counter() - started,
        summary={"models_trained": len(store_rows), "silver_version": version, "strategy": strategy,
                 **({"base_model": f"{base['name']}/{base['version']}"} if base else {}),
                 "models_registered": sorted(f"{r.name}/{r.version}" for r in tracked.registered.values())[:20]},
    )
