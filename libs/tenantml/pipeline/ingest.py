"""Ingest: source files or table -> bronze Delta, partitioned by tenant, idempotent per batch."""

from __future__ import annotations

import difflib
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tenantml.config import DatasetSpec, SourceSpec
from tenantml.errors import SourceError
from tenantml.io import replace_where
from tenantml.pipeline.result import StepResult, TenantOutcome
from tenantml.tenancy import TENANT_ID_JAVA_REGEX, validate_tenant_ids
from tenantml.tenants import register_tenants

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from tenantml.context import JobContext

log = logging.getLogger(__name__)

RAW_TENANT = "_tenant_raw"
BRONZE_META = ["_batch_id", "_ingested_at", "_source", "_row_number"]


def _source_files(path: Path, fmt: str) -> list[Path]:
    if path.is_file():
        return [path]
    suffixes = {"csv": (".csv",), "json": (".json", ".jsonl"), "parquet": (".parquet",)}.get(fmt, ())
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)


def batch_id_for(files: Sequence[Path], dataset: str) -> str:
    """Content hash of the source files: the same files ingested twice are the same batch."""
    h = hashlib.sha256(dataset.encode())
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def _read_table_source(spark: SparkSession, ctx: JobContext, dataset: str,
                       spec: DatasetSpec) -> tuple[DataFrame, str]:
    """A table source's batch is its Delta version: the same snapshot ingested twice is one batch."""
    from tenantml.io import table_exists, table_version
    from tenantml.tables import TableRef

    src = spec.source
    location = src.table or str(ctx.resolve_path(src.path or ""))
    ref = TableRef(name=dataset, fqn=src.table) if src.table else TableRef(name=dataset, path=location)
    try:
        exists = table_exists(spark, ref)
    except Exception:
        exists = False
    if not exists:
        raise SourceError(f"dataset {dataset!r}: source table {location} does not exist or is not Delta")
    version = table_version(spark, ref)
    df = spark.read.table(src.table) if src.table else spark.read.format("delta").load(location)
    batch = hashlib.sha256(f"{dataset}:{location}:v{version}".encode()).hexdigest()[:24]
    return df, batch


def source_location(src: SourceSpec, path_override: str | None, ctx: JobContext) -> str:
    """The location actually read, for error messages."""
    if path_override or src.path:
        return str(ctx.resolve_path(path_override or src.path or ""))
    return str(src.table)


def read_source(spark: SparkSession, ctx: JobContext, dataset: str, spec: DatasetSpec,
                path_override: str | None = None) -> tuple[DataFrame, str]:
    """Read the raw source with every declared column as a string; bronze keeps values as given."""
    from pyspark.sql import functions as F

    src = spec.source
    if src.format in ("table", "delta") and not path_override:
        df, batch = _read_table_source(spark, ctx, dataset, spec)
    else:
        raw_path = source_location(src, path_override, ctx)
        path = Path(raw_path)
        if not path.exists():
            raise SourceError(f"dataset {dataset!r}: source path {raw_path} does not exist")
        files = _source_files(path, src.format)
        if not files:
            raise SourceError(f"dataset {dataset!r}: no {src.format} files under {raw_path}")
        empty = [str(f) for f in files if f.stat().st_size == 0]
        if empty and len(empty) == len(files):
            raise SourceError(f"dataset {dataset!r}: source files are empty: {', '.join(empty)}")
        # RFC 4180 quoting ("" inside quotes) unless the dataset says otherwise.
        options = {"header": "true", "inferSchema": "false", "mode": "PERMISSIVE", "escape": '"',
                   "multiLine": "false", **src.options} \
            if src.format == "csv" else dict(src.options)
        reader = spark.read.format(src.format).options(**options)
        try:
            df = reader.load([str(f) for f in files if f.stat().st_size > 0])
        except Exception as exc:
            raise SourceError(f"dataset {dataset!r}: cannot read {raw_path} as {src.format}: "
                              f"{str(exc).splitlines()[0]}") from exc
        batch = batch_id_for(files, dataset)
        df = df.withColumn("_source", F.col("_metadata.file_path"))
    location = source_location(src, path_override, ctx)
    columns = [c for c in df.columns if c != "_source"]
    missing = [c for c in spec.declared_columns if c not in columns]
    if missing:
        hints = []
        for c in missing:
            close = difflib.get_close_matches(c, columns, n=1)
            hints.append(f"{c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SourceError(f"dataset {dataset!r}: source {location} lacks declared "
                          f"column(s) {', '.join(hints)}; it has {sorted(columns)}")
    extra = sorted(set(df.columns) - set(spec.declared_columns) - {"_source"})
    if extra:
        log.warning("dataset %s: ignoring undeclared source columns %s", dataset, extra)
    if "_source" not in df.columns:
        df = df.withColumn("_source", F.lit(src.table or src.path))
    return df, batch


