"""The quarantine split: bronze rows -> valid (silver) rows + quarantined rows with every reason,
and per-tenant counts, from one Great Expectations run over every tenant.

The latest batch holding a (tenant, key) is its current state: rows of earlier batches are
superseded history (kept in bronze, left out of silver and quarantine); a key repeated within the
latest batch is a duplicate, and all but the last copy are quarantined. For every tenant,
valid + quarantined = rows of its current state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tenantml.config import DatasetSpec
from tenantml.io.sources import RAW_TENANT
from tenantml.quality.gx_rules import Rule, RuleResult, run_rules
from tenantml.quality.rules import (
    DUP_RANK,
    MALFORMED,
    ROW_ID,
    build_rules,
    typed_check_columns,
    typed_select,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

CASE_OK = "_tenant_case_ok"


@dataclass
class Split:
    """The split's frames (lazy, over one materialised snapshot) and its per-tenant counts."""

    silver: DataFrame
    quarantine: DataFrame
    rows: dict[str | None, tuple[int, int]]          # tenant -> (rows, rejected)
    superseded: dict[str | None, int]
    rules: list[Rule]
    results: list[RuleResult]
    checkpoint: DataFrame
    collisions: dict[str, str] = field(default_factory=dict)

    @property
    def tenant_ids(self) -> list[str]:
        return sorted(t for t in self.rows if t is not None)

    def release(self) -> None:
        self.checkpoint.unpersist()


def split_rows(spark: SparkSession, bronze: DataFrame, spec: DatasetSpec, *, run_id: str,
               registered: Sequence[str] | None, collisions: dict[str, str], suite: str) -> Split:
    """Validate ``bronze`` (every tenant at once) and split it.

    ``registered`` (when tenants are not auto-registered) rejects rows of unknown tenants;
    ``collisions`` (id -> the registered id it differs from only in case) rejects those rows.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    if MALFORMED not in bronze.columns:  # bronze written before ingest recorded malformed lines
        bronze = bronze.withColumn(MALFORMED, F.lit(None).cast("string"))
    order = Window.partitionBy(RAW_TENANT, spec.entity_key).orderBy(
        F.col("_ingested_at").desc(), F.col("_row_number").desc())
    keyed = F.col(spec.entity_key).isNotNull()
    ranked = (bronze
              .withColumn(DUP_RANK, F.when(keyed, F.row_number().over(order)).otherwise(F.lit(1)))
              .withColumn("_superseded", keyed & (F.col("_batch_id") != F.first("_batch_id").over(order))))
    range_cols = [F.expr(f"try_cast(trim(`{c}`) AS DOUBLE)").alias(f"{c}__typed")
                  for c in typed_check_columns(spec)]
    case_ok = (~F.col("tenant_id").isin(sorted(collisions))).cast("int") if collisions else F.lit(1)
    # Row ids must not change between the rule jobs and the split below, and the window must not
    # be evaluated once per job: materialise once, then count and drop the superseded rows.
    checkpointed = ranked.select("*", F.monotonically_increasing_id().alias(ROW_ID), *range_cols,
                                 F.coalesce(case_ok, F.lit(1)).alias(CASE_OK)).localCheckpoint(eager=True)
    superseded = {r["tenant_id"]: int(r["n"]) for r in checkpointed.where("_superseded")
                  .groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
    frame = checkpointed.where(~F.col("_superseded")).drop("_superseded")

    rules = build_rules(spec, list(registered) if registered is not None else None)
    if collisions:
        rules.append(Rule("in_set", CASE_OK, "tenant id differs only in case from registered tenant "
                                             + ", ".join(f"{held!r} ({t!r})" for t, held in sorted(collisions.items())[:5])
                                             + ": tenant ids are unique case-insensitively", value_set=(1,)))
    results = run_rules(frame, rules, row_id_col=ROW_ID, suite_name=suite)

    reasons: dict[int, list[str]] = defaultdict(list)
    for res in results:
        for rid in res.failing_row_ids:
            reasons[int(rid)].append(res.rule.reason)
    reason_df = spark.createDataFrame(
        [(rid, "; ".join(rs)) for rid, rs in reasons.items()],
        T.StructType([T.StructField(ROW_ID, T.LongType(), False),
                      T.StructField("_reason", T.StringType(), False)]),
    )
    joined = frame.join(F.broadcast(reason_df), on=ROW_ID, how="left")
    now = F.current_timestamp()
    quarantine = joined.where(F.col("_reason").isNotNull()).select(
        *[F.col(f"`{c}`") for c in bronze.columns], "_reason",
        F.lit(run_id).alias("_run_id"), now.alias("_quarantined_at"))
    valid = joined.where(F.col("_reason").isNull())
    silver = valid.select(*typed_select(valid, spec), "_batch_id", "_ingested_at",
                          now.alias("_validated_at"), F.lit(run_id).alias("_run_id"))
    per_tenant = {r["tenant_id"]: (int(r["n"]), int(r["bad"] or 0)) for r in joined.groupBy("tenant_id").agg(
        F.count(F.lit(1)).alias("n"), F.sum(F.col("_reason").isNotNull().cast("long")).alias("bad")).collect()}
    return Split(silver=silver, quarantine=quarantine, rows=per_tenant, superseded=superseded, rules=rules,
                 results=results, checkpoint=checkpointed, collisions=collisions)
