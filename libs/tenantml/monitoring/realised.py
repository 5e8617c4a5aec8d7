"""Realised model quality once labels arrive: per (tenant, scoring batch) AUC or RMSE.

Predictions (tenant_id, entity_key, batch_id, score) are joined to labels that arrive later
(tenant_id, entity_key, label). The rules, shared by `realised_metrics` (Spark) and its pandas twin
`realised_metrics_pandas`:

* rows with a null key or group value, a null/NaN score or a null/NaN label are ignored;
* duplicates collapse: one score per (keys, group), the greatest; one label per key, the greatest
  (a binary label that was 1 once stays 1);
* a label applies to every group that scored its key (an entity scored in two batches is evaluated
  in both);
* per group: ``rows`` scored and labelled, ``unlabelled`` scored without a label yet, and the
  metric: binary AUC (Mann-Whitney with average ranks for ties, NaN with one class; label 1 is
  positive) with ``positives``, or regression RMSE;
* labels whose key was never scored are counted per tenant (the first key column) in
  ``result.attrs["unmatched_labels"]``.

The Spark version gets the average ranks from one SQL window per group (``rank()`` and a running
count over the scores), sums them per group and finishes the AUC on the driver: one query, one small
collect, no Python worker. On 1,000 groups of 200 rows (local[2]) it ran about 3x faster than
``applyInPandas`` with `roc_auc` per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tenantml.models import primary_metric, rmse, roc_auc

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

_MATCHED, _UNLABELLED, _UNMATCHED = 0, 1, 2


def _columns(task: str, group: Sequence[str]) -> list[str]:
    base = [*group, "metric", "value", "rows", "unlabelled"]
    return [*base, "positives"] if task == "binary" else base


def _check(task: str, keys: Sequence[str], group: Sequence[str]) -> tuple[list[str], list[str]]:
    primary_metric(task)  # type: ignore[arg-type]  # raises ValueError on an unknown task
    keys, group = list(keys), list(group)
    if not keys or not group:
        raise ValueError("keys and group need at least one column each")
    for reserved in ("score", "label"):
        if reserved in keys or reserved in group:
            raise ValueError(f"{reserved!r} cannot be a key or group column")
    return keys, group


def _auc_from_ranks(n: int, positives: int, rank_sum: float) -> float:
    negatives = n - positives
    if positives == 0 or negatives == 0:
        return math.nan
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def realised_metrics(
    scored: DataFrame,
    labels: DataFrame,
    task: str,
    keys: Sequence[str] = ("tenant_id", "entity_key"),
    group: Sequence[str] = ("tenant_id", "batch_id"),
) -> pd.DataFrame:
    """Realised metric per group in one Spark query.

    Columns: the group columns, metric ('auc' | 'rmse'), value, rows, unlabelled, and positives
    (binary only); sorted by group. ``attrs["unmatched_labels"]``: {tenant: labels never scored}.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    keys, group = _check(task, keys, group)
    group_only = [g for g in group if g not in keys]
    score, label = F.col("score").cast("double"), F.col("label").cast("double")
    s = (scored.select(*keys, *group_only, score.alias("score"))
         .where(F.col("score").isNotNull() & ~F.isnan("score"))
         .dropna(subset=[*keys, *group_only])
         .groupBy(*keys, *group_only).agg(F.max("score").alias("score"), F.lit(True).alias("_scored")))
    lab = (labels.select(*keys, label.alias("label"))
           .where(F.col("label").isNotNull() & ~F.isnan("label"))
           .dropna(subset=keys)
           .groupBy(*keys).agg(F.max("label").alias("label"), F.lit(True).alias("_labelled")))
    joined = s.join(lab, on=keys, how="full")
    kind = (F.when(F.col("_scored").isNull(), F.lit(_UNMATCHED))
            .when(F.col("_labelled").isNull(), F.lit(_UNLABELLED))
            .otherwise(F.lit(_MATCHED)))
    matched = kind == _MATCHED
    binary = task == "binary"
    # Unmatched labels keep only their tenant; unlabelled rows only their group.
    cells = [F.when(kind == _UNMATCHED, F.lit(None)).otherwise(F.col(g)).alias(g) for g in group]
    cells += [kind.alias("_kind"),
              F.when(kind == _UNMATCHED, F.col(keys[0])).cast("string").alias("_tenant"),
              F.when(matched, F.col("score")).alias("_score"),
              F.when(matched, F.col("label")).alias("_label")]
    by = [*group, "_kind", "_tenant"]
    cells_df = joined.select(*cells)
    if binary:
        # Average 1-based rank of a score among its group's: (first rank + last rank of its ties) / 2.
        ordered = Window.partitionBy(*by).orderBy("_score")
        upto = ordered.rangeBetween(Window.unboundedPreceding, Window.currentRow)
        average_rank = (F.rank().over(ordered) + F.count(F.lit(1)).over(upto)) / 2.0
        cells_df = cells_df.withColumn("_rank", average_rank)
    else:
        cells_df = cells_df.withColumn("_rank", F.lit(None).cast("double"))
    positive = F.col("_label") == 1.0
    rows = (cells_df.groupBy(*by)
            .agg(F.count(F.lit(1)).alias("_n"),
                 F.sum(F.when(positive, 1).otherwise(0)).alias("_pos"),
                 F.sum((F.col("_label") - F.col("_score")) ** 2).alias("_sq"),
                 F.sum(F.when(positive, F.col("_rank"))).alias("_rank_sum"))
            .collect())

    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    unmatched: dict[str, int] = {}
    for r in rows:
        if r["_kind"] == _UNMATCHED:
            unmatched[r["_tenant"]] = unmatched.get(r["_tenant"], 0) + int(r["_n"])
            continue
        g = groups.setdefault(tuple(r[c] for c in group),
                              {"rows": 0, "unlabelled": 0, "positives": 0, "sq": 0.0, "rank_sum": 0.0})
        if r["_kind"] == _UNLABELLED:
            g["unlabelled"] += int(r["_n"])
        else:
            g["rows"] += int(r["_n"])
            g["positives"] += int(r["_pos"])
            g["sq"] += float(r["_sq"] or 0.0)
            g["rank_sum"] += float(r["_rank_sum"] or 0.0)
    out = []
    for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
        g = groups[key]
        row: dict[str, Any] = dict(zip(group, key, strict=True))
        if binary:
            row.update(metric="auc", value=_auc_from_ranks(g["rows"], g["positives"], g["rank_sum"]))
        else:
            row.update(metric="rmse", value=math.sqrt(g["sq"] / g["rows"]) if g["rows"] else math.nan)
        row.update(rows=g["rows"], unlabelled=g["unlabelled"])
        if binary:
            row["positives"] = g["positives"]
        out.append(row)
    return _frame(out, task, group, unmatched)


