"""Source readers: a dataset's files (csv, parquet, json) or table, read as bronze rows.

Files are read in schema groups: files with the same CSV header line or the same parquet schema
are read together, and every group is mapped onto the declared columns by name. A batch whose files
disagree (a column added, dropped, reordered or retyped) therefore never shifts values into another
column: extra columns are ignored with a warning, a missing declared column fails the ingest naming
the file, and every declared column is kept as a string in bronze (validate parses it).

A file that cannot be read to its end (a parquet file without its footer, a truncated gzip) fails
the whole ingest with a :class:`SourceError` naming the dataset and the file, before anything is
written. A CSV or JSON line that can be read but is malformed (a line cut short, too many fields,
broken JSON) is kept with its raw text in ``_malformed`` and quarantined by validate.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import logging
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

from tenantml.config import DatasetSpec, SourceSpec
from tenantml.core.errors import ConfigError, SourceError, SourceNotFoundError
from tenantml.core.ids import TENANT_ID_JAVA_REGEX

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import DataType

    from tenantml.io.tables import TableRef


log = logging.getLogger(__name__)

RAW_TENANT = "_tenant_raw"
# Bronze column set by ingest: the raw text of a source line Spark could not parse as a row of the
# source's shape (CSV: a field count other than the header's; JSON: not valid JSON), else NULL.
MALFORMED = "_malformed"
BRONZE_META = ["_batch_id", "_ingested_at", "_source", "_row_number", MALFORMED]
# Spark's corrupt-record column while reading csv/json (a name no source is expected to use).
_CORRUPT = "_tenantml_corrupt_record"
# A hash over every field of a CSV line, dropped before the write: it makes Spark parse every field,
# which its CSV column pruning would otherwise skip, and with it the field-count check that flags
# short (truncated) and long lines as malformed.
ALL_FIELDS = "_tenantml_all_fields"
_SUFFIXES = {"csv": (".csv",), "json": (".json", ".jsonl"), "parquet": (".parquet",)}
_COMPRESSED = (".gz",)  # csv/json only; Spark picks the codec from the extension
_PARQUET_MAGIC = (b"PAR1", b"PARE")
_NAMED_FILES = 5
_NOTHING_WRITTEN = "nothing was ingested"


Purpose = Literal["history", "scoring"]


def batch_source(spec: DatasetSpec, purpose: Purpose) -> SourceSpec:
    """Where a batch of ``purpose`` comes from: the labelled history, or the rows to score."""
    if purpose == "history":
        return spec.source
    if spec.scoring_source is None:
        raise ConfigError("the dataset declares no 'scoring_source' (rows to score); add one to its "
                          "config, or give the rows with --source")
    return spec.scoring_source


def batch_columns(spec: DatasetSpec, purpose: Purpose) -> list[str]:
    """The columns a batch of ``purpose`` must carry: rows to score have no label."""
    return spec.declared_columns if purpose == "history" else spec.scoring_columns


def _source_files(path: Path, fmt: str) -> list[Path]:
    if path.is_file():
        return [path]
    suffixes = _SUFFIXES.get(fmt, ())

    def wanted(p: Path) -> bool:
        if p.suffix in suffixes:
            return True
        return fmt in ("csv", "json") and p.suffix in _COMPRESSED and Path(p.stem).suffix in suffixes

    return sorted(p for p in path.rglob("*") if p.is_file() and wanted(p))


def batch_id_for(files: Sequence[Path], dataset: str) -> str:
    """Content hash of the source files: the same files ingested twice are the same batch."""
    h = hashlib.sha256(dataset.encode())
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def _name_files(files: Sequence[Path | str]) -> str:
    names = [str(f) for f in files[:_NAMED_FILES]]
    more = len(files) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _col(name: str) -> Column:
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def _read_table_source(spark: SparkSession, resolve: Callable[[str], Path], dataset: str,
                       src: SourceSpec, purpose: Purpose = "history") -> tuple[DataFrame, str]:
    """A table source's batch is its Delta version: the same snapshot ingested twice is one batch."""
    from tenantml.io import table_exists, table_version
    from tenantml.io.tables import TableRef

    location = src.table or str(resolve(src.path or ""))
    ref = TableRef(name=dataset, fqn=src.table) if src.table else TableRef(name=dataset, path=location)
    try:
        exists = table_exists(spark, ref)
    except Exception:
        exists = False
    if not exists:
        raise SourceError(f"dataset {dataset!r}: source table {location} does not exist or is not Delta")
    version = table_version(spark, ref)
    df = spark.read.table(src.table) if src.table else spark.read.format("delta").load(location)
    key = dataset if purpose == "history" else f"{dataset}:scoring"
    batch = hashlib.sha256(f"{key}:{location}:v{version}".encode()).hexdigest()[:24]
    return df, batch


