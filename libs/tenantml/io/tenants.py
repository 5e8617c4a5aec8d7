"""The `tenants` table: registry of tenants, their strategy, consents and status."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tenantml.config import TenantsConfig
from tenantml.core.ids import TenantId, canonical, validate_tenant_ids
from tenantml.core.policy import TenantPolicy
from tenantml.io import read_table, table_exists
from tenantml.io.delta import insert_missing, merge_into, quote_identifier, with_conflict_retries
from tenantml.io.spark import local_frame
from tenantml.io.tables import TableRef

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

TENANT_COLUMNS = ["tenant_id", "display_name", "strategy", "consent_share_data",
                  "consent_shared_inference", "status", "created_at", "updated_at"]


def _schema():  # type: ignore[no-untyped-def]
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("tenant_id", T.StringType(), False),
        T.StructField("display_name", T.StringType(), True),
        T.StructField("strategy", T.StringType(), False),
        T.StructField("consent_share_data", T.BooleanType(), False),
        T.StructField("consent_shared_inference", T.BooleanType(), False),
        T.StructField("status", T.StringType(), False),
        T.StructField("created_at", T.TimestampType(), False),
        T.StructField("updated_at", T.TimestampType(), False),
    ])


def case_collisions(candidates: Iterable[str], registered: Iterable[str]) -> dict[str, str]:
    """Ids that differ only in case from a registered id or from an earlier (sorted) candidate:
    id -> the id that holds its name. Tenant ids are unique case-insensitively (Unity Catalog
    lower-cases names; some disks ignore case), so `Acme` cannot join while `acme` exists."""
    owner = {canonical(t): t for t in sorted(registered)}
    out: dict[str, str] = {}
    for t in sorted(set(candidates)):
        held = owner.setdefault(canonical(t), t)
        if held != t:
            out[t] = held
    return out


def register_tenants(spark: SparkSession, ref: TableRef, tenant_ids: Iterable[str],
                     defaults: TenantsConfig) -> list[TenantId]:
    """Insert tenants not registered yet (existing rows are never changed); returns the new ids.

    An id that differs only in case from a registered one (or from another new id that sorts
    before it) is not registered: validation quarantines its rows with that reason."""
    wanted = sorted(set(validate_tenant_ids(tenant_ids, where="the tenants table")))
    if not wanted:
        return []
    known = list_tenant_ids(spark, ref) if table_exists(spark, ref) else []
    clashing = case_collisions(wanted, known)
    ids = [t for t in wanted if t not in clashing]
    if not ids:
        return []
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [(t, t, defaults.default_strategy, defaults.default_consent_share_data,
             defaults.default_consent_shared_inference, "active", now, now) for t in ids]
    incoming = local_frame(spark, rows, _schema())
    existing = set(known)
    new = [t for t in ids if t not in existing]
    if not new:
        return []

    insert_missing(incoming, ref, "tenant_id")  # never overwrites consents or status
    return new


def read_tenants(spark: SparkSession, ref: TableRef) -> DataFrame:
    return read_table(spark, ref)


def list_tenant_ids(spark: SparkSession, ref: TableRef) -> list[str]:
    if not table_exists(spark, ref):
        return []
    return sorted(r[0] for r in read_table(spark, ref).select("tenant_id").collect())


def tenants_frame(spark: SparkSession, ref: TableRef) -> pd.DataFrame:
    import pandas as pd

    if not table_exists(spark, ref):
        return pd.DataFrame(columns=TENANT_COLUMNS)
    df: pd.DataFrame = read_table(spark, ref).toPandas()
    return df.sort_values("tenant_id").reset_index(drop=True)


def tenant_policies(spark: SparkSession, ref: TableRef, tenant_ids: Iterable[str],
                    defaults: TenantsConfig) -> dict[str, TenantPolicy]:
    """Policies from the tenants table; tenants missing there get the configured defaults."""
    ids = validate_tenant_ids(list(tenant_ids), where="tenant policies")
    found: dict[str, TenantPolicy] = {}
    if ids and table_exists(spark, ref):
        from pyspark.sql import functions as F

        for r in read_table(spark, ref).where(F.col("tenant_id").isin(ids)).collect():
            found[r["tenant_id"]] = TenantPolicy(TenantId(r["tenant_id"]), r["strategy"], bool(r["consent_share_data"]),
                                                 bool(r["consent_shared_inference"]))
    for t in ids:
        found.setdefault(t, TenantPolicy(t, defaults.default_strategy, defaults.default_consent_share_data,
                                         defaults.default_consent_shared_inference))
    return found


def update_tenants(spark: SparkSession, ref: TableRef, tenant_ids: Iterable[str], *,
                   strategy: str | None = None, consent_share_data: bool | None = None,
                   consent_shared_inference: bool | None = None, status: str | None = None) -> int:
    """Change settings of registered tenants in one MERGE; returns how many rows matched.

    The new values travel as the merge source's rows (typed columns), never as SQL text."""
    from pyspark.sql import types as T

    from tenantml.core.errors import UnknownTenantError

    ids = sorted(set(validate_tenant_ids(list(tenant_ids), where="tenants update")))
    if strategy is not None and strategy not in ("auto", "tenant", "shared", "tuned"):
        raise ValueError(f"strategy must be auto, tenant, shared or tuned, got {strategy!r}")
    if status is not None and status not in ("active", "paused"):
        raise ValueError(f"status must be active or paused, got {status!r}")
    known = set(list_tenant_ids(spark, ref))
    missing = [t for t in ids if t not in known]
    if missing:
        raise UnknownTenantError(f"{ref.display}: tenant(s) {missing} are not registered")
    changes: dict[str, object] = {}
    for col, value in (("strategy", strategy), ("consent_share_data", consent_share_data),
                       ("consent_shared_inference", consent_shared_inference), ("status", status)):
        if value is not None:
            changes[col] = value
    types = {f.name: f.dataType for f in _schema().fields}
    schema = T.StructType([T.StructField("tenant_id", T.StringType(), False),
                           *(T.StructField(c, types[c], False) for c in changes)])
    source = local_frame(spark, [(t, *changes.values()) for t in ids], schema)
    sets = ", ".join(["t.updated_at = current_timestamp()",
                      *(f"t.{quote_identifier(c)} = s.{quote_identifier(c)}" for c in changes)])

    def write() -> None:
        merge_into(spark, ref, source, "t.tenant_id = s.tenant_id", f"WHEN MATCHED THEN UPDATE SET {sets}")

    with_conflict_retries(write, what=ref.display)
    return len(ids)
