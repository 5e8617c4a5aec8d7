"""Model lineage: exactly whose rows each model learned from, so consent can be enforced afterwards.

One row per (model version, contributing tenant) in the platform table `model_lineage`: the rows
it contributed, the table and version they were read from (and the shared training set's version),
and, for a model derived from another (a tuned model fine-tuned from a shared one, a shared model
serving a tenant under its own name), the model it inherited its contributors from. Tuned models
copy their base's rows at creation, so a lookup never has to walk a chain.

Contributors are stored twice: the id, for people reading the table, and a keyed hash of it (HMAC
with the platform's signing key). Offboarding erases the ids; the hashes stay, so a model that
learned from a tenant that is gone is still known to be tainted, without the table naming it.

A model is *tainted* when a contributor other than the tenant it serves is no longer a registered
tenant that consents to share its data (`consent_share_data`): it withdrew, or was offboarded.
The check is computed from the tenants table each time, so there is no taint state to go stale.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tenantml.core.ids import SHARED_ID, sql_identifier, validate_tenant_id
from tenantml.io.spark import local_frame

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from tenantml.io.tables import TableRef

LINEAGE_SCHEMA = (
    "dataset string, model_name string, model_version string, strategy string, model_tenant string, "
    "contributor string, contributor_hash string, rows long, source_table string, source_version long, "
    "trainset_table string, trainset_version long, inherited_from string, run_id string, recorded_at timestamp"
)
LINEAGE_COLUMNS = [c.split()[0] for c in LINEAGE_SCHEMA.split(", ")]
_MODEL_RE_SAFE = "abcdefghijklmnopqrstuvwxyz0123456789_.-/"


def contributor_hash(key: bytes, tenant_id: str) -> str:
    """A keyed hash of a tenant id: equal for the same tenant and key, meaningless without the key."""
    return hmac.new(key, b"tenantml-lineage\x00" + tenant_id.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Contribution:
    """One tenant's part in one model: ``rows`` of ``source_table`` at ``source_version``."""

    tenant_id: str
    rows: int
    source_table: str | None = None
    source_version: int | None = None
    trainset_table: str | None = None
    trainset_version: int | None = None


@dataclass(frozen=True)
class ModelLineage:
    """Every contributor of one model version; ``inherited_from`` names the base it copied them from."""

    dataset: str
    model_name: str
    model_version: str
    strategy: str
    model_tenant: str
    contributions: tuple[Contribution, ...]
    inherited_from: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.model_name, self.model_version)


@dataclass
class Taint:
    """Why a model may no longer serve: the contributors that withdrew consent or are gone."""

    withdrawn: list[str] = field(default_factory=list)  # still registered, consent_share_data=false
    offboarded: int = 0  # contributors no longer registered (their ids are erased)

    def __bool__(self) -> bool:
        return bool(self.withdrawn) or self.offboarded > 0

    def describe(self) -> str:
        parts = []
        if self.withdrawn:
            parts.append(f"tenant(s) {', '.join(sorted(self.withdrawn))} withdrew consent to share data")
        if self.offboarded:
            parts.append(f"{self.offboarded} offboarded tenant(s)")
        return "trained on rows of " + " and ".join(parts)


def _rows(lineages: Iterable[ModelLineage], key: bytes, run_id: str) -> list[tuple[Any, ...]]:
    now = datetime.now(UTC).replace(tzinfo=None)
    out = []
    for m in lineages:
        for c in m.contributions:
            tid = validate_tenant_id(c.tenant_id, where=f"lineage of {m.model_name}/{m.model_version}")
            out.append((m.dataset, m.model_name, m.model_version, m.strategy, m.model_tenant, tid,
                        contributor_hash(key, tid), int(c.rows), c.source_table, c.source_version, c.trainset_table,
                        c.trainset_version, m.inherited_from, run_id, now))
    return out


def _quote(value: str, what: str) -> str:
    if any(ch not in _MODEL_RE_SAFE for ch in value.lower()):
        raise ValueError(f"{what} {value!r} cannot go into a lineage predicate")
    return f"'{value}'"


def _models_predicate(keys: Iterable[tuple[str, str]]) -> str:
    parts = [f"(model_name = {_quote(n, 'model name')} AND model_version = {_quote(v, 'model version')})"
             for n, v in sorted(set(keys))]
    return " OR ".join(parts) if parts else "false"


def record_lineage(spark: SparkSession, ref: TableRef, lineages: Sequence[ModelLineage], *, key: bytes,
                   run_id: str) -> int:
    """Write these models' lineage in one commit; recording a model again replaces its rows."""
    from tenantml.io.delta import replace_where

    if not lineages:
        return 0
    rows = _rows(lineages, key, run_id)
    df = local_frame(spark, rows, LINEAGE_SCHEMA)
    replace_where(df, ref, _models_predicate(m.key for m in lineages), what=f"{ref.display} (model lineage)")
    return len(rows)


def read_lineage(spark: SparkSession, ref: TableRef, models: Iterable[tuple[str, str]] | None = None,
                 dataset: str | None = None) -> DataFrame | None:
    """The lineage rows of these models (all when None); None when nothing was ever recorded."""
    from pyspark.sql import functions as F

    from tenantml.io.delta import read_table, table_exists

    if not table_exists(spark, ref):
        return None
    df = read_table(spark, ref)
    if dataset is not None:
        df = df.where(F.col("dataset") == sql_identifier(dataset, "dataset"))
    if models is not None:
        keys = sorted(set(models))
        if not keys:
            return df.limit(0)
        pairs = local_frame(spark, keys, "model_name string, model_version string")
        df = df.join(F.broadcast(pairs), ["model_name", "model_version"])  # a join hint: fine over Connect
    return df


