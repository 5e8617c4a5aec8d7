"""Promote: per tenant, judge every candidate on one holdout and move `champion` only for a clear win.

Candidates are the latest tenant-specific and tuned versions of the tenant, the shared champion,
and the current champion itself, all evaluated in one Spark pass on the same holdout rows. A
challenger replaces the champion only when it beats it by `training.promotion_margin`, or when the
champion may no longer serve the tenant (its strategy setting or consent changed). Every decision
goes to the `promotions` table.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tenantml.io import read_table, table_exists
from tenantml.pipeline.eligibility import open_step
from tenantml.pipeline.result import StepResult, TenantOutcome
from tenantml.registry.decisions import write_decisions
from tenantml.registry.store import SHARED_ID, write_models
from tenantml.registry.tracking import (
    Registered,
    champion_versions,
    register_serving_version,
    set_champions,
    shared_champion_model,
)
from tenantml.tenants import TenantPolicy, tenant_policies
from tenantml.training.evaluate import evaluate_candidates

if TYPE_CHECKING:
    from tenantml.context import JobContext

# When holdout metrics cannot tell candidates apart (tiny tenants), prefer the model that saw most
# relevant data: tuned, then shared, then the tenant's own.
FALLBACK_ORDER = ("tuned", "shared", "tenant")


@dataclass(frozen=True)
class Candidate:
    model_id: str          # "<registered name>/<version>" of the model actually evaluated
    strategy: str
    name: str
    version: str
    source: str = ""
    metric: float = math.nan
    owner: str | None = None  # tenant the version was trained for (None: the shared model)
    base_version: str | None = None

    @property
    def label(self) -> str:
        return f"{self.strategy}:{self.name}/{self.version}"


@dataclass
class Decision:
    decision: str  # promoted | kept | none
    reason: str
    serving: Candidate | None
    challenger: Candidate | None


def _better(a: float, b: float, higher_is_better: bool) -> float:
    """How much a beats b, positive when a is better."""
    return (a - b) if higher_is_better else (b - a)


def decide(tenant_id: str, policy: TenantPolicy, candidates: Sequence[Candidate], champion: Candidate | None,
           *, margin: float, higher_is_better: bool) -> Decision:
    """Champion/challenger for one tenant; pure so every branch is unit-tested."""
    allowed = [c for c in candidates if policy.allows(c.strategy)
               and (c.owner in (None, tenant_id))]
    refused = ""
    champion_ok = champion is not None and policy.allows(champion.strategy) and champion.owner == tenant_id
    if champion is not None and not champion_ok:
        refused = (f"champion {champion.label} may no longer serve tenant {tenant_id!r} "
                   f"(strategy {policy.strategy!r}, consent_shared_inference={policy.consent_shared_inference})")
    scored = [c for c in allowed if math.isfinite(c.metric)]
    best: Candidate | None
    if scored:
        order = {s: i for i, s in enumerate(("tenant", "tuned", "shared"))}
        best = sorted(scored, key=lambda c: (-_better(c.metric, 0.0, higher_is_better), order.get(c.strategy, 9)))[0]
    else:
        best = next((c for s in FALLBACK_ORDER for c in allowed if c.strategy == s), None)
    if best is None:
        if champion_ok:
            return Decision("kept", "no new entitled candidate", champion, None)
        return Decision("none", refused or "no entitled candidate model", None, None)
    if not champion_ok:
        why = refused or "no champion yet"
        how = (f"best candidate on holdout ({best.metric:.4f})" if math.isfinite(best.metric)
               else f"no comparable holdout metric; fallback to {best.strategy}")
        return Decision("promoted", f"{why}: {how}", best, best)
    assert champion is not None
    if _same_model(best, champion):
        return Decision("kept", "champion is already the best candidate", champion, best)
    if not math.isfinite(best.metric):
        return Decision("kept", "holdout too small to compare candidates; champion kept", champion, best)
    if not math.isfinite(champion.metric):
        return Decision("promoted", f"champion could not be evaluated on the holdout; {best.strategy} "
                                    f"scores {best.metric:.4f}", best, best)
    gain = _better(best.metric, champion.metric, higher_is_better)
    if gain > 0 and gain >= margin:  # a tie never replaces the champion, even with margin 0
        return Decision("promoted", f"{best.strategy} beats champion by {gain:.4f} (margin {margin})", best, best)
    return Decision("kept", f"best challenger {best.strategy} ahead by {gain:.4f}, below margin {margin}",
                    champion, best)


def _same_model(a: Candidate, b: Candidate) -> bool:
    if a.model_id == b.model_id:
        return True
    shared_a = a.strategy == "shared" and (a.base_version or a.version)
    shared_b = b.strategy == "shared" and (b.base_version or b.version)
    return bool(shared_a and shared_b and shared_a == shared_b)


def _latest_candidates(ctx: JobContext, dataset: str, tenants: list[str]) -> dict[str, dict[str, Any]]:
    """tenant -> strategy -> newest model_store row (tenant and tuned strategies)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ref = ctx.tables.model_store
    if not tenants or not table_exists(ctx.spark, ref):
        return {}
    w = Window.partitionBy("tenant_id", "strategy").orderBy(F.col("created_at").desc(),
                                                            F.col("model_version").cast("long").desc())
    rows = (read_table(ctx.spark, ref)
            .where((F.col("dataset") == dataset) & F.col("tenant_id").isin(tenants)
                   & F.col("strategy").isin("tenant", "tuned"))
            .withColumn("_rank", F.row_number().over(w)).where("_rank = 1").drop("_rank").collect())
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r["tenant_id"], {})[r["strategy"]] = r.asDict()
    return out


