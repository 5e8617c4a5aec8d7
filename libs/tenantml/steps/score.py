"""score: each tenant's new batches of rows to score, with its entitled champion, in one job.

Predictions are history: keyed by (tenant, entity key, scoring batch), a batch is written once
(a rerun replaces exactly that batch) and earlier batches stay. `latest_predictions_<ds>` holds
each entity's latest prediction for BI. After scoring, the PSI of each batch's scores against the
champion's training scores (prediction drift) goes to `monitoring_<ds>`, with the feature drift of
any batch the monitor step had no champion to measure against (a tenant's first batch).

The champion is read from the registry per tenant and checked at scoring time whatever the alias
says (its owner, strategy and consent: `core.policy.entitled`), and its model store row is
verified (signature and digest, against the registry version's digest) before any row meets it.
"""

from __future__ import annotations

import json
from typing import Any

from tenantml.core.ids import shared_model_name
from tenantml.core.policy import entitled
from tenantml.io.delta import read_table, table_exists
from tenantml.io.model_store import digests, verify
from tenantml.io.spark import SparkTaskProgress, default_parallelism
from tenantml.monitoring import SCORE_FEATURE, drift_by_tenant
from tenantml.registry.tracking import champion_versions
from tenantml.scoring.batch import ServingModel, score_frame, scoring_slices
from tenantml.steps.base import Option, StepOutput, StepScope, TenantOutcome, step
from tenantml.steps.monitor import drift_status, feature_confidence, feature_drift, write_monitoring


