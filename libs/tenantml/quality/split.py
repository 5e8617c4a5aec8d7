"""The quarantine split: raw rows -> valid rows + quarantined rows with every reason, and
per-tenant counts, from one Great Expectations run over every tenant.

Among the rows given, the latest batch holding a (tenant, key) is its current state: rows of
earlier batches are superseded (kept in bronze, left out of both outputs); a key repeated within
one batch is a duplicate, and all but the last copy are quarantined. A history row whose only
fault is an empty label is not a training row: it goes to quarantine marked `unlabelled`, and does
not count as rejected. For every tenant, valid + quarantined = rows of its current state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tenantml.config import DatasetSpec
from tenantml.io.sources import RAW_TENANT
from tenantml.io.spark import local_frame
from tenantml.quality.gx_rules import Rule, RuleResult, run_rules
from tenantml.quality.rules import (
    DUP_RANK,
    MALFORMED,
    ROW_ID,
    Purpose,
    build_rules,
    typed_check_columns,
    typed_select,
    unlabelled_reason,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

CASE_OK = "_tenant_case_ok"
KIND_REJECTED, KIND_UNLABELLED = "rejected", "unlabelled"


@dataclass(frozen=True)
class Counts:
    rows: int
    rejected: int
    unlabelled: int = 0

    @property
    def valid(self) -> int:
        return self.rows - self.rejected - self.unlabelled

    @property
    def rejected_fraction(self) -> float:
        """Rejected among the rows that could be used: unlabelled history rows are neither."""
        usable = self.rows - self.unlabelled
        return self.rejected / usable if usable else 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.rows + other.rows, self.rejected + other.rejected, self.unlabelled + other.unlabelled)


@dataclass
class Split:
    """The split's frames (lazy, over one materialised snapshot) and its per-tenant counts."""

    valid: DataFrame
    quarantine: DataFrame
    keys: DataFrame                                # (RAW_TENANT, key) of every keyed row given
    counts: dict[str | None, Counts]               # tenant -> counts of the rows given (current state)
    superseded: dict[str | None, int]
    rules: list[Rule]
    results: list[RuleResult]
    checkpoint: DataFrame
    collisions: dict[str, str] = field(default_factory=dict)

    @property
    def tenant_ids(self) -> list[str]:
        return sorted(t for t in self.counts if t is not None)

    def release(self) -> None:
        self.checkpoint.unpersist()


def split_rows(spark: SparkSession, raw: DataFrame, spec: DatasetSpec, *, run_id: str,
               registered: Sequence[str] | None, collisions: dict[str, str], suite: str,
               purpose: Purpose = "history", supersede: bool = True) -> Split:
    """Validate ``raw`` (every tenant at once) and split it.

    ``registered`` rejects rows of tenants outside it; ``collisions`` (id -> the registered id it
    differs from only in case) rejects those rows. Without ``supersede`` every batch stands on its
    own (rows to score: an entity scored in two batches is two rows to score); duplicates within a
    batch are still quarantined.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    if MALFORMED not in raw.columns:  # bronze written before ingest recorded malformed lines
        raw = raw.withColumn(MALFORMED, F.lit(None).cast("string"))
    by = [RAW_TENANT, spec.entity_key] if supersede else [RAW_TENANT, spec.entity_key, "_batch_id"]
    order = Window.partitionBy(*by).orderBy(
        F.col("_ingested_at").desc(), F.col("_row_number").desc())
    keyed = F.col(spec.entity_key).isNotNull()
    ranked = (raw
              .withColumn(DUP_RANK, F.when(keyed, F.row_number().over(order)).otherwise(F.lit(1)))
              .withColumn("_superseded", keyed & (F.col("_batch_id") != F.first("_batch_id").over(order))))
    range_cols = [F.expr(f"try_cast(trim(`{c}`) AS DOUBLE)").alias(f"{c}__typed")
                  for c in typed_check_columns(spec, purpose)]
    case_ok = (~F.col("tenant_id").isin(sorted(collisions))).cast("int") if collisions else F.lit(1)
    # Row ids must not change between the rule jobs and the split below, and the window must not
    # be evaluated once per job: materialise once, then count and drop the superseded rows.
    checkpointed = ranked.select("*", F.monotonically_increasing_id().alias(ROW_ID), *range_cols,
                                 F.coalesce(case_ok, F.lit(1)).alias(CASE_OK)).localCheckpoint(eager=True)
    superseded = {r["tenant_id"]: int(r["n"]) for r in checkpointed.where("_superseded")
                  .groupBy("tenant_id").agg(F.count(F.lit(1)).alias("n")).collect()}
    frame = checkpointed.where(~F.col("_superseded")).drop("_superseded")

    rules = build_rules(spec, list(registered) if registered is not None else None, purpose)
    if collisions:
        rules.append(Rule("in_set", CASE_OK, "tenant id differs only in case from registered tenant "
                                             + ", ".join(f"{held!r} ({t!r})" for t, held in sorted(collisions.items())[:5])
                                             + ": tenant ids are unique case-insensitively", value_set=(1,)))
    results = run_rules(frame, rules, row_id_col=ROW_ID, suite_name=suite)

    reasons: dict[int, list[str]] = defaultdict(list)
    for res in results:
        for rid in res.failing_row_ids:
            reasons[int(rid)].append(res.rule.reason)
    only_unlabelled = [unlabelled_reason(spec)]
    reason_df = local_frame(spark,
        [(rid, "; ".join(rs), KIND_UNLABELLED if rs == only_unlabelled else KIND_REJECTED)
         for rid, rs in reasons.items()],
        T.StructType([T.StructField(ROW_ID, T.LongType(), False),
                      T.StructField("_reason", T.StringType(), False),
                      T.StructField("_kind", T.StringType(), False)]),
    )
    joined = frame.join(F.broadcast(reason_df), on=ROW_ID, how="left")
    now = F.current_timestamp()
    quarantine = joined.where(F.col("_reason").isNotNull()).select(
        *[F.col(f"`{c}`") for c in raw.columns], "_reason", "_kind", F.lit(purpose).alias("_purpose"),
        F.lit(run_id).alias("_run_id"), now.alias("_quarantined_at"))
    valid_rows = joined.where(F.col("_reason").isNull())
    valid = valid_rows.select(*typed_select(valid_rows, spec, purpose), "_batch_id", "_ingested_at",
                              now.alias("_validated_at"), F.lit(run_id).alias("_run_id"))
    counts = {r["tenant_id"]: Counts(int(r["n"]), int(r["bad"] or 0), int(r["unl"] or 0)) for r in
              joined.groupBy("tenant_id").agg(
                  F.count(F.lit(1)).alias("n"),
                  F.sum((F.col("_kind") == KIND_REJECTED).cast("long")).alias("bad"),
                  F.sum((F.col("_kind") == KIND_UNLABELLED).cast("long")).alias("unl")).collect()}
    keys = checkpointed.where(keyed).select(RAW_TENANT, F.col(f"`{spec.entity_key}`")).distinct()
    return Split(valid=valid, quarantine=quarantine, keys=keys, counts=counts, superseded=superseded, rules=rules,
                 results=results, checkpoint=checkpointed, collisions=collisions)