def promote(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None) -> StepResult:
    from tenantml.models import primary_metric

    started = time.perf_counter()
    name, spec, _, version, silver, elig, outcomes, scope = open_step(ctx, dataset, tenants, "promote")
    cfg = ctx.config.training
    spark = ctx.spark
    policies = tenant_policies(spark, ctx.tables.tenants, elig.eligible, ctx.config.tenants)
    metric_name, higher = primary_metric(spec.task)  # type: ignore[arg-type]
    ctx.progress.phase(f"promote {name}: gathering candidates for {len(elig.eligible)} tenants")

    latest = _latest_candidates(ctx, name, elig.eligible)
    blobs: dict[str, bytes] = {}
    cands: dict[str, list[Candidate]] = {t: [] for t in elig.eligible}
    for t, by_strategy in latest.items():
        for s, r in by_strategy.items():
            c = Candidate(f"{r['model_name']}/{r['model_version']}", s, r["model_name"], r["model_version"], owner=t)
            cands[t].append(c)
            blobs[c.model_id] = bytes(r["model"])
    found = shared_champion_model(ctx, name)
    shared_mv, shared_blob = found if found is not None else (None, None)
    shared_run_id = shared_mv.run_id if shared_mv is not None else None
    if shared_mv is not None and shared_blob is not None:
        sc = Candidate(f"{shared_mv.name}/{shared_mv.version}", "shared", shared_mv.name, str(shared_mv.version),
                       source=str(shared_mv.source), owner=None, base_version=str(shared_mv.version))
        blobs[sc.model_id] = shared_blob
        for t in elig.eligible:
            cands[t].append(sc)
    champs = champion_versions(ctx, name, elig.eligible)
    champ_rows = scope.load_models({t: (mv.name, str(mv.version)) for t, mv in champs.items()})
    champions: dict[str, Candidate] = {}
    for r in champ_rows.itertuples(index=False):
        tags = dict(champs[r.tenant_id].tags)
        c = Candidate(f"{r.model_name}/{r.model_version}", r.strategy, r.model_name, r.model_version,
                      owner=tags.get("tenant_id"), base_version=tags.get("base_version"))
        champions[r.tenant_id] = c
        blobs[c.model_id] = bytes(r.model)

    wanted = {t: sorted({c.model_id for c in cands[t]} | ({champions[t].model_id} if t in champions else set()))
              for t in elig.eligible}
    ctx.progress.phase(f"promote {name}: evaluating {sum(len(v) for v in wanted.values())} candidate models "
                       f"on per-tenant holdouts")
    evals = evaluate_candidates(spark, silver, spec, cfg, wanted, blobs)
    metric_of = {(r.tenant_id, r.model_id): float(r.metric) for r in evals.itertuples(index=False)}
    holdout = {r.tenant_id: int(r.holdout_rows) for r in evals.itertuples(index=False)}
    baseline = {r.tenant_id: float(r.baseline_metric) for r in evals.itertuples(index=False)}

    decisions: list[dict[str, Any]] = []
    to_alias: list[Registered] = []
    to_unset: list[str] = []  # champions that may no longer serve and have no replacement
    serving_rows: list[dict[str, Any]] = []
    for t in elig.eligible:
        tc = [replace(c, metric=metric_of.get((t, c.model_id), math.nan)) for c in cands[t]]
        ch = champions.get(t)
        if ch is not None:
            ch = replace(ch, metric=metric_of.get((t, ch.model_id), math.nan))
        d = decide(t, policies[t], tc, ch, margin=cfg.promotion_margin, higher_is_better=higher)
        serving = d.serving
        if d.decision == "none" and ch is not None:
            to_unset.append(ch.name)
        if d.decision == "promoted" and serving is not None:
            if serving.strategy == "shared":
                reg = register_serving_version(ctx, name, t, Registered(SHARED_ID, serving.name, serving.version,
                                                                        serving.source), {"strategy": "shared"},
                                              run_id=shared_run_id)
                serving_rows.append({
                    "dataset": name, "tenant_id": t, "strategy": "shared", "model_name": reg.name,
                    "model_version": reg.version, "mlflow_run_id": None, "run_id": ctx.run_id,
                    "metric_name": metric_name, "metric": serving.metric, "baseline_metric": baseline.get(t),
                    "metrics_json": json.dumps({"base_model": serving.model_id}), "train_rows": 0,
                    "delta_version": version, "git_commit": None, "config_hash": ctx.config.config_hash(),
                    "model": blobs[serving.model_id]})
                serving = replace(serving, name=reg.name, version=reg.version)
            to_alias.append(Registered(t, serving.name, serving.version, serving.source))
        candidates_json = json.dumps([{"strategy": c.strategy, "model": c.model_id,
                                       metric_name: None if not math.isfinite(c.metric) else round(c.metric, 6)}
                                      for c in tc])
        decisions.append({
            "run_id": ctx.run_id, "dataset": name, "tenant_id": t, "decision": d.decision, "reason": d.reason,
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
            tenant_id=t, status="skipped" if d.decision == "none" else "ok", rows_in=elig.rows[t], detail={
                "decision": d.decision, "reason": d.reason,
                **({"serving": f"{serving.name}/{serving.version}", "strategy": serving.strategy} if serving else {}),
                **{f"{c.strategy}_{metric_name}": round(c.metric, 4) for c in tc if math.isfinite(c.metric)}}))
    # Bytes first, then the audit trail, then the aliases: a crash never leaves an alias whose
    # model the scorer cannot load, and a rerun recomputes the same decisions.
    write_models(spark, ctx.tables.model_store, serving_rows, name, ctx.run_id, strategy="shared",
                 scope=scope)
    write_decisions(spark, ctx.tables.promotions, decisions, name, ctx.run_id)
    set_champions(ctx, to_alias)
    for model in to_unset:
        ctx.mlflow.delete_registered_model_alias(model, ctx.config.tracking.champion_alias)
    outcomes.sort(key=lambda o: o.tenant_id or "")
    counts = {k: sum(1 for d in decisions if d["decision"] == k) for k in ("promoted", "kept", "none")}
    serving_mix: dict[str, int] = {}
    for d2 in decisions:
        if d2["serving_strategy"]:
            serving_mix[d2["serving_strategy"]] = serving_mix.get(d2["serving_strategy"], 0) + 1
    return StepResult(step="promote", dataset=name, run_id=ctx.run_id, tenants=outcomes,
                      tables_written=[ctx.tables.promotions.display] if decisions else [],
                      seconds=time.perf_counter() - started,
                      summary={**counts, "serving_strategies": serving_mix, "silver_version": version})


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
