"""Builds the SparkSession: a local Delta-enabled one by default, the existing one on Databricks."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


SCHEDULER_POOLS_FILE = Path(__file__).with_name("resources") / "fairscheduler.xml"


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


if __name__ == "__main__":  # `python -m tenantml.sparksession`: resolve the Delta jars once (setup)
    from tenantml.sql_endpoint import require_thrift_server

    session = build_local_spark(app_name="tenantml-setup")
    session.range(1).write.format("noop").mode("overwrite").save()
    require_thrift_server(session)  # `serve-sql`: shipped in PySpark's jars, nothing to fetch; fail set-up if not
    print(f"Spark {session.version} with Delta Lake and the Thrift JDBC/ODBC server is ready", file=sys.stderr)
    session.stop()
