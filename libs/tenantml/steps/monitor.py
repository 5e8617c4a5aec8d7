"""monitor: watch every tenant's champion, then decide who is retrained this run.

Per tenant and scoring batch, into `monitoring_<ds>`, all tenants in one Spark pass each:

- feature drift: the PSI of every feature of each new batch of rows to score against the
  reference stored with the champion when it was trained (its training rows), and the batch's
  row count; prediction drift (and the feature drift of a tenant's first batch, which has no
  champion yet when the monitor runs) is written by the score step once the batch is scored;
- realised metric: when labels arrive (a later history batch labels entities that were scored),
  the AUC or RMSE of the scores against them, next to the holdout metric the champion was
  promoted with.

Then the retraining policy (`retraining.*`) decides per tenant, into `retraining_<ds>` with its
reasons: no champion yet, the champion no longer entitled, the champion tainted (it learned from
a tenant that withdrew consent or was offboarded), enough new labelled rows, drift, degradation,
age, or forced. The train, train-tuned and promote steps of the run act only for the
tenants it names; the others keep their champions and cost nothing. A run in which nothing the
monitor reads changed (and no champion came of age) skips it: the decisions of the run it stands
on hold, and the train steps read those.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from tenantml.core.policy import no_model_possible
from tenantml.io.delta import table_exists
from tenantml.io.lineage import taints
from tenantml.io.spark import local_frame
from tenantml.io.tenants import list_tenant_ids
from tenantml.monitoring import SCORE_FEATURE, classify_psi, drift_by_tenant, realised_metrics
from tenantml.monitoring.drift import NOISE_CONFIDENCE
from tenantml.steps.base import StepOutput, StepScope, TenantOutcome, step

MONITORING_SCHEMA = (
    "run_id string, dataset string, tenant_id string, batch_id string, kind string, feature string, psi double, "
    "status string, rows long, missing_share double, metric_name string, value double, promoted_value double, "
    "model_name string, model_version string, computed_at timestamp"
)
MONITORING_COLUMNS = [c.split()[0] for c in MONITORING_SCHEMA.split(", ")]
RETRAINING_SCHEMA = (
    "run_id string, dataset string, tenant_id string, retrain boolean, reasons string, champion string, "
    "champion_age_days double, new_rows long, drifted_features long, prediction_psi double, realised_value double, "
    "promoted_value double, decided_at timestamp"
)
FEATURE_KINDS = ("numeric", "categorical", "rows")


def champions(scope: StepScope, tenants: list[str]) -> dict[str, dict[str, Any]]:
    """Each tenant's champion as the last promote chose it (the `promotions` audit trail): model,
    version, strategy, the holdout metric it was promoted with, and its model store row (reference
    profile, training rows, creation time). No registry call: this runs for every tenant every night."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ctx, name = scope.ctx, scope.dataset
    ref = ctx.tables.promotions
    if not tenants or not table_exists(ctx.spark, ref):
        return {}
    w = Window.partitionBy("tenant_id").orderBy(F.col("decided_at").desc(), F.col("run_id").desc())
    latest = (scope.tenants.read(ref).where((F.col("dataset") == name) & F.col("tenant_id").isin(tenants))
              .withColumn("_n", F.row_number().over(w)).where("_n = 1").where(F.col("serving_model").isNotNull())
              .collect())
    out: dict[str, dict[str, Any]] = {}
    for r in latest:
        model, _, version = str(r["serving_model"]).rpartition("/")
        metric = r["challenger_metric"] if r["decision"] == "promoted" else r["champion_before_metric"]
        out[r["tenant_id"]] = {"model_name": model, "model_version": version, "strategy": r["serving_strategy"],
                               "metric_name": r["metric_name"], "promoted_value": metric,
                               "decided_at": r["decided_at"]}
    store_ref = ctx.tables.model_store
    if out and table_exists(ctx.spark, store_ref):
        keys = local_frame(ctx.spark, [(t, c["model_name"], c["model_version"]) for t, c in out.items()],
                                         "tenant_id string, model_name string, model_version string")
        store = scope.tenants.read(store_ref).where(F.col("dataset") == name)
        cols = [c for c in ("profile_json", "train_rows", "created_at") if c in store.columns]
        for r in store.join(F.broadcast(keys), ["tenant_id", "model_name", "model_version"]).select(
                "tenant_id", *cols).collect():
            out[r["tenant_id"]].update({c: r[c] for c in cols})
    return out


