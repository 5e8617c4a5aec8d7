"""Offboarding: remove every trace of one tenant, and make sure time travel cannot bring it back.

What a tenant leaves behind is found, not listed by hand: every Delta table of the project with a
`tenant_id` (or raw tenant) column, the tenant's registered models, its MLflow LoggedModels (one
per training candidate, tag `tenantml.tenant_id`), the MLflow runs tagged with the tenant (child
runs, from jobs tracked with `tracking.tenant_runs` or before LoggedModels), and shared-training
checkpoints. Without confirmation nothing is changed and the plan is returned; with it, rows are
deleted, deletion vectors purged, and, when the operator also asks for it, old files vacuumed past
retention.

What stays in MLflow: each training job's run keeps the job-wide params and counts, and, because
MLflow writes every metric logged with a model id to the run as well, a run-level copy of the
tenant's metric values (`auc`, `rows`, ...) at the tenant's step in that job. That copy names no
tenant, and once the LoggedModel is purged nothing links the step to the tenant; removing it means
deleting the whole job run (`mlflow gc` would also cascade to every other tenant's model metrics).
With `tracking.tenant_runs` those metrics live in the tenant's child run and go with it. The job
run's `tenant_quotas` param names tenants with non-default quotas and also stays.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantml.core.errors import UnknownTenantError
from tenantml.core.ids import validate_tenant_id
from tenantml.io.tables import TableRef

if TYPE_CHECKING:
    from tenantml.io.context import JobContext

log = logging.getLogger(__name__)
TENANT_COLUMNS = ("tenant_id", "_tenant_raw")


@dataclass
class OffboardReport:
    tenant_id: str
    executed: bool
    purged_history: bool
    rows: dict[str, int] = field(default_factory=dict)          # table -> rows of the tenant
    models: list[str] = field(default_factory=list)             # registered models removed
    runs: list[str] = field(default_factory=list)               # MLflow runs removed
    logged_models: list[str] = field(default_factory=list)      # MLflow LoggedModel ids removed
    checkpoints: list[str] = field(default_factory=list)
    shared_models_trained_with_tenant: list[str] = field(default_factory=list)
    # serving models of other tenants (or the shared one) that learned from this tenant's rows; each
    # stays tainted until the next run retrains or replaces it
    serving_models_to_retrain: list[str] = field(default_factory=list)
    lineage_rows: int = 0                                       # model_lineage rows erased or blanked
    reports: list[str] = field(default_factory=list)            # run reports naming the tenant: re-rendered
    figures: list[str] = field(default_factory=list)            # notebook figure folders: removed
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tenant_id": self.tenant_id, "executed": self.executed, "purged_history": self.purged_history,
                "rows": self.rows, "models": self.models, "runs": self.runs,
                "logged_models": self.logged_models, "checkpoints": self.checkpoints,
                "shared_models_trained_with_tenant": self.shared_models_trained_with_tenant,
                "serving_models_to_retrain": self.serving_models_to_retrain, "lineage_rows": self.lineage_rows,
                "reports": self.reports, "figures": self.figures, "notes": self.notes}


def project_tables(ctx: JobContext) -> list[TableRef]:
    """Every Delta table of this project: the warehouse folder locally, the schema on a catalog."""
    from tenantml.io.delta import is_delta_path

    spark = ctx.spark
    cfg = ctx.config.tables
    if cfg.catalog and cfg.schema_:
        names = [t.name for t in spark.catalog.listTables(f"{cfg.catalog}.{cfg.schema_}")]
        return [ctx.tables.ref(n) for n in sorted(names)]
    root = ctx.tables.warehouse
    if not root.exists():
        return []
    return [ctx.tables.ref(p.name) for p in sorted(root.iterdir())
            if p.is_dir() and is_delta_path(spark, str(p))]


def _tenant_filter(columns: list[str], tenant_id: str) -> Any:
    from pyspark.sql import functions as F

    cond = None
    for c in TENANT_COLUMNS:
        if c in columns:
            term = F.col(c) == F.lit(tenant_id)  # a bound value, never SQL text
            cond = term if cond is None else (cond | term)
    return cond


def _tenant_predicate(columns: list[str], tenant_id: str) -> str | None:
    """`_tenant_filter` as the SQL text of a ``DELETE``: Delta's SQL parser does not bind query
    parameters (``spark.sql(..., args=...)`` leaves them unbound with Delta's extension loaded), so
    the id goes in as a literal, re-validated here (letters, digits, '_' and '-' only)."""
    from tenantml.core.ids import tenant_in_predicate

    terms = [tenant_in_predicate([validate_tenant_id(tenant_id, where="tenants delete")], column=c)
             for c in TENANT_COLUMNS if c in columns]
    return " OR ".join(terms) or None


def _shared_models_with(ctx: JobContext, tenant_id: str) -> list[str]:
    """Shared model versions whose training set held this tenant's rows (they need retraining)."""
    import json
    import tempfile

    from tenantml.registry.tracking import shared_model_name

    found = []
    for dataset in ctx.config.datasets:
        name = shared_model_name(ctx.config.tracking.model_name_prefix, dataset)
        try:
            versions = ctx.mlflow.search_model_versions(f"name = '{name}'")
        except Exception:
            continue
        for v in versions:
            if not v.run_id:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    path = ctx.mlflow.download_artifacts(v.run_id, "trainset.json", tmp)
                except Exception:
                    continue
                with open(path) as f:
                    if tenant_id in json.load(f).get("contributors", {}):
                        found.append(f"{name}/{v.version}")
    return found


def _serving_models_with(ctx: JobContext, tenant_id: str) -> list[str]:
    """`name/version` of every serving model, in every dataset, that still holds the tenant's rows."""
    from tenantml.registry.lineage import serving_models_with

    return sorted({s.model for d in ctx.config.datasets for s in serving_models_with(ctx, d, tenant_id)})


def _reports_naming(ctx: JobContext, tenant_id: str) -> list[str]:
    """Run reports whose page mentions the tenant id (a false match only costs a re-render)."""
    root = ctx.data_dir / "reports"
    if not root.exists():
        return []
    return sorted(str(p) for p in root.glob("*.html") if tenant_id in p.read_text(encoding="utf-8", errors="replace"))


def _rerender_reports(ctx: JobContext, report: OffboardReport) -> None:
    """Render each report again from the tables the tenant is now gone from; drop it if the run
    held nothing else."""
    from tenantml.apps.report import write_run_report
    from tenantml.core.errors import RunNotFoundError

    for path in map(Path, report.reports):
        rendered = False
        for dataset in ctx.config.datasets:
            try:
                write_run_report(ctx, dataset, path.stem)
                rendered = True
                break
            except RunNotFoundError:
                continue
        if not rendered:
            path.unlink(missing_ok=True)
            report.notes.append(f"run report {path.name} covered only this tenant and was removed")


def offboard_tenant(ctx: JobContext, tenant_id: str, *, confirm: bool = False,
                    purge_history: bool = False) -> OffboardReport:
    """Plan (confirm=False) or carry out the removal of ``tenant_id`` from tables, registry and runs."""
    from tenantml.core.ids import model_name
    from tenantml.io import read_table
    from tenantml.io.delta import sql_name, with_conflict_retries
    from tenantml.io.lineage import erase_contributor
    from tenantml.io.tenants import list_tenant_ids
    from tenantml.registry.tracking import registered_model_exists, tenant_logged_model_ids, tenant_run_ids

    tenant_id = validate_tenant_id(tenant_id, where="tenants delete")
    spark = ctx.spark
    report = OffboardReport(tenant_id=tenant_id, executed=confirm, purged_history=confirm and purge_history)
    tables = project_tables(ctx)
    for ref in tables:
        df = read_table(spark, ref)
        cond = _tenant_filter(df.columns, tenant_id)
        if cond is not None:
            n = df.where(cond).count()
            if n:
                report.rows[ref.name] = n
    prefix = ctx.config.tracking.model_name_prefix
    report.models = sorted(model_name(prefix, d, tenant_id) for d in ctx.config.datasets
                           if registered_model_exists(ctx, model_name(prefix, d, tenant_id)))
    report.runs = tenant_run_ids(ctx, tenant_id, include_deleted=True)
    report.logged_models = tenant_logged_model_ids(ctx, tenant_id)
    ckpt_root = ctx.data_dir / "checkpoints"
    report.checkpoints = sorted(str(p) for p in ckpt_root.glob("*.pt")) if ckpt_root.exists() else []
    report.shared_models_trained_with_tenant = _shared_models_with(ctx, tenant_id)
    report.serving_models_to_retrain = _serving_models_with(ctx, tenant_id)
    report.reports = _reports_naming(ctx, tenant_id)
    figures_root = ctx.data_dir / "notebooks"
    report.figures = sorted(str(p) for p in figures_root.iterdir() if p.is_dir()) if figures_root.exists() else []
    if not (report.rows or report.models or report.runs or report.logged_models
            or tenant_id in list_tenant_ids(spark, ctx.tables.tenants)):
        raise UnknownTenantError(f"tenant {tenant_id!r} has no rows, models or runs in this project")
    if report.shared_models_trained_with_tenant:
        report.notes.append("shared model versions above learned from this tenant's rows; the next "
                            "train-shared excludes the tenant, then promote replaces them")
    if report.serving_models_to_retrain:
        report.notes.append(f"{len(report.serving_models_to_retrain)} serving model(s) of other tenants learned "
                            "from this tenant's rows; they are tainted and the next run retrains or replaces "
                            "them (`tenantml lineage --contains ID` lists what still holds its rows)")
    else:
        report.notes.append("no serving model of another tenant holds this tenant's rows")
    if not confirm:
        return report

    for ref in tables:
        if ref.name not in report.rows:
            continue
        predicate = _tenant_predicate(read_table(spark, ref).columns, tenant_id)

        def delete(r: TableRef = ref, where: str | None = predicate) -> None:
            spark.sql(f"DELETE FROM {sql_name(r)} WHERE {where}")

        with_conflict_retries(delete, what=ref.display)
        _purge_deletion_vectors(ctx, ref)
    report.lineage_rows = with_conflict_retries(
        lambda: erase_contributor(spark, ctx.tables.model_lineage, tenant_id), what=ctx.tables.model_lineage.display)
    if report.lineage_rows:
        _purge_deletion_vectors(ctx, ctx.tables.model_lineage)
    for name in report.models:
        ctx.mlflow.delete_registered_model(name)
    for run_id in report.runs:
        ctx.mlflow.delete_run(run_id)
    for model_id in report.logged_models:  # a soft delete: its artifacts stay until purged below
        ctx.mlflow.delete_logged_model(model_id)
    _hard_delete_runs(ctx, report)
    for p in report.checkpoints:  # weights that may have learned from the tenant's rows
        Path(p).unlink(missing_ok=True)
    _remove_staged_copies(ctx, report)
    _rerender_reports(ctx, report)
    for folder in report.figures:  # any figure may draw the tenant; the next notebook run redraws them
        shutil.rmtree(folder, ignore_errors=True)
    if report.figures:
        report.notes.append("notebook figures under <data_dir>/notebooks were removed; rerun the notebooks "
                            "to redraw them (figures saved elsewhere with the output_dir widget are not tracked)")
    if purge_history:
        prev = spark.conf.get("spark.databricks.delta.retentionDurationCheck.enabled", "true") or "true"
        spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        try:
            for ref in tables:
                if ref.name in report.rows or (report.lineage_rows and ref.name == ctx.tables.model_lineage.name):
                    spark.sql(f"VACUUM {sql_name(ref)} RETAIN 0 HOURS")
        finally:
            spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", prev)
    else:
        report.notes.append("Delta history still holds the deleted rows until VACUUM passes the retention "
                            "period; rerun with --purge-history to vacuum now")
    return report


def _remove_staged_copies(ctx: JobContext, report: OffboardReport) -> None:
    """Shared training exports each training-set version to the staging directory for its worker
    processes; a dataset whose training set held the tenant's rows loses those copies (the next
    shared training exports the table again, without the tenant)."""
    from tenantml.training.shared_data import remove_shared_exports

    for dataset in ctx.config.datasets:
        if ctx.tables.shared_trainset(dataset).name in report.rows:
            remove_shared_exports(ctx.staging_dir, dataset)
            report.notes.append(f"staged copies of the {dataset} shared training set were removed")


def _purge_deletion_vectors(ctx: JobContext, ref: TableRef) -> None:
    """With deletion vectors a DELETE only marks rows; rewrite the files so vacuum can drop them."""
    from tenantml.io.delta import sql_name, table_properties

    props = table_properties(ctx.spark, ref)
    if str(props.get("delta.enableDeletionVectors", "false")).lower() == "true":
        ctx.spark.sql(f"REORG TABLE {sql_name(ref)} APPLY (PURGE)")


def _hard_delete_runs(ctx: JobContext, report: OffboardReport) -> None:
    """Soft-deleted runs and LoggedModels keep their data and artifacts; `mlflow gc` removes them
    for good. Given no ids of one kind, `mlflow gc` purges every already-deleted one of that kind in
    the store (its CLI reads no ids as all), which only finishes what someone else deleted."""
    if not (report.runs or report.logged_models):
        return
    uri = ctx.tracking_uri
    if not uri.startswith("sqlite:"):
        report.notes.append("runs and logged models were deleted; the tracking server purges deleted runs "
                            "and models (and their artifacts) on its own schedule")
        return
    ids = [*(["--run-ids", ",".join(report.runs)] if report.runs else []),
           *(["--logged-model-ids", ",".join(report.logged_models)] if report.logged_models else [])]
    proc = subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri, "--tracking-uri", uri,
                           *ids], capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"mlflow gc failed for tenant {report.tenant_id!r}: {proc.stderr[-2000:]}")
