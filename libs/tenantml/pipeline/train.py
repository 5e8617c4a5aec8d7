"""Train: one tenant-specific model per eligible tenant, in parallel, tracked and registered."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tenantml.context import git_commit
from tenantml.io import read_table, table_version
from tenantml.pipeline.eligibility import eligible_tenants, excluded_outcomes
from tenantml.pipeline.result import StepResult, TenantOutcome
from tenantml.progress import SparkTaskProgress
from tenantml.registry.store import write_models
from tenantml.registry.tracking import promote, track_training
from tenantml.tenancy import validate_tenant_ids
from tenantml.training.tenant_models import train_tenant_models

if TYPE_CHECKING:
    from tenantml.context import JobContext

STRATEGY = "tenant"


def train(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None) -> StepResult:
    started = time.perf_counter()
    validate_tenant_ids(tenants or [], where="--tenants")  # before any Spark work
    name, spec = ctx.config.dataset(dataset)
    cfg = ctx.config.training
    spark = ctx.spark
    silver_ref = ctx.tables.silver(name)
    version = table_version(spark, silver_ref)  # pinned: every task reads the same snapshot
    silver = read_table(spark, silver_ref, version=version)
    elig = eligible_tenants(ctx, name, silver, tenants)
    outcomes = excluded_outcomes(elig)
    trainable: dict[str, int] = {}
    for t in elig.eligible:
        n = elig.rows[t]
        if n < cfg.min_rows:
            outcomes.append(TenantOutcome(tenant_id=t, status="skipped", rows_in=n, detail={
                "reason": f"{n} rows, below training.min_rows={cfg.min_rows}"}))
        else:
            trainable[t] = n
    ctx.progress.phase(f"train {name}: {len(trainable)} tenant models on "
                       f"{spark.sparkContext.defaultParallelism} cores (silver v{version})")
    with SparkTaskProgress(spark, ctx.progress, "training tasks"):
        results = train_tenant_models(spark, silver.where(silver.tenant_id.isin(list(trainable)))
                                      if trainable else silver.limit(0), trainable, spec, cfg)
    lineage = {"delta_table": silver_ref.display, "delta_version": version, "git_commit": git_commit(),
               "config_hash": ctx.config.config_hash()}
    params = {"dataset": name, "strategy": STRATEGY, "task": spec.task, "min_rows": cfg.min_rows,
              "hidden_units": cfg.hidden_units, "learning_rate": cfg.learning_rate,
              "max_epochs": cfg.max_epochs, "patience": cfg.patience, "batch_size": cfg.batch_size,
              "test_fraction": cfg.test_fraction, "tenants_requested": len(elig.rows)}
    tracked = track_training(ctx, name, results, strategy=STRATEGY, params=params, lineage=lineage)

    store_rows = []
    for r in results.itertuples(index=False):
        if r.status != "ok":
            outcomes.append(TenantOutcome(tenant_id=r.tenant_id, status="failed", rows_in=int(r.rows),
                                          seconds=float(r.seconds), error=r.error,
                                          detail={"attempts": int(r.attempts)}))
            continue
        reg = tracked.registered[r.tenant_id]
        store_rows.append({
            "dataset": name, "tenant_id": r.tenant_id, "strategy": STRATEGY, "model_name": reg.name,
            "model_version": reg.version, "mlflow_run_id": tracked.mlflow_run_id, "run_id": ctx.run_id,
            "metric_name": r.metric_name, "metric": float(r.metric), "baseline_metric": float(r.baseline_metric),
            "metrics_json": r.metrics_json, "train_rows": int(r.train_rows), "delta_version": version,
            "git_commit": lineage["git_commit"], "config_hash": lineage["config_hash"], "model": bytes(r.model),
        })
        outcomes.append(TenantOutcome(
            tenant_id=r.tenant_id, status="ok", rows_in=int(r.rows), rows_out=int(r.train_rows),
            seconds=float(r.seconds),
            detail={"model": f"models:/{reg.name}@{ctx.config.tracking.champion_alias}",
                    "attempts": int(r.attempts),
                    **({"sampled_from": int(r.sampled_from)} if r.sampled_from == r.sampled_from
                       and r.sampled_from is not None else {}),
                    "version": reg.version, r.metric_name: round(float(r.metric), 4),
                    f"baseline_{r.metric_name}": round(float(r.baseline_metric), 4), "epochs": int(r.epochs)}))
    write_models(spark, ctx.tables.model_store, store_rows, name, ctx.run_id)
    promote(ctx, tracked.registered.values())
    outcomes.sort(key=lambda o: o.tenant_id or "")
    return StepResult(
        step="train", dataset=name, run_id=ctx.run_id, tenants=outcomes,
        tables_written=[ctx.tables.model_store.display] if store_rows else [],
        mlflow_run_id=tracked.mlflow_run_id, seconds=time.perf_counter() - started,
        summary={"models_trained": len(store_rows), "silver_version": version,
                 "models_registered": sorted(f"{r.name}/{r.version}" for r in tracked.registered.values())[:20]},
    )
