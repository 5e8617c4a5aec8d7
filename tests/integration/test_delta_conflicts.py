"""Conflict retries proven against real Delta conflicts: two writers racing on one table until
Delta raises its own concurrent-modification exception (no hand-raised stand-in)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tenantml.core.errors import ConcurrentWriteError
from tenantml.io.delta import conflict_types, is_conflict, read_table, replace_where, with_conflict_retries
from tenantml.io.tables import TableRef

pytestmark = pytest.mark.spark


def _rows(spark: Any, writer: str, n: int = 200) -> Any:
    return spark.createDataFrame([("t0", writer, i) for i in range(n)] + [("t1", writer, i) for i in range(n)],
                                 "tenant_id string, writer string, i long")


def _raw_write(df: Any, ref: TableRef) -> None:
    df.write.format("delta").mode("overwrite").option("replaceWhere", "tenant_id = 't0'").save(ref.path)


def _race(fns: list[Any]) -> list[BaseException | None]:
    """Run the functions at the same instant on their own threads; their exceptions, in order."""
    barrier = threading.Barrier(len(fns))
    errors: list[BaseException | None] = [None] * len(fns)

    def go(i: int) -> None:
        barrier.wait()
        try:
            fns[i]()
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return errors


@pytest.fixture(scope="module")
def real_conflict(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Race two unretried replaceWhere overwrites of one partition until Delta refuses one commit.

    `conflict_types()` installs delta-spark's conversion of JVM conflicts to Python types, as every
    retried platform write does before its first attempt."""
    conflict_types()
    ref = TableRef(name="conflicts", path=str(tmp_path_factory.mktemp("conflicts") / "t"))
    _rows(spark, "seed").write.format("delta").partitionBy("tenant_id").save(ref.path)
    a, b = (_rows(spark, w).where("tenant_id = 't0'") for w in ("a", "b"))
    for _ in range(12):
        errors = _race([lambda: _raw_write(a, ref), lambda: _raw_write(b, ref)])
        conflict = next((e for e in errors if e is not None), None)
        if conflict is not None:
            return {"ref": ref, "exc": conflict, "a": a, "b": b}
    pytest.fail("two concurrent overwrites of one partition never conflicted in 12 races")


def test_delta_raises_its_typed_conflict_exception(real_conflict: dict[str, Any]) -> None:
    exc = real_conflict["exc"]
    assert isinstance(exc, conflict_types()), type(exc).__mro__
    assert is_conflict(exc)
    assert not is_conflict(ValueError("DELTA_CONCURRENT_APPEND in a message is not a conflict"))


def test_racing_writers_with_retries_both_commit_and_never_duplicate(spark: Any,
                                                                    real_conflict: dict[str, Any]) -> None:
    ref, a, b = real_conflict["ref"], real_conflict["a"], real_conflict["b"]
    attempts = {"a": 0, "b": 0}
    conflicts = 0
    for _ in range(6):
        def writer(name: str, df: Any) -> Any:
            def attempt() -> None:
                attempts[name] += 1
                _raw_write(df, ref)
            return lambda: with_conflict_retries(attempt, what=f"{ref.display} (writer {name})", base_delay=0.05)

        before = dict(attempts)
        errors = _race([writer("a", a), writer("b", b)])
        assert errors == [None, None], errors
        conflicts += sum(attempts[k] - before[k] - 1 for k in attempts)
        rows = read_table(spark, ref).where("tenant_id = 't0'").toPandas()
        assert len(rows) == 200 and rows["writer"].nunique() == 1  # one whole writer's rows, never a mix
        assert read_table(spark, ref).where("tenant_id = 't1'").count() == 200  # the other partition kept
        if conflicts:
            break
    assert conflicts >= 1, "no race produced a retried conflict"


def test_a_conflict_that_outlasts_the_retries_names_the_table(real_conflict: dict[str, Any]) -> None:
    exc = real_conflict["exc"]
    calls = []

    def lose() -> None:
        calls.append(1)
        raise exc  # the real exception Delta raised in the race above

    with pytest.raises(ConcurrentWriteError, match=r"concurrent write conflict on table silver_demo "
                       r"\(tenant\(s\) t000\): still conflicting after 3 attempts"):
        with_conflict_retries(lose, what="silver_demo (tenant(s) t000)", attempts=3, base_delay=0)
    assert len(calls) == 3 and ConcurrentWriteError("x").exit_code == 1

    def broken() -> None:
        raise ValueError("not a conflict")

    with pytest.raises(ValueError, match="not a conflict"):  # anything else is not retried
        with_conflict_retries(broken, what="t", base_delay=0)


def test_replace_where_retries_real_conflicts(spark: Any, tmp_path: Path) -> None:
    """The helper every write goes through: two racing replaceWhere writes of one partition both land."""
    ref = TableRef(name="rw", path=str(tmp_path / "rw"))
    _rows(spark, "seed").write.format("delta").partitionBy("tenant_id").save(ref.path)
    a, b = (_rows(spark, w).where("tenant_id = 't0'") for w in ("a", "b"))
    errors = _race([lambda: replace_where(a, ref, "tenant_id = 't0'", ("tenant_id",)),
                    lambda: replace_where(b, ref, "tenant_id = 't0'", ("tenant_id",))])
    assert errors == [None, None], errors
    rows = read_table(spark, ref).where("tenant_id = 't0'").toPandas()
    assert len(rows) == 200 and rows["writer"].nunique() == 1