def pending_batches(scope: StepScope) -> dict[str, list[str]]:
    """Per eligible tenant, its batches of rows to score that have no predictions yet (with
    ``--rescore``: its latest batch, scored again with today's champion)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ctx, name = scope.ctx, scope.dataset
    rows = scope.input.select("tenant_id", "_batch_id", "_ingested_at").groupBy("tenant_id", "_batch_id").agg(
        F.max("_ingested_at").alias("_at"))
    if scope.options.get("rescore"):
        w = Window.partitionBy("tenant_id").orderBy(F.col("_at").desc(), F.col("_batch_id").desc())
        latest = rows.withColumn("_n", F.row_number().over(w)).where("_n = 1")
        return {r["tenant_id"]: [r["_batch_id"]] for r in latest.collect()}
    rows = rows.select("tenant_id", "_batch_id")
    pred_ref = ctx.tables.predictions(name)
    if table_exists(ctx.spark, pred_ref) and "batch_id" in read_table(ctx.spark, pred_ref).columns:
        done = scope.tenants.read(pred_ref).select("tenant_id", F.col("batch_id").alias("_batch_id")).distinct()
        rows = rows.join(done, ["tenant_id", "_batch_id"], "left_anti")
    out: dict[str, list[str]] = {}
    for r in rows.collect():
        out.setdefault(r["tenant_id"], []).append(r["_batch_id"])
    return {t: sorted(b) for t, b in out.items()}


@step(name="score", help="score each tenant's new batch of rows to score with its champion", after=("promote",),
      reads=("scoring", "tenants", "model_store", "registry", "monitoring", "model_lineage"), skip_unchanged=True,
      writes=("predictions", "latest_predictions", "monitoring"), eligibility="inference", measured=True,
      options=(Option("--rescore", "rescore", "score each tenant's latest batch again (e.g. after a promotion), "
                                              "replacing its predictions", switch=True, forces_run=True),))
def run(scope: StepScope) -> StepOutput:
    from pyspark.sql import functions as F

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    spark = ctx.spark
    if scope.input_ref is None or scope.input_version is None:
        why = ("no rows to score yet: declare the dataset's scoring_source (rows without labels) and run "
               "ingest-scoring and validate-scoring, or run `tenantml score --source PATH`")
        return StepOutput(summary={"rows_scored": 0, "reason": why})
    outcomes: list[TenantOutcome] = []
    pending = pending_batches(scope)
    for t in scope.eligible:
        if t not in pending:
            outcomes.append(scope.skipped(t, "every batch of rows to score is scored already"))
    todo = sorted(pending)
    scope.phase(f"looking up champions for {len(todo)} tenants with new rows to score")
    champions = champion_versions(ctx, name, todo)
    shared_name = shared_model_name(ctx.config.tracking.model_name_prefix, name)
    wanted: dict[str, tuple[str, str]] = {}
    for t in todo:
        mv = champions.get(t)
        if mv is None:
            outcomes.append(scope.skipped(t, "no champion model registered"))
            continue
        refusal = entitled(t, dict(mv.tags), scope.policies[t], shared_name)
        if refusal:
            outcomes.append(scope.failed(t, refusal))
            continue
        wanted[t] = (mv.name, str(mv.version))
    taint_notes = _tainted_champions(scope, wanted, champions, outcomes)
    rows_df = scope.tenants.model_rows(wanted) if wanted else None
    stored = {r["tenant_id"]: r for r in digests(rows_df)} if rows_df is not None else {}
    models: dict[str, ServingModel] = {}
    profiles: dict[str, dict[str, Any]] = {}
    for t, (mname, version) in sorted(wanted.items()):
        r = stored.get(t)
        tags = dict(champions[t].tags)
        if r is None:
            outcomes.append(scope.failed(t, f"champion {mname} v{version} is missing from {ctx.tables.model_store.display}"))
            continue
        problem = verify(r, ctx.signing_key, tags)
        if problem is None and r["strategy"] != tags.get("strategy", "tenant"):
            problem = (f"model store row of {mname} v{version} says strategy {r['strategy']!r}, the registry "
                       f"disagrees: refused")
        if problem:
            outcomes.append(scope.failed(t, problem))
            continue
        models[t] = ServingModel(t, mname, version, r["strategy"], r["mlflow_run_id"])
        if r.get("profile_json"):
            profiles[t] = json.loads(r["profile_json"])
    pred_ref, latest_ref = ctx.tables.predictions(name), ctx.tables.latest_predictions(name)
    batches = sorted({b for t in models for b in pending[t]})
    rows_of = {t: 0 for t in models}
    slices: dict[str, int] = {}
    scored_counts: dict[str, int] = {}
    task_seconds: dict[str, float] = {}
    written: list[str] = []
    if models:
        data = scope.input.where(F.col("_batch_id").isin(batches))
        for cnt in data.where(F.col("tenant_id").isin(list(models))).groupBy("tenant_id").agg(
                F.count(F.lit(1)).alias("n")).collect():
            rows_of[cnt["tenant_id"]] = int(cnt["n"])
        scope.phase(f"scoring {sum(rows_of.values())} rows of {len(models)} tenants ({len(batches)} batch(es))")
        sc = ctx.config.scoring
        parts = sc.parallelism or default_parallelism(spark)
        quotas = ctx.config.training.tenant_quotas
        slices = scoring_slices(rows_of, parts, {t: quotas[t].scoring_concurrency for t in models if t in quotas},
                                sc.tenant_concurrency, sc.rows_per_slice)
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(sc.arrow_batch_size))
        model_rows = rows_df.where(F.col("tenant_id").isin(list(models))).select(  # type: ignore[union-attr]
            "tenant_id", F.col("model").alias("_model"))
        preds = score_frame(data, model_rows, models, key=spec.entity_key, features=spec.feature_columns,
                            task=spec.task, run_id=ctx.run_id, device=sc.device, partitions=parts, slices=slices)
        preds = preds.withColumn("scored_at", F.current_timestamp()).localCheckpoint(eager=True)
        with SparkTaskProgress(spark, ctx.progress, "scoring tasks"):
            batch_in = "batch_id IN (" + ", ".join(f"'{b}'" for b in batches) + ")"  # content hashes (hex)
            scope.tenants.write(preds.drop("_seconds"), pred_ref, list(models), extra_predicate=batch_in)
        written.append(pred_ref.display)
        per = {r["tenant_id"]: (int(r["n"]), float(r["s"] or 0.0)) for r in preds.groupBy("tenant_id").agg(
            F.count(F.lit(1)).alias("n"), F.sum("_seconds").alias("s")).collect()}
        scored_counts = {t: n for t, (n, _) in per.items()}
        task_seconds = {t: s for t, (_, s) in per.items()}
        _write_latest(scope, pred_ref, latest_ref, list(models))
        written.append(latest_ref.display)
        scope.phase("prediction drift, and feature drift of batches the monitor had no champion for")
        if _monitor_scored(scope, preds, profiles, models, batches):
            written.append(ctx.tables.monitoring(name).display)
        preds.unpersist()
    for t, m in sorted(models.items()):
        outcomes.append(TenantOutcome(tenant_id=t, status="ok", rows_in=rows_of.get(t, 0),
                                      rows_out=scored_counts.get(t, 0), seconds=task_seconds.get(t, 0.0),
                                      detail={"model": f"{m.model_name}/{m.model_version}", "strategy": m.strategy,
                                              "batches": pending[t], "scoring_tasks_max": slices[t],
                                              **({"tainted": taint_notes[t]} if t in taint_notes else {})}))
    summary: dict[str, Any] = {"rows_scored": sum(scored_counts.values()), "batches": batches}
    if taint_notes:
        summary["tainted"] = {t: taint_notes[t] for t in sorted(taint_notes)[:50]}
    if not models and not scope.eligible and scope.excluded:
        blocked = {t: e.reason for t, e in scope.excluded.items() if e.status == "blocked"}
        if blocked and len(blocked) == len(scope.excluded):
            summary["reason"] = (f"no tenant was scored: all {len(blocked)} with rows to score were blocked by "
                                 f"validation ({'; '.join(sorted(blocked.values())[:3])})")
    return StepOutput(outcomes=outcomes, tables_written=written, summary=summary)


def _tainted_champions(scope: StepScope, wanted: dict[str, tuple[str, str]], champions: dict[str, Any],
                       outcomes: list[TenantOutcome]) -> dict[str, str]:
    """Champions that learned from a tenant that withdrew consent or was offboarded, until the next
    run replaces them: with `retraining.tainted_models: fall_back` their tenants are scored with
    their own latest tenant-specific model, or not at all; with keep_serving they serve, flagged.
    Changes ``wanted``/``champions`` in place; returns tenant -> what its summary says."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from tenantml.io.lineage import taints

    ctx = scope.ctx
    found = taints(ctx.spark, ctx.tables.model_lineage, ctx.tables.tenants, set(wanted.values()), key=ctx.signing_key)
    bad = {t: found[m] for t, m in wanted.items() if m in found}
    if not bad:
        return {}
    notes: dict[str, str] = {}
    if ctx.config.retraining.tainted_models == "keep_serving":
        for t, taint in bad.items():
            notes[t] = (f"champion {wanted[t][0]}/{wanted[t][1]} was {taint.describe()}; kept serving "
                        "(retraining.tainted_models=keep_serving) until it is retrained")
        return notes
    w = Window.partitionBy("tenant_id").orderBy(F.col("created_at").desc(), F.col("model_version").cast("long").desc())
    own = {r["tenant_id"]: (r["model_name"], str(r["model_version"])) for r in
           scope.tenants.read(ctx.tables.model_store)
           .where((F.col("dataset") == scope.dataset) & (F.col("strategy") == "tenant")
                  & F.col("tenant_id").isin(sorted(bad)))
           .withColumn("_n", F.row_number().over(w)).where("_n = 1").select("tenant_id", "model_name", "model_version")
           .collect()}
    for t, taint in sorted(bad.items()):
        was = f"{wanted[t][0]}/{wanted[t][1]}"
        if t in own:
            wanted[t] = own[t]
            champions[t] = ctx.mlflow.get_model_version(*own[t])
            notes[t] = f"champion {was} was {taint.describe()}; scored with its own model {own[t][0]}/{own[t][1]}"
        else:
            del wanted[t]
            outcomes.append(scope.skipped(t, f"champion {was} was {taint.describe()} and the tenant has no model of "
                                             "its own to fall back to (retraining.tainted_models=fall_back)"))
    return notes