def contributions_of(spark: SparkSession, ref: TableRef, model: tuple[str, str]) -> list[Contribution]:
    """A model's contributors as recorded, to copy into a model derived from it (tuned, serving)."""
    df = read_lineage(spark, ref, [model])
    if df is None:
        return []
    return [Contribution(r["contributor"] or "", int(r["rows"] or 0), r["source_table"], r["source_version"],
                         r["trainset_table"], r["trainset_version"])
            for r in df.collect() if r["contributor"]]


def clean_hashes(spark: SparkSession, tenants_ref: TableRef, key: bytes) -> set[str]:
    """Hashes of the registered tenants that consent to share their data: the only contributors a
    model serving someone else may have."""
    from pyspark.sql import functions as F

    from tenantml.io.delta import read_table, table_exists

    if not table_exists(spark, tenants_ref):
        return set()
    ids = [r[0] for r in read_table(spark, tenants_ref).where(F.col("consent_share_data")).select("tenant_id").collect()]
    return {contributor_hash(key, t) for t in ids}


def taints(spark: SparkSession, ref: TableRef, tenants_ref: TableRef, models: Iterable[tuple[str, str]], *,
           key: bytes, registered: Iterable[str] | None = None) -> dict[tuple[str, str], Taint]:
    """For each of these models that is tainted, why (models without lineage are left out: they
    predate lineage, or learned only from their own tenant)."""
    from pyspark.sql import functions as F

    from tenantml.io.delta import read_table, table_exists

    df = read_lineage(spark, ref, models)
    if df is None:
        return {}
    clean = clean_hashes(spark, tenants_ref, key)
    if registered is None:
        registered = ([r[0] for r in read_table(spark, tenants_ref).select("tenant_id").collect()]
                      if table_exists(spark, tenants_ref) else [])
    present = {contributor_hash(key, t): t for t in registered}
    out: dict[tuple[str, str], Taint] = {}
    rows = df.select("model_name", "model_version", "model_tenant", "contributor_hash").distinct()
    for r in rows.where(F.col("contributor_hash").isNotNull()).collect():
        h = r["contributor_hash"]
        if h in clean:
            continue
        if r["model_tenant"] != SHARED_ID and h == contributor_hash(key, r["model_tenant"]):
            continue  # a tenant's own rows in its own model: its consent to share is not needed
        taint = out.setdefault((r["model_name"], r["model_version"]), Taint())
        if h in present:
            if present[h] not in taint.withdrawn:
                taint.withdrawn.append(present[h])
        else:
            taint.offboarded += 1
    return out


def erase_contributor(spark: SparkSession, ref: TableRef, tenant_id: str) -> int:
    """Offboarding: drop the lineage of the tenant's own models (they are deleted) and blank its id
    in every other model's rows; the keyed hash stays, so the models it contributed to stay
    tainted until they are retrained. Returns the rows changed."""
    from tenantml.io.delta import sql_name, table_exists

    tid = validate_tenant_id(tenant_id, where="lineage erasure")
    if not table_exists(spark, ref):
        return 0
    table = sql_name(ref)
    n = int(spark.sql(f"SELECT count(*) AS n FROM {table} WHERE model_tenant = '{tid}' OR contributor = '{tid}'")
            .collect()[0]["n"])
    if n:
        spark.sql(f"DELETE FROM {table} WHERE model_tenant = '{tid}'")
        spark.sql(f"UPDATE {table} SET contributor = NULL WHERE contributor = '{tid}'")
    return n


def models_with(spark: SparkSession, ref: TableRef, tenant_id: str, key: bytes,
                dataset: str | None = None) -> list[tuple[str, str, str]]:
    """(model name, version, model tenant) of every recorded model that learned from ``tenant_id``
    (by its keyed hash, so also after offboarding erased the id)."""
    from pyspark.sql import functions as F

    df = read_lineage(spark, ref, dataset=dataset)
    if df is None:
        return []
    h = contributor_hash(key, validate_tenant_id(tenant_id, where="lineage lookup"))
    return sorted((r["model_name"], r["model_version"], r["model_tenant"]) for r in
                  df.where(F.col("contributor_hash") == h).select("model_name", "model_version", "model_tenant")
                  .distinct().collect())


def lineage_frame(spark: SparkSession, ref: TableRef, models: Mapping[str, tuple[str, str]]) -> Any:
    """Per serving model (tenant -> (name, version)): contributors and rows, as pandas, for display."""
    import pandas as pd

    df = read_lineage(spark, ref, list(models.values()))
    if df is None:
        return pd.DataFrame(columns=["model_name", "model_version", "contributor", "rows"])
    return df.select("model_name", "model_version", "strategy", "model_tenant", "contributor", "rows",
                     "source_table", "source_version", "inherited_from").orderBy(
        "model_name", "model_version", "contributor").toPandas()


__all__ = ["LINEAGE_COLUMNS", "LINEAGE_SCHEMA", "Contribution", "ModelLineage", "Taint", "clean_hashes",
           "contributions_of", "contributor_hash", "erase_contributor", "lineage_frame", "models_with",
           "read_lineage", "record_lineage", "taints"]
