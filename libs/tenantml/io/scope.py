"""The tenant scope: the only way a step (or a notebook) reads or writes tenant data, loads a
model or writes a file.

Batch steps act for many tenants at once; the runner opens one `TenantScope` per step over the
tenants the step may act for. Whatever a step's own logic does:

- `read(table)` returns only the scope's rows (a bound-value `isin` filter, never SQL text);
- `write(df, table)` replaces the scope's partitions, and every row passes a guard evaluated inside
  the write job itself (`raise_error` for a `tenant_id` outside the scope), so a bug that produced
  another tenant's row fails the job before the Delta commit, at no extra Spark job;
- `check(tenants, what)` guards driver-side writes (model store rows, registry writes);
- `load_models({tenant: (model, version)})` loads only versions of each tenant's own registered
  model (bytes from `model_store` keyed by the tenant);
- `artifact_path(tenant, *parts)` stays under `<data_dir>/tenants/<id>/`.

Every refusal is a `TenantIsolationError` naming the step, the tenants and the table, model or path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tenantml.core.errors import TenantIsolationError
from tenantml.core.ids import SHARED_ID, TenantId, model_name, validate_tenant_id
from tenantml.io.tables import TableRef

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

ISOLATION_MARKER = "tenantml-isolation:"


class TenantScope:
    """A set of tenants that one step (or one reader) acts for; see the module docstring."""

    def __init__(self, spark: SparkSession | Callable[[], SparkSession], tenants: Iterable[str], step: str, *,
                 model_store: TableRef, model_prefix: str = "", datasets: Sequence[str] = (),
                 data_dir: Path | None = None) -> None:
        # A callable is called on first use: opening a scope starts no session.
        self._spark = spark
        self.step = step
        self.tenants: tuple[TenantId, ...] = tuple(sorted({validate_tenant_id(t, where=f"step {step}")
                                                           for t in tenants}))
        self._model_store = model_store
        self._prefix = model_prefix
        self._datasets = tuple(datasets)
        self._data_dir = data_dir

    @property
    def spark(self) -> SparkSession:
        if callable(self._spark) and not hasattr(self._spark, "sparkContext") and not hasattr(self._spark, "client"):
            self._spark = self._spark()
        return self._spark  # type: ignore[return-value]

    def _refuse(self, what: str) -> TenantIsolationError:
        shown = ", ".join(self.tenants[:5]) + (f" and {len(self.tenants) - 5} more" if len(self.tenants) > 5 else "")
        return TenantIsolationError(f"step {self.step} acting for tenant(s) [{shown}]: {what}: refused")

    def __contains__(self, tenant_id: object) -> bool:
        return tenant_id in self.tenants

    def narrowed(self, tenants: Iterable[str], step: str | None = None) -> TenantScope:
        """A scope over a subset of these tenants (never a tenant outside them)."""
        ids = list(tenants)
        self.check(ids, "narrowing the scope")
        return TenantScope(self._spark, ids, step or self.step, model_store=self._model_store,
                           model_prefix=self._prefix, datasets=self._datasets, data_dir=self._data_dir)

    # ------------------------------------------------------------------ data
    def read(self, ref: TableRef, version: int | None = None, *, shared: bool = False,
             include_null: bool = False) -> DataFrame:
        """Only the scope's rows of a tenant-keyed table (at a pinned version if given); with
        ``shared`` also the platform's shared-model rows (tenant id ``_shared``); with
        ``include_null`` also rows that belong to no tenant (quarantined rows whose id was unsafe)."""
        from pyspark.sql import functions as F

        from tenantml.io.delta import read_table

        df = read_table(self.spark, ref, version=version)
        if "tenant_id" not in df.columns:
            raise self._refuse(f"table {ref.display} has no tenant_id column, so it cannot be read per tenant")
        ids: list[str] = [*self.tenants, *([SHARED_ID] if shared else [])]
        keep = F.col("tenant_id").isin(ids)
        return df.where(keep | F.col("tenant_id").isNull() if include_null else keep)

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
              include_null: bool = False, partition_by: Sequence[str] = ("tenant_id",),
              extra_predicate: str | None = None) -> None:
        """Replace ``tenants``' rows (default: the whole scope) of ``ref`` with ``df`` in one commit.

        ``extra_predicate`` (validated SQL over non-tenant columns, e.g. one batch id) narrows what
        is replaced within those tenants, so history of other batches is kept."""
        from tenantml.io.delta import replace_tenants

        ids = list(self.tenants if tenants is None else tenants)
        self.check(ids, f"replacing partitions in {ref.display}")
        try:
            replace_tenants(self.guard(df, ref, include_null), ref, ids, include_null=include_null,
                            partition_by=partition_by, extra_predicate=extra_predicate)
        except Exception as exc:
            text = str(exc)
            if ISOLATION_MARKER not in text:
                raise
            detail = text[text.index(ISOLATION_MARKER) + len(ISOLATION_MARKER):].split("\n")[0].strip()
            raise self._refuse(detail) from None

    # ------------------------------------------------------------------ models
    def own_model(self, dataset: str, tenant_id: str) -> str:
        """The tenant's own registered model name for ``dataset`` (the tenant must be in scope)."""
        self.check([tenant_id], f"naming the model of dataset {dataset!r}")
        return model_name(self._prefix, dataset, tenant_id)

    def _check_own(self, wanted: dict[str, tuple[str, str]]) -> None:
        for tenant, (name, _) in wanted.items():
            if tenant not in self.tenants:
                raise self._refuse(f"loading a model for tenant {tenant!r}")
            if name not in {model_name(self._prefix, ds, tenant) for ds in self._datasets}:
                raise self._refuse(f"loading model {name!r} for tenant {tenant!r}: not its own model")

    def model_rows(self, wanted: dict[str, tuple[str, str]]) -> DataFrame:
        """`load_models` as a Spark frame: the bytes stay in Spark (scoring joins them to the rows)."""
        from tenantml.io.model_store import stored_rows

        self._check_own(wanted)
        return stored_rows(self.spark, self._model_store, wanted)

    def load_models(self, wanted: dict[str, tuple[str, str]]) -> pd.DataFrame:
        """Stored bytes of each tenant's (model, version), which must be a version of its own model.

        The rows come from `model_store` keyed by the tenant, so a registry alias pointed at another
        tenant's model cannot pull that tenant's bytes in."""
        from tenantml.io.model_store import load_models

        self._check_own(wanted)
        return load_models(self.spark, self._model_store, wanted)

    # ------------------------------------------------------------------ files
    def artifact_path(self, tenant_id: str, *parts: str) -> Path:
        """A path under the tenant's own folder; separators, '..' and absolute parts are refused."""
        if self._data_dir is None:
            raise self._refuse("writing files: this scope has no data directory")
        self.check([tenant_id], "writing files")
        root = (self._data_dir / "tenants" / tenant_id).resolve()
        for p in parts:
            if not p or p in (".", "..") or "/" in p or "\\" in p or "\x00" in p or Path(p).is_absolute():
                raise self._refuse(f"path part {p!r} would leave its folder {root}")
        path = root.joinpath(*parts).resolve()
        if root != path and root not in path.parents:
            raise self._refuse(f"path {path} is outside its folder {root}")
        return path
