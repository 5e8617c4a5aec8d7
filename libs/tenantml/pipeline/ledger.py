"""Cost ledger: compute seconds and rows per (run, step, tenant), and per-tenant budgets.

Training and scoring seconds are measured inside the Spark tasks, per tenant. Ingest and validate
process all tenants in shared Spark jobs, so their wall time is allocated by row share and marked
as such.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tenantml.io import read_table, replace_where, table_exists
from tenantml.pipeline.result import StepResult, validate_run_id
from tenantml.tables import TableRef
from tenantml.tenancy import tenant_in_predicate

if TYPE_CHECKING:
    from pyspark.accumulators import AccumulatorParam
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)
MEASURED_STEPS = {"train", "train_tuned", "score"}  # seconds measured inside the tasks


def dict_sum_param() -> AccumulatorParam[dict[str, float]]:
    """A Spark accumulator summing per-tenant seconds across tasks."""
    from pyspark.accumulators import AccumulatorParam

    class DictSum(AccumulatorParam[dict[str, float]]):
        def zero(self, value: dict[str, float]) -> dict[str, float]:
            return {}

        def addInPlace(self, a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            for k, v in b.items():
                a[k] = a.get(k, 0.0) + v
            return a

    return DictSum()


def write_cost_ledger(spark: SparkSession, ref: TableRef, result: StepResult) -> None:
    """One row per tenant of the step; replaced on rerun like run_log."""
    validate_run_id(result.run_id)
    tenants = [t for t in result.tenants if t.tenant_id is not None and t.status in ("ok", "failed")]
    if not tenants:
        return
    measured = result.step in MEASURED_STEPS
    total_rows = sum(t.rows_in for t in tenants) or 1
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [(result.run_id, result.step, result.dataset, t.tenant_id,
             float(t.seconds) if measured else result.seconds * t.rows_in / total_rows,
             int(t.rows_in), "measured" if measured else "allocated", now) for t in tenants]
    df = spark.createDataFrame(rows, "run_id string, step string, dataset string, tenant_id string, "
                                     "compute_seconds double, rows long, method string, recorded_at timestamp")
    predicate = (f"run_id = '{result.run_id}' AND step = '{result.step}' AND dataset = '{result.dataset}' "
                 f"AND {tenant_in_predicate([t.tenant_id for t in tenants if t.tenant_id])}")
    replace_where(df, ref, predicate)


def spent_this_month(spark: SparkSession, ref: TableRef, tenants: list[str]) -> dict[str, float]:
    """Compute seconds recorded per tenant since the first of the current month (UTC)."""
    from pyspark.sql import functions as F

    if not tenants or not table_exists(spark, ref):
        return {}
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    rows = (read_table(spark, ref).where(F.col("tenant_id").isin(tenants) & (F.col("recorded_at") >= start))
            .groupBy("tenant_id").agg(F.sum("compute_seconds").alias("s")).collect())
    return {r["tenant_id"]: float(r["s"]) for r in rows}
