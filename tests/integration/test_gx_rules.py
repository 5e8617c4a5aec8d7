"""GX 1.x row-level rules over one multi-tenant Spark DataFrame: exact failing row ids per rule."""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tenantml.quality.gx_rules import Rule, RuleResult, build_suite, run_rules

pytestmark = pytest.mark.spark

N = 2_100
TENANTS = ("t0", "t1", "t2")
PLANS = ("basic", "pro", "enterprise")
BAD_AMOUNTS = ("n/a", "", "1e5", "12,5", " 7", "abc", "--1", "3.", ".5", "NaN")
NUMERIC_RE = r"^-?\d+(\.\d+)?$"

R_LABEL = Rule("not_null", "churned", "label 'churned' is null")
R_AMOUNT = Rule("regex", "amount_raw", "amount_raw is not a number", regex=NUMERIC_RE)
R_TENURE = Rule("between", "tenure_months", "tenure_months outside [0, 120]", min_value=0, max_value=120)
R_PLAN = Rule("in_set", "plan", "plan not in catalogue", value_set=PLANS)
R_KEY = Rule(
    "unique", "tenant_id", "duplicate (tenant_id, customer_id)", columns=("tenant_id", "customer_id")
)
R_CUSTOMER = Rule("unique", "customer_id", "customer_id repeats across the frame")
R_TENANT = Rule("not_null", "tenant_id", "tenant_id is null")  # never fails: the 0-failure case


def _make_rows() -> list[dict[str, Any]]:
    rows = []
    for i in range(N):
        tenant = TENANTS[i % 3]
        customer: int | None = i // 3  # unique within a tenant, repeated across tenants
        if i % 250 == 100:
            customer = (i - 15) // 3  # same tenant as row i - 15: both rows are duplicates
        if i % 333 == 1:
            customer = None  # several null keys in tenant t1: ignored, not duplicates
        churned = None if i % 101 == 7 else i % 2
        if i % 50 == 0:
            amount: str | None = None  # null: not a regex failure
        elif i % 2 == 1:
            amount = BAD_AMOUNTS[i % len(BAD_AMOUNTS)]  # 1,050 failures (> 1,000, > GX's 200 cap)
        else:
            amount = str(i) if i % 4 == 0 else f"-{i}.25"
        tenure: float | None
        if i % 40 == 5:
            tenure = None  # null: not a between failure
        elif i % 97 == 11:
            tenure = 150.0
        elif i % 89 == 13:
            tenure = -1.0
        elif i % 131 == 17:
            tenure = 120.0  # inclusive upper bound: passes
        else:
            tenure = float(i % 120)
        plan: str | None
        if i % 60 == 9:
            plan = None  # null: not an in_set failure
        elif i % 43 == 2:
            plan = "free"
        elif i % 71 == 3:
            plan = "Basic"  # case matters
        else:
            plan = PLANS[i % 3]
        rows.append(
            {
                "_row_id": i,
                "tenant_id": tenant,
                "customer_id": customer,
                "churned": churned,
                "amount_raw": amount,
                "tenure_months": tenure,
                "plan": plan,
            }
        )
    return rows


def _expected(rows: list[dict[str, Any]]) -> dict[Rule, list[int]]:
    """Failing ids computed in plain Python, independently of Spark and GX."""
    import re

    numeric = re.compile(NUMERIC_RE)
    keys = Counter((r["tenant_id"], r["customer_id"]) for r in rows if r["customer_id"] is not None)
    customers = Counter(r["customer_id"] for r in rows if r["customer_id"] is not None)
    return {
        R_LABEL: [r["_row_id"] for r in rows if r["churned"] is None],
        R_AMOUNT: [
            r["_row_id"]
            for r in rows
            if r["amount_raw"] is not None and not numeric.fullmatch(r["amount_raw"])
        ],
        R_TENURE: [
            r["_row_id"]
            for r in rows
            if r["tenure_months"] is not None and not 0 <= r["tenure_months"] <= 120
        ],
        R_PLAN: [r["_row_id"] for r in rows if r["plan"] is not None and r["plan"] not in PLANS],
        R_KEY: [
            r["_row_id"]
            for r in rows
            if r["customer_id"] is not None and keys[(r["tenant_id"], r["customer_id"])] > 1
        ],
        R_CUSTOMER: [
            r["_row_id"] for r in rows if r["customer_id"] is not None and customers[r["customer_id"]] > 1
        ],
        R_TENANT: [],
    }


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return _make_rows()


