"""The `promotions` table: every champion/challenger decision, one row per (run, dataset, model owner).

An auditor can answer "why is this model serving this tenant" from one row: the champion before,
the best challenger, every candidate's holdout metric, the margin and the reason.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tenantml.core.ids import SHARED_ID, tenant_in_predicate, validate_run_id
from tenantml.io import replace_where
from tenantml.io.spark import local_frame
from tenantml.io.tables import TableRef

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

DECISION_SCHEMA = (
    "run_id string, dataset string, tenant_id string, decision string, reason string, metric_name string, "
    "margin double, serving_model string, serving_strategy string, champion_before string, "
    "champion_before_strategy string, champion_before_metric double, challenger string, "
    "challenger_strategy string, challenger_metric double, holdout_rows long, candidates_json string, "
    "decided_at timestamp"
)
DECISION_COLUMNS = [c.split()[0] for c in DECISION_SCHEMA.split(", ")]


def write_decisions(spark: SparkSession, ref: TableRef, rows: list[dict[str, Any]], dataset: str,
                    run_id: str) -> None:
    """Replace this run's decisions for these owners: a rerun never duplicates a decision."""
    validate_run_id(run_id)
    if not rows:
        return
    now = datetime.now(UTC).replace(tzinfo=None)
    data = [tuple({**{c: None for c in DECISION_COLUMNS}, **r, "decided_at": now}[c] for c in DECISION_COLUMNS)
            for r in rows]
    df = local_frame(spark, data, DECISION_SCHEMA)
    owners = tenant_in_predicate([r["tenant_id"] for r in rows], allow=(SHARED_ID,))
    replace_where(df, ref, f"run_id = '{run_id}' AND dataset = '{dataset}' AND {owners}",
                  partition_by=("dataset",))