def _frame(out: list[dict[str, Any]], task: str, group: Sequence[str], unmatched: dict[str, int]) -> pd.DataFrame:
    result = pd.DataFrame(out, columns=_columns(task, group))
    for c in ("rows", "unlabelled", "positives"):
        if c in result:
            result[c] = result[c].astype("int64")
    result["value"] = result["value"].astype("float64")
    result.attrs["unmatched_labels"] = dict(sorted(unmatched.items()))
    return result


def realised_metrics_pandas(
    scored: pd.DataFrame,
    labels: pd.DataFrame,
    task: str,
    keys: Sequence[str] = ("tenant_id", "entity_key"),
    group: Sequence[str] = ("tenant_id", "batch_id"),
) -> pd.DataFrame:
    """The pandas twin of `realised_metrics` (same rules and output), with `roc_auc` and `rmse`."""
    keys, group = _check(task, keys, group)
    group_only = [g for g in group if g not in keys]
    s = scored[[*keys, *group_only]].copy()
    s["score"] = pd.to_numeric(scored["score"], errors="coerce").astype("float64")
    s = s.dropna(subset=[*keys, *group_only, "score"])
    s = s.groupby([*keys, *group_only], as_index=False, sort=False)["score"].max()
    lab = labels[list(keys)].copy()
    lab["label"] = pd.to_numeric(labels["label"], errors="coerce").astype("float64")
    lab = lab.dropna(subset=[*keys, "label"]).groupby(keys, as_index=False, sort=False)["label"].max()
    joined = s.merge(lab, on=keys, how="outer", indicator=True)

    unmatched_rows = joined[joined["_merge"] == "right_only"]
    unmatched = {str(t): int(n) for t, n in unmatched_rows.groupby(keys[0]).size().items()}
    scored_rows = joined[joined["_merge"] != "right_only"]
    out = []
    for key, part in scored_rows.groupby(group, sort=False):
        key_tuple = key if isinstance(key, tuple) else (key,)
        labelled = part[part["_merge"] == "both"]
        y = labelled["label"].to_numpy(dtype=np.float64)
        p = labelled["score"].to_numpy(dtype=np.float64)
        row: dict[str, Any] = dict(zip(group, key_tuple, strict=True))
        if task == "binary":
            row.update(metric="auc", value=roc_auc(y, p))
        else:
            row.update(metric="rmse", value=rmse(y, p))
        row.update(rows=len(labelled), unlabelled=int((part["_merge"] == "left_only").sum()))
        if task == "binary":
            row["positives"] = int((y == 1).sum())
        out.append(row)
    out.sort(key=lambda r: tuple(str(r[c]) for c in group))
    return _frame(out, task, group, unmatched)