def to_bronze(df: DataFrame, spec: DatasetSpec, batch_id: str) -> DataFrame:
    """Declared columns as strings, the raw tenant kept, and a validated ``tenant_id`` (NULL if unsafe)."""
    from pyspark.sql import functions as F

    raw = F.col(f"`{spec.tenant_column}`").cast("string")
    cols = [raw.alias(RAW_TENANT),
            F.when(raw.rlike(TENANT_ID_JAVA_REGEX), raw).alias("tenant_id")]
    cols += [F.col(f"`{c}`").cast("string").alias(c) for c in spec.declared_columns
             if c != spec.tenant_column]
    return df.select(
        *cols,
        F.lit(batch_id).alias("_batch_id"),
        F.current_timestamp().alias("_ingested_at"),
        F.col("_source").cast("string").alias("_source"),
        F.monotonically_increasing_id().alias("_row_number"),
    )


def ingest(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None,
           source_path: str | None = None) -> StepResult:
    """Append one batch to bronze; re-ingesting the same batch replaces it instead of duplicating."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    ids = validate_tenant_ids(tenants or [], where="--tenants")  # before any Spark work
    name, spec = ctx.config.dataset(dataset)
    spark = ctx.spark
    bronze_ref = ctx.tables.bronze(name)
    ctx.progress.phase(f"ingest {name}: reading source")
    df, batch_id = read_source(spark, ctx, name, spec, source_path)
    bronze = to_bronze(df, spec, batch_id)
    predicate = f"_batch_id = '{batch_id}'"
    if ids:
        bronze = bronze.where(F.col("tenant_id").isin(ids))
        from tenantml.tenancy import tenant_in_predicate

        predicate += f" AND ({tenant_in_predicate(ids)})"
    bronze = bronze.localCheckpoint(eager=True)
    ctx.progress.phase(f"ingest {name}: writing batch {batch_id} to {bronze_ref.display}")
    replace_where(bronze, bronze_ref, predicate, partition_by=("tenant_id",))
    counts = {r["tenant_id"]: int(r["n"]) for r in
              bronze.groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
    seen = [t for t in counts if t is not None]
    new = []
    if ctx.config.tenants.auto_register and seen:
        new = register_tenants(spark, ctx.tables.tenants, seen, ctx.config.tenants)
    outcomes = [
        TenantOutcome(tenant_id=t, status="ok", rows_in=n, rows_out=n,
                      detail={"batch_id": batch_id} if t is not None else
                      {"batch_id": batch_id, "note": "rows with a missing or invalid tenant id"})
        for t, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))
    ]
    written = [bronze_ref.display] + ([ctx.tables.tenants.display] if new else [])
    return StepResult(step="ingest", dataset=name, run_id=ctx.run_id, tenants=outcomes,
                      tables_written=written, seconds=time.perf_counter() - started,
                      summary={"batch_id": batch_id, "tenants_registered": len(new),
                               "rows_ingested": sum(counts.values())})
