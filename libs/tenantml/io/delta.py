"""Delta table access. Writes are idempotent: a rerun replaces what it wrote, never duplicates it."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from tenantml.errors import TableNotFoundError
from tenantml.tables import TableRef
from tenantml.tenancy import tenant_in_predicate

if TYPE_CHECKING:
    from delta.tables import DeltaTable
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE = (
    "ConcurrentAppendException",
    "ConcurrentDeleteReadException",
    "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException",
    "MetadataChangedException",
    "ProtocolChangedException",
    "DELTA_CONCURRENT",
)


def with_conflict_retries(fn: Callable[[], T], *, what: str, attempts: int = 5,
                          base_delay: float = 0.5) -> T:
    """Retry a Delta commit that lost an optimistic-concurrency race, with jittered backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            if attempt == attempts or not any(marker in text for marker in _RETRYABLE):
                raise
            delay = base_delay * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("concurrent commit on %s (attempt %d/%d), retrying in %.1fs", what, attempt,
                        attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def table_exists(spark: SparkSession, ref: TableRef) -> bool:
    from delta.tables import DeltaTable

    if ref.fqn:
        return bool(spark.catalog.tableExists(ref.fqn))
    return bool(DeltaTable.isDeltaTable(spark, str(ref.path)))


def delta_table(spark: SparkSession, ref: TableRef) -> DeltaTable:
    from delta.tables import DeltaTable

    return DeltaTable.forName(spark, ref.fqn) if ref.fqn else DeltaTable.forPath(spark, str(ref.path))


def read_table(spark: SparkSession, ref: TableRef, version: int | None = None) -> DataFrame:
    if not table_exists(spark, ref):
        raise TableNotFoundError(f"table {ref.display} does not exist yet (run the step that writes it)")
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.table(ref.fqn) if ref.fqn else reader.load(ref.path)


def table_version(spark: SparkSession, ref: TableRef) -> int:
    """The current Delta version: recorded with models so training data can be time-travelled to."""
    if not table_exists(spark, ref):
        raise TableNotFoundError(f"table {ref.display} does not exist yet (run the step that writes it)")
    row = delta_table(spark, ref).history(1).select("version").first()
    return int(row[0]) if row else 0


def _writer(df: DataFrame, mode: str, partition_by: Sequence[str]):  # type: ignore[no-untyped-def]
    w = df.write.format("delta").mode(mode).option("mergeSchema", "true")
    if partition_by:
        w = w.partitionBy(*partition_by)
    return w


def _save(writer, ref: TableRef) -> None:  # type: ignore[no-untyped-def]
    if ref.fqn:
        writer.saveAsTable(ref.fqn)
    else:
        writer.save(ref.path)


def insert_missing(df: DataFrame, ref: TableRef, key: str) -> None:
    """Insert the rows whose ``key`` the table does not hold yet, creating the table if needed.

    Existing rows are never changed, so concurrent writers cannot undo each other.
    """
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ValueError(f"unsafe key column {key!r} in a merge condition")
    spark = df.sparkSession

    def write() -> None:
        if not table_exists(spark, ref):
            _save(_writer(df, "append", ()), ref)
            return
        (delta_table(spark, ref).alias("t").merge(df.alias("s"), f"t.{key} = s.{key}")
         .whenNotMatchedInsertAll().execute())

    with_conflict_retries(write, what=ref.display)


def overwrite(df: DataFrame, ref: TableRef, partition_by: Sequence[str] = (),
              user_metadata: str | None = None) -> None:
    """Replace the whole table, schema included, in one commit; ``user_metadata`` is recorded in
    the commit so a later reader can tell which inputs produced this version."""
    w = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
    if user_metadata is not None:
        w = w.option("userMetadata", user_metadata)
    if partition_by:
        w = w.partitionBy(*partition_by)
    _save(w, ref)


def append(df: DataFrame, ref: TableRef, partition_by: Sequence[str] = ()) -> None:
    with_conflict_retries(lambda: _save(_writer(df, "append", partition_by), ref), what=ref.display)


def replace_where(df: DataFrame, ref: TableRef, predicate: str, partition_by: Sequence[str] = ()) -> None:
    """Atomically replace the rows matching ``predicate`` with ``df`` (one Delta commit).

    The predicate must come from validated values only (see tenancy.tenant_in_predicate).
    """
    spark = df.sparkSession

    def write() -> None:
        if not table_exists(spark, ref):
            _save(_writer(df, "append", partition_by), ref)
            return
        _save(_writer(df, "overwrite", partition_by).option("replaceWhere", predicate), ref)

    with_conflict_retries(write, what=ref.display)


def replace_tenants(df: DataFrame, ref: TableRef, tenants: Iterable[str],
                    partition_by: Sequence[str] = ("tenant_id",), include_null: bool = False) -> None:
    """Rewrite the given tenants' partitions in one commit: a rerun replaces, never duplicates."""
    ids = list(tenants)
    parts = []
    if ids:
        parts.append(tenant_in_predicate(ids))
    if include_null:
        parts.append("tenant_id IS NULL")
    if not parts:
        return
    replace_where(df, ref, " OR ".join(f"({p})" for p in parts), partition_by)
