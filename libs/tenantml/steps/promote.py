"""promote: per tenant, judge every candidate on one holdout and move `champion` only for a clear win.

Candidates are the latest tenant-specific and tuned versions of the tenant, the shared champion,
and the current champion itself, all evaluated in one Spark pass on the same holdout rows. A
challenger replaces the champion only when it beats it by `training.promotion_margin`, or when the
champion may no longer serve the tenant (its strategy setting or consent changed). Every decision
goes to the `promotions` table.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

from tenantml.core.ids import SHARED_ID
from tenantml.io.delta import table_exists
from tenantml.io.lineage import ModelLineage, contributions_of, record_lineage, taints
from tenantml.io.model_store import model_sha256, verify, write_models
from tenantml.registry.decisions import write_decisions
from tenantml.registry.tracking import (
    Registered,
    champion_versions,
    register_serving_version,
    set_champions,
    shared_champion_model,
)
from tenantml.steps.base import StepOutput, StepScope, TenantOutcome, step
from tenantml.training.evaluate import evaluate_candidates
from tenantml.training.selection import Candidate, decide, metric_standard_error


def _latest_candidates(scope: StepScope) -> dict[str, dict[str, Any]]:
    """tenant -> strategy -> newest model_store row (tenant and tuned strategies)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ref = scope.ctx.tables.model_store
    if not scope.eligible or not table_exists(scope.ctx.spark, ref):
        return {}
    w = Window.partitionBy("tenant_id", "strategy").orderBy(F.col("created_at").desc(),
                                                            F.col("model_version").cast("long").desc())
    rows = (scope.tenants.read(ref)
            .where((F.col("dataset") == scope.dataset) & F.col("strategy").isin("tenant", "tuned"))
            .withColumn("_rank", F.row_number().over(w)).where("_rank = 1").drop("_rank").collect())
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r["tenant_id"], {})[r["strategy"]] = r.asDict()
    return out


@step(name="promote", help="judge candidates on each tenant's holdout; move champions on a clear win",
      after=("train", "train_tuned"), reads=("silver", "tenants", "model_store", "registry", "model_lineage"),
      writes=("model_store", "promotions", "registry", "model_lineage"), gated=True, skip_unchanged=True)
