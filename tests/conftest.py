"""Shared fixtures: one local Spark + Delta session for the whole test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TENANTML_LOG_LEVEL", "WARNING")


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
