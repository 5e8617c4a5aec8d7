"""The tenant-scoped gate: what code acting for one tenant may read, write, load and touch.

Analyst notebooks, per-tenant exports and support tooling act for one tenant at a time; they get a
`TenantGate` instead of raw tables and clients. Every method filters to, or checks against, the
gate's tenant with bound values (never SQL text), and refuses anything else with a
`TenantIsolationError` that names both tenants and the table, model, run or path involved.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantml.errors import TenantIsolationError, UnknownTenantError
from tenantml.tables import TableRef
from tenantml.tenancy import validate_tenant_id

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame

    from tenantml.context import JobContext


class TenantGate:
    def __init__(self, ctx: JobContext, tenant_id: str) -> None:
        from tenantml.tenants import list_tenant_ids

        self.tenant_id = validate_tenant_id(tenant_id, where="the tenant gate")
        if self.tenant_id not in list_tenant_ids(ctx.spark, ctx.tables.tenants):
            raise UnknownTenantError(f"tenant {self.tenant_id!r} is not registered in {ctx.tables.tenants.display}")
        self.ctx = ctx

    def _refuse(self, what: str) -> TenantIsolationError:
        return TenantIsolationError(f"tenant {self.tenant_id!r}: {what}: refused")

    # ------------------------------------------------------------------ data
    def read(self, ref: TableRef) -> DataFrame:
        """The gate's tenant's rows of a tenant-partitioned table, and nothing else."""
        from pyspark.sql import functions as F

        from tenantml.io import read_table

        df = read_table(self.ctx.spark, ref)
        if "tenant_id" not in df.columns:
            raise self._refuse(f"table {ref.display} has no tenant_id column, so it cannot be read per tenant")
        return df.where(F.col("tenant_id") == F.lit(self.tenant_id))

    def write(self, df: DataFrame, ref: TableRef) -> None:
        """Replace the gate's tenant's partition of ``ref`` with ``df``; a foreign row refuses all."""
        from pyspark.sql import functions as F

        from tenantml.io import replace_tenants

        if "tenant_id" not in df.columns:
            raise self._refuse(f"rows for {ref.display} carry no tenant_id column")
        foreign = (df.where(F.col("tenant_id").isNull() | (F.col("tenant_id") != F.lit(self.tenant_id)))
                   .select("tenant_id").distinct().limit(5).collect())
        if foreign:
            others = sorted(str(r["tenant_id"]) for r in foreign)
            raise self._refuse(f"writing rows of tenant(s) {others} into {ref.display}")
        replace_tenants(df, ref, [self.tenant_id])

    # ------------------------------------------------------------------ models
    def champion(self, dataset: str) -> Any:
        """The tenant's champion ModelVersion, after the same entitlement check scoring applies."""
        from tenantml.pipeline.score import entitled
        from tenantml.registry.tracking import champion_versions, shared_model_name
        from tenantml.tenants import tenant_policies

        name, _ = self.ctx.config.dataset(dataset)
        mv = champion_versions(self.ctx, name, [self.tenant_id]).get(self.tenant_id)
        if mv is None:
            raise UnknownTenantError(f"tenant {self.tenant_id!r} has no champion for dataset {name!r}")
        policy = tenant_policies(self.ctx.spark, self.ctx.tables.tenants, [self.tenant_id],
                                 self.ctx.config.tenants)[self.tenant_id]
        why = entitled(self.tenant_id, dict(mv.tags), policy,
                       shared_model_name(self.ctx.config.tracking.model_name_prefix, name))
        if why:
            raise TenantIsolationError(why)
        return mv

    def load_model(self, dataset: str, model_uri: str | None = None) -> Any:
        """A TabularModel the tenant may use: its champion, or a version of its own registered model."""
        from tenantml.models import TabularModel
        from tenantml.registry.store import load_models
        from tenantml.registry.tracking import model_name

        name, _ = self.ctx.config.dataset(dataset)
        own = model_name(self.ctx.config.tracking.model_name_prefix, name, self.tenant_id)
        if model_uri is None:
            mv = self.champion(name)
            version = str(mv.version)
        else:
            prefix = f"models:/{own}/"
            alias_prefix = f"models:/{own}@"
            if model_uri.startswith(alias_prefix):
                version = str(self.ctx.mlflow.get_model_version_by_alias(own, model_uri[len(alias_prefix):]).version)
            elif model_uri.startswith(prefix) and model_uri[len(prefix):].isdigit():
                version = model_uri[len(prefix):]
            else:
                raise self._refuse(f"model {model_uri!r} is not a version of its own model {own!r}")
        rows = load_models(self.ctx.spark, self.ctx.tables.model_store, {self.tenant_id: (own, version)})
        if rows.empty:
            raise self._refuse(f"{own} v{version} has no stored bytes for this tenant")
        return TabularModel.from_bytes(bytes(rows.iloc[0]["model"]))

    def score(self, dataset: str, rows: pd.DataFrame) -> pd.DataFrame:
        """Score the tenant's own rows with its entitled champion; another tenant's row refuses all."""
        if "tenant_id" in rows.columns:
            others = sorted({str(t) for t in rows["tenant_id"].unique()} - {self.tenant_id})
            if others:
                raise self._refuse(f"scoring rows of tenant(s) {others}")
        model = self.load_model(dataset)
        out = rows.copy()
        out["score"] = model.predict(rows)
        return out

    # ------------------------------------------------------------------ tracking
    def run_metrics(self, run_id: str) -> dict[str, float]:
        """Metrics of one of the tenant's own (child) runs."""
        run = self.ctx.mlflow.get_run(run_id)
        owner = run.data.tags.get("tenantml.tenant_id")
        if owner != self.tenant_id:
            raise self._refuse(f"MLflow run {run_id} belongs to {owner!r}" if owner
                               else f"MLflow run {run_id} is not a per-tenant run")
        return dict(run.data.metrics)

    def runs(self) -> list[str]:
        """Ids of the tenant's own MLflow runs."""
        from tenantml.registry.tracking import tenant_run_ids

        return tenant_run_ids(self.ctx, self.tenant_id)

    # ------------------------------------------------------------------ files
    def artifact_path(self, *parts: str) -> Path:
        """A path under the tenant's own folder; separators, '..' and absolute parts are refused."""
        root = (self.ctx.data_dir / "tenants" / self.tenant_id).resolve()
        for p in parts:
            if not p or p in (".", "..") or "/" in p or "\\" in p or "\x00" in p or Path(p).is_absolute():
                raise self._refuse(f"path part {p!r} would leave its folder {root}")
        path = root.joinpath(*parts).resolve()
        if root != path and root not in path.parents:
            raise self._refuse(f"path {path} is outside its folder {root}")
        return path