def source_location(src: SourceSpec, path_override: str | None, resolve: Callable[[str], Path]) -> str:
    """The location actually read, for error messages."""
    if path_override or src.path:
        return str(resolve(path_override or src.path or ""))
    return str(src.table)


def effective_source(spec: DatasetSpec, purpose: Purpose, path_override: str | None) -> SourceSpec:
    """The source a batch is read from: the configured one, or ``--source PATH`` read in the configured
    format (a table source's override is a Delta path); rows to score given with --source need no
    configured scoring source (the history source's format is used)."""
    if not path_override:
        return batch_source(spec, purpose)
    configured = spec.scoring_source if purpose == "scoring" and spec.scoring_source else spec.source
    fmt = "delta" if configured.format in ("table", "delta") else configured.format
    return SourceSpec(path=path_override, format=fmt, options=dict(configured.options) if fmt != "delta" else {})


def check_source_exists(dataset: str, spec: DatasetSpec, path_override: str | None,
                        resolve: Callable[[str], Path], purpose: Purpose = "history") -> None:
    """A file source (or --source) that does not exist is a usage error, found before any Spark work."""
    src = effective_source(spec, purpose, path_override)
    if src.table is not None:
        return
    location = source_location(src, None, resolve)
    if not Path(location).exists():
        raise SourceNotFoundError(f"dataset {dataset!r}: source path {location} does not exist")


# --------------------------------------------------------------------------- file checks


