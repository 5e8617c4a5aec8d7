"""Delta table access. Writes are idempotent: a rerun replaces what it wrote, never duplicates it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tenantml.core.errors import ConcurrentWriteError, TableNotFoundError
from tenantml.core.ids import tenant_in_predicate
from tenantml.io.tables import TableRef

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)
T = TypeVar("T")

def conflict_types() -> tuple[type[BaseException], ...]:
    """Delta's optimistic-concurrency exceptions (classic and Spark Connect subclass these).

    Importing ``delta.exceptions.captured`` installs delta-spark's conversion of the JVM's conflict
    exceptions into these Python types (without it a classic session raises a bare Py4JJavaError)."""
    with contextlib.suppress(ImportError):  # a client without the classic PySpark
        import delta.exceptions.captured  # noqa: F401
    from delta.exceptions.base import (
        ConcurrentAppendException,
        ConcurrentDeleteDeleteException,
        ConcurrentDeleteReadException,
        ConcurrentTransactionException,
        ConcurrentWriteException,
        DeltaConcurrentModificationException,
        MetadataChangedException,
        ProtocolChangedException,
    )

    return (ConcurrentAppendException, ConcurrentDeleteReadException, ConcurrentDeleteDeleteException,
            ConcurrentTransactionException, ConcurrentWriteException, DeltaConcurrentModificationException,
            MetadataChangedException, ProtocolChangedException)


def is_conflict(exc: BaseException) -> bool:
    """A lost commit race: one of Delta's typed conflict exceptions, or (where the Python wrapper is
    not installed, e.g. some Connect clients) a Spark error whose condition is a Delta conflict."""
    if isinstance(exc, conflict_types()):
        return True
    condition = getattr(exc, "getCondition", None)
    try:
        value = condition() if callable(condition) else None
    except Exception:
        value = None
    return isinstance(value, str) and value.startswith("DELTA_CONCURRENT")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def with_conflict_retries(fn: Callable[[], T], *, what: str, attempts: int = 5,
                          base_delay: float = 0.5) -> T:
    """Retry a Delta commit that lost an optimistic-concurrency race, with jittered backoff.

    The race may be with another thread or with another process on the same tables (each with its
    own JVM): Delta detects both the same way. When the last attempt still conflicts, raise
    :class:`ConcurrentWriteError` naming ``what`` (the table, and the tenants where known).
    """
    from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    conflict_types()  # before the first attempt: the conversion must be in place when a commit loses

    def warn(state: Any) -> None:
        log.warning("concurrent commit on %s (attempt %d/%d), retrying", what, state.attempt_number, attempts)

    retrying = Retrying(retry=retry_if_exception(is_conflict), stop=stop_after_attempt(attempts),
                        wait=wait_random_exponential(multiplier=base_delay, max=base_delay * 2 ** attempts),
                        before_sleep=warn, reraise=False)
    try:
        return retrying(fn)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise ConcurrentWriteError(
            f"concurrent write conflict on table {what}: still conflicting after {attempts} attempts with "
            f"backoff ({_first_line(last) if last else 'conflict'}); another run is writing the same rows: "
            f"rerun this step once it has finished") from last


def quote_identifier(part: str) -> str:
    """One SQL identifier in backticks (a backtick inside is doubled)."""
    return "`" + part.replace("`", "``") + "`"


def sql_name(ref: TableRef) -> str:
    """How SQL names the table: ``delta.`<path>``` for a path table, the catalog name quoted part by
    part (```c`.`s`.`t```) for a catalog table."""
    if ref.fqn:
        return ".".join(quote_identifier(part) for part in ref.fqn.split("."))
    return f"delta.{quote_identifier(str(ref.path))}"


def is_delta_path(spark: SparkSession, path: str) -> bool:
    """Whether ``path`` holds a Delta table. Over Spark Connect (no Python `DeltaTable` there) and
    when a classic session's cached answer is "no", a read of the table's schema decides."""
    from tenantml.io.spark import is_connect

    connect = is_connect(spark)
    if not connect:
        from delta.tables import DeltaTable

        if DeltaTable.isDeltaTable(spark, path):
            return True
    # A "no" comes from this JVM's cached snapshot of the path, stale when another process (its own
    # JVM) has created the table since this one last looked: resolving a read refreshes it.
    try:
        spark.read.format("delta").load(path).schema  # noqa: B018
    except Exception as exc:
        from pyspark.errors import AnalysisException

        if connect and not isinstance(exc, AnalysisException):  # the server, not the table, failed
            raise
        return False
    return True


def table_exists(spark: SparkSession, ref: TableRef) -> bool:
    if ref.fqn:
        return bool(spark.catalog.tableExists(ref.fqn))
    return is_delta_path(spark, str(ref.path))


def read_table(spark: SparkSession, ref: TableRef, version: int | None = None) -> DataFrame:
    if not table_exists(spark, ref):
        raise TableNotFoundError(f"table {ref.display} does not exist yet (run the step that writes it)")
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.table(ref.fqn) if ref.fqn else reader.load(ref.path)


def history(spark: SparkSession, ref: TableRef, limit: int = 1) -> DataFrame:
    """The table's latest ``limit`` commits, newest first (``DESCRIBE HISTORY``: the same rows as
    `DeltaTable.history`, on classic sessions and over Spark Connect)."""
    return spark.sql(f"DESCRIBE HISTORY {sql_name(ref)} LIMIT {int(limit)}")


def latest_commit(spark: SparkSession, ref: TableRef) -> tuple[int, str | None] | None:
    """(version, userMetadata) of the table's latest commit; None when the table does not exist."""
    if not table_exists(spark, ref):
        return None
    row = history(spark, ref, 1).select("version", "userMetadata").first()
    return (int(row["version"]), row["userMetadata"]) if row else None