@pytest.fixture(scope="module")
def frame(spark: Any, rows: list[dict[str, Any]]) -> Any:
    from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

    schema = StructType(
        [
            StructField("_row_id", LongType(), False),
            StructField("tenant_id", StringType(), True),
            StructField("customer_id", LongType(), True),
            StructField("churned", LongType(), True),
            StructField("amount_raw", StringType(), True),
            StructField("tenure_months", DoubleType(), True),
            StructField("plan", StringType(), True),
        ]
    )
    cols = [f.name for f in schema.fields]
    return spark.createDataFrame([tuple(r[c] for c in cols) for r in rows], schema=schema)


@pytest.fixture(scope="module")
def dirty_results(frame: Any) -> list[RuleResult]:
    rules = [R_LABEL, R_AMOUNT, R_TENURE, R_PLAN, R_KEY, R_CUSTOMER, R_TENANT]
    return run_rules(frame, rules)


def test_failing_row_ids_are_exact_per_rule(
    dirty_results: list[RuleResult], rows: list[dict[str, Any]]
) -> None:
    expected = _expected(rows)
    assert [r.rule for r in dirty_results] == [
        R_LABEL,
        R_AMOUNT,
        R_TENURE,
        R_PLAN,
        R_KEY,
        R_CUSTOMER,
        R_TENANT,
    ]
    types = {
        R_LABEL: "expect_column_values_to_not_be_null",
        R_AMOUNT: "expect_column_values_to_match_regex",
        R_TENURE: "expect_column_values_to_be_between",
        R_PLAN: "expect_column_values_to_be_in_set",
        R_KEY: "expect_compound_columns_to_be_unique",
        R_CUSTOMER: "expect_column_values_to_be_unique",
        R_TENANT: "expect_column_values_to_not_be_null",
    }
    for res in dirty_results:
        want = expected[res.rule]
        assert res.failing_row_ids == want, res.rule.reason
        assert res.unexpected_count == len(want), res.rule.reason
        assert res.success is (not want), res.rule.reason
        assert res.element_count == N
        assert res.expectation_type == types[res.rule]
    # every kind that should fail does, with a few rows each, and each tenant is hit
    for rule in (R_LABEL, R_AMOUNT, R_TENURE, R_PLAN, R_KEY):
        assert len(expected[rule]) >= 2, rule.reason
    assert {rows[i]["tenant_id"] for i in expected[R_AMOUNT]} == set(TENANTS)


def test_thousands_of_failures_are_not_truncated(dirty_results: list[RuleResult]) -> None:
    by_rule = {r.rule: r for r in dirty_results}
    amount = by_rule[R_AMOUNT]
    assert amount.unexpected_count == 1_050  # every odd row; GX caps value lists at 200 / 20
    assert len(amount.failing_row_ids) == 1_050
    customer = by_rule[R_CUSTOMER]  # window-function metric, single column
    assert len(customer.failing_row_ids) > 1_000


def test_nulls_do_not_fail_regex_between_in_set(
    dirty_results: list[RuleResult], rows: list[dict[str, Any]]
) -> None:
    by_rule = {r.rule: r for r in dirty_results}
    for rule, column in ((R_AMOUNT, "amount_raw"), (R_TENURE, "tenure_months"), (R_PLAN, "plan")):
        null_ids = {r["_row_id"] for r in rows if r[column] is None}
        assert len(null_ids) >= 10
        assert not null_ids & set(by_rule[rule].failing_row_ids), rule.reason
    null_key_ids = {r["_row_id"] for r in rows if r["customer_id"] is None}
    assert len(null_key_ids) >= 2 and {rows[i]["tenant_id"] for i in null_key_ids} == {"t1"}
    assert not null_key_ids & set(by_rule[R_KEY].failing_row_ids)