def _write_latest(scope: StepScope, pred_ref: Any, latest_ref: Any, tenants: list[str]) -> None:
    """Each entity's latest prediction of these tenants, rewritten per tenant in one commit."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("tenant_id", "entity_key").orderBy(F.col("scored_at").desc(), F.col("batch_id").desc())
    latest = (scope.tenants.read(pred_ref).where(F.col("tenant_id").isin(tenants))
              .withColumn("_n", F.row_number().over(w)).where("_n = 1").drop("_n"))
    scope.tenants.write(latest, latest_ref, tenants)


def _monitor_scored(scope: StepScope, preds: Any, profiles: dict[str, dict[str, Any]],
                    models: dict[str, ServingModel], batches: list[str]) -> bool:
    """Monitoring rows of the batches just scored: prediction drift of each (tenant, batch), and the
    feature drift of those the monitor step did not measure (a tenant's first batch, scored by a
    champion promoted in this very run), against the model that scored them."""
    serving = {t: (m.model_name, m.model_version, profiles[t]) for t, m in models.items() if t in profiles}
    return write_monitoring(scope, [*_prediction_drift(scope, preds, profiles, models),
                                    *feature_drift(scope, serving, batches)])


def _prediction_drift(scope: StepScope, preds: Any, profiles: dict[str, dict[str, Any]],
                      models: dict[str, ServingModel]) -> list[dict[str, Any]]:
    """PSI of each (tenant, batch)'s scores against its champion's scores on its training rows."""
    from pyspark.sql import functions as F

    have = [t for t in models if profiles.get(t, {}).get("prediction")]
    if not have:
        return []
    cfg = scope.ctx.config.monitoring
    keyed = preds.where(F.col("tenant_id").isin(have)).withColumn("_tb", F.concat_ws("\x1f", "tenant_id", "batch_id"))
    groups = [r["_tb"] for r in keyed.select("_tb").distinct().collect()]
    report = drift_by_tenant(keyed, {g: profiles[g.split("\x1f", 1)[0]] for g in groups}, [], [], "score",
                             tenant_col="_tb", confidence=feature_confidence(cfg, 1))
    rows: list[dict[str, Any]] = []
    for r in report.itertuples(index=False):
        t, b = str(r.tenant_id).split("\x1f", 1)
        m = models[t]
        rows.append({"tenant_id": t, "batch_id": b, "kind": "prediction", "feature": SCORE_FEATURE,
                     "psi": float(r.psi), "status": drift_status(float(r.psi), int(r.rows), cfg, float(r.noise_psi)),
                     "rows": int(r.rows), "missing_share": float(r.missing_share), "model_name": m.model_name,
                     "model_version": m.model_version})
    return rows