def _check_parquet_footer(dataset: str, f: Path) -> None:
    """A parquet file is only readable with its footer: a truncated one is refused by name."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(4)
        fh.seek(max(size - 8, 0))
        tail = fh.read(8)
    problem = None
    if head not in _PARQUET_MAGIC:
        problem = "it does not start with the parquet magic bytes"
    elif size < 12 or tail[4:] not in _PARQUET_MAGIC:
        problem = "its footer is missing (no parquet magic bytes at the end)"
    else:
        footer = int.from_bytes(tail[:4], "little")
        if not 0 < footer <= size - 12:
            problem = f"its footer length ({footer} bytes) does not fit in the {size}-byte file"
    if problem:
        raise SourceError(f"dataset {dataset!r}: source file {f} is not a complete parquet file: {problem} "
                          f"(truncated or corrupt); {_NOTHING_WRITTEN}")


def _parquet_schema_key(dataset: str, f: Path) -> str:
    import pyarrow.parquet as pq

    _check_parquet_footer(dataset, f)
    try:
        return str(pq.read_schema(f).remove_metadata())
    except Exception as exc:
        raise SourceError(f"dataset {dataset!r}: cannot read the parquet footer of source file {f}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
                          f"(truncated or corrupt); {_NOTHING_WRITTEN}") from exc


def _csv_header_key(dataset: str, f: Path, comment: bytes | None) -> bytes | None:
    """The first non-empty, non-comment line (the header); None for a file without any line."""
    opener: Any = gzip.open if f.suffix == ".gz" else open
    try:
        with opener(f, "rb") as fh:
            for _ in range(10_000):
                line = fh.readline(1 << 20)
                if not line:
                    return None
                stripped = line.strip()
                if stripped and not (comment and stripped.startswith(comment)):
                    return stripped
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"dataset {dataset!r}: cannot read source file {f}: {exc} "
                          f"(truncated or corrupt); {_NOTHING_WRITTEN}") from exc
    return b"\0" + str(f).encode()  # no header in sight: the file is a group of its own


def _lower_keys(options: dict[str, str]) -> dict[str, str]:
    """Spark reader options are case-insensitive; a later key wins (the dataset's over defaults)."""
    return {k.lower(): v for k, v in options.items()}


def _schema_groups(dataset: str, fmt: str, options: dict[str, str], files: list[Path]) -> list[list[Path]]:
    """Files that share a schema, in file order; files without a single line are left out."""
    opts = _lower_keys(options)
    if fmt == "parquet":
        keys: list[object] = [_parquet_schema_key(dataset, f) for f in files]
    elif fmt == "csv" and opts.get("header", "").lower() == "true":
        comment = opts.get("comment")
        keys = [_csv_header_key(dataset, f, comment.encode() if comment else None) for f in files]
    else:
        return [files]
    groups: dict[object, list[Path]] = {}
    for f, key in zip(files, keys, strict=True):
        if key is not None:
            groups.setdefault(key, []).append(f)
    return list(groups.values())


# --------------------------------------------------------------------------- Spark read errors


def _java(exc: BaseException) -> Any:
    return getattr(exc, "java_exception", None) or getattr(exc, "_origin", None)


def read_failure(dataset: str, fmt: str, exc: BaseException) -> SourceError | None:
    """A ``SourceError`` naming the file Spark failed to read, or None if ``exc`` is not a read failure."""
    text = str(exc)
    java = _java(exc)
    path = None
    try:
        params = dict(java.getMessageParameters()) if java is not None else {}
        path = params.get("path")
    except Exception:
        path = None
    if path is None:
        m = re.search(r"Encountered error while reading file (\S+?)\.?(?:\s|$)", text)
        path = m.group(1) if m else None
    if path is None or ("FAILED_READ_FILE" not in text and "reading file" not in text):
        return None
    local = unquote(re.sub(r"^file:(//)?", "", path))
    cause = None
    if java is not None:
        try:
            root = java
            while root.getCause() is not None:
                root = root.getCause()
            cause = f"{root.getClass().getSimpleName()}: {root.getMessage()}"
        except Exception:
            cause = None
    if cause is None:
        m = re.search(r"\] (Encountered error while reading file.*?)(?:SQLSTATE|$)", text.splitlines()[0])
        cause = m.group(1).strip() if m else text.splitlines()[0]
    return SourceError(f"dataset {dataset!r}: cannot read source file {local} as {fmt}: {cause} "
                       f"(truncated or corrupt file?); {_NOTHING_WRITTEN}")


# --------------------------------------------------------------------------- reading


def _read_group(spark: SparkSession, dataset: str, fmt: str, options: dict[str, str],
                files: list[Path]) -> DataFrame:
    from pyspark.sql import types as T

    paths = [str(f) for f in files]
    reader = spark.read.format(fmt).options(**options)
    try:
        if fmt == "csv":
            header = reader.load(paths).schema  # this group's own header: columns keep their names
            schema = T.StructType([*header.fields, T.StructField(_CORRUPT, T.StringType())])
            return reader.schema(schema).option("columnNameOfCorruptRecord", _CORRUPT).load(paths)
        if fmt == "json":
            return reader.option("columnNameOfCorruptRecord", _CORRUPT).load(paths)
        return reader.load(paths)
    except Exception as exc:
        known = read_failure(dataset, fmt, exc)
        if known is not None:
            raise known from exc
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"dataset {dataset!r}: cannot read {_name_files(files)} as {fmt}: {first}; "
                          f"{_NOTHING_WRITTEN}") from exc


