"""score: every eligible tenant with its own entitled champion, in one distributed job, atomically."""

from __future__ import annotations

from tenantml.core.ids import shared_model_name
from tenantml.core.policy import entitled
from tenantml.io.spark import SparkTaskProgress, default_parallelism
from tenantml.registry.tracking import champion_versions
from tenantml.scoring.batch import ServingModel, dict_sum_param, score_frame, scoring_slices
from tenantml.steps.base import StepOutput, StepScope, TenantOutcome, step


@step(name="score", help="score every eligible tenant with its champion", after=("promote",),
      reads=("silver", "tenants", "model_store", "registry"), writes=("predictions",), measured=True)
def run(scope: StepScope) -> StepOutput:
    from pyspark.sql import functions as F

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    silver, elig_rows = scope.input, scope.rows
    spark = ctx.spark
    outcomes: list[TenantOutcome] = []
    scope.phase(f"looking up champions for {len(scope.eligible)} tenants")
    champions = champion_versions(ctx, name, scope.eligible)
    policies = scope.policies
    shared_name = shared_model_name(ctx.config.tracking.model_name_prefix, name)
    wanted: dict[str, tuple[str, str]] = {}
    for t in scope.eligible:
        mv = champions.get(t)
        if mv is None:
            outcomes.append(TenantOutcome(tenant_id=t, status="skipped", rows_in=elig_rows[t],
                                          detail={"reason": "no champion model registered"}))
            continue
        refusal = entitled(t, dict(mv.tags), policies[t], shared_name)
        if refusal:
            outcomes.append(TenantOutcome(tenant_id=t, status="failed", rows_in=elig_rows[t], error=refusal))
            continue
        wanted[t] = (mv.name, str(mv.version))
    stored = scope.tenants.load_models(wanted)
    blobs: dict[bytes, bytes] = {}
    models: dict[str, ServingModel] = {}
    for r in stored.itertuples(index=False):
        if r.strategy != dict(champions[r.tenant_id].tags).get("strategy", "tenant"):
            outcomes.append(TenantOutcome(tenant_id=r.tenant_id, status="failed", rows_in=elig_rows[r.tenant_id],
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
        outcomes.append(TenantOutcome(tenant_id=t, status="failed", rows_in=elig_rows[t],
                                      error=f"champion {wanted[t][0]} v{wanted[t][1]} is missing from "
                                            f"{ctx.tables.model_store.display}"))
    pred_ref = ctx.tables.predictions(name)
    scored_counts: dict[str, int] = {}
    task_seconds: dict[str, float] = {}
    if models:
        ctx.progress.phase(f"score {name}: scoring {sum(elig_rows[t] for t in models)} rows "
                           f"of {len(models)} tenants")
        sc = ctx.config.scoring
        parts = sc.parallelism or default_parallelism(spark)
        quotas = ctx.config.training.tenant_quotas
        slices = scoring_slices({t: elig_rows[t] for t in models}, parts,
                                {t: quotas[t].scoring_concurrency for t in models if t in quotas},
                                sc.tenant_concurrency, sc.rows_per_slice)
        costs = spark.sparkContext.accumulator({}, dict_sum_param())
        preds = score_frame(spark, silver, models, key=spec.entity_key, task=spec.task, run_id=ctx.run_id,
                            device=sc.device, partitions=parts, cost_accumulator=costs,
                            features=spec.feature_columns, slices=slices)
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(ctx.config.scoring.arrow_batch_size))
        preds = preds.withColumn("scored_at", F.current_timestamp())
        with SparkTaskProgress(spark, ctx.progress, "scoring tasks"):
            scope.tenants.write(preds, pred_ref, list(models))
        written = scope.tenants.read(pred_ref).where(F.col("tenant_id").isin(list(models)))
        scored_counts = {r["tenant_id"]: int(r["n"]) for r in
                         written.groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
        task_seconds = dict(costs.value)
    for t, m in sorted(models.items()):
        n = scored_counts.get(t, 0)
        outcomes.append(TenantOutcome(tenant_id=t, status="ok", rows_in=elig_rows[t], rows_out=n,
                                      seconds=task_seconds.get(t, 0.0),
                                      detail={"model": f"{m.model_name}/{m.model_version}",
                                              "strategy": m.strategy, "scoring_tasks_max": slices[t]}))
    return StepOutput(outcomes=outcomes, tables_written=[pred_ref.display] if models else [],
                      summary={"rows_scored": sum(scored_counts.values())})