ISOLATION_MARKER = "tenantml-isolation:"


class TenantScope:
    """The batch steps' gate: one run acting for a set of tenants at once.

    Per-tenant steps read, write and load models only through it, so whatever a step's own logic
    does, a row of a tenant outside the run's selection is never read, a write carrying one fails
    before its commit (checked row by row inside the write job itself, at no extra Spark job), and
    a model that is not the tenant's own registered model is never loaded for it.
    """

    def __init__(self, ctx: JobContext, tenants: Iterable[str], step: str) -> None:
        self.ctx = ctx
        self.step = step
        self.tenants: tuple[str, ...] = tuple(sorted({validate_tenant_id(t, where=f"step {step}") for t in tenants}))

    def _refuse(self, what: str) -> TenantIsolationError:
        shown = ", ".join(self.tenants[:5]) + (f" and {len(self.tenants) - 5} more" if len(self.tenants) > 5 else "")
        return TenantIsolationError(f"step {self.step} acting for tenant(s) [{shown}]: {what}: refused")

    def read(self, ref: TableRef, version: int | None = None) -> DataFrame:
        """Only the scope's rows of a tenant-partitioned table (at a pinned version if given)."""
        from pyspark.sql import functions as F

        from tenantml.io import read_table

        df = read_table(self.ctx.spark, ref, version=version)
        if "tenant_id" not in df.columns:
            raise self._refuse(f"table {ref.display} has no tenant_id column, so it cannot be read per tenant")
        return df.where(F.col("tenant_id").isin(list(self.tenants)))

    def guard(self, df: DataFrame, ref: TableRef, include_null: bool = False) -> DataFrame:
        """``df`` unchanged, except that a row of a tenant outside the scope fails the job that writes it."""
        from pyspark.sql import functions as F

        col = F.col("tenant_id")
        allowed = col.isin(list(self.tenants)) | (col.isNull() if include_null else F.lit(False))
        message = F.concat(F.lit(f"{ISOLATION_MARKER} step {self.step} wrote a row of tenant "),
                           F.coalesce(col, F.lit("<null>")), F.lit(f" into {ref.display}"))
        return df.withColumn("tenant_id", F.when(allowed, col).otherwise(F.raise_error(message)))

    def check(self, tenants: Iterable[str], what: str) -> None:
        """Driver-side rows (model store rows, registry writes): every tenant must be in the scope."""
        outside = sorted({str(t) for t in tenants} - set(self.tenants))
        if outside:
            raise self._refuse(f"{what} for tenant(s) {outside[:5]}")

    def write(self, df: DataFrame, ref: TableRef, tenants: Iterable[str] | None = None,
              include_null: bool = False) -> None:
        """Replace ``tenants``' partitions (default: the whole scope) of ``ref`` with ``df``."""
        from tenantml.io import replace_tenants

        ids = list(self.tenants if tenants is None else tenants)
        self.check(ids, f"replacing partitions in {ref.display}")
        try:
            replace_tenants(self.guard(df, ref, include_null), ref, ids, include_null=include_null)
        except Exception as exc:
            text = str(exc)
            if ISOLATION_MARKER not in text:
                raise
            detail = text[text.index(ISOLATION_MARKER) + len(ISOLATION_MARKER):].split("\n")[0].strip()
            raise self._refuse(detail) from None

    def load_models(self, wanted: dict[str, tuple[str, str]]) -> pd.DataFrame:
        """Stored bytes of each tenant's (model, version), which must be a version of its own model."""
        from tenantml.registry.store import load_models
        from tenantml.registry.tracking import model_name

        prefix = self.ctx.config.tracking.model_name_prefix
        for tenant, (name, _) in wanted.items():
            if tenant not in self.tenants:
                raise self._refuse(f"loading a model for tenant {tenant!r}")
            if name not in {model_name(prefix, ds, tenant) for ds in self.ctx.config.datasets}:
                raise self._refuse(f"loading model {name!r} for tenant {tenant!r}: not its own model")
        return load_models(self.ctx.spark, self.ctx.tables.model_store, wanted)