def _string_value(name: str, dtype: DataType, identity: bool) -> Column:
    """A source value as bronze keeps it: a string. Identity columns (tenant, key, categories, a binary
    label) compare by text, so a float that holds a whole number is written as that number (an int
    column that arrives as a double in a later batch, 1001 -> 1001.0, keeps matching "1001")."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    col = _col(name)
    if identity and isinstance(dtype, T.FloatType | T.DoubleType | T.DecimalType):
        whole = (F.abs(col) < F.lit(2.0 ** 53)) & (col % 1 == 0)
        return F.when(whole, col.try_cast("long").cast("string")).otherwise(col.cast("string"))
    return col.cast("string")


def _declared_strings(df: DataFrame, spec: DatasetSpec, source: Column, fmt: str, columns: list[str]) -> DataFrame:
    """Declared columns as strings + ``_source``, ``_malformed`` and the all-fields helper."""
    from pyspark.sql import functions as F

    identity = {spec.tenant_column, spec.entity_key, *spec.categorical_features,
                *([spec.label] if spec.task == "binary" else [])}
    types = {f.name: f.dataType for f in df.schema.fields}
    cols = [_string_value(c, types[c], c in identity).alias(c) for c in columns]
    malformed = _col(_CORRUPT) if _CORRUPT in types else F.lit(None).cast("string")
    data_cols = [n for n in types if n != _CORRUPT]
    all_fields = F.xxhash64(*[_col(n) for n in data_cols]) if fmt == "csv" and data_cols else F.lit(0)
    return df.select(*cols, source.cast("string").alias("_source"), malformed.alias(MALFORMED),
                     all_fields.cast("long").alias(ALL_FIELDS))


def _check_columns(dataset: str, spec: DatasetSpec, columns: list[str], where: str,
                   purpose: Purpose = "history") -> list[str]:
    """Raise naming the missing declared columns (with close matches); return the undeclared ones.

    Rows to score must not carry the label: a scoring batch with a label column is refused (labelled
    rows belong in the history source, where they train and, for scored entities, are monitored)."""
    declared = batch_columns(spec, purpose)
    if purpose == "scoring" and spec.label in columns:
        raise SourceError(f"dataset {dataset!r}: scoring source {where} has the label column {spec.label!r}: "
                          f"rows to score carry no label (labelled rows go to the history source); "
                          f"{_NOTHING_WRITTEN}")
    missing = [c for c in declared if c not in columns]
    if missing:
        hints = []
        for c in missing:
            close = difflib.get_close_matches(c, columns, n=1)
            hints.append(f"{c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SourceError(f"dataset {dataset!r}: source {where} lacks declared "
                          f"column(s) {', '.join(hints)}; it has {sorted(columns)}; {_NOTHING_WRITTEN}")
    return sorted(set(columns) - set(declared))


def batch_identity(spark: SparkSession, resolve: Callable[[str], Path], dataset: str, spec: DatasetSpec,
                   path_override: str | None = None, purpose: Purpose = "history") -> str:
    """The batch id a read would give, without reading the rows: the content hash of the files, or
    the table's version. Ingest uses it to skip a batch it already holds."""
    src = effective_source(spec, purpose, path_override)
    location = source_location(src, None, resolve)
    key = dataset if purpose == "history" else f"{dataset}:scoring"
    if src.format in ("table", "delta"):
        from tenantml.io import table_exists, table_version
        from tenantml.io.tables import TableRef

        ref = TableRef(name=dataset, fqn=src.table) if src.table else TableRef(name=dataset, path=location)
        if not table_exists(spark, ref):
            raise SourceError(f"dataset {dataset!r}: source table {location} does not exist or is not Delta")
        return hashlib.sha256(f"{key}:{location}:v{table_version(spark, ref)}".encode()).hexdigest()[:24]
    path = Path(location)
    if not path.exists():
        raise SourceNotFoundError(f"dataset {dataset!r}: source path {location} does not exist")
    files = _source_files(path, src.format)
    if not files:
        raise SourceError(f"dataset {dataset!r}: no {src.format} files under {location}")
    return batch_id_for(files, key)


def read_source(spark: SparkSession, resolve: Callable[[str], Path], dataset: str, spec: DatasetSpec,
                path_override: str | None = None, purpose: Purpose = "history",
                batch_id: str | None = None) -> tuple[DataFrame, str, list[str]]:
    """Read the raw source with every declared column as a string; bronze keeps values as given.

    Returns the frame (declared columns, ``_source``, ``_malformed`` and a helper column that
    :func:`ingest` drops after materialising), the batch id and the undeclared columns ignored.
    """
    from pyspark.sql import functions as F

    src = effective_source(spec, purpose, path_override)
    columns_wanted = batch_columns(spec, purpose)
    location = source_location(src, None, resolve)
    if src.format in ("table", "delta"):
        raw, batch = _read_table_source(spark, resolve, dataset, src, purpose)
        extra = _check_columns(dataset, spec, raw.columns, location, purpose)
        if extra:
            log.warning("dataset %s: ignoring undeclared source columns %s", dataset, extra)
        df = _declared_strings(raw, spec, F.lit(src.table or location), src.format, columns_wanted)
    else:
        path = Path(location)
        if not path.exists():
            raise SourceNotFoundError(f"dataset {dataset!r}: source path {location} does not exist")
        files = _source_files(path, src.format)
        if not files:
            raise SourceError(f"dataset {dataset!r}: no {src.format} files under {location}")
        empty = [str(f) for f in files if f.stat().st_size == 0]
        if empty and len(empty) == len(files):
            raise SourceError(f"dataset {dataset!r}: source files are empty: {', '.join(empty)}")
        # RFC 4180 quoting ("" inside quotes) unless the dataset says otherwise.
        options = {"header": "true", "inferSchema": "false", "mode": "PERMISSIVE", "escape": '"',
                   "multiLine": "false", **src.options} \
            if src.format == "csv" else dict(src.options)
        groups = _schema_groups(dataset, src.format, options,
                                [f for f in files if f.stat().st_size > 0])
        if not groups:
            raise SourceError(f"dataset {dataset!r}: source files have no lines: {_name_files(files)}")
        frames = []
        extra_by_group: dict[str, list[str]] = {}
        for group in groups:
            raw = _read_group(spark, dataset, src.format, options, group)
            columns = [c for c in raw.columns if c != _CORRUPT]
            where = location if len(groups) == 1 else f"file(s) {_name_files(group)}"
            group_extra = _check_columns(dataset, spec, columns, where, purpose)
            if group_extra:
                extra_by_group[_name_files(group)] = group_extra
            frames.append(_declared_strings(raw, spec, F.col("_metadata.file_path"), src.format, columns_wanted))
        df = frames[0]
        for other in frames[1:]:
            df = df.unionByName(other)
        batch = batch_id or batch_id_for(files, dataset if purpose == "history" else f"{dataset}:scoring")
        for where, cols in extra_by_group.items():
            log.warning("dataset %s: ignoring undeclared source columns %s in %s", dataset, cols, where)
        extra = sorted({c for cols in extra_by_group.values() for c in cols})
    return df, batch, extra


