"""publish: the gold star schema for BI, rewritten idempotently per tenant.

- `gold_<ds>_prediction_fact`: one row per (tenant, entity key, scoring run), partitioned by
  tenant; every scoring run published is kept, so reports can trend scores over runs.
- `gold_tenant_dim`, `gold_<ds>_model_dim`, `gold_date_dim`: what the fact's keys point at.

Dimensions are written before the fact, so a reader never sees a fact whose key is not in its
dimension. Column contracts are in docs/data-contracts.md; builders in `tenantml.gold.star`.
"""

from __future__ import annotations

from typing import Any

from tenantml.core.errors import UnknownTenantError
from tenantml.core.ids import (
    SHARED_ID,
    TENANT_ID_JAVA_REGEX,
    model_name,
    tenant_in_predicate,
    validate_run_id,
)
from tenantml.gold.star import (
    MODEL_DIM_SCHEMA,
    TENANT_DIM_SCHEMA,
    checked,
    extend_date_dim,
    holds,
    model_dim,
    model_dim_rows,
    prediction_fact,
    published_runs,
    scoring_runs,
    tenant_dim,
)
from tenantml.io.delta import read_table, table_exists, table_version
from tenantml.io.spark import local_frame
from tenantml.registry.tracking import champion_versions, shared_champion, version_tags
from tenantml.steps.base import StepOutput, StepScope, TenantOutcome, step


@step(name="publish", help="write the gold star schema for BI (prediction facts, tenant/model/date dims)",
      after=("score",), reads=("predictions", "tenants", "model_store", "registry"),
      writes=("gold_prediction_fact", "gold_tenant_dim", "gold_model_dim", "gold_date_dim"),
      eligibility="own", resumable=False, skip_unchanged=True)
