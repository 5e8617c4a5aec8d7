"""The gold star schema for BI: table contracts and builders over predictions, models and tenants.

- `gold_<ds>_prediction_fact`: one row per (tenant, entity key, scoring run), partitioned by
  tenant; every scoring run published is kept, so reports can trend scores over runs.
- `gold_tenant_dim`, `gold_<ds>_model_dim`, `gold_date_dim`: what the fact's keys point at.

Surrogate keys are 64-bit hashes of the natural keys (`xxhash64`), so they are the same in every
run, process and dataset without a key table to coordinate, and a rerun writes the same rows.
Dimensions are written before the fact, so a reader never sees a fact whose key is not in its
dimension. Column contracts are in docs/data-contracts.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from tenantml.core.errors import TenantMLError
from tenantml.core.ids import SHARED_ID, TENANT_ID_JAVA_REGEX
from tenantml.io.delta import insert_missing, read_table, table_exists
from tenantml.io.spark import local_frame
from tenantml.io.tables import TableRef

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

# The published contracts: exact column names, order and types (tested; documented in
# docs/data-contracts.md). Change them only together with the docs and the BI reports.
FACT_SCHEMA = (
    "tenant_id string, tenant_key bigint, entity_key string, scoring_run_id string, scoring_batch_id string, "
    "score_date_key int, scored_at timestamp, model_key bigint, strategy string, prediction double, score double"
)
TENANT_DIM_SCHEMA = (
    "tenant_key bigint, tenant_id string, display_name string, strategy string, consent_share_data boolean, "
    "consent_shared_inference boolean, status string, is_active boolean, created_at timestamp, "
    "updated_at timestamp"
)
MODEL_DIM_SCHEMA = (
    "model_key bigint, model_name string, model_version int, dataset string, tenant_key bigint, "
    "tenant_id string, strategy string, is_shared_model boolean, metric_name string, metric_value double, "
    "baseline_metric_value double, train_rows bigint, training_data_version bigint, base_model_key bigint, "
    "base_model_name string, base_model_version int, mlflow_run_id string, trained_run_id string, "
    "is_champion boolean, created_at timestamp"
)
DATE_DIM_SCHEMA = (
    "date_key int, date date, year int, quarter int, quarter_name string, month int, month_name string, "
    "year_month string, day int, weekday int, weekday_name string, day_of_year int, iso_week int, "
    "is_weekend boolean"
)


def columns(schema: str) -> list[str]:
    return [c.split()[0] for c in schema.split(", ")]


def tenant_key(tenant_id: Column) -> Column:
    """The tenant's surrogate key: the same for a tenant in every dataset, run and process."""
    from pyspark.sql import functions as F

    return F.when(tenant_id.isNotNull(), F.xxhash64(F.lit("tenant"), tenant_id))


def model_key(model_name: Column, model_version: Column) -> Column:
    """A model version's surrogate key, from the registered name and version (as text)."""
    from pyspark.sql import functions as F

    return F.when(model_name.isNotNull() & model_version.isNotNull(),
                  F.xxhash64(F.lit("model"), model_name, model_version.cast("string")))


def date_key(d: Column) -> Column:
    """yyyymmdd as an int: sortable, readable, and the usual key of a BI date table."""
    from pyspark.sql import functions as F

    return F.date_format(d, "yyyyMMdd").cast("int")


def _cast(df: DataFrame, schema: str) -> DataFrame:
    from pyspark.sql import functions as F

    return df.select(*[F.col(c.split()[0]).cast(c.split()[1]).alias(c.split()[0]) for c in schema.split(", ")])


def checked(df: DataFrame, key: str, *natural: str, table: TableRef) -> list[Any]:
    """The dimension's rows, refusing a key that is not unique: a duplicated natural key or a hash
    collision (never seen), because a BI relationship on it would silently double-count."""
    rows = df.collect()
    if len({r[key] for r in rows}) != len(rows):
        seen: dict[Any, int] = {}
        for r in rows:
            seen[r[key]] = seen.get(r[key], 0) + 1
        dup = sorted({"/".join(str(r[c]) for c in natural) for r in rows if seen[r[key]] > 1})[:5]
        raise TenantMLError(f"{table.display}: column {key!r} would not be unique ({'/'.join(natural)} "
                            f"{dup} duplicated or colliding); stopped before writing it")
    return rows


