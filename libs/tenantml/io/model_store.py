"""The `model_store` Delta table: every registered model's bytes and lineage, one row per version.

Scoring reads model bytes here in one query instead of downloading thousands of MLflow
artifacts; MLflow stays the source of truth for which version is champion.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tenantml.core.ids import SHARED_ID, tenant_in_predicate, validate_run_id, validate_tenant_ids
from tenantml.io import read_table, replace_where, table_exists
from tenantml.io.tables import TableRef

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import SparkSession

    from tenantml.io.scope import TenantScope

STORE_SCHEMA = (
    "dataset string, tenant_id string, strategy string, model_name string, model_version string, "
    "mlflow_run_id string, run_id string, metric_name string, metric double, baseline_metric double, "
    "metrics_json string, train_rows long, delta_version long, git_commit string, config_hash string, "
    "model binary, created_at timestamp"
)


def write_models(spark: SparkSession, ref: TableRef, rows: list[dict[str, Any]], dataset: str,
                 run_id: str, strategy: str, scope: TenantScope | None = None) -> None:
    """Idempotent per (run, dataset, strategy, tenant): a rerun replaces its own tenants' rows
    only, so a resumed run keeps the models its first attempt registered for the other tenants.
    With ``scope`` every row's tenant must be one the step acts for."""
    validate_run_id(run_id)
    if scope is not None:
        scope.check([r["tenant_id"] for r in rows], f"writing {ref.display} rows")
    if strategy not in ("tenant", "shared", "tuned"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if not rows:
        return
    now = datetime.now(UTC).replace(tzinfo=None)
    cols = [c.split()[0] for c in STORE_SCHEMA.split(", ")]
    data = [tuple({**r, "created_at": now}[c] for c in cols) for r in rows]
    df = spark.createDataFrame(data, STORE_SCHEMA)
    tenants = tenant_in_predicate([r["tenant_id"] for r in rows], allow=(SHARED_ID,))
    replace_where(df, ref, f"run_id = '{run_id}' AND dataset = '{dataset}' AND strategy = '{strategy}' "
                           f"AND {tenants}",
                  partition_by=("tenant_id",))


def load_models(spark: SparkSession, ref: TableRef, wanted: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Rows for exactly the (model_name, version) of each tenant in ``wanted``."""
    import pandas as pd
    from pyspark.sql import functions as F

    if not wanted or not table_exists(spark, ref):
        return pd.DataFrame(columns=[c.split()[0] for c in STORE_SCHEMA.split(", ")])
    tenants = [t for t in wanted if t == SHARED_ID] + validate_tenant_ids(
        [t for t in wanted if t != SHARED_ID], where="the model store")
    keys = spark.createDataFrame([(t, n, v) for t, (n, v) in wanted.items()],
                                 "tenant_id string, model_name string, model_version string")
    df = (read_table(spark, ref).where(F.col("tenant_id").isin(tenants))
          .join(F.broadcast(keys), on=["tenant_id", "model_name", "model_version"], how="inner")
          .dropDuplicates(["tenant_id", "model_name", "model_version"]))
    return df.toPandas()
