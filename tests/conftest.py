"""Shared fixtures: one local Spark + Delta session for the whole test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TENANTML_LOG_LEVEL", "WARNING")
# Spark settings for the suite's small, short-lived JVMs (why, and what it measured: the file itself).
# Set before any session starts, so this process's JVM and every subprocess's read it.
os.environ.setdefault("SPARK_CONF_DIR", str(Path(__file__).resolve().parent / "spark-conf"))


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A session-scoped `local[2]` Spark with Delta; small shuffles keep tests quick on 2 cores."""
    from tenantml.io.spark import build_local_spark

    warehouse = tmp_path_factory.mktemp("warehouse")
    session = build_local_spark(master="local[2]", app_name="tenantml-tests", shuffle_partitions=2,
                                warehouse_dir=str(warehouse))
    yield session
    session.stop()


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture()
def restore_spark_conf(spark: Any) -> Iterator[None]:
    """For code that builds "its own" local session (the CLI, a notebook without `spark`): in this
    process that is the shared session, with the config's runtime settings applied; undo them."""
    before = dict(spark.conf.getAll)
    yield
    for key, value in before.items():
        if spark.conf.get(key, None) != value:
            spark.conf.set(key, value)


# Under `pytest -n 2` (what `make test` runs) every test of one scope runs on one worker: a module's
# tests share its module-scoped world, and the modules that share a session-scoped world (built once,
# minutes of pipeline) form one scope, so no world is built twice. The benchmark smoke runs share
# nothing and spread over the workers one by one. (xdist's own `loadgroup` marks do not reach the
# scheduler under pytest 9, so the scopes are set here, through xdist's scheduler hook.)
WORLD_GROUPS = {
    "test_workflows": "nightly_run", "test_publish": "nightly_run", "test_uc_registry": "nightly_run",
    "test_unchanged_inputs": "nightly_run",
    "test_consent_lineage": "sharing_world", "test_offboarding": "sharing_world",
    "test_cli_demo": "demo_cli_run", "test_notebooks": "demo_cli_run", "test_run_report": "demo_cli_run",
}
UNGROUPED = {"test_benchmarks_quick"}


# The heavy tier: each builds a whole world of its own (its own processes, JVMs or cluster, and
# several pipelines), minutes apiece on two cores. `make test` (what CI runs) leaves them out to keep
# the suite inside its time budget; `make test-all` runs them too. Named here, in one place.
HEAVY_MODULES = {
    "test_standalone_cluster", "test_spark_connect", "test_kill_and_rerun", "test_multiprocess_concurrency",
    "test_churn_dataset", "test_consent_lineage", "test_offboarding", "test_uc_registry",
}
# Whole pipelines at several sizes, or several shared-training launches (1 and 2 processes, per backend).
HEAVY_BENCHES = {"bench_production_loop.py", "bench_scale.py", "bench_shared_models.py"}


def _module(nodeid: str) -> str:
    return Path(nodeid.split("::", 1)[0]).stem


def is_heavy(nodeid: str) -> bool:
    """Whether a test belongs to the heavy tier (its module, or a benchmark smoke run of a heavy bench)."""
    return _module(nodeid) in HEAVY_MODULES or any(f"[{bench}]" in nodeid for bench in HEAVY_BENCHES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if is_heavy(item.nodeid):
            item.add_marker(pytest.mark.heavy)


def world_scope(nodeid: str) -> str:
    """The scheduling scope of a test: its shared world, else its module (else the test itself)."""
    module = _module(nodeid)
    if module in UNGROUPED:
        return nodeid
    return WORLD_GROUPS.get(module, nodeid.split("::", 1)[0])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class WorldScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return world_scope(nodeid)

    return WorldScheduling(config, log)