def tenant_dim(spark: SparkSession, tenants_ref: TableRef, scope: Sequence[str] | None) -> DataFrame:
    """The tenants table as a dimension; only valid ids (the table holds no other, checked again)."""
    from pyspark.sql import functions as F

    df = read_table(spark, tenants_ref).where(F.col("tenant_id").rlike(TENANT_ID_JAVA_REGEX))
    if scope is not None:
        df = df.where(F.col("tenant_id").isin(list(scope)))
    df = (df.withColumn("tenant_key", tenant_key(F.col("tenant_id")))
          .withColumn("display_name", F.coalesce(F.col("display_name"), F.col("tenant_id")))
          .withColumn("is_active", F.col("status") == F.lit("active")))
    return _cast(df, TENANT_DIM_SCHEMA)


def date_dim(spark: SparkSession, first: date, last: date) -> DataFrame:
    """Every calendar day of the whole years from ``first`` to ``last``: contiguous, as Power BI's
    "mark as date table" and time-intelligence functions require."""
    from pyspark.sql import functions as F

    start, end = date(first.year, 1, 1), date(last.year, 12, 31)
    d = F.col("date")
    df = (spark.range(1).select(F.explode(F.sequence(F.lit(start), F.lit(end))).alias("date"))
          .select(date_key(d).alias("date_key"), d, F.year(d).alias("year"), F.quarter(d).alias("quarter"),
                  F.concat(F.lit("Q"), F.quarter(d).cast("string")).alias("quarter_name"),
                  F.month(d).alias("month"), F.date_format(d, "MMMM").alias("month_name"),
                  F.date_format(d, "yyyy-MM").alias("year_month"), F.dayofmonth(d).alias("day"),
                  (F.weekday(d) + 1).alias("weekday"), F.date_format(d, "EEEE").alias("weekday_name"),
                  F.dayofyear(d).alias("day_of_year"), F.weekofyear(d).alias("iso_week"),
                  (F.weekday(d) >= 5).alias("is_weekend")))
    return _cast(df, DATE_DIM_SCHEMA)


def model_dim_rows(store_rows: Iterable[dict[str, Any]], champions: dict[str, str],
                   version_tags: dict[tuple[str, str], dict[str, str]]) -> list[dict[str, Any]]:
    """One row per (model name, version) of the dataset from `model_store` rows (without bytes).

    Lineage comes from the registry's version tags (`base_model`, `base_version`: a tuned version's
    starting point, or the shared version a tenant's serving version points at); a shared serving
    version also names its base in `metrics_json`, and takes its training run and rows from that
    base. ``champions`` maps registered name -> champion version.
    """
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in store_rows:  # a (name, version) is stored once; the newest row wins if ever twice
        k = (r["model_name"], str(r["model_version"]))
        if k not in latest or (r["created_at"] or datetime.min) > (latest[k]["created_at"] or datetime.min):
            latest[k] = r
    out: list[dict[str, Any]] = []
    for (name, version), r in sorted(latest.items()):
        shared_model = r["tenant_id"] == SHARED_ID
        tags = version_tags.get((name, version), {})
        base_name, base_version = tags.get("base_model"), tags.get("base_version")
        if r["strategy"] == "shared" and not shared_model and not (base_name and base_version):
            ref = _json(r["metrics_json"]).get("base_model")
            if isinstance(ref, str) and "/" in ref:
                base_name, base_version = ref.rsplit("/", 1)
        if shared_model or r["strategy"] == "tenant":
            base_name = base_version = None
        base = latest.get((base_name, base_version)) if base_name and base_version else None
        serving_shared = r["strategy"] == "shared" and not shared_model and base is not None
        out.append({
            "model_name": name, "model_version": _int(version), "model_version_text": version,
            "dataset": r["dataset"], "tenant_id": None if shared_model else r["tenant_id"],
            "strategy": r["strategy"], "is_shared_model": shared_model, "metric_name": r["metric_name"],
            "metric_value": r["metric"], "baseline_metric_value": r["baseline_metric"],
            "train_rows": base["train_rows"] if serving_shared and base else r["train_rows"],
            "training_data_version": r["delta_version"],
            "base_model_name": base_name, "base_model_version": _int(base_version),
            "base_model_version_text": base_version if base is not None else None,
            "mlflow_run_id": (base["mlflow_run_id"] if serving_shared and base else None) or r["mlflow_run_id"],
            "trained_run_id": r["run_id"], "is_champion": champions.get(name) == version,
            "created_at": r["created_at"],
        })
    return out