def table_version(spark: SparkSession, ref: TableRef) -> int:
    """The current Delta version: recorded with models so training data can be time-travelled to."""
    if not table_exists(spark, ref):
        raise TableNotFoundError(f"table {ref.display} does not exist yet (run the step that writes it)")
    row = history(spark, ref, 1).select("version").first()
    return int(row[0]) if row else 0


def table_properties(spark: SparkSession, ref: TableRef) -> dict[str, str]:
    """The table's properties (``DESCRIBE DETAIL``)."""
    row = spark.sql(f"DESCRIBE DETAIL {sql_name(ref)}").select("properties").first()
    return dict(row[0] or {}) if row else {}


def merge_into(spark: SparkSession, ref: TableRef, source: DataFrame, on: str, clauses: str) -> None:
    """``MERGE INTO`` the table from ``source`` (as ``s``; the table is ``t``), in SQL over a temporary
    view: the one form of a Delta merge both classic sessions and Spark Connect run. Values come in
    as ``source``'s rows, never as SQL text; ``on`` and ``clauses`` name columns only.

    The view's name is unique to the call (sessions are shared by threads) and dropped after."""
    with _temp_view(source, "merge") as view:
        spark.sql(f"MERGE INTO {sql_name(ref)} AS t USING {view} AS s ON {on} {clauses}")


@contextlib.contextmanager
def _temp_view(df: DataFrame, purpose: str) -> Iterator[str]:
    """``df`` as a temporary view for one SQL statement, yielding its quoted name: unique to the
    call (sessions are shared by threads), dropped after."""
    import uuid

    view = f"_tenantml_{purpose}_{uuid.uuid4().hex}"
    df.createOrReplaceTempView(view)
    try:
        yield quote_identifier(view)
    finally:
        df.sparkSession.catalog.dropTempView(view)


def _writer(df: DataFrame, mode: str, partition_by: Sequence[str], ref: TableRef):  # type: ignore[no-untyped-def]
    """Delta's writer for ``df``; a clustered table (``ref.cluster_by``) is never given partitions."""
    w = df.write.format("delta").mode(mode).option("mergeSchema", "true")
    if partition_by and not ref.cluster_by:
        w = w.partitionBy(*partition_by)
    return w


def _save(writer, ref: TableRef) -> None:  # type: ignore[no-untyped-def]
    if ref.fqn:
        writer.saveAsTable(ref.fqn)
    else:
        writer.save(ref.path)


_EXISTS = ("DELTA_PATH_EXISTS", "TABLE_OR_VIEW_ALREADY_EXISTS", "already exists")