def check_json_documents(bronze: DataFrame, dataset: str, src: SourceSpec) -> None:
    """With ``multiLine`` a JSON file is one document: a corrupt one cannot be read in part."""
    from pyspark.sql import functions as F

    if src.format != "json" or _lower_keys(src.options).get("multiline", "").lower() != "true":
        return
    bad = [r[0] for r in bronze.where(F.col(MALFORMED).isNotNull()).select("_source").distinct()
           .orderBy("_source").limit(_NAMED_FILES + 1).collect()]
    if bad:
        files = [unquote(re.sub(r"^file:(//)?", "", str(b))) for b in bad]
        raise SourceError(f"dataset {dataset!r}: source file(s) {_name_files(files)} are not valid JSON "
                          f"documents (truncated or corrupt; multiLine JSON cannot be read in part); "
                          f"{_NOTHING_WRITTEN}")


def to_bronze(df: DataFrame, spec: DatasetSpec, batch_id: str, purpose: Purpose = "history") -> DataFrame:
    """Declared columns as strings, the raw tenant kept, and a validated ``tenant_id`` (NULL if unsafe).

    ``df`` is what :func:`read_source` returns; the helper column it carries is kept here (so the
    materialised frame parses every CSV field) and dropped by :func:`ingest` before the write.
    """
    from pyspark.sql import functions as F

    raw = _col(spec.tenant_column).cast("string")
    cols = [raw.alias(RAW_TENANT),
            F.when(raw.rlike(TENANT_ID_JAVA_REGEX), raw).alias("tenant_id")]
    cols += [_col(c).cast("string").alias(c) for c in batch_columns(spec, purpose) if c != spec.tenant_column]
    return df.select(
        *cols,
        F.lit(batch_id).alias("_batch_id"),
        F.current_timestamp().alias("_ingested_at"),
        F.col("_source").cast("string").alias("_source"),
        F.monotonically_increasing_id().alias("_row_number"),
        (F.col(MALFORMED) if MALFORMED in df.columns else F.lit(None)).cast("string").alias(MALFORMED),
        *([F.col(ALL_FIELDS)] if ALL_FIELDS in df.columns else []),
    )




def held_batch(spark: SparkSession, ref: TableRef, batch_id: str) -> dict[str | None, int] | None:
    """Rows per tenant of batch ``batch_id`` in ``ref`` when a complete ingest wrote it (not one limited
    with --tenants), else None: the batch is read and written again."""
    from pyspark.sql import functions as F

    from tenantml.io import read_table, table_exists

    if not table_exists(spark, ref):
        return None
    rows = read_table(spark, ref).where(F.col("_batch_id") == batch_id)
    if "_partial" not in rows.columns:
        return None
    held = rows.groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n"),
                                         F.max(F.coalesce(F.col("_partial"), F.lit(True)).cast("int")).alias("p")).collect()
    if not held or any(r["p"] for r in held):
        return None
    return {r["tenant_id"]: int(r["n"]) for r in held}