def run(scope: StepScope) -> StepOutput:
    from tenantml.models import primary_metric

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    silver, version = scope.input, scope.input_version
    cfg = ctx.config.training
    spark = ctx.spark
    policies = scope.policies
    outcomes: list[TenantOutcome] = []
    elig_rows = scope.rows
    metric_name, higher = primary_metric(spec.task)  # type: ignore[arg-type]
    scope.phase(f"gathering candidates for {len(scope.eligible)} tenants")

    latest = _latest_candidates(scope)
    positive_share: dict[str, float] = {}  # tenant -> positives / rows of its holdout, as training saw it
    blobs: dict[str, bytes] = {}
    cands: dict[str, list[Candidate]] = {t: [] for t in scope.eligible}
    refused: dict[str, list[str]] = {}  # tenant -> why a stored model was not considered
    for t, by_strategy in latest.items():
        for s, r in by_strategy.items():
            problem = verify(r, ctx.signing_key)
            if problem:
                refused.setdefault(t, []).append(problem)
                continue
            c = Candidate(f"{r['model_name']}/{r['model_version']}", s, r["model_name"], r["model_version"], owner=t)
            cands[t].append(c)
            blobs[c.model_id] = bytes(r["model"])
            _note_holdout(positive_share, t, r.get("metrics_json"))
    found = shared_champion_model(ctx, name)
    shared_mv, shared_blob = (found.version, found.blob) if found is not None else (None, None)
    shared_run_id = shared_mv.run_id if shared_mv is not None else None
    if shared_mv is not None and shared_blob is not None:
        sc = Candidate(f"{shared_mv.name}/{shared_mv.version}", "shared", shared_mv.name, str(shared_mv.version),
                       source=str(shared_mv.source), owner=None, base_version=str(shared_mv.version))
        blobs[sc.model_id] = shared_blob
        for t in scope.eligible:
            cands[t].append(sc)
    champs = champion_versions(ctx, name, scope.eligible)
    champ_rows = scope.tenants.load_models({t: (mv.name, str(mv.version)) for t, mv in champs.items()})
    champions: dict[str, Candidate] = {}
    refused_champion: dict[str, str] = {}
    for r in champ_rows.itertuples(index=False):
        tags = dict(champs[r.tenant_id].tags)
        problem = verify(r, ctx.signing_key, tags)
        if problem:  # a champion whose stored row was changed may not serve: it is replaced
            refused.setdefault(r.tenant_id, []).append(problem)
            refused_champion[r.tenant_id] = r.model_name
            continue
        c = Candidate(f"{r.model_name}/{r.model_version}", r.strategy, r.model_name, r.model_version,
                      owner=tags.get("tenant_id"), base_version=tags.get("base_version"))
        champions[r.tenant_id] = c
        blobs[c.model_id] = bytes(r.model)
        _note_holdout(positive_share, r.tenant_id, getattr(r, "metrics_json", None))

    # A model that learned from a tenant that withdrew consent or was offboarded may neither stay
    # champion nor be promoted (io/lineage.py); its tenants get the best clean candidate.
    tainted = taints(spark, ctx.tables.model_lineage, ctx.tables.tenants,
                     {(c.name, str(c.version)) for cs in cands.values() for c in cs}
                     | {(c.name, str(c.version)) for c in champions.values()}, key=ctx.signing_key)
    tainted_champion: dict[str, str] = {}
    for t in scope.eligible:
        for c in cands[t]:
            if (c.name, str(c.version)) in tainted:
                refused.setdefault(t, []).append(f"{c.model_id} was {tainted[(c.name, str(c.version))].describe()}")
        cands[t] = [c for c in cands[t] if (c.name, str(c.version)) not in tainted]
        ch0 = champions.get(t)
        if ch0 is not None and (ch0.name, str(ch0.version)) in tainted:
            why = f"champion {ch0.model_id} was {tainted[(ch0.name, str(ch0.version))].describe()}"
            if cands[t] or ctx.config.retraining.tainted_models == "fall_back":
                refused.setdefault(t, []).append(why)
                refused_champion[t] = ch0.name
                tainted_champion[t] = why
                del champions[t]
            else:  # keep_serving and nothing clean to replace it: it serves on, flagged
                refused.setdefault(t, []).append(why + "; kept serving (retraining.tainted_models=keep_serving)")
    wanted = {t: sorted({c.model_id for c in cands[t]} | ({champions[t].model_id} if t in champions else set()))
              for t in scope.eligible}
    ctx.progress.phase(f"promote {name}: evaluating {sum(len(v) for v in wanted.values())} candidate models "
                       f"on per-tenant holdouts")
    shared_ids = {c.model_id for cs in cands.values() for c in cs if c.strategy == "shared"}
    evals = evaluate_candidates(spark, silver, spec, cfg, wanted, blobs, profile_for=shared_ids)
    profile_of = {(r.tenant_id, r.model_id): r.profile_json for r in evals.itertuples(index=False)}
    metric_of = {(r.tenant_id, r.model_id): float(r.metric) for r in evals.itertuples(index=False)}
    holdout = {r.tenant_id: int(r.holdout_rows) for r in evals.itertuples(index=False)}
    baseline = {r.tenant_id: float(r.baseline_metric) for r in evals.itertuples(index=False)}

    decisions: list[dict[str, Any]] = []
    to_alias: list[Registered] = []
    to_unset: list[str] = []  # champions that may no longer serve and have no replacement
    serving_rows: list[dict[str, Any]] = []
    def judged(t: str, c: Candidate) -> Candidate:
        """The candidate with its holdout metric and that metric's standard error on this holdout."""
        m, n = metric_of.get((t, c.model_id), math.nan), holdout.get(t)
        pos = round(positive_share[t] * n) if t in positive_share and n else None
        return replace(c, metric=m, se=metric_standard_error(metric_name, m, n, pos))

    for t in scope.eligible:
        tc = [judged(t, c) for c in cands[t]]
        ch = champions.get(t)
        if ch is not None:
            ch = judged(t, ch)
        d = decide(t, policies[t], tc, ch, margin=cfg.promotion_margin, higher_is_better=higher,
                   noise_z=cfg.promotion_noise_z)
        serving = d.serving
        if d.decision == "none" and ch is not None:
            to_unset.append(ch.name)
        elif d.decision == "none" and t in refused_champion:
            to_unset.append(refused_champion[t])
        if d.decision == "promoted" and serving is not None:
            if serving.strategy == "shared":
                reg = register_serving_version(ctx, name, t, Registered(SHARED_ID, serving.name, serving.version,
                                                                        serving.source),
                                              {"strategy": "shared",
                                               "model_sha256": model_sha256(blobs[serving.model_id])},
                                              run_id=shared_run_id)
                serving_rows.append({
                    "dataset": name, "tenant_id": t, "strategy": "shared", "model_name": reg.name,
                    "model_version": reg.version, "mlflow_run_id": None, "run_id": ctx.run_id,
                    "metric_name": metric_name, "metric": serving.metric, "baseline_metric": baseline.get(t),
                    "metrics_json": json.dumps({"base_model": serving.model_id}), "train_rows": 0,
                    "delta_version": version, "git_commit": None, "config_hash": ctx.config.config_hash(),
                    "model": blobs[serving.model_id], "profile_json": profile_of.get((t, serving.model_id))})
                serving = replace(serving, name=reg.name, version=reg.version)
            to_alias.append(Registered(t, serving.name, serving.version, serving.source))
        candidates_json = json.dumps([{"strategy": c.strategy, "model": c.model_id,
                                       metric_name: None if not math.isfinite(c.metric) else round(c.metric, 6),
                                       "se": None if not math.isfinite(c.se) else round(c.se, 6)}
                                      for c in tc])
        decisions.append({
            "run_id": ctx.run_id, "dataset": name, "tenant_id": t, "decision": d.decision,
            "reason": f"{tainted_champion[t]}; {d.reason}" if t in tainted_champion else d.reason,
            "metric_name": metric_name, "margin": cfg.promotion_margin,
            "serving_model": f"{serving.name}/{serving.version}" if serving else None,
            "serving_strategy": serving.strategy if serving else None,
            "champion_before": ch.model_id if ch else None, "champion_before_strategy": ch.strategy if ch else None,
            "champion_before_metric": _finite(ch.metric) if ch else None,
            "challenger": d.challenger.model_id if d.challenger else None,
            "challenger_strategy": d.challenger.strategy if d.challenger else None,
            "challenger_metric": _finite(d.challenger.metric) if d.challenger else None,
            "holdout_rows": holdout.get(t), "candidates_json": candidates_json})
        outcomes.append(TenantOutcome(
            tenant_id=t, status="skipped" if d.decision == "none" else "ok", rows_in=elig_rows[t], detail={
                "decision": d.decision, "reason": d.reason, **({"refused": refused[t]} if t in refused else {}),
                **({"serving": f"{serving.name}/{serving.version}", "strategy": serving.strategy} if serving else {}),
                **{f"{c.strategy}_{metric_name}": round(c.metric, 4) for c in tc if math.isfinite(c.metric)}}))
    # Bytes first, then the audit trail, then the aliases: a crash never leaves an alias whose
    # model the scorer cannot load, and a rerun recomputes the same decisions.
    write_models(spark, ctx.tables.model_store, serving_rows, name, ctx.run_id, strategy="shared",
                 key=ctx.signing_key, scope=scope.tenants)
    if serving_rows and shared_mv is not None:  # a serving version learned what the shared model did
        base = (shared_mv.name, str(shared_mv.version))
        inherited = tuple(contributions_of(spark, ctx.tables.model_lineage, base))
        record_lineage(spark, ctx.tables.model_lineage, [ModelLineage(
            name, r["model_name"], str(r["model_version"]), "shared", r["tenant_id"], inherited,
            inherited_from=f"{base[0]}/{base[1]}") for r in serving_rows], key=ctx.signing_key, run_id=ctx.run_id)
    write_decisions(spark, ctx.tables.promotions, decisions, name, ctx.run_id)
    set_champions(ctx, to_alias)
    for model in to_unset:
        ctx.mlflow.delete_registered_model_alias(model, ctx.config.tracking.champion_alias)
    counts = {k: sum(1 for d in decisions if d["decision"] == k) for k in ("promoted", "kept", "none")}
    serving_mix: dict[str, int] = {}
    for d2 in decisions:
        if d2["serving_strategy"]:
            serving_mix[d2["serving_strategy"]] = serving_mix.get(d2["serving_strategy"], 0) + 1
    return StepOutput(outcomes=outcomes, tables_written=[ctx.tables.promotions.display] if decisions else [],
                      summary={**counts, "serving_strategies": serving_mix})


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _note_holdout(shares: dict[str, float], tenant_id: str, metrics_json: str | None) -> None:
    """Remember the positive share of a tenant's holdout from a training row's metrics (the same
    `tenant_split` holdout promotion scores on), for the AUC's standard error."""
    if tenant_id in shares or not metrics_json:
        return
    m = json.loads(metrics_json)
    rows, pos = m.get("holdout_rows"), m.get("holdout_positives")
    if isinstance(rows, (int, float)) and isinstance(pos, (int, float)) and rows > 0:
        shares[tenant_id] = float(pos) / float(rows)
