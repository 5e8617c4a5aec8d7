"""Row-level validation rules run by Great Expectations 1.x (GX Core) over one Spark DataFrame.

One call to :func:`run_rules` validates the frame holding *all* tenants' rows in one GX suite
validation (one ephemeral context, one data source, one batch) and returns, for every rule, the
complete list of failing row ids, so the caller can quarantine exactly those rows with
``Rule.reason``.

How failing rows are identified (checked against the installed GX 1.24.1 source)
-------------------------------------------------------------------------------
* The caller adds a unique integral row-id column (``row_id_col``, default ``_row_id``). The suite
  is validated with ``result_format={"result_format": "COMPLETE",
  "unexpected_index_column_names": [row_id_col], "exclude_unexpected_values": True,
  "return_unexpected_index_query": False}``.
* On Spark the ``*.unexpected_index_list`` metric
  (``expectations/metrics/map_metric_provider/map_condition_auxilliary_methods.py::
  _spark_map_condition_index``) applies ``.limit(partial_unexpected_count)`` only when the
  result format is *not* COMPLETE; under COMPLETE it collects every failing row. It is the same
  metric for column-map expectations (not_null / regex / between / in_set / single-column unique)
  and for multicolumn-map expectations (``ExpectCompoundColumnsToBeUnique``: GX only skips it for
  compound columns on SQL engines, not on Spark). Verified by the integration tests with 0 and
  > 1,000 failures per rule.
* With ``exclude_unexpected_values=True`` the list has the compact shape
  ``[{row_id_col: [id, id, ...]}]`` (one dict of lists, or ``[]`` when nothing failed) instead
  of one ``{row_id_col: id, column: value}`` dict per failing row. Both shapes are parsed.
* GX *does* cap other parts of the result: ``unexpected_list`` / ``unexpected_rows`` and
  ``partial_*`` lists are limited to ``MAX_RESULT_RECORDS`` (200) or ``partial_unexpected_count``
  (20) even under COMPLETE. They are not used here. As a guard against any silent truncation the
  number of ids returned is compared with ``unexpected_count`` and a ``RuntimeError`` is raised on
  a mismatch (a duplicate id means ``row_id_col`` is not unique and raises ``ValueError``).

Semantics
---------
* ``not_null``: ``ExpectColumnValuesToNotBeNull``; null is the failure.
* ``regex`` / ``between`` / ``in_set``: ``ExpectColumnValuesToMatchRegex`` (Spark ``rlike``,
  i.e. Java regex, *search* semantics: anchor with ``^...$``), ``ExpectColumnValuesToBeBetween``
  (inclusive bounds; at least one of min/max), ``ExpectColumnValuesToBeInSet``. GX evaluates
  these only on non-null values (the condition is ``col IS NOT NULL AND NOT expected``), so
  **nulls are never failures** for them: add a ``not_null`` rule when null must be rejected.
  On Spark 4 GX rejects ``between`` with numeric bounds on a string column (ANSI), so that is
  checked up front and raised as ``ValueError``.
* ``unique``: one key column -> ``ExpectColumnValuesToBeUnique`` (nulls ignored by GX);
  several key columns (``Rule.columns``) -> ``ExpectCompoundColumnsToBeUnique`` with
  ``ignore_row_if="any_value_is_missing"`` so that a null in any key column is likewise not a
  failure (GX's default ``"never"`` would group nulls together as duplicates). *Every* row of a
  duplicated key fails (GX counts rows whose key occurs more than once, it does not keep a
  "first" row). Uniqueness is over the whole frame: include ``tenant_id`` in the key for
  per-tenant uniqueness.
* ``success`` is GX's (``mostly`` = 1.0): true iff the rule has no failing row.

GX pitfalls handled here
------------------------
* ``ExpectationSuite.add_expectation`` silently drops an expectation equal to one already in the
  suite (``meta`` and ``notes`` are ignored in the comparison), so two rules that differ only in
  ``reason`` would collapse. Rules are de-duplicated here by their GX configuration and each
  distinct expectation carries ``meta={"tenantml_key": i}``; results are mapped back through it,
  not through result order.
* ``add_spark(persist=True)`` (the default) makes GX ``persist()`` the batch DataFrame and never
  unpersist it. ``persist=False`` is passed and the (column-pruned) frame is cached and
  unpersisted here instead: GX runs a Spark job per metric (one aggregate job bundles the counts,
  then collect jobs per expectation for values and index lists, window jobs for uniqueness).
* Passing ``force_reuse_spark_context`` (any value) emits a ``DeprecationWarning``; it is left
  unset. GX obtains the session with ``SparkSession.builder.getOrCreate()``, i.e. the caller's
  active session (it first tries the Spark Connect builder, which is skipped when grpcio is not
  installed and raises a caught ``PySparkValueError`` when ``spark.remote`` is not set).
* Metric progress bars (tqdm on stderr) are on by default; they are disabled through the
  ephemeral context's ``progress_bars`` config. ``init_temp_docs_sites=False`` avoids the default
  ephemeral temp docs-site directory. Nothing is written to the working directory.
* Importing GX calls ``logging.captureWarnings(True)`` (module-level code in
  ``expect_column_kl_divergence_to_be_less_than.py``), rerouting all Python warnings of the
  process to the ``py.warnings`` logger; :func:`_import_gx` turns that back off. Importing GX also
  emits ``DeprecationWarning``s for ``sre_constants``/``sre_parse`` and takes ~2.5 s once.
* Analytics: ``GX_ANALYTICS_ENABLED=False`` is set before GX is imported and the project config
  sets ``analytics_enabled=False``; GX 1.24.1 ships no event client, and its PyPI version checker
  (``data_context/_version_checker.py``) is not called by any code path, so no network is used.
* GX catches per-expectation exceptions into ``exception_info``; any raised exception is turned
  into a ``RuntimeError`` naming the rule, never into a silently "successful" result.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import great_expectations as gx
    from pyspark.sql import DataFrame

__all__ = ["Rule", "RuleKind", "RuleResult", "build_suite", "run_rules"]

RuleKind = Literal["not_null", "regex", "between", "in_set", "unique"]
_RULE_KINDS: frozenset[str] = frozenset(get_args(RuleKind))
_META_KEY = "tenantml_key"


@dataclass(frozen=True)
class Rule:
    """One row-level rule; ``reason`` is the text put on the rows that fail it.

    Nulls are NOT failures for ``regex`` / ``between`` / ``in_set`` (GX evaluates those only on
    non-null values) nor for ``unique`` (a row with a null key column is ignored); use a
    ``not_null`` rule to reject nulls. ``between`` bounds are inclusive. An empty ``value_set``
    fails every non-null value. For ``unique``,
    ``columns`` is the compound key (its first entry must be ``column``); when empty the key is
    ``(column,)``.
    """

    kind: RuleKind
    column: str
    reason: str
    regex: str | None = None
    min_value: float | None = None
    max_value: float | None = None
    value_set: tuple[str | int | float, ...] | None = None
    columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _RULE_KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r}; expected one of {sorted(_RULE_KINDS)}")
        if not self.column:
            raise ValueError(f"{self.kind} rule needs a column")
        if self.kind == "regex" and not self.regex:
            raise ValueError(f"regex rule on {self.column!r} needs a regex")
        if self.kind == "between":
            if self.min_value is None and self.max_value is None:
                raise ValueError(f"between rule on {self.column!r} needs min_value and/or max_value")
            if self.min_value is not None and self.max_value is not None and self.min_value > self.max_value:
                raise ValueError(
                    f"between rule on {self.column!r}: min_value {self.min_value} > max_value {self.max_value}"
                )
        if self.kind == "in_set" and self.value_set is None:
            raise ValueError(f"in_set rule on {self.column!r} needs a value_set")
        if self.columns:
            if self.kind != "unique":
                raise ValueError(f"columns is only for unique rules, not {self.kind!r}")
            if self.columns[0] != self.column:
                raise ValueError(
                    f"unique rule: column {self.column!r} must be the first of columns {self.columns!r}"
                )
            if len(set(self.columns)) != len(self.columns):
                raise ValueError(f"unique rule: repeated column in {self.columns!r}")

    @property
    def key_columns(self) -> tuple[str, ...]:
        """For ``unique``: the key columns; otherwise ``(column,)``."""
        return self.columns if (self.kind == "unique" and self.columns) else (self.column,)

    def referenced_columns(self) -> tuple[str, ...]:
        return self.key_columns


@dataclass
class RuleResult:
    rule: Rule
    success: bool
    element_count: int
    unexpected_count: int
    failing_row_ids: list[int]  # complete and sorted: row_id_col values of the failing rows
    expectation_type: str


def _import_gx() -> Any:
    """Import GX with analytics off, undoing the global side effect its import has on warnings.

    ``GX_ANALYTICS_ENABLED=False`` is set first, whatever the environment says. Importing GX runs
    ``logging.captureWarnings(True)`` (in ``expect_column_kl_divergence_to_be_less_than``), which
    would reroute every ``warnings.warn`` of the process into the ``py.warnings`` logger; it is
    switched back off when the import turned it on.
    """
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    if "great_expectations" in sys.modules:
        return sys.modules["great_expectations"]
    before = warnings.showwarning
    import great_expectations as gx

    if warnings.showwarning is not before:
        logging.captureWarnings(False)
    return gx


def _gx_key(rule: Rule) -> tuple[Any, ...]:
    """What makes two rules the same GX expectation (``reason`` does not)."""
    value_set = tuple(rule.value_set) if rule.value_set is not None else None
    if rule.kind == "unique":
        return (rule.kind, rule.key_columns)
    return (rule.kind, rule.column, rule.regex, rule.min_value, rule.max_value, value_set)


def _to_expectation(rule: Rule, meta: dict[str, Any] | None = None) -> Any:
    x = _import_gx().expectations
    extra: dict[str, Any] = {"meta": meta} if meta is not None else {}
    if rule.kind == "not_null":
        return x.ExpectColumnValuesToNotBeNull(column=rule.column, **extra)
    if rule.kind == "regex":
        return x.ExpectColumnValuesToMatchRegex(column=rule.column, regex=rule.regex, **extra)
    if rule.kind == "between":
        return x.ExpectColumnValuesToBeBetween(
            column=rule.column, min_value=rule.min_value, max_value=rule.max_value, **extra
        )
    if rule.kind == "in_set":
        return x.ExpectColumnValuesToBeInSet(
            column=rule.column, value_set=list(rule.value_set or ()), **extra
        )
    if rule.kind == "unique":
        if len(rule.key_columns) == 1:
            return x.ExpectColumnValuesToBeUnique(column=rule.column, **extra)
        return x.ExpectCompoundColumnsToBeUnique(
            column_list=list(rule.key_columns), ignore_row_if="any_value_is_missing", **extra
        )
    raise ValueError(f"unknown rule kind {rule.kind!r}")  # pragma: no cover - __post_init__ guards


def _distinct(rules: Sequence[Rule]) -> tuple[list[Rule], list[int]]:
    """Distinct GX expectations (first rule of each) and, per rule, the index of its expectation."""
    index_of: dict[tuple[Any, ...], int] = {}
    firsts: list[Rule] = []
    rule_to_key: list[int] = []
    for rule in rules:
        key = _gx_key(rule)
        if key not in index_of:
            index_of[key] = len(firsts)
            firsts.append(rule)
        rule_to_key.append(index_of[key])
    return firsts, rule_to_key


def build_suite(name: str, rules: Sequence[Rule], row_id_col: str) -> gx.ExpectationSuite:
    """An (unsaved) ExpectationSuite with one expectation per distinct rule.

    Each expectation's ``meta`` holds ``tenantml_key`` (its index among the distinct rules) and
    ``row_id_col``; rules identical up to ``reason`` share one expectation (GX would drop the
    duplicate anyway).
    """
    gx = _import_gx()
    suite = gx.ExpectationSuite(name=name)
    firsts, _ = _distinct(rules)
    for i, rule in enumerate(firsts):
        suite.add_expectation(_to_expectation(rule, meta={_META_KEY: i, "row_id_col": row_id_col}))
    if len(suite.expectations) != len(firsts):  # pragma: no cover - defensive, see module docstring
        raise RuntimeError(
            f"GX kept {len(suite.expectations)} of {len(firsts)} distinct expectations in suite {name!r}"
        )
    return suite


def _check_columns(df: DataFrame, rules: Sequence[Rule], row_id_col: str) -> None:
    from pyspark.sql.types import IntegralType, NumericType, StringType

    fields = {f.name: f.dataType for f in df.schema.fields}
    available = ", ".join(df.columns)
    if row_id_col not in fields:
        raise ValueError(
            f"row id column {row_id_col!r} is missing from the DataFrame; available columns: {available}"
        )
    if not isinstance(fields[row_id_col], IntegralType):
        raise ValueError(
            f"row id column {row_id_col!r} must be an integral type, not {fields[row_id_col].simpleString()}"
        )
    for rule in rules:
        for col in rule.referenced_columns():
            if col not in fields:
                raise ValueError(
                    f"column {col!r} of {rule.kind} rule ({rule.reason!r}) is missing from the DataFrame; "
                    f"available columns: {available}"
                )
        if rule.kind == "between" and not isinstance(fields[rule.column], NumericType):
            hint = " (add a regex rule and cast first)" if isinstance(fields[rule.column], StringType) else ""
            raise ValueError(
                f"between rule on {rule.column!r} needs a numeric column, not "
                f"{fields[rule.column].simpleString()}{hint}"
            )


def _ephemeral_context() -> Any:
    gx = _import_gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _failing_ids(result: dict[str, Any], row_id_col: str, rule: Rule) -> list[int]:
    index_list = result.get("unexpected_index_list")
    if index_list is None:
        raise RuntimeError(f"GX returned no unexpected_index_list for {rule.kind} rule on {rule.column!r}")
    ids: list[int] = []
    for entry in index_list:
        value = entry[row_id_col]
        if isinstance(value, list):  # exclude_unexpected_values shape: {row_id_col: [ids]}
            ids.extend(int(v) for v in value)
        else:  # one dict per failing row
            ids.append(int(value))
    ids.sort()
    return ids


def run_rules(
    df: DataFrame,
    rules: Sequence[Rule],
    row_id_col: str = "_row_id",
    suite_name: str = "tenantml",
) -> list[RuleResult]:
    """One GX validation of the whole frame; one :class:`RuleResult` per rule, in ``rules`` order.

    Raises ``ValueError`` (before GX runs) naming the column, with the available columns, when a
    rule's column or ``row_id_col`` is missing; ``ValueError`` when ``row_id_col`` is not unique
    among failing rows; ``RuntimeError`` when GX raised on an expectation or returned fewer/more
    row ids than its ``unexpected_count``.
    """
    if not rules:
        return []
    _check_columns(df, rules, row_id_col)

    _import_gx()
    from great_expectations.core.result_format import ResultFormat

    needed = list(dict.fromkeys([row_id_col, *(c for r in rules for c in r.referenced_columns())]))
    work = df.select(*needed).cache()  # only the columns the rules read; our own cache to unpersist
    try:
        context = _ephemeral_context()
        datasource = context.data_sources.add_spark(name="tenantml_spark", persist=False)
        asset = datasource.add_dataframe_asset(name="frame")
        batch_definition = asset.add_batch_definition_whole_dataframe("whole_frame")
        batch = batch_definition.get_batch(batch_parameters={"dataframe": work})
        suite = build_suite(suite_name, rules, row_id_col)
        suite_result = batch.validate(
            suite,
            result_format={
                "result_format": ResultFormat.COMPLETE.value,
                "unexpected_index_column_names": [row_id_col],
                "exclude_unexpected_values": True,
                "return_unexpected_index_query": False,
            },
        )
    finally:
        work.unpersist()

    firsts, rule_to_key = _distinct(rules)
    by_key: dict[int, tuple[bool, int, int, list[int], str]] = {}
    for evr in suite_result.results:
        config = evr.expectation_config
        key = int(config.meta[_META_KEY])
        rule = firsts[key]
        info = evr.exception_info or {}
        if info.get("raised_exception"):
            raise RuntimeError(
                f"GX failed evaluating {config.type} for {rule.kind} rule on {rule.column!r}: "
                f"{info.get('exception_message')}"
            )
        result = evr.result or {}
        unexpected_count = int(result.get("unexpected_count") or 0)
        ids = _failing_ids(result, row_id_col, rule)
        if len(set(ids)) != len(ids):
            raise ValueError(f"row id column {row_id_col!r} is not unique (duplicate ids among failing rows)")
        if len(ids) != unexpected_count:
            raise RuntimeError(
                f"GX returned {len(ids)} failing row ids but unexpected_count={unexpected_count} for "
                f"{config.type} on {rule.column!r}: the id list is truncated or inconsistent"
            )
        by_key[key] = (
            bool(evr.success),
            int(result.get("element_count") or 0),
            unexpected_count,
            ids,
            config.type,
        )

    missing = [firsts[k] for k in range(len(firsts)) if k not in by_key]
    if missing:
        raise RuntimeError(f"GX returned no result for rules: {missing}")
    out: list[RuleResult] = []
    for rule, key in zip(rules, rule_to_key, strict=True):
        success, element_count, unexpected_count, ids, expectation_type = by_key[key]
        out.append(
            RuleResult(
                rule=rule,
                success=success,
                element_count=element_count,
                unexpected_count=unexpected_count,
                failing_row_ids=list(ids),
                expectation_type=expectation_type,
            )
        )
    return out
