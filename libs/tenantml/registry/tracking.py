"""Track a training job as one MLflow run whose tenant candidates are MLflow 3 LoggedModels, and
register them cheaply.

A run per tenant and job would reach Databricks' cap of 500,000 runs per experiment in about two
weeks at 10,000 tenants x 3 candidates nightly, so each candidate is a LoggedModel of the job's run
(params, tags ``tenantml.tenant_id``/``dataset``/``strategy``/``run_id``, and its metrics, logged on
the job run with the model's id, each model at its own step). ``tracking.tenant_runs: true`` keeps
the older layout as well: a child run per tenant holds its metrics and is the LoggedModel's source
run.

Per-model cost is what matters with thousands of tenants: no `log_model` (seconds each), but a
model directory written by tenantml and uploaded straight to the LoggedModel's artifact location,
metrics in 1000-metric batches, one `log_outputs` per job, and a few small registry calls
(bench/bench_tracking.py measures it against the child-run path; docs/architecture.md has the
figures).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantml.core.ids import SHARED_ID, model_name, shared_model_name, validate_tenant_id
from tenantml.io.model_store import load_models, model_sha256

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from tenantml.io.context import JobContext

log = logging.getLogger(__name__)
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
MODEL_TYPE = "tenantml.tabular"
TENANT_TAG = "tenantml.tenant_id"
# Job params that name other tenants: they stay on the job run, never on one tenant's LoggedModel
# (offboarding a tenant deletes its own models, not the ones of every tenant it is named in).
JOB_ONLY_PARAMS = frozenset({"tenant_quotas"})
_LM_NAME_BAD = re.compile(r"[/:.%\"']")


def ensure_registered_model(client: MlflowClient, name: str, tags: dict[str, str]) -> None:
    try:
        client.create_registered_model(name, tags=tags)
    except Exception as exc:  # registered before, or concurrently
        if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
            raise


@dataclass
class Registered:
    tenant_id: str
    name: str
    version: str
    source: str


@dataclass
class TrainingRun:
    mlflow_run_id: str
    artifact_uri: str
    registered: dict[str, Registered] = field(default_factory=dict)
    tenant_runs: dict[str, str] = field(default_factory=dict)  # tenant -> child run id (tracking.tenant_runs)
    logged_models: dict[str, str] = field(default_factory=dict)  # tenant -> LoggedModel id (failed ones too)


def logged_model_name(registered_name: str) -> str:
    """A LoggedModel name may not hold '.', '/', ':', '%' or quotes: the registered model's name
    without its Unity Catalog ``catalog.schema.`` levels (the full name is the
    ``tenantml.registered_model`` tag)."""
    return _LM_NAME_BAD.sub("_", registered_name.rsplit(".", 1)[-1]) or "model"


def _flat_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: (v if isinstance(v, str) else json.dumps(v))[:6000] for k, v in params.items()}


def _upload_model_dir(artifact_location: str, local_dir: Path) -> None:
    """What ``client.log_model_artifacts`` does, minus its ``get_logged_model`` lookup per model."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(artifact_location).log_artifacts(str(local_dir))


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def log_batches(client: MlflowClient, run_id: str, metrics: Sequence[tuple[str, float]],
                params: Sequence[tuple[str, str]], tags: Sequence[tuple[str, str]]) -> None:
    """MLflow caps one batch at 1000 metrics / 100 params / 100 tags: send as few calls as allowed."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    for chunk in _chunks(list(params), _MAX_PARAMS):
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in chunk], synchronous=True)
    for chunk in _chunks(list(tags), _MAX_TAGS):
        client.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in chunk], synchronous=True)
    for chunk in _chunks(list(metrics), _MAX_METRICS):
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in chunk], synchronous=True)


def _not_found(exc: Exception) -> bool:
    text = str(exc)
    return "RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower() or "NOT_FOUND" in text


def registered_model_exists(ctx: JobContext, name: str) -> bool:
    """One lookup by exact name (no search)."""
    try:
        ctx.mlflow.get_registered_model(name)
    except Exception as exc:
        if _not_found(exc):
            return False
        raise
    return True


def registered_names(ctx: JobContext, dataset: str) -> set[str]:
    """Registered models tenantml created for ``dataset``: the model store records every version it
    registered, so no registry search is needed (Unity Catalog's registry allows no filtered search)."""
    from pyspark.sql import functions as F

    from tenantml.io.delta import read_table, table_exists

    ref = ctx.tables.model_store
    if not table_exists(ctx.spark, ref):
        return set()
    rows = read_table(ctx.spark, ref).where(F.col("dataset") == dataset).select("model_name").distinct().collect()
    return {r[0] for r in rows}


def track_training(ctx: JobContext, dataset: str, results: pd.DataFrame, *, strategy: str,
                   params: dict[str, Any], lineage: dict[str, Any],
                   version_tags: dict[str, str] | None = None) -> TrainingRun:
    """One MLflow run for the job; one LoggedModel per tenant candidate (its params, tags, metrics
    and model directory); every trained tenant's model registered (promotion moves aliases later).

    A tenant whose training failed gets a LoggedModel too, status FAILED with a ``tenantml.error``
    tag and no artifacts: its failure is on record per tenant, and offboarding removes it with the
    tenant's other models. Metrics go on the job run with the model's id (MLflow also keeps them as
    run metrics, each model at its own step); with ``tracking.tenant_runs`` they go on the tenant's
    child run instead, so that copy is per tenant too.
    """
    import math
    import shutil
    import time

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, RunStatus, RunTag

    from tenantml.registry.model_dir import write_model_dir

    client = ctx.mlflow
    spec = ctx.config.datasets[dataset]
    prefix = ctx.config.tracking.model_name_prefix
    child_runs = ctx.config.tracking.tenant_runs
    experiment = ctx.experiment_id()
    base_tags = {"tenantml.run_id": ctx.run_id, "tenantml.dataset": dataset, "tenantml.step": "train",
                 "tenantml.strategy": strategy}
    run = client.create_run(experiment, run_name=f"train-{dataset}-{strategy}-{ctx.run_id}", tags=base_tags)
    rid = run.info.run_id
    out = TrainingRun(mlflow_run_id=rid, artifact_uri=run.info.artifact_uri)
    try:
        ok = results[results["status"] == "ok"]
        flat = [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in {**params, **lineage}.items()]
        log_batches(client, rid, [], flat, [("tenantml.tenants_trained", str(len(ok))),
                                            ("tenantml.tenants_failed", str(len(results) - len(ok))),
                                            ("tenantml.tenant_runs", str(child_runs).lower())])
        model_params = _flat_params({k: v for k, v in {**params, **lineage}.items() if k not in JOB_ONLY_PARAMS})
        ctx.progress.phase(f"logging {len(results)} tenant models ({len(ok)} trained)"
                           + (" with a child run each" if child_runs else ""))
        ctx.progress.start("tenant models", len(results))
        now = int(time.time() * 1000)
        source_run: dict[str, str] = {}
        location: dict[str, str] = {}
        outputs: list[LoggedModelOutput] = []
        job_metrics: list[Metric] = []
        with tempfile.TemporaryDirectory(prefix="tenantml-models-") as tmp:
            for step, r in enumerate(results.itertuples(index=False)):
                tid = validate_tenant_id(r.tenant_id)
                trained = r.status == "ok"
                src = rid
                if child_runs:
                    child = client.create_run(experiment, run_name=f"{tid}", tags={
                        **base_tags, "mlflow.parentRunId": rid, TENANT_TAG: tid, "tenantml.status": str(r.status)})
                    src = child.info.run_id
                    out.tenant_runs[tid] = src
                name = model_name(prefix, dataset, tid)
                tags = {**base_tags, TENANT_TAG: tid, "tenantml.status": str(r.status),
                        "tenantml.registered_model": name}
                error = str(r.error or "")[:5000]
                if not trained:
                    tags["tenantml.error"] = error
                own = {k: str(v) for k in ("tier", "path") if isinstance(v := getattr(r, k, None), str)}
                lm = client.create_logged_model(experiment, name=logged_model_name(name), source_run_id=src,
                                                model_type=MODEL_TYPE, params={**model_params, **own}, tags=tags)
                out.logged_models[tid] = lm.model_id
                source_run[tid], location[tid] = src, lm.artifact_location
                metrics: list[Metric] = []
                if trained:
                    values = {**json.loads(r.metrics_json), "rows": r.rows, "epochs": r.epochs, "seconds": r.seconds}
                    metrics = [Metric(k, float(v), now, 0 if child_runs else step, model_id=lm.model_id)
                               for k, v in values.items()
                               if v is not None and not (isinstance(v, float) and math.isnan(v))]
                if child_runs:
                    client.log_batch(src, metrics=metrics, synchronous=True,
                                     tags=[] if trained else [RunTag("tenantml.error", error)])
                else:
                    job_metrics.extend(metrics)
                if trained:
                    stage = Path(tmp) / tid
                    write_model_dir(stage, bytes(r.model), run_id=src, artifact_path=lm.artifact_location,
                                    numeric=spec.numeric_features, categorical=spec.categorical_features,
                                    metadata={"tenant_id": tid, "dataset": dataset, "strategy": strategy,
                                              "tenantml_run_id": ctx.run_id}, model_id=lm.model_id)
                    _upload_model_dir(lm.artifact_location, stage)
                    shutil.rmtree(stage, ignore_errors=True)  # bounded disk at 10,000 tenants
                client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY if trained
                                             else LoggedModelStatus.FAILED)
                if child_runs:
                    client.set_terminated(src, RunStatus.to_string(RunStatus.FINISHED if trained
                                                                   else RunStatus.FAILED))
                outputs.append(LoggedModelOutput(lm.model_id, step))
                ctx.progress.advance()
        if outputs:
            client.log_outputs(rid, outputs)  # the run page's list of logged models
        for chunk in _chunks(job_metrics, _MAX_METRICS):
            client.log_batch(rid, metrics=list(chunk), synchronous=True)
        ctx.progress.done()

        known = registered_names(ctx, dataset)
        ctx.progress.start("registering models", len(ok))
        for r in ok.itertuples(index=False):
            name = model_name(prefix, dataset, r.tenant_id)
            if name not in known:
                ensure_registered_model(client, name, {"tenant_id": r.tenant_id, "dataset": dataset})
            source = location[r.tenant_id]  # not models:/<id>: no lookup, and a plain path every reader opens
            mv = client.create_model_version(
                name, source=source, run_id=source_run[r.tenant_id], model_id=out.logged_models[r.tenant_id],
                tags={"tenant_id": r.tenant_id, "dataset": dataset, "strategy": strategy,
                      "model_sha256": model_sha256(bytes(r.model)),
                      "metric_name": r.metric_name, "metric": f"{r.metric:.6g}",
                      "baseline_metric": f"{r.baseline_metric:.6g}", "tenantml_run_id": ctx.run_id,
                      "job_run_id": rid, "logged_model_id": out.logged_models[r.tenant_id],
                      **{k: str(v) for k, v in lineage.items()}, **(version_tags or {})})
            out.registered[r.tenant_id] = Registered(r.tenant_id, name, str(mv.version), source)
            ctx.progress.advance()
        ctx.progress.done()
        client.set_terminated(rid, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException:
        client.set_terminated(rid, RunStatus.to_string(RunStatus.FAILED))
        raise
    return out


def set_champions(ctx: JobContext, registered: Iterable[Registered]) -> None:
    """Point each tenant's champion alias at its chosen version.

    Called only after the versions' bytes are in the model store: a crash before this leaves the
    old champions serving, never an alias whose model the scorer cannot find.
    """
    alias = ctx.config.tracking.champion_alias
    for reg in registered:
        ctx.mlflow.set_registered_model_alias(reg.name, alias, reg.version)


def track_shared(ctx: JobContext, dataset: str, blob: bytes, *, params: dict[str, Any],
                 metrics: dict[str, float], lineage: dict[str, Any], artifacts: dict[str, Any]) -> TrainingRun:
    """One MLflow run for the shared model: its params, figures, consent snapshot, PII policy and
    read manifest as JSON artifacts of the run; the model itself a LoggedModel of that run (its
    metrics logged with its id) and one registered version (not yet champion)."""
    import time

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, RunStatus

    from tenantml.registry.model_dir import write_model_dir

    client = ctx.mlflow
    spec = ctx.config.datasets[dataset]
    name = shared_model_name(ctx.config.tracking.model_name_prefix, dataset)
    experiment = ctx.experiment_id()
    base_tags = {"tenantml.run_id": ctx.run_id, "tenantml.dataset": dataset, "tenantml.step": "train_shared",
                 "tenantml.strategy": "shared"}
    run = client.create_run(experiment, run_name=f"train-{dataset}-shared-{ctx.run_id}", tags=base_tags)
    rid = run.info.run_id
    out = TrainingRun(mlflow_run_id=rid, artifact_uri=run.info.artifact_uri)
    try:
        flat = [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in {**params, **lineage}.items()]
        log_batches(client, rid, [], flat, [])
        lm = client.create_logged_model(
            experiment, name=logged_model_name(name), source_run_id=rid, model_type=MODEL_TYPE,
            params=_flat_params({k: v for k, v in {**params, **lineage}.items() if k not in JOB_ONLY_PARAMS}),
            tags={**base_tags, TENANT_TAG: SHARED_ID, "tenantml.status": "ok", "tenantml.registered_model": name})
        out.logged_models[SHARED_ID] = lm.model_id
        now = int(time.time() * 1000)
        for chunk in _chunks(list(metrics.items()), _MAX_METRICS):
            client.log_batch(rid, metrics=[Metric(k, float(v), now, 0, model_id=lm.model_id) for k, v in chunk],
                             synchronous=True)
        with tempfile.TemporaryDirectory(prefix="tenantml-shared-") as tmp:
            stage = Path(tmp)
            write_model_dir(stage / "model", blob, run_id=rid, artifact_path=lm.artifact_location,
                            numeric=spec.numeric_features, categorical=spec.categorical_features,
                            metadata={"dataset": dataset, "strategy": "shared", "tenantml_run_id": ctx.run_id},
                            model_id=lm.model_id)
            _upload_model_dir(lm.artifact_location, stage / "model")
            (stage / "run").mkdir()
            for fname, payload in artifacts.items():
                (stage / "run" / fname).write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
            client.log_artifacts(rid, str(stage / "run"))
        client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
        client.log_outputs(rid, [LoggedModelOutput(lm.model_id, 0)])
        ensure_registered_model(client, name, {"dataset": dataset, "strategy": "shared"})
        source = lm.artifact_location
        mv = client.create_model_version(name, source=source, run_id=rid, model_id=lm.model_id, tags={
            "dataset": dataset, "strategy": "shared", "tenant_id": SHARED_ID, "tenantml_run_id": ctx.run_id,
            "model_sha256": model_sha256(blob), "job_run_id": rid, "logged_model_id": lm.model_id,
            **{k: str(v) for k, v in lineage.items()}})
        out.registered[SHARED_ID] = Registered(SHARED_ID, name, str(mv.version), source)
        client.set_terminated(rid, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException:
        client.set_terminated(rid, RunStatus.to_string(RunStatus.FAILED))
        raise
    return out


def shared_champion(ctx: JobContext, dataset: str) -> Any | None:
    """ModelVersion of the shared model's champion, or None."""
    name = shared_model_name(ctx.config.tracking.model_name_prefix, dataset)
    try:
        return ctx.mlflow.get_model_version_by_alias(name, ctx.config.tracking.champion_alias)
    except Exception as exc:
        if _not_found(exc):
            return None
        raise


@dataclass
class SharedChampion:
    """The shared champion's registry version and its verified bytes (None, with why, when the model
    store lacks its row or the row fails verification)."""

    version: Any
    blob: bytes | None
    problem: str | None = None


def shared_champion_model(ctx: JobContext, dataset: str) -> SharedChampion | None:
    """The shared champion with its bytes from model_store, verified; None without a champion."""
    from tenantml.io.model_store import verify

    mv = shared_champion(ctx, dataset)
    if mv is None:
        return None
    stored = load_models(ctx.spark, ctx.tables.model_store, {SHARED_ID: (mv.name, str(mv.version))})
    if stored.empty:
        return SharedChampion(mv, None, f"shared champion {mv.name} v{mv.version} is missing from "
                                        f"{ctx.tables.model_store.display}")
    row = stored.iloc[0]
    problem = verify(row.to_dict(), ctx.signing_key, dict(mv.tags or {}))
    return SharedChampion(mv, None if problem else bytes(row["model"]), problem)


def register_serving_version(ctx: JobContext, dataset: str, tenant_id: str, source: Registered,
                             tags: dict[str, str], run_id: str | None = None) -> Registered:
    """A version of the tenant's own registered model that points at a shared model's artifacts,
    so `models:/<dataset>__<tenant>@champion` stays the one URI whatever strategy serves it.
    ``run_id`` is the source version's run (lineage), passed in so many tenants cost no lookups."""
    client = ctx.mlflow
    name = model_name(ctx.config.tracking.model_name_prefix, dataset, tenant_id)
    ensure_registered_model(client, name, {"tenant_id": tenant_id, "dataset": dataset})
    mv = client.create_model_version(name, source=source.source, run_id=run_id, tags={
        **tags, "tenant_id": tenant_id, "dataset": dataset, "base_model": source.name,
        "base_version": source.version, "tenantml_run_id": ctx.run_id})
    return Registered(tenant_id, name, str(mv.version), source.source)


def tenant_run_ids(ctx: JobContext, tenant_id: str, include_deleted: bool = False) -> list[str]:
    """Every per-tenant (child) run of ``tenant_id`` in the project's experiment, all pages (jobs
    tracked with ``tracking.tenant_runs``, and every job before LoggedModels)."""
    from mlflow.entities import ViewType
    from mlflow.utils import get_results_from_paginated_fn

    tid = validate_tenant_id(tenant_id, where="an MLflow run filter")
    exp = ctx.mlflow.get_experiment_by_name(ctx.config.tracking.experiment)
    if exp is None:
        return []
    view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
    runs = get_results_from_paginated_fn(
        lambda n, token: ctx.mlflow.search_runs([exp.experiment_id],
                                                filter_string=f"tags.`tenantml.tenant_id` = '{tid}'",
                                                run_view_type=view, max_results=n, page_token=token), 1000)
    return [r.info.run_id for r in runs]


def tenant_logged_model_ids(ctx: JobContext, tenant_id: str) -> list[str]:
    """Every LoggedModel of ``tenant_id`` in the project's experiment (failed ones too), all pages.

    MLflow's search never returns soft-deleted models, so ones deleted but not yet purged are not
    listed again."""
    from mlflow.utils import get_results_from_paginated_fn

    tid = validate_tenant_id(tenant_id, where="an MLflow logged-model filter")
    exp = ctx.mlflow.get_experiment_by_name(ctx.config.tracking.experiment)
    if exp is None:
        return []
    models = get_results_from_paginated_fn(
        lambda n, token: ctx.mlflow.search_logged_models([exp.experiment_id],
                                                         filter_string=f"tags.`{TENANT_TAG}` = '{tid}'",
                                                         max_results=n, page_token=token), 1000)
    return sorted(m.model_id for m in models)


def champion_versions(ctx: JobContext, dataset: str, tenants: Iterable[str]) -> dict[str, Any]:
    """tenant -> ModelVersion of its champion (tags included); tenants without one are left out.

    One alias read per tenant that has a registered model; no registry search."""
    client = ctx.mlflow
    prefix = ctx.config.tracking.model_name_prefix
    alias = ctx.config.tracking.champion_alias
    known = registered_names(ctx, dataset)
    found: dict[str, Any] = {}
    for t in tenants:
        name = model_name(prefix, dataset, t)
        if name not in known:
            continue
        try:
            found[t] = client.get_model_version_by_alias(name, alias)
        except Exception as exc:
            if _not_found(exc):
                continue
            raise
    return found


_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")


def version_tags(ctx: JobContext, names: Iterable[str]) -> dict[tuple[str, str], dict[str, str]]:
    """(name, version) -> registry tags of every version of these registered models (one paged
    search per model, by exact name: the one filter Unity Catalog's registry supports)."""
    from mlflow.utils import get_results_from_paginated_fn

    out: dict[tuple[str, str], dict[str, str]] = {}
    for name in sorted(set(names)):
        if not _MODEL_NAME_RE.fullmatch(name):  # it goes into a filter string
            log.warning("model name %r is not one tenantml registers: lineage left empty", name)
            continue
        versions = get_results_from_paginated_fn(
            lambda n, token, nm=name: ctx.mlflow.search_model_versions(filter_string=f"name = '{nm}'",
                                                                       max_results=n, page_token=token), 1000)
        for mv in versions:
            out[(mv.name, str(mv.version))] = dict(mv.tags or {})
    return out