def run(scope: StepScope) -> StepOutput:
    from pyspark.sql import functions as F

    ctx, name = scope.ctx, scope.dataset
    wanted: list[str] | None = list(scope.requested) if scope.requested else None
    spark = ctx.spark
    t = ctx.tables
    pred_ref, fact_ref, model_ref = t.predictions(name), t.gold_prediction_fact(name), t.gold_model_dim(name)
    scope.phase("reading predictions, models and tenants")
    if not table_exists(spark, pred_ref):
        return StepOutput(summary={"fact_rows": 0, "reason": f"nothing to publish: {pred_ref.display} does not "
                                                              f"exist yet (no tenant has been scored)"})

    pred_version = table_version(spark, pred_ref)  # one snapshot for the counts and the facts
    preds = (read_table(spark, pred_ref, version=pred_version)
             .where(F.col("tenant_id").rlike(TENANT_ID_JAVA_REGEX)))
    if wanted:
        preds = preds.where(F.col("tenant_id").isin(wanted))
    # One small aggregate tells per tenant: rows, scoring runs, models used and the date range.
    groups = (preds.groupBy("tenant_id", "run_id", "model_name", "model_version")
              .agg(F.count(F.lit(1)).alias("n"), F.min(F.to_date("scored_at")).alias("first"),
                   F.max(F.to_date("scored_at")).alias("last"), F.max("scored_at").alias("scored_at"))
              .collect())
    # Dimensions first: a reader never sees a fact whose key is missing from its dimension. They
    # are small: built once on the driver, checked, then written from exactly the rows checked.
    tenant_rows = checked(tenant_dim(spark, t.tenants, wanted), "tenant_key", "tenant_id", table=t.gold_tenant_dim)
    registered = {r["tenant_id"] for r in tenant_rows}
    predicted = {g["tenant_id"] for g in groups}
    if wanted:
        missing = sorted(set(wanted) - registered - predicted)
        if missing:
            raise UnknownTenantError(f"{t.tenants.display} and {pred_ref.display} hold no tenant(s) {missing}")
    acting: list[str] = list(wanted) if wanted else sorted(registered | predicted)
    tenants = scope.acting_for(acting)
    in_dim = sorted(registered)
    written_to: list[str] = []
    if in_dim and not holds(spark, t.gold_tenant_dim, tenant_rows, F.col("tenant_id").isin(in_dim)):
        tenants.write(local_frame(spark, tenant_rows, TENANT_DIM_SCHEMA), t.gold_tenant_dim, in_dim,
                      partition_by=())
        written_to.append(t.gold_tenant_dim.display)

    store_rows = _store_rows(scope)
    prefix = ctx.config.tracking.model_name_prefix
    champions = {model_name(prefix, name, tid): str(mv.version)
                 for tid, mv in champion_versions(ctx, name, acting).items()}
    shared = shared_champion(ctx, name)
    if shared is not None:
        champions[shared.name] = str(shared.version)
    derived = {r["model_name"] for r in store_rows if r["strategy"] in ("tuned", "shared")
               and r["tenant_id"] != SHARED_ID}
    models = model_dim_rows(store_rows, champions, version_tags(ctx, derived))
    model_owners = sorted({m["tenant_id"] for m in models if m["tenant_id"]})
    if models:
        model_rows = checked(model_dim(spark, models), "model_key", "model_name", "model_version", table=model_ref)
        owned = F.col("tenant_id").isin(model_owners) | F.col("tenant_id").isNull()
        if not holds(spark, model_ref, model_rows, owned):
            tenants.write(local_frame(spark, model_rows, MODEL_DIM_SCHEMA), model_ref, model_owners,
                          partition_by=(), include_null=True)
            written_to.append(model_ref.display)
    known_models = {(m["model_name"], m["model_version_text"]) for m in models}

    outcomes: list[TenantOutcome] = []
    ok: dict[str, list[Any]] = {}
    by_tenant: dict[str, list[Any]] = {}
    for g in groups:
        by_tenant.setdefault(g["tenant_id"], []).append(g)
    for tid in acting:
        gs = by_tenant.get(tid, [])
        rows = sum(int(g["n"]) for g in gs)
        if not gs:
            outcomes.append(TenantOutcome(tenant_id=tid, status="skipped", detail={
                "reason": f"no predictions in {pred_ref.display}"}))
        elif tid not in registered:
            outcomes.append(TenantOutcome(tenant_id=tid, status="failed", rows_in=rows, error=(
                f"tenant {tid!r} has predictions in {pred_ref.display} but no row in {t.tenants.display}: "
                f"not published")))
        elif lost := sorted({f"{g['model_name']}/{g['model_version']}" for g in gs
                             if (g["model_name"], g["model_version"]) not in known_models}):
            outcomes.append(TenantOutcome(tenant_id=tid, status="failed", rows_in=rows, error=(
                f"predictions of tenant {tid!r} in {pred_ref.display} name model version(s) {lost} that "
                f"{t.model_store.display} does not hold: not published")))
        else:
            ok[tid] = gs

    written = 0
    if ok:
        scored = [g for gs in ok.values() for g in gs]
        if extend_date_dim(spark, t.gold_date_dim, min(g["first"] for g in scored), max(g["last"] for g in scored)):
            written_to.append(t.gold_date_dim.display)
        current = published_runs(spark, fact_ref, list(ok))
        stale = {tid: gs for tid, gs in ok.items()
                 if any(current.get((tid, run)) != v for run, v in scoring_runs(gs).items())}
        if stale:
            n_facts = sum(int(g["n"]) for gs in stale.values() for g in gs)
            scope.phase(f"writing {n_facts} facts of {len(stale)} tenants")
            runs: dict[str, list[str]] = {}
            for tid, gs in stale.items():
                for run in scoring_runs(gs):
                    runs.setdefault(validate_run_id(run), []).append(tid)
            # Per scoring run, its tenants: a rerun replaces exactly the rows it writes, and the
            # facts of the tenants' earlier scoring runs stay (the run is part of the grain).
            predicate = " OR ".join(f"(scoring_run_id = '{run}' AND {tenant_in_predicate(ids)})"
                                    for run, ids in sorted(runs.items()))
            facts = prediction_fact(preds.where(F.col("tenant_id").isin(list(stale))))
            tenants.write(facts, fact_ref, list(stale), extra_predicate=predicate)
            written_to.append(fact_ref.display)
        for tid, gs in sorted(ok.items()):
            n = sum(int(g["n"]) for g in gs)
            written += n
            outcomes.append(TenantOutcome(tenant_id=tid, status="ok", rows_in=n, rows_out=n, detail={
                "scoring_runs": sorted({g["run_id"] for g in gs}), "unchanged": tid not in stale,
                "models": sorted({f"{g['model_name']}/{g['model_version']}" for g in gs})}))
    return StepOutput(outcomes=outcomes, tables_written=written_to,
                      summary={"fact_rows": written, "models_published": len(models),
                               "tenants_published": len(in_dim), "predictions_version": pred_version})


def _store_rows(scope: StepScope) -> list[dict[str, Any]]:
    """The dataset's model_store rows of the scope's tenants and of the shared model, without the bytes."""
    from pyspark.sql import functions as F

    if not table_exists(scope.ctx.spark, scope.ctx.tables.model_store):
        return []
    df = (scope.tenants.read(scope.ctx.tables.model_store, shared=True)
          .where(F.col("dataset") == scope.dataset).drop("model"))
    return [r.asDict() for r in df.collect()]