def drift_status(psi: float, rows: int, cfg: Any, noise: float | None = None) -> str:
    """stable / warn / drift; too_few_rows below `monitoring.min_drift_rows`; within_noise when the
    PSI is above a threshold but not above what sampling noise reaches for a batch of this size
    (``noise``, `psi_noise_level`; only with `monitoring.drift_confidence` set)."""
    if rows < cfg.min_drift_rows:
        return "too_few_rows"
    level = classify_psi(psi, cfg.psi_warn, cfg.psi_alert)
    if (level != "stable" and cfg.drift_confidence is not None and noise is not None and math.isfinite(noise)
            and psi <= noise):
        return "within_noise"
    return level


def feature_confidence(cfg: Any, features: int) -> float:
    """The confidence each feature's noise level is taken at, so that a tenant whose batch did not
    drift is flagged by chance on at most ``1 - drift_confidence`` of its batches, however many
    features it has (Bonferroni over the features)."""
    confidence = cfg.drift_confidence if cfg.drift_confidence is not None else NOISE_CONFIDENCE
    return 1.0 - (1.0 - float(confidence)) / max(features, 1)


def _unmonitored_batches(scope: StepScope, tenants: list[str], batches: list[str] | None = None) -> Any:
    """Rows of the batches to score (of ``batches`` when given) that have no feature-drift rows yet."""
    from pyspark.sql import functions as F

    ctx, name = scope.ctx, scope.dataset
    scoring_ref, mon_ref = ctx.tables.scoring(name), ctx.tables.monitoring(name)
    if not table_exists(ctx.spark, scoring_ref):
        return None
    rows = scope.tenants.read(scoring_ref).where(F.col("tenant_id").isin(tenants))
    if batches is not None:
        rows = rows.where(F.col("_batch_id").isin(batches))
    if table_exists(ctx.spark, mon_ref):
        done = (scope.tenants.read(mon_ref).where((F.col("dataset") == name) & F.col("kind").isin(*FEATURE_KINDS))
                .where(F.col("tenant_id").isin(tenants)))
        if batches is not None:
            done = done.where(F.col("batch_id").isin(batches))
        done = done.select("tenant_id", F.col("batch_id").alias("_batch_id")).distinct()
        rows = rows.join(F.broadcast(done), ["tenant_id", "_batch_id"], "left_anti")
    return rows


def feature_drift(scope: StepScope, serving: dict[str, tuple[str, str, dict[str, Any]]],
                  batches: list[str] | None = None) -> list[dict[str, Any]]:
    """PSI of every feature per (tenant, batch not yet monitored), against the reference profile of
    the model that serves the tenant (``serving``: tenant -> (model name, version, profile)), one
    Spark query for every tenant. The monitor measures batches against the champions before the
    run trains; the score step measures the batches the monitor could not (no champion yet) against
    the model it scored them with."""
    from pyspark.sql import functions as F

    spec, cfg = scope.spec, scope.ctx.config.monitoring
    if not serving:
        return []
    rows = _unmonitored_batches(scope, sorted(serving), batches)
    if rows is None:
        return []
    found = [(r["tenant_id"], r["_batch_id"], int(r["n"])) for r in
             rows.groupBy("tenant_id", "_batch_id").agg(F.count(F.lit(1)).alias("n")).collect()]
    if not found:
        return []
    # One profile per (tenant, batch) group key: the serving model's.
    group = F.concat_ws("\x1f", F.col("tenant_id"), F.col("_batch_id"))
    keyed = {f"{t}\x1f{b}": serving[t][2] for t, b, _ in found}
    confidence = feature_confidence(cfg, len(spec.numeric_features) + len(spec.categorical_features))
    report = drift_by_tenant(rows.withColumn("_tb", group), keyed, spec.numeric_features, spec.categorical_features,
                             None, tenant_col="_tb", confidence=confidence)
    out: list[dict[str, Any]] = []
    for r in report.itertuples(index=False):
        t, b = str(r.tenant_id).split("\x1f", 1)
        mname, version, _ = serving[t]
        out.append({"tenant_id": t, "batch_id": b, "kind": r.kind, "feature": r.feature, "psi": float(r.psi),
                    "status": drift_status(float(r.psi), int(r.rows), cfg, float(r.noise_psi)), "rows": int(r.rows),
                    "missing_share": float(r.missing_share), "model_name": mname, "model_version": version})
    for t, b, n in found:
        mname, version, _ = serving[t]
        out.append({"tenant_id": t, "batch_id": b, "kind": "rows", "feature": None, "rows": n,
                    "model_name": mname, "model_version": version})
    return out


