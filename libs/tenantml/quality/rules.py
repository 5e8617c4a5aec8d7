"""Dataset spec -> typed frame + rule list. The rules are what Great Expectations checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from tenantml.config import DatasetSpec
from tenantml.io.sources import MALFORMED
from tenantml.quality.gx_rules import Rule

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

NUMBER_REGEX = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
DATE_REGEX = r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?)?$"
BINARY_LABELS = ("0", "1", "0.0", "1.0", "true", "false", "True", "False", "TRUE", "FALSE")
DUP_RANK = "_dup_rank"
MAX_FINITE = 1.7976931348623157e308
ROW_ID = "_row_id"


def typed_label(spec: DatasetSpec) -> Column:
    from pyspark.sql import functions as F

    raw = F.col(f"`{spec.label}`")
    if spec.task == "regression":
        return F.expr(f"try_cast(`{spec.label}` AS DOUBLE)")
    if spec.positive_label is not None:
        return F.when(raw.isNull(), None).when(raw == F.lit(spec.positive_label), 1.0).otherwise(0.0)
    lowered = F.lower(F.trim(raw))
    return (F.when(lowered.isin("1", "1.0", "true"), 1.0)
            .when(lowered.isin("0", "0.0", "false"), 0.0))


Purpose = Literal["history", "scoring"]


def unlabelled_reason(spec: DatasetSpec) -> str:
    """A history row without a label: not a training row, not a rejected one either."""
    return f"label {spec.label!r} is empty: not a training row (not counted as rejected)"


def typed_select(df: DataFrame, spec: DatasetSpec, purpose: Purpose = "history") -> list[Column]:
    """Silver columns from bronze strings; values that don't parse become NULL (rules catch them).
    Rows to score have no label column."""
    from pyspark.sql import functions as F

    cols = [F.col("tenant_id"), F.col(f"`{spec.entity_key}`").cast("string").alias(spec.entity_key)]
    if purpose == "history":
        cols.append(typed_label(spec).alias(spec.label))
    cols += [F.expr(f"try_cast(trim(`{c}`) AS DOUBLE)").alias(c) for c in spec.numeric_features]
    cols += [F.col(f"`{c}`").alias(c) for c in spec.categorical_features]
    cols += [F.col(f"`{c}`").alias(c) for c in spec.pii_columns]
    if spec.event_time:
        cols.append(F.expr(f"try_cast(`{spec.event_time}` AS TIMESTAMP)").alias(spec.event_time))
    return cols


def build_rules(spec: DatasetSpec, registered_tenants: list[str] | None = None,
                purpose: Purpose = "history") -> list[Rule]:
    """Every row check, stated once; reasons are what analysts read in the quarantine table.

    Rows to score get the same rules minus the label's."""
    rules: list[Rule] = [
        Rule("in_set", MALFORMED, malformed_reason(spec), value_set=()),
        Rule("not_null", "tenant_id",
             f"tenant id in column {spec.tenant_column!r} is missing or invalid "
             "(letters, digits, '_' and '-', at most 64 characters)"),
        Rule("not_null", spec.entity_key, f"entity key {spec.entity_key!r} is null"),
        Rule("in_set", DUP_RANK, f"duplicate entity key {spec.entity_key!r}: a later row was kept",
             value_set=(1,)),
    ]
    if purpose == "history":
        rules.insert(3, Rule("not_null", spec.label, unlabelled_reason(spec)))
    if registered_tenants is not None:
        rules.append(Rule("in_set", "tenant_id", "tenant is not registered in the tenants table",
                          value_set=tuple(registered_tenants)))
    if purpose == "history" and spec.task == "regression":
        rules.append(Rule("regex", spec.label, f"label {spec.label!r} is not a number",
                          regex=NUMBER_REGEX))
    elif purpose == "history" and spec.positive_label is None:
        rules.append(Rule("in_set", spec.label, f"label {spec.label!r} is not a binary value (0/1, true/false)",
                          value_set=BINARY_LABELS))
    for c in spec.numeric_features:
        rules.append(Rule("regex", c, f"column {c!r} is not a number", regex=NUMBER_REGEX))
    if spec.event_time:
        rules.append(Rule("regex", spec.event_time,
                          f"event time {spec.event_time!r} is not an ISO date/timestamp", regex=DATE_REGEX))
    skip = {spec.label} if purpose == "scoring" else set()
    for c in spec.rules.not_null:
        if c in skip:
            continue
        rules.append(Rule("not_null", c, f"column {c!r} is null"))
    for c in typed_check_columns(spec, purpose):
        rng = spec.rules.ranges.get(c)
        lo = rng.min if rng and rng.min is not None else None
        hi = rng.max if rng and rng.max is not None else None
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        # Overflowing literals (1e999) parse to infinity: the finite bounds catch them.
        rules.append(Rule("between", f"{c}__typed",
                          f"column {c!r} is outside {bounds}" if rng else f"column {c!r} is not a finite number",
                          min_value=-MAX_FINITE if lo is None else lo, max_value=MAX_FINITE if hi is None else hi))
    for c, values in spec.rules.allowed_values.items():
        if c in skip:
            continue
        rules.append(Rule("in_set", c, f"column {c!r} is not one of {values}", value_set=tuple(values)))
    return rules


def malformed_reason(spec: DatasetSpec) -> str:
    """What a malformed source line is, in the words of the source's format."""
    what = {"csv": "its number of fields does not match the header",
            "json": "it is not valid JSON"}.get(spec.source.format, "it could not be parsed")
    return f"malformed source line: {what} (truncated or broken line; raw text in {MALFORMED!r})"


def typed_check_columns(spec: DatasetSpec, purpose: Purpose = "history") -> list[str]:
    """Columns checked as numbers: numeric features, a regression label, and every ranged column."""
    label = [spec.label] if spec.task == "regression" and purpose == "history" else []
    cols = [*spec.numeric_features, *label, *(c for c in spec.rules.ranges if purpose == "history" or c != spec.label)]
    return list(dict.fromkeys(cols))


def referenced_columns(spec: DatasetSpec) -> list[str]:
    """Columns a spec's rules name; each must be a declared column (checked before any Spark work)."""
    return [*spec.rules.not_null, *spec.rules.ranges, *spec.rules.allowed_values]
