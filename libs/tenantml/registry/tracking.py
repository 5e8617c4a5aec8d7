"""Track a training job as one MLflow run with a child run per tenant, and register models cheaply.

Per-model cost is what matters with thousands of tenants: no `log_model` (seconds each), but a
model directory written by tenantml, one `log_batch` and one `log_artifacts` per tenant's child
run, and a few small registry calls (about 30 ms per model on SQLite in all; see bench/ and
docs/benchmarks.md).
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
    tenant_runs: dict[str, str] = field(default_factory=dict)  # tenant -> child run id


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
    """One MLflow run for the job, one child run per tenant (its metrics and model artifacts), and
    every trained tenant's model registered (promotion moves aliases later).

    Per-tenant child runs keep every tenant's tracking data separable: offboarding deletes a
    tenant's runs without touching the others'.
    """
    import math
    import time

    from mlflow.entities import Metric, RunStatus, RunTag

    from tenantml.registry.model_dir import write_model_dir

    client = ctx.mlflow
    spec = ctx.config.datasets[dataset]
    prefix = ctx.config.tracking.model_name_prefix
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
                                            ("tenantml.tenants_failed", str(len(results) - len(ok)))])
        ctx.progress.phase(f"logging {len(results)} tenant runs and {len(ok)} model artifacts")
        ctx.progress.start("tenant runs", len(results))
        now = int(time.time() * 1000)
        child_uri: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="tenantml-models-") as tmp:
            for r in results.itertuples(index=False):
                tid = validate_tenant_id(r.tenant_id)
                child = client.create_run(experiment, run_name=f"{tid}", tags={
                    **base_tags, "mlflow.parentRunId": rid, "tenantml.tenant_id": tid, "tenantml.status": str(r.status)})
                cid = child.info.run_id
                out.tenant_runs[tid] = cid
                child_uri[tid] = child.info.artifact_uri
                metrics: list[Metric] = []
                tags: list[RunTag] = []
                if r.status == "ok":
                    values = {**json.loads(r.metrics_json), "rows": r.rows, "epochs": r.epochs, "seconds": r.seconds}
                    metrics = [Metric(k, float(v), now, 0) for k, v in values.items()
                               if v is not None and not (isinstance(v, float) and math.isnan(v))]
                else:
                    tags = [RunTag("tenantml.error", str(r.error or "")[:5000])]
                client.log_batch(cid, metrics=metrics, tags=tags, synchronous=True)
                if r.status == "ok":
                    write_model_dir(Path(tmp) / tid, bytes(r.model), run_id=cid, artifact_path="model",
                                    numeric=spec.numeric_features, categorical=spec.categorical_features,
                                    metadata={"tenant_id": tid, "dataset": dataset, "strategy": strategy,
                                              "tenantml_run_id": ctx.run_id})
                    client.log_artifacts(cid, str(Path(tmp) / tid), "model")
                client.set_terminated(cid, RunStatus.to_string(RunStatus.FINISHED if r.status == "ok"
                                                               else RunStatus.FAILED))
                ctx.progress.advance()
        ctx.progress.done()

        known = registered_names(ctx, dataset)
        ctx.progress.start("registering models", len(ok))
        for r in ok.itertuples(index=False):
            name = model_name(prefix, dataset, r.tenant_id)
            if name not in known:
                ensure_registered_model(client, name, {"tenant_id": r.tenant_id, "dataset": dataset})
            cid = out.tenant_runs[r.tenant_id]
            source = f"{child_uri[r.tenant_id]}/model"
            mv = client.create_model_version(
                name, source=source, run_id=cid,
                tags={"tenant_id": r.tenant_id, "dataset": dataset, "strategy": strategy,
                      "model_sha256": model_sha256(bytes(r.model)),
                      "metric_name": r.metric_name, "metric": f"{r.metric:.6g}",
                      "baseline_metric": f"{r.baseline_metric:.6g}", "tenantml_run_id": ctx.run_id,
                      "job_run_id": rid, **{k: str(v) for k, v in lineage.items()}, **(version_tags or {})})
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
    read manifest as JSON artifacts, and one registered version (not yet champion)."""
    from mlflow.entities import RunStatus

    from tenantml.registry.model_dir import write_model_dir

    client = ctx.mlflow
    spec = ctx.config.datasets[dataset]
    name = shared_model_name(ctx.config.tracking.model_name_prefix, dataset)
    run = client.create_run(ctx.experiment_id(), run_name=f"train-{dataset}-shared-{ctx.run_id}",
                            tags={"tenantml.run_id": ctx.run_id, "tenantml.dataset": dataset,
                                  "tenantml.step": "train_shared", "tenantml.strategy": "shared"})
    rid = run.info.run_id
    out = TrainingRun(mlflow_run_id=rid, artifact_uri=run.info.artifact_uri)
    try:
        flat = [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in {**params, **lineage}.items()]
        log_batches(client, rid, list(metrics.items()), flat, [])
        with tempfile.TemporaryDirectory(prefix="tenantml-shared-") as tmp:
            stage = Path(tmp)
            write_model_dir(stage / "models" / SHARED_ID, blob, run_id=rid, artifact_path=f"models/{SHARED_ID}",
                            numeric=spec.numeric_features, categorical=spec.categorical_features,
                            metadata={"dataset": dataset, "strategy": "shared", "tenantml_run_id": ctx.run_id})
            for fname, payload in artifacts.items():
                (stage / fname).write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
            client.log_artifacts(rid, str(stage))
        ensure_registered_model(client, name, {"dataset": dataset, "strategy": "shared"})
        source = f"{run.info.artifact_uri}/models/{SHARED_ID}"
        mv = client.create_model_version(name, source=source, run_id=rid, tags={
            "dataset": dataset, "strategy": "shared", "tenant_id": SHARED_ID, "tenantml_run_id": ctx.run_id,
            "model_sha256": model_sha256(blob),
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
    """Every per-tenant (child) run of ``tenant_id`` in the project's experiment, all pages."""
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