def _create_with(df: DataFrame, ref: TableRef, partition_by: Sequence[str]) -> bool:
    """Create the table holding ``df``'s rows; False, writing nothing, when the table exists.

    The write refuses an existing table (mode ``error``: Spark Connect's writer knows no alias
    ``errorifexists``), checked in the transaction itself: a plain append would be blind, and when
    another process has created the table since this one looked (or this JVM's cached snapshot is
    stale) it would add the rows next to that process's copy. Two creations racing each other
    conflict in Delta and are retried like any commit.
    """
    if table_exists(df.sparkSession, ref):
        return False
    try:
        if ref.cluster_by:
            _create_clustered(df, ref)
        else:
            _save(_writer(df, "error", partition_by, ref), ref)
    except Exception as exc:
        if not any(marker in str(exc) for marker in _EXISTS):
            raise
        return False
    return True


def _create_clustered(df: DataFrame, ref: TableRef) -> None:
    """``CREATE TABLE ... CLUSTER BY ... AS SELECT`` over a view of ``df``: Delta's writer API does
    not create a liquid-clustered table (the v1 writer ignores ``clusterBy``), its SQL does, on
    classic sessions and Spark Connect alike. One commit, the rows included; it fails like any
    creation when the table exists."""
    columns = ", ".join(quote_identifier(c) for c in ref.cluster_by)
    with _temp_view(df, "create") as view:
        df.sparkSession.sql(f"CREATE TABLE {sql_name(ref)} USING delta CLUSTER BY ({columns}) AS SELECT * FROM {view}")


def insert_missing(df: DataFrame, ref: TableRef, key: str) -> None:
    """Insert the rows whose ``key`` the table does not hold yet, creating the table if needed.

    Existing rows are never changed, so concurrent writers cannot undo each other.
    """
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ValueError(f"unsafe key column {key!r} in a merge condition")
    spark = df.sparkSession
    column = quote_identifier(key)

    def write() -> None:
        if _create_with(df, ref, ()):
            return
        merge_into(spark, ref, df, f"t.{column} = s.{column}", "WHEN NOT MATCHED THEN INSERT *")

    with_conflict_retries(write, what=ref.display)


def overwrite(df: DataFrame, ref: TableRef, partition_by: Sequence[str] = (),
              user_metadata: str | None = None) -> None:
    """Replace the whole table, schema included, in one commit; ``user_metadata`` is recorded in
    the commit so a later reader can tell which inputs produced this version."""
    w = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
    if user_metadata is not None:
        w = w.option("userMetadata", user_metadata)
    if partition_by and not ref.cluster_by:
        w = w.partitionBy(*partition_by)
    _save(w, ref)


def append(df: DataFrame, ref: TableRef, partition_by: Sequence[str] = ()) -> None:
    with_conflict_retries(lambda: _save(_writer(df, "append", partition_by, ref), ref), what=ref.display)


def replace_where(df: DataFrame, ref: TableRef, predicate: str, partition_by: Sequence[str] = (),
                  what: str | None = None) -> None:
    """Atomically replace the rows matching ``predicate`` with ``df`` (one Delta commit).

    The predicate must come from validated values only (see tenancy.tenant_in_predicate); ``what``
    names the rows in a conflict error (default: the table).
    """

    def write() -> None:
        if _create_with(df, ref, partition_by):
            return
        _save(_writer(df, "overwrite", partition_by, ref).option("replaceWhere", predicate), ref)

    with_conflict_retries(write, what=what or ref.display)


def replace_tenants(df: DataFrame, ref: TableRef, tenants: Iterable[str],
                    partition_by: Sequence[str] = ("tenant_id",), include_null: bool = False,
                    extra_predicate: str | None = None) -> None:
    """Rewrite the given tenants' rows in one commit: a rerun replaces, never duplicates.

    ``extra_predicate`` (built from validated values only) narrows the replaced rows within those
    tenants, e.g. to one scoring batch so earlier batches are kept."""
    ids = list(tenants)
    parts = []
    if ids:
        parts.append(tenant_in_predicate(ids))
    if include_null:
        parts.append("tenant_id IS NULL")
    if not parts:
        return
    named = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    predicate = " OR ".join(f"({p})" for p in parts)
    if extra_predicate:
        predicate = f"({predicate}) AND ({extra_predicate})"
    replace_where(df, ref, predicate, partition_by, what=f"{ref.display} (tenant(s) {named})" if ids else None)
