"""Score: every eligible tenant with its own champion, in one distributed job, atomically per run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tenantml.pipeline.eligibility import open_step
from tenantml.pipeline.ledger import dict_sum_param
from tenantml.pipeline.result import StepResult, TenantOutcome
from tenantml.progress import SparkTaskProgress
from tenantml.registry.tracking import champion_versions, shared_model_name
from tenantml.scoring.batch import ServingModel, score_frame, scoring_slices
from tenantml.tenants import TenantPolicy, tenant_policies

if TYPE_CHECKING:
    from tenantml.context import JobContext


def entitled(tenant_id: str, version_tags: dict[str, str], policy: TenantPolicy | None = None,
             shared_name: str | None = None) -> str | None:
    """None when the tenant may be served by this version, else why not.

    Checked at scoring time whatever the registry's alias says: a version registered for another
    tenant is refused; a shared or tuned-shared version is refused for a tenant that does not
    consent to models trained on other tenants' data; a "shared" version must derive from the
    dataset's shared model.
    """
    owner = version_tags.get("tenant_id")
    strategy = version_tags.get("strategy", "tenant")
    if owner != tenant_id:
        return f"champion of tenant {tenant_id!r} was registered for tenant {owner!r}: refused"
    if strategy not in ("tenant", "shared", "tuned"):
        return f"champion of tenant {tenant_id!r} has unknown strategy {strategy!r}: refused"
    if strategy in ("shared", "tuned"):
        if policy is not None and not policy.consent_shared_inference:
            return (f"champion of tenant {tenant_id!r} is a {strategy} model, but the tenant does not consent "
                    f"to models trained on other tenants' data (consent_shared_inference=false): refused")
        if shared_name is not None and version_tags.get("base_model") != shared_name:
            return (f"champion of tenant {tenant_id!r} claims strategy {strategy!r} but derives from "
                    f"{version_tags.get('base_model')!r}, not {shared_name!r}: refused")
    return None


def score(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None) -> StepResult:
    from pyspark.sql import functions as F

    started = time.perf_counter()
    name, spec, _, version, silver, elig, outcomes, scope = open_step(ctx, dataset, tenants, "score")
    spark = ctx.spark
    ctx.progress.phase(f"score {name}: looking up champions for {len(elig.eligible)} tenants")
    champions = champion_versions(ctx, name, elig.eligible)
    policies = tenant_policies(spark, ctx.tables.tenants, elig.eligible, ctx.config.tenants)
    shared_name = shared_model_name(ctx.config.tracking.model_name_prefix, name)
    wanted: dict[str, tuple[str, str]] = {}
    for t in elig.eligible:
        mv = champions.get(t)
        if mv is None:
            outcomes.append(TenantOutcome(tenant_id=t, status="skipped", rows_in=elig.rows[t],
                                          detail={"reason": "no champion model registered"}))
            continue
        refusal = entitled(t, dict(mv.tags), policies[t], shared_name)
        if refusal:
            outcomes.append(TenantOutcome(tenant_id=t, status="failed", rows_in=elig.rows[t], error=refusal))
            continue
        wanted[t] = (mv.name, str(mv.version))
    stored = scope.load_models(wanted)
    blobs: dict[bytes, bytes] = {}
    models: dict[str, ServingModel] = {}
    for r in stored.itertuples(index=False):
        if r.strategy != dict(champions[r.tenant_id].tags).get("strategy", "tenant"):
            outcomes.append(TenantOutcome(tenant_id=r.tenant_id, status="failed", rows_in=elig.rows[r.tenant_id],
                                          error=f"model store row of {r.model_name} v{r.model_version} says "
                                                f"strategy {r.strategy!r}, the registry disagrees: refused"))
            continue
        blob = bytes(r.model)
        # One object per distinct model: the broadcast pickles it once and each task loads it once.
        blob = blobs.setdefault(blob, blob)
        models[r.tenant_id] = ServingModel(r.tenant_id, r.model_name, r.model_version, r.strategy,
                                           r.mlflow_run_id, blob)
    refused_now = {o.tenant_id for o in outcomes if o.status == "failed"}
    for t in sorted(set(wanted) - set(models) - refused_now):
        outcomes.append(TenantOutcome(tenant_id=t, status="failed", rows_in=elig.rows[t],
                                      error=f"champion {wanted[t][0]} v{wanted[t][1]} is missing from "
                                            f"{ctx.tables.model_store.display}"))
    pred_ref = ctx.tables.predictions(name)
    scored_counts: dict[str, int] = {}
    task_seconds: dict[str, float] = {}
    if models:
        ctx.progress.phase(f"score {name}: scoring {sum(elig.rows[t] for t in models)} rows "
                           f"of {len(models)} tenants")
        sc = ctx.config.scoring
        parts = sc.parallelism or spark.sparkContext.defaultParallelism
        quotas = ctx.config.training.tenant_quotas
        slices = scoring_slices({t: elig.rows[t] for t in models}, parts,
                                {t: quotas[t].scoring_concurrency for t in models if t in quotas},
                                sc.tenant_concurrency, sc.rows_per_slice)
        costs = spark.sparkContext.accumulator({}, dict_sum_param())
        preds = score_frame(spark, silver, models, key=spec.entity_key, task=spec.task, run_id=ctx.run_id,
                            device=sc.device, partitions=parts, cost_accumulator=costs,
                            features=spec.feature_columns, slices=slices)
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(ctx.config.scoring.arrow_batch_size))
        preds = preds.withColumn("scored_at", F.current_timestamp())
        with SparkTaskProgress(spark, ctx.progress, "scoring tasks"):
            scope.write(preds, pred_ref, list(models))
        written = scope.read(pred_ref).where(F.col("tenant_id").isin(list(models)))
        scored_counts = {r["tenant_id"]: int(r["n"]) for r in
                         written.groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
        task_seconds = dict(costs.value)
    for t, m in sorted(models.items()):
        n = scored_counts.get(t, 0)
        outcomes.append(TenantOutcome(tenant_id=t, status="ok", rows_in=elig.rows[t], rows_out=n,
                                      seconds=task_seconds.get(t, 0.0),
                                      detail={"model": f"{m.model_name}/{m.model_version}",
                                              "strategy": m.strategy, "scoring_tasks_max": slices[t]}))
    outcomes.sort(key=lambda o: o.tenant_id or "")
    return StepResult(step="score", dataset=name, run_id=ctx.run_id, tenants=outcomes,
                      tables_written=[pred_ref.display] if models else [],
                      seconds=time.perf_counter() - started,
                      summary={"rows_scored": sum(scored_counts.values()), "silver_version": version})