def test_clean_frame_succeeds_with_no_ids(frame: Any, dirty_results: list[RuleResult]) -> None:
    from pyspark.sql import functions as F

    bad = sorted({i for r in dirty_results if r.rule is not R_CUSTOMER for i in r.failing_row_ids})
    clean = frame.filter(~F.col("_row_id").isin(bad))
    rules = [R_LABEL, R_AMOUNT, R_TENURE, R_PLAN, R_KEY, R_TENANT]
    results = run_rules(clean, rules)
    assert len(results) == len(rules)
    for res in results:
        assert res.success, res.rule.reason
        assert res.failing_row_ids == []
        assert res.unexpected_count == 0
        assert res.element_count == N - len(bad)


def test_empty_frame(frame: Any) -> None:
    results = run_rules(frame.limit(0), [R_LABEL, R_AMOUNT, R_KEY])
    assert [(r.success, r.element_count, r.unexpected_count, r.failing_row_ids) for r in results] == [
        (True, 0, 0, [])
    ] * 3


def test_empty_value_set_fails_every_non_null_value(frame: Any, rows: list[dict[str, Any]]) -> None:
    (res,) = run_rules(frame, [Rule("in_set", "plan", "no plan is registered", value_set=())])
    assert res.failing_row_ids == [r["_row_id"] for r in rows if r["plan"] is not None]


def test_rules_differing_only_in_reason_each_get_results(frame: Any, rows: list[dict[str, Any]]) -> None:
    twin = Rule("not_null", "churned", "churn label missing (second owner)")
    results = run_rules(frame, [R_LABEL, twin])
    assert [r.rule for r in results] == [R_LABEL, twin]
    assert results[0].failing_row_ids == results[1].failing_row_ids == _expected(rows)[R_LABEL]
    assert len(build_suite("s", [R_LABEL, twin], "_row_id").expectations) == 1


def test_missing_rule_column_raises_value_error_naming_it(frame: Any) -> None:
    rule = Rule("regex", "amount_typo", "bad amount", regex=NUMERIC_RE)
    with pytest.raises(ValueError, match=r"'amount_typo'.*available columns: _row_id, tenant_id"):
        run_rules(frame, [R_LABEL, rule])
    key = Rule("unique", "tenant_id", "dup", columns=("tenant_id", "cust_id"))
    with pytest.raises(ValueError, match="'cust_id'"):
        run_rules(frame, [key])
    with pytest.raises(ValueError, match="row id column '_rid'"):
        run_rules(frame, [R_LABEL], row_id_col="_rid")


def test_invalid_rules_are_rejected(frame: Any) -> None:
    with pytest.raises(ValueError, match="needs a regex"):
        Rule("regex", "amount_raw", "x")
    with pytest.raises(ValueError, match="needs a value_set"):
        Rule("in_set", "plan", "x")
    with pytest.raises(ValueError, match="min_value and/or max_value"):
        Rule("between", "tenure_months", "x")
    with pytest.raises(ValueError, match="first of columns"):
        Rule("unique", "customer_id", "x", columns=("tenant_id", "customer_id"))
    with pytest.raises(ValueError, match="numeric column"):
        run_rules(frame, [Rule("between", "amount_raw", "x", min_value=0)])


def test_no_files_and_no_network(frame: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ephemeral context: nothing written to the working directory, no non-loopback connection."""
    monkeypatch.chdir(tmp_path)
    remote: list[Any] = []
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            remote.append(address)
            raise OSError(f"network disabled in test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    results = run_rules(frame, [R_LABEL, R_KEY])
    assert results[0].failing_row_ids
    assert remote == []
    assert list(tmp_path.iterdir()) == []