KIND_CLASSES = {"numeric": FEATURE_KINDS, "categorical": FEATURE_KINDS, "rows": FEATURE_KINDS,
                "prediction": ("prediction",), "realised": ("realised",)}


def write_monitoring(scope: StepScope, rows: list[dict[str, Any]]) -> bool:
    """Write monitoring rows; each (tenant, batch) replaces exactly the kinds it brings (a batch's
    feature rows as one, its prediction PSI, its realised metric), so a rerun replaces its own rows
    and nothing else of the tenant is touched. One commit per group of (tenant, batch) pairs that
    bring the same kinds for the same batch: on a night with one new batch, one or two."""
    if not rows:
        return False
    ctx, name = scope.ctx, scope.dataset
    now = datetime.now(UTC).replace(tzinfo=None)
    kinds_of: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        kinds_of.setdefault((str(r["tenant_id"]), str(r["batch_id"])), set()).update(KIND_CLASSES[r["kind"]])
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (tenant, batch), brought in sorted(kinds_of.items()):
        groups.setdefault((batch, tuple(sorted(brought))), []).append(tenant)
    for (batch, kinds), tenants in sorted(groups.items()):
        members = set(tenants)
        values = [tuple({"run_id": ctx.run_id, "dataset": name, "computed_at": now, **r}.get(c)
                        for c in MONITORING_COLUMNS)
                  for r in rows if str(r["batch_id"]) == batch and str(r["tenant_id"]) in members
                  and r["kind"] in kinds]
        predicate = (f"dataset = '{name}' AND kind IN ({', '.join(repr(k) for k in kinds)}) "
                     f"AND batch_id = '{batch}'")  # batch ids are content hashes (hex)
        scope.tenants.write(local_frame(ctx.spark, values, MONITORING_SCHEMA), ctx.tables.monitoring(name),
                            sorted(members), extra_predicate=predicate)
    return True


