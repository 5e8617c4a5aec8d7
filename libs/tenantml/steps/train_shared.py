"""Train the shared model on every consenting tenant's de-identified rows, data-parallel.

Consent is read from the tenants table at run time and snapshotted with the run, together with
the PII policy applied, the pinned training-set version and what each process actually read.
The new version becomes the shared champion only when it beats the current one on the
contributing tenants' holdouts by the promotion margin; that decision is recorded too.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from tenantml.core.ids import SHARED_ID
from tenantml.io.context import git_commit
from tenantml.io.lineage import Contribution, ModelLineage, record_lineage, taints
from tenantml.io.model_store import write_models
from tenantml.registry.decisions import write_decisions
from tenantml.registry.tracking import (
    Registered,
    set_champions,
    shared_champion,
    shared_champion_model,
    track_shared,
)
from tenantml.steps.base import StepOutput, StepScope, TenantOutcome, step
from tenantml.steps.runner import retraining_decisions
from tenantml.training.evaluate import evaluate_candidates
from tenantml.training.privacy import PiiPolicy, resolve_salt, salt_id
from tenantml.training.shared import train_shared_model
from tenantml.training.shared_data import build_shared_trainset


@step(name="train_shared", help="train the shared model on consenting tenants' de-identified rows",
      after=("monitor",), reads=("silver", "tenants", "retraining", "model_lineage"),
      writes=("shared_trainset", "model_store", "promotions", "registry"), skip_unchanged=True)
def run(scope: StepScope) -> StepOutput:
    from tenantml.models import primary_metric

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    silver, version, elig_rows = scope.input, scope.input_version, scope.rows
    silver_ref = scope.input_ref
    assert silver_ref is not None and version is not None
    cfg = ctx.config.training
    sh = cfg.shared
    spark = ctx.spark
    policies = scope.policies
    contributors = [t for t in scope.eligible if policies[t].consent_share_data]
    outcomes = [scope.skipped(t, "tenant did not consent to contribute data to shared models "
                                 "(consent_share_data=false)")
                for t in scope.eligible if not policies[t].consent_share_data]

    def finish(reason: str | None, **summary: Any) -> StepOutput:
        if reason:
            outcomes.extend(scope.skipped(t, reason) for t in contributors)
        return StepOutput(outcomes=outcomes, mlflow_run_id=summary.pop("mlflow_run_id", None),
                          tables_written=summary.pop("tables_written", []),
                          summary={"reason": reason, **summary} if reason else summary)

    if "shared" not in cfg.strategies:
        return finish("strategy 'shared' is not in training.strategies", models_trained=0)
    decisions = retraining_decisions(ctx, name)
    current_mv = shared_champion(ctx, name)
    taint = (taints(spark, ctx.tables.model_lineage, ctx.tables.tenants, [(current_mv.name, str(current_mv.version))],
                    key=ctx.signing_key).get((current_mv.name, str(current_mv.version))) if current_mv else None)
    keep = _keep_shared(ctx.config.retraining, decisions, contributors, current_mv, taint)
    if keep:
        return finish(keep, models_trained=0, **_valid_until(ctx.config.retraining, current_mv))
    if len(contributors) < sh.min_tenants:
        return finish(f"{len(contributors)} consenting tenant(s), below training.shared.min_tenants="
                      f"{sh.min_tenants}", models_trained=0)

    salt = resolve_salt(ctx.config.privacy, ctx.data_dir, dbutils=ctx.dbutils())
    policy = PiiPolicy(columns=tuple(spec.pii_columns), action=ctx.config.privacy.pii_action,
                       salt_reference=ctx.config.privacy.pii_salt, salt_id=salt_id(salt))
    ctx.progress.phase(f"train_shared {name}: de-identifying {len(contributors)} consenting tenants' "
                       f"training rows (silver v{version}, PII {policy.action})")
    trainset = build_shared_trainset(spark, silver, silver_ref=silver_ref.display, silver_version=version,
                                     spec=spec, cfg=cfg, contributors=contributors, policy=policy, salt=salt,
                                     ref=ctx.tables.shared_trainset(name), num_shards=sh.num_processes,
                                     staging_dir=ctx.staging_dir, dataset=name)
    del salt
    ckpt_dir = ctx.resolve_path(sh.checkpoint_dir) if sh.checkpoint_dir else ctx.data_dir / "checkpoints"
    ctx.progress.phase(f"train_shared {name}: {trainset.rows} rows (v{trainset.version}"
                       f"{', reused' if trainset.reused else ''}) on {sh.num_processes} processes with "
                       f"{sh.backend}")
    result = train_shared_model(spark, trainset, spec, cfg, ckpt_dir, name)
    fig = result.figures
    consent_snapshot = {t: {"consent_share_data": policies[t].consent_share_data,
                            "consent_shared_inference": policies[t].consent_shared_inference,
                            "strategy": policies[t].strategy} for t in scope.eligible}
    read_tenants: dict[str, int] = {}
    for m in fig["read_manifest"]:
        for t, n in m["tenants"].items():
            read_tenants[t] = read_tenants.get(t, 0) + int(n)
    leaked = sorted(set(read_tenants) - set(contributors))
    if leaked:  # cannot happen by construction; refuse to register a model if it ever does
        raise RuntimeError(f"shared training read rows of non-consenting tenant(s) {leaked}")
    lineage = {"delta_table": silver_ref.display, "delta_version": version,
               "trainset_table": trainset.ref.display, "trainset_version": trainset.version,
               "trainset_fingerprint": trainset.fingerprint, "git_commit": git_commit(),
               "config_hash": ctx.config.config_hash()}
    params = {"dataset": name, "strategy": "shared", "backend": sh.backend, "comm": fig["comm"],
              "num_processes": sh.num_processes, "local_mode": sh.local_mode, "device": fig["device"],
              "contributors": len(contributors), "pii_action": policy.action, "pii_columns": list(policy.columns),
              "pii_salt_reference": policy.salt_reference, "pii_salt_id": policy.salt_id,
              "max_epochs": sh.max_epochs, "batch_size": sh.batch_size, "learning_rate": sh.learning_rate,
              "steps_per_epoch": result.job.steps_per_epoch, "start_epoch": fig["start_epoch"],
              "resumed": fig["resumed"]}
    metrics = {"samples_per_second": float(fig["samples_per_second"]), "train_seconds": float(fig["train_seconds"]),
               "epochs_run": float(fig["epochs_run"]), "best_epoch": float(fig["best_epoch"]),
               "trainset_rows": float(trainset.rows)}
    if math.isfinite(fig["best_val_loss"]):
        metrics["best_val_loss"] = float(fig["best_val_loss"])
    artifacts = {"consent_snapshot.json": consent_snapshot, "pii_policy.json": policy.to_dict(),
                 "read_manifest.json": fig["read_manifest"],
                 "trainset.json": {"table": trainset.ref.display, "version": trainset.version,
                                   "contributors": trainset.contributors, "shard_rows": trainset.shard_rows,
                                   "columns": trainset.columns}}
    tracked = track_shared(ctx, name, result.blob, params=params, metrics=metrics, lineage=lineage,
                           artifacts=artifacts)
    reg = tracked.registered[SHARED_ID]
    metric_name, higher = primary_metric(spec.task)  # type: ignore[arg-type]
    write_models(spark, ctx.tables.model_store, [{
        "dataset": name, "tenant_id": SHARED_ID, "strategy": "shared", "model_name": reg.name,
        "model_version": reg.version, "mlflow_run_id": tracked.mlflow_run_id, "run_id": ctx.run_id,
        "metric_name": metric_name, "metric": None, "baseline_metric": None,
        "metrics_json": json.dumps({k: v for k, v in metrics.items()}), "train_rows": trainset.rows,
        "delta_version": version, "git_commit": lineage["git_commit"], "config_hash": lineage["config_hash"],
        "model": result.blob}], name, ctx.run_id, strategy="shared",
                 key=ctx.signing_key)
    record_lineage(spark, ctx.tables.model_lineage, [ModelLineage(
        name, reg.name, reg.version, "shared", SHARED_ID, tuple(
            Contribution(t, int(n), silver_ref.display, version, trainset.ref.display, trainset.version)
            for t, n in sorted(trainset.contributors.items())))], key=ctx.signing_key, run_id=ctx.run_id)

    # Shared champion/challenger on the contributors' holdouts.
    new_id = f"{reg.name}/{reg.version}"
    blobs = {new_id: result.blob}
    found = shared_champion_model(ctx, name)
    current, current_blob = (found.version, found.blob) if found is not None else (None, None)
    cur_id = None
    if current is not None and current_blob is not None:
        cur_id = f"{current.name}/{current.version}"
        blobs[cur_id] = current_blob
    ctx.progress.phase(f"train_shared {name}: evaluating on {len(contributors)} tenants' holdouts")
    evals = evaluate_candidates(spark, silver, spec, cfg, {t: sorted(blobs) for t in contributors}, blobs)
    pooled = {m: _pooled(evals[evals["model_id"] == m]) for m in blobs}
    gain = None if cur_id is None or cur_id == new_id else (
        (pooled[new_id] - pooled[cur_id]) * (1 if higher else -1))
    if cur_id is None or cur_id == new_id:
        decision, reason = "promoted", "no shared champion yet"
    elif taint:
        decision, reason = "promoted", f"the shared champion {cur_id} was {taint.describe()}: replaced"
    elif not math.isfinite(pooled[cur_id]) or (gain is not None and gain > 0 and gain >= cfg.promotion_margin):
        decision, reason = "promoted", f"new shared model beats the champion by {gain:.4f} (pooled holdout)"
    else:
        decision, reason = "kept", f"new shared model ahead by {gain:.4f}, below margin {cfg.promotion_margin}"
    serving = new_id if decision == "promoted" else cur_id
    write_decisions(spark, ctx.tables.promotions, [{
        "run_id": ctx.run_id, "dataset": name, "tenant_id": SHARED_ID, "decision": decision, "reason": reason,
        "metric_name": metric_name, "margin": cfg.promotion_margin, "serving_model": serving,
        "serving_strategy": "shared", "champion_before": cur_id, "champion_before_strategy": "shared" if cur_id else None,
        "champion_before_metric": _finite(pooled.get(cur_id)) if cur_id else None, "challenger": new_id,
        "challenger_strategy": "shared", "challenger_metric": _finite(pooled[new_id]),
        "holdout_rows": int(evals[evals["model_id"] == new_id]["holdout_rows"].sum()),
        "candidates_json": json.dumps({m: _finite(v) for m, v in pooled.items()})}], name, ctx.run_id)
    if decision == "promoted":
        set_champions(ctx, [Registered(SHARED_ID, reg.name, reg.version, reg.source)])
    for t in contributors:
        outcomes.append(TenantOutcome(tenant_id=t, status="ok", rows_in=elig_rows[t],
                                      rows_out=trainset.contributors.get(t, 0),
                                      detail={"contributed_rows": trainset.contributors.get(t, 0)}))
    return finish(None, models_trained=1, mlflow_run_id=tracked.mlflow_run_id,
                  tables_written=[trainset.ref.display, ctx.tables.model_store.display],
                  model=new_id, decision=decision, shared_champion=serving,
                  pooled_holdout_metric=_finite(pooled[new_id]), trainset_version=trainset.version,
                  trainset_rows=trainset.rows, contributors=len(contributors), backend=sh.backend,
                  samples_per_second=round(float(fig["samples_per_second"]), 1),
                  epochs_run=fig["epochs_run"], start_epoch=fig["start_epoch"], resumed=fig["resumed"])


def _keep_shared(rcfg: Any, decisions: dict[str, tuple[bool, str]] | None, contributors: list[str],
                 current_mv: Any, taint: Any) -> str | None:
    """Why the shared champion stays as it is this run (None: retrain it). It learned from every
    consenting tenant, so one tenant's drift or new rows are that tenant's to answer (its own and
    its tuned model); the shared model moves when enough of its contributors need it."""
    if decisions is None or rcfg.force or current_mv is None or taint:
        return None
    created = getattr(current_mv, "creation_timestamp", None)
    age_days = (time.time() * 1000 - created) / 86_400_000 if created else None
    if age_days is not None and rcfg.max_age_days is not None and age_days > rcfg.max_age_days:
        return None
    needing = [t for t in contributors if decisions.get(t, (True, ""))[0]]
    if contributors and len(needing) >= rcfg.shared_min_fraction * len(contributors):
        return None
    if not needing:
        return "no tenant needs retraining this run; the shared champion stays"
    return (f"{len(needing)} of {len(contributors)} contributing tenants need retraining, below "
            f"retraining.shared_min_fraction={rcfg.shared_min_fraction:g}: the shared champion stays "
            "(they fine-tune from it)")


def _valid_until(rcfg: Any, current_mv: Any) -> dict[str, str]:
    """Until when keeping the shared champion stands on time alone (it comes of age then)."""
    from datetime import UTC, datetime, timedelta

    created = getattr(current_mv, "creation_timestamp", None)
    if not created or rcfg.max_age_days is None:
        return {}
    until = datetime.fromtimestamp(created / 1000, UTC).replace(tzinfo=None) + timedelta(days=rcfg.max_age_days)
    return {"valid_until": until.isoformat()}


def _pooled(rows: Any) -> float:
    """Mean of per-tenant holdout metrics weighted by holdout rows (finite ones only)."""
    ok = rows[rows["metric"].notna() & (rows["holdout_rows"] > 0)]
    ok = ok[ok["metric"].map(math.isfinite)]
    if ok.empty:
        return math.nan
    return float((ok["metric"] * ok["holdout_rows"]).sum() / ok["holdout_rows"].sum())


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
