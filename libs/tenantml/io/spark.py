"""Builds the SparkSession: a local Delta-enabled one by default, the existing one on Databricks."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantml.core.progress import Progress

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


SCHEDULER_POOLS_FILE = Path(__file__).resolve().parents[1] / "resources" / "fairscheduler.xml"


def on_databricks() -> bool:
    """Databricks runtimes set this variable; there the session already exists and must be reused."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


def build_local_spark(
    master: str = "local[2]",
    app_name: str = "tenantml",
    shuffle_partitions: int = 4,
    arrow_batch_size: int = 10_000,
    warehouse_dir: str | None = None,
    extra_conf: Mapping[str, str] | None = None,
) -> SparkSession:
    """A local session with Delta Lake; the Delta jars resolve from the package registry on first use.

    Workers must run this interpreter (torch, pandas and tenantml live there), so PYSPARK_PYTHON is
    pinned to ``sys.executable`` unless the caller set it.
    """
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_batch_size))
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.databricks.delta.retentionDurationCheck.enabled", "true")
        # One FAIR pool per tenant tier (resources/fairscheduler.xml); spark.conf may replace the file.
        .config("spark.scheduler.mode", "FAIR")
        .config("spark.scheduler.allocation.file", str(SCHEDULER_POOLS_FILE))
        .config("spark.jars.ivy", os.environ.get("TENANTML_IVY_DIR", os.path.expanduser("~/.ivy2.5.2")))
    )
    if warehouse_dir:
        builder = builder.config("spark.sql.warehouse.dir", warehouse_dir)
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    # The JVM (and Ivy's dependency report) inherit fd 1; point it at stderr so that stdout stays
    # clean for `--json` output.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        spark = configure_spark_with_delta_pip(builder).getOrCreate()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    spark.sparkContext.setLogLevel("ERROR")
    # Delta's VACUUM lists a table's directories in a job of this many tasks (default 10,000):
    # locally that cost 28-40 s per small partitioned table, against 2 s at a few per core.
    if LISTING_PARALLELISM not in (extra_conf or {}):
        spark.conf.set(LISTING_PARALLELISM, str(4 * spark.sparkContext.defaultParallelism))
    return spark


def get_or_build_spark(**kwargs: object) -> SparkSession:
    """On Databricks reuse the runtime's session (its config is the cluster's); locally build one."""
    if on_databricks():
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            return active
        return SparkSession.builder.getOrCreate()
    return build_local_spark(**kwargs)  # type: ignore[arg-type]


def is_connect(spark: Any) -> bool:
    """Whether ``spark`` is a Spark Connect session (Databricks serverless, standard access mode,
    Databricks Connect): there ``sparkContext``, broadcasts, accumulators and the JVM do not exist."""
    try:
        from pyspark.sql.connect.session import SparkSession as ConnectSession
    except ImportError:  # the Connect client packages are not installed
        return False
    return isinstance(spark, ConnectSession)


@contextmanager
def scheduler_pool(spark: Any, pool: str) -> Iterator[None]:
    """Jobs submitted from this thread run in FAIR pool ``pool``; over Spark Connect (no local
    properties) the server's scheduling applies and this does nothing."""
    if is_connect(spark):
        yield
        return
    sc = spark.sparkContext
    sc.setLocalProperty("spark.scheduler.pool", pool)
    try:
        yield
    finally:
        sc.setLocalProperty("spark.scheduler.pool", None)  # type: ignore[arg-type]


def default_parallelism(spark: Any) -> int:
    """Cores Spark can run tasks on; over Spark Connect, the session's configured value."""
    if not is_connect(spark):
        return int(spark.sparkContext.defaultParallelism)
    value = spark.conf.get("spark.default.parallelism", None) or spark.conf.get("spark.sql.shuffle.partitions")
    return max(1, int(value or 2))


class SparkTaskProgress:
    """Reports a Spark job's finished/total tasks while it runs (training is one long job).

    A daemon thread polls the status tracker: no listener is registered, nothing changes in the job.
    """

    def __init__(self, spark: object, progress: Progress, label: str, interval: float = 0.5) -> None:
        self._sc = None if is_connect(spark) else spark.sparkContext  # type: ignore[attr-defined]
        self._progress = progress
        self._label = label
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="tenantml-progress", daemon=True)

    def _poll(self) -> None:
        if self._sc is None:  # Spark Connect: no status tracker
            return
        tracker = self._sc.statusTracker()
        shown = (-1, -1)
        started = False
        while not self._stop.wait(self._interval):
            done = total = 0
            for sid in tracker.getActiveStageIds():
                info = tracker.getStageInfo(sid)
                if info is not None:
                    done += info.numCompletedTasks
                    total += info.numTasks
            if total and (done, total) != shown:
                if not started:
                    self._progress.start(self._label, total)
                    started = True
                self._progress.update(done, total)
                shown = (done, total)
        if started:
            self._progress.done()

    def __enter__(self) -> SparkTaskProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