_MODEL_INPUT_SCHEMA = (
    "model_name string, model_version int, model_version_text string, dataset string, tenant_id string, "
    "strategy string, is_shared_model boolean, metric_name string, metric_value double, "
    "baseline_metric_value double, train_rows bigint, training_data_version bigint, base_model_name string, "
    "base_model_version int, base_model_version_text string, mlflow_run_id string, trained_run_id string, "
    "is_champion boolean, created_at timestamp"
)


def model_dim(spark: SparkSession, rows: list[dict[str, Any]]) -> DataFrame:
    from pyspark.sql import functions as F

    cols = columns(_MODEL_INPUT_SCHEMA)
    df = local_frame(spark, [tuple(r[c] for c in cols) for r in rows], _MODEL_INPUT_SCHEMA)
    df = (df.withColumn("model_key", model_key(F.col("model_name"), F.col("model_version_text")))
          .withColumn("tenant_key", tenant_key(F.col("tenant_id")))
          .withColumn("base_model_key", model_key(F.col("base_model_name"), F.col("base_model_version_text"))))
    return _cast(df, MODEL_DIM_SCHEMA)


def prediction_fact(predictions: DataFrame) -> DataFrame:
    """predictions_<ds> rows as facts: keys to the dimensions, measures, the scoring run."""
    from pyspark.sql import functions as F

    df = (predictions
          .withColumn("tenant_key", tenant_key(F.col("tenant_id")))
          .withColumn("scoring_run_id", F.col("run_id"))
          .withColumn("scoring_batch_id", F.col("batch_id") if "batch_id" in predictions.columns else F.lit(None))
          .withColumn("score_date_key", date_key(F.to_date(F.col("scored_at"))))
          .withColumn("model_key", model_key(F.col("model_name"), F.col("model_version"))))
    return _cast(df, FACT_SCHEMA)


def holds(spark: SparkSession, ref: TableRef, rows: list[Any], scope: Column) -> bool:
    """Whether the table's rows in ``scope`` are exactly ``rows``: a rerun then commits nothing."""
    if not table_exists(spark, ref):
        return False
    current = read_table(spark, ref).where(scope).collect()
    return sorted(map(tuple, current), key=repr) == sorted(map(tuple, rows), key=repr)


def scoring_runs(groups: Iterable[Any]) -> dict[str, tuple[int, Any]]:
    """scoring run -> (rows, latest scored_at) of one tenant's predictions."""
    out: dict[str, tuple[int, Any]] = {}
    for g in groups:
        n, at = out.get(g["run_id"], (0, g["scored_at"]))
        out[g["run_id"]] = (n + int(g["n"]), max(at, g["scored_at"]))
    return out


def published_runs(spark: SparkSession, ref: TableRef,
                    tenants: list[str]) -> dict[tuple[str, str], tuple[int, Any]]:
    """(tenant, scoring run) -> (rows, latest scored_at) already in the fact table. Every scoring
    run stamps its own time, so equal figures mean those facts are already published."""
    from pyspark.sql import functions as F

    if not tenants or not table_exists(spark, ref):
        return {}
    rows = (read_table(spark, ref).where(F.col("tenant_id").isin(tenants))
            .groupBy("tenant_id", "scoring_run_id")
            .agg(F.count(F.lit(1)).alias("n"), F.max("scored_at").alias("at")).collect())
    return {(r["tenant_id"], r["scoring_run_id"]): (int(r["n"]), r["at"]) for r in rows}


def extend_date_dim(spark: SparkSession, ref: TableRef, first: date, last: date) -> bool:
    """Add the missing days (whole years, contiguous with what the table holds); never rewrites a
    day, so datasets publishing concurrently cannot undo each other. True when it committed."""
    from pyspark.sql import functions as F

    if table_exists(spark, ref):
        bounds = read_table(spark, ref).agg(F.min("date").alias("a"), F.max("date").alias("b")).first()
        if bounds is not None and bounds["a"] is not None:
            if bounds["a"] <= first and last <= bounds["b"]:
                return False  # already covered (a rerun): nothing to commit
            first, last = min(first, bounds["a"]), max(last, bounds["b"])
    insert_missing(date_dim(spark, first, last), ref, "date_key")
    return True


def _json(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