def _realised(scope: StepScope, champs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Realised metric per (tenant, scored batch) from labels that arrived after the batch was scored."""
    from pyspark.sql import functions as F

    ctx, name, spec = scope.ctx, scope.dataset, scope.spec
    pred_ref = ctx.tables.predictions(name)
    if not table_exists(ctx.spark, pred_ref) or not scope.eligible:
        return []
    preds = scope.tenants.read(pred_ref)
    if "batch_id" not in preds.columns:
        return []
    preds = preds.where(F.col("batch_id").isNotNull()).select(
        "tenant_id", "entity_key", "batch_id", "score", "scored_at", "model_name", "model_version")
    # Only labels that arrived after the earliest scoring can label a scored row: on a night
    # without such labels Delta's file statistics skip every silver file and nothing is joined.
    earliest = preds.agg(F.min("scored_at").alias("t")).collect()[0]["t"]
    if earliest is None:
        return []
    labels = (scope.input.where(F.col(spec.label).isNotNull() & (F.col("_ingested_at") > F.lit(earliest)))
              .select("tenant_id", F.col(f"`{spec.entity_key}`").cast("string").alias("entity_key"),
                      F.col(f"`{spec.label}`").cast("double").alias("label"), "_ingested_at"))
    if not labels.limit(1).collect():
        return []
    matched = (preds.join(labels, ["tenant_id", "entity_key"])
               .where(F.col("_ingested_at") > F.col("scored_at")))  # labels that arrived after scoring
    scored = matched.select("tenant_id", "entity_key", "batch_id", "score")
    result = realised_metrics(scored, matched.select("tenant_id", "entity_key", "label"), spec.task)
    models = {(r["tenant_id"], r["batch_id"]): (r["model_name"], r["model_version"]) for r in
              preds.select("tenant_id", "batch_id", "model_name", "model_version").distinct().collect()}
    out = []
    for r in result.itertuples(index=False):
        if int(r.rows) < ctx.config.monitoring.min_labelled_rows:
            continue
        model = models.get((r.tenant_id, r.batch_id), (None, None))
        champ = champs.get(str(r.tenant_id), {})
        same = champ.get("model_name") == model[0] and champ.get("model_version") == model[1]
        out.append({"tenant_id": r.tenant_id, "batch_id": r.batch_id, "kind": "realised", "feature": None,
                    "rows": int(r.rows), "metric_name": r.metric, "value": float(r.value),
                    "promoted_value": champ.get("promoted_value") if same else None,
                    "model_name": model[0], "model_version": model[1]})
    return out


def _latest(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for r in rows:
        by.setdefault(r["tenant_id"], {}).setdefault(r["batch_id"], []).append(r)
    return by


@step(name="monitor", help="drift and realised metrics per tenant and batch; decide who is retrained",
      after=("validate", "validate_scoring"),
      reads=("silver", "scoring", "predictions", "promotions", "model_store", "model_lineage", "tenants"),
      writes=("monitoring", "retraining"), resumable=False, skip_unchanged=True)
def run(scope: StepScope) -> StepOutput:
    ctx, name = scope.ctx, scope.dataset
    mcfg, rcfg = ctx.config.monitoring, ctx.config.retraining
    spark = ctx.spark
    registered = set(list_tenant_ids(spark, ctx.tables.tenants))
    tenants = [t for t in scope.eligible if t in registered]
    scope.phase(f"champions and references of {len(tenants)} tenants")
    champs = champions(scope, tenants)
    scope.phase("feature drift of new batches to score")
    drift = feature_drift(scope, {t: (str(c["model_name"]), str(c["model_version"]), json.loads(c["profile_json"]))
                                  for t, c in champs.items() if c.get("profile_json")})
    scope.phase("realised metrics of scored batches with labels")
    realised = _realised(scope, champs)
    now = datetime.now(UTC).replace(tzinfo=None)
    written = []
    if write_monitoring(scope, [*drift, *realised]):
        written.append(ctx.tables.monitoring(name).display)

    # What the monitoring table says per tenant: its latest batch's drift, its latest realised metric.
    scope.phase("latest drift and realised metric per tenant")
    history = _tenant_state(scope, tenants)
    scope.phase("new labelled rows since each champion")
    new_rows = _new_labelled_rows(scope, champs)
    scope.phase("champions' lineage (withdrawn consent, offboarded tenants)")
    tainted = taints(spark, ctx.tables.model_lineage, ctx.tables.tenants,
                     {(str(c["model_name"]), str(c["model_version"])) for c in champs.values()},
                     key=ctx.signing_key, registered=registered)
    decisions = []
    outcomes = []
    drifted, degraded, retrain_ids, waits = [], [], [], []
    tcfg = ctx.config.training
    for t in tenants:
        c = champs.get(t)
        champion = f"{c['model_name']}/{c['model_version']}" if c else None
        st = history.get(t, {})
        reasons = []
        if rcfg.force:
            reasons.append("forced (retraining.force)")
        waiting = None
        if c is None:
            waiting = no_model_possible(scope.policies[t], scope.rows.get(t, 0), tcfg.strategies, tcfg.min_rows,
                                        tcfg.tuned.min_rows)
            if waiting is None:
                reasons.append("no champion yet")
            elif rcfg.force:
                reasons.clear()  # forcing cannot train what has too few rows
        else:
            if not scope.policies[t].allows(str(c["strategy"])):
                reasons.append(f"champion strategy {c['strategy']!r} no longer allowed for the tenant")
            taint = tainted.get((str(c["model_name"]), str(c["model_version"])))
            if taint:
                reasons.append(f"champion {c['model_name']}/{c['model_version']} was {taint.describe()}")
            base = int(c.get("train_rows") or 0)
            n_new = new_rows.get(t, 0)
            if n_new >= rcfg.min_new_rows or (base and n_new >= rcfg.min_new_fraction * base):
                reasons.append(f"{n_new} new labelled rows since the champion was trained")
            # Drift is answered by the retrain it causes, whether that retrain replaced the champion or
            # kept it (retraining again on the same rows would decide the same): only drift against the
            # serving champion, measured after its latest promotion decision, is a reason to retrain.
            measured_on, measured_at, decided_at = st.get("drift_model"), st.get("drift_at"), c.get("decided_at")
            against_champion = ((measured_on is None or measured_on == champion)
                                and (measured_at is None or decided_at is None or measured_at > decided_at))
            features_drifted = against_champion and st.get("drifted_features", 0) >= mcfg.drift_features
            prediction_drifted = against_champion and (st.get("prediction_psi") or 0) > mcfg.psi_alert
            if features_drifted or prediction_drifted:
                drifted.append(t)
                if rcfg.on_drift:
                    what = []
                    if features_drifted:
                        what.append(f"feature(s) {', '.join(st.get('drifted_names', []))}")
                    if prediction_drifted:
                        what.append(f"predictions (PSI {st.get('prediction_psi'):.3f})")
                    reasons.append(f"drift in batch {st.get('drift_batch')}: {' and '.join(what)} above PSI "
                                   f"{mcfg.psi_alert}")
            value, promoted = st.get("realised_value"), c.get("promoted_value")
            if value is not None and promoted is not None and _worse(value, promoted, str(c["metric_name"]), mcfg.metric_drop):
                degraded.append(t)
                if rcfg.on_degradation:
                    reasons.append(f"realised {c['metric_name']} {value:.4f} vs {promoted:.4f} promoted "
                                   f"(worse by more than {mcfg.metric_drop})")
            created = c.get("created_at")
            age = (now - created).total_seconds() / 86400 if created is not None else None
            if age is not None and rcfg.max_age_days is not None and age > rcfg.max_age_days:
                reasons.append(f"champion is {age:.0f} days old (max {rcfg.max_age_days:g})")
        retrain = bool(reasons)
        if retrain:
            retrain_ids.append(t)
        if waiting:
            waits.append(t)
        why = "; ".join(reasons) if reasons else waiting or "champion current: no new rows, drift or degradation"
        created = c.get("created_at") if c else None
        decisions.append((ctx.run_id, name, t, retrain, why, champion,
                          (now - created).total_seconds() / 86400 if created is not None else None,
                          int(new_rows.get(t, 0)), int(st.get("drifted_features", 0)), st.get("prediction_psi"),
                          st.get("realised_value"), c.get("promoted_value") if c else None, now))
        outcomes.append(TenantOutcome(tenant_id=t, status="ok", rows_in=scope.rows.get(t, 0), detail={
            "retrain": retrain, "reason": why, **({"drifted": True} if t in drifted else {}),
            **({"degraded": True} if t in degraded else {})}))
    for t in scope.eligible:
        if t not in registered:
            outcomes.append(scope.skipped(t, "tenant is not registered"))
    if decisions:
        scope.phase(f"writing {len(decisions)} retraining decisions")
        ret_ref = ctx.tables.retraining(name)
        scope.tenants.write(local_frame(spark, decisions, RETRAINING_SCHEMA), ret_ref, [d[2] for d in decisions],
                            extra_predicate=f"run_id = '{ctx.run_id}' AND dataset = '{name}'")
        written.append(ret_ref.display)
    # The decisions change with time alone when a champion comes of age: until then, a run in
    # which nothing the monitor reads changed is skipped (its decisions stand).
    ages = [c["created_at"] + timedelta(days=rcfg.max_age_days) for c in champs.values()
            if c.get("created_at") is not None and rcfg.max_age_days is not None]
    until = min((a for a in ages if a > now), default=None)
    return StepOutput(outcomes=outcomes, tables_written=written, summary={
        **({"valid_until": until.isoformat()} if until is not None else {}),
        "tenants_retrained": len(retrain_ids), "tenants_kept": len(decisions) - len(retrain_ids) - len(waits),
        "tenants_waiting_for_rows": len(waits),
        "drifted": sorted(drifted), "degraded": sorted(degraded), "retrain": sorted(retrain_ids)[:50],
        "batches_monitored": len({(r["tenant_id"], r["batch_id"]) for r in drift}),
        "realised_metrics": len(realised)})


def _worse(value: float, promoted: float, metric: str, margin: float) -> bool:
    from tenantml.models import primary_metric

    higher = metric == primary_metric("binary")[0]  # auc: higher is better; rmse: lower is better
    drop = promoted - value if higher else value - promoted
    return math.isfinite(drop) and drop > margin


def _tenant_state(scope: StepScope, tenants: list[str]) -> dict[str, dict[str, Any]]:
    """Per tenant: its latest monitored batch's drift, and its latest realised metric."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ctx, name = scope.ctx, scope.dataset
    ref = ctx.tables.monitoring(name)
    if not tenants or not table_exists(ctx.spark, ref):
        return {}
    mon = scope.tenants.read(ref).where(F.col("dataset") == name)
    out: dict[str, dict[str, Any]] = {}
    w = Window.partitionBy("tenant_id").orderBy(F.col("computed_at").desc(), F.col("batch_id").desc())
    drift_kind = F.col("kind").isin("numeric", "categorical", "prediction")
    latest_batch = (mon.where(drift_kind)
                    .groupBy("tenant_id", "batch_id").agg(F.max("computed_at").alias("computed_at"))
                    .withColumn("_n", F.row_number().over(w)).where("_n = 1").select("tenant_id", "batch_id"))
    for r in (mon.join(latest_batch, ["tenant_id", "batch_id"])
              .groupBy("tenant_id", "batch_id")
              .agg(F.sum(((F.col("kind") != "prediction") & (F.col("status") == "drift")).cast("long")).alias("n"),
                   F.array_sort(F.collect_list(F.when((F.col("kind") != "prediction") & (F.col("status") == "drift"),
                                                      F.col("feature")))).alias("names"),
                   F.max(F.when((F.col("kind") == "prediction") & (F.col("status") != "too_few_rows"), F.col("psi")))
                   .alias("p"),
                   F.max(F.when(drift_kind, F.concat_ws("/", "model_name", "model_version"))).alias("m"),
                   # When the monitor measured the batch's features (the score step adds its prediction
                   # PSI later in the same run, after the retrain that this measurement decided).
                   F.coalesce(F.max(F.when(F.col("kind").isin("numeric", "categorical"), F.col("computed_at"))),
                              F.max(F.when(F.col("kind") == "prediction", F.col("computed_at")))).alias("at"))
              .collect()):
        out.setdefault(r["tenant_id"], {}).update(drift_batch=r["batch_id"], drifted_features=int(r["n"] or 0),
                                                  drifted_names=list(r["names"] or []), prediction_psi=r["p"],
                                                  drift_model=r["m"] or None, drift_at=r["at"])
    wr = Window.partitionBy("tenant_id").orderBy(F.col("computed_at").desc(), F.col("batch_id").desc())
    for r in (mon.where(F.col("kind") == "realised").withColumn("_n", F.row_number().over(wr)).where("_n = 1")
              .collect()):
        out.setdefault(r["tenant_id"], {}).update(realised_value=r["value"])
    return out


def _new_labelled_rows(scope: StepScope, champs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Per tenant, silver rows validated after its champion was trained (labelled rows it has not seen)."""
    from pyspark.sql import functions as F

    when = {t: c["created_at"] for t, c in champs.items() if c.get("created_at") is not None}
    if not when:
        return {}
    marks = local_frame(scope.ctx.spark, list(when.items()), "tenant_id string, _since timestamp")
    newer = scope.input.where(F.col("_validated_at") > F.lit(min(when.values())))  # file statistics skip the rest
    return {r["tenant_id"]: int(r["n"]) for r in
            newer.join(F.broadcast(marks), "tenant_id").where(F.col("_validated_at") > F.col("_since"))
            .groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}


__all__ = ["MONITORING_SCHEMA", "RETRAINING_SCHEMA", "SCORE_FEATURE", "champions", "run"]
