"""What a step returns and what `run_log` records: one outcome per (run, step, tenant)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from tenantml.errors import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL
from tenantml.io import replace_where
from tenantml.tables import TableRef
from tenantml.tenancy import tenant_in_predicate

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

TenantStatus = Literal["ok", "skipped", "blocked", "failed"]
ExcludedStatus = Literal["skipped", "blocked"]
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def validate_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '_' and '-' (max 64)")
    return run_id


@dataclass
class TenantOutcome:
    tenant_id: str | None
    status: TenantStatus
    rows_in: int = 0
    rows_out: int = 0
    rows_quarantined: int = 0
    seconds: float = 0.0
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    step: str
    dataset: str
    run_id: str
    tenants: list[TenantOutcome] = field(default_factory=list)
    tables_written: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> Literal["ok", "partial", "failed"]:
        failed = sum(t.status == "failed" for t in self.tenants)
        if failed == 0:
            return "ok"
        return "partial" if failed < len(self.tenants) else "failed"

    @property
    def exit_code(self) -> int:
        return {"ok": EXIT_OK, "partial": EXIT_PARTIAL, "failed": EXIT_FAILURE}[self.status]

    def count(self, status: TenantStatus) -> int:
        return sum(t.status == status for t in self.tenants)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "dataset": self.dataset,
            "run_id": self.run_id,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "tenants_processed": len(self.tenants),
            "tenants_ok": self.count("ok"),
            "tenants_skipped": self.count("skipped"),
            "tenants_blocked": self.count("blocked"),
            "tenants_failed": self.count("failed"),
            "rows_in": sum(t.rows_in for t in self.tenants),
            "rows_out": sum(t.rows_out for t in self.tenants),
            "rows_quarantined": sum(t.rows_quarantined for t in self.tenants),
            "tables_written": self.tables_written,
            "mlflow_run_id": self.mlflow_run_id,
            **self.summary,
            "failures": {str(t.tenant_id): t.error for t in self.tenants if t.status == "failed"},
        }


def write_run_log(spark: SparkSession, ref: TableRef, result: StepResult) -> None:
    """Record every tenant's outcome; a rerun of the same run and step replaces its rows."""
    from pyspark.sql import types as T

    validate_run_id(result.run_id)
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [
        (result.run_id, result.step, result.dataset, t.tenant_id, t.status, int(t.rows_in),
         int(t.rows_out), int(t.rows_quarantined), float(t.seconds), t.error,
         json.dumps(t.detail, default=str, sort_keys=True), now)
        for t in result.tenants
    ]
    schema = T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("step", T.StringType(), False),
        T.StructField("dataset", T.StringType(), False),
        T.StructField("tenant_id", T.StringType(), True),
        T.StructField("status", T.StringType(), False),
        T.StructField("rows_in", T.LongType(), False),
        T.StructField("rows_out", T.LongType(), False),
        T.StructField("rows_quarantined", T.LongType(), False),
        T.StructField("seconds", T.DoubleType(), False),
        T.StructField("error", T.StringType(), True),
        T.StructField("detail", T.StringType(), True),
        T.StructField("logged_at", T.TimestampType(), False),
    ])
    df = spark.createDataFrame(rows, schema)
    if not re.fullmatch(r"[a-z_]+", result.step) or not re.fullmatch(r"[A-Za-z0-9_]+", result.dataset):
        raise ValueError(f"invalid step/dataset name {result.step!r}/{result.dataset!r}")
    predicate = (f"run_id = '{result.run_id}' AND step = '{result.step}' "
                 f"AND dataset = '{result.dataset}'")
    ids = [t.tenant_id for t in result.tenants if t.tenant_id is not None]
    # Only this result's tenants are replaced, so a resumed step keeps the rows of the tenants it
    # did not rerun; a step-level failure row (tenant NULL) is always superseded.
    scope = f"{tenant_in_predicate(ids)} OR tenant_id IS NULL" if ids else "tenant_id IS NULL"
    replace_where(df, ref, f"{predicate} AND ({scope})")


def failed_tenants(spark: SparkSession, ref: TableRef, run_id: str, step: str, dataset: str) -> list[str]:
    """Tenants whose ``step`` failed in ``run_id``: what `--resume` reruns."""
    from pyspark.sql import functions as F

    from tenantml.io import read_table, table_exists

    if not table_exists(spark, ref):
        return []
    rows = (read_table(spark, ref)
            .where((F.col("run_id") == validate_run_id(run_id)) & (F.col("step") == step)
                   & (F.col("dataset") == dataset) & (F.col("status") == "failed")
                   & F.col("tenant_id").isNotNull())
            .select("tenant_id").distinct().collect())
    return sorted(r[0] for r in rows)


def outcome_dict(o: TenantOutcome) -> dict[str, Any]:
    return asdict(o)
