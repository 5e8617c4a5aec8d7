"""Builds the SparkSession: a local Delta-enabled one by default, the existing one on Databricks."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantml.core.progress import Progress

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType


SCHEDULER_POOLS_FILE = Path(__file__).resolve().parents[1] / "resources" / "fairscheduler.xml"
# Driver logging of local sessions: errors only (what the session is set to once it runs), so
# start-up prints no log4j banner, no default-profile notice and no level hint.
LOG4J2_FILE = Path(__file__).resolve().parents[1] / "resources" / "log4j2.properties"

# The Delta Lake jars, resolved once by `python -m tenantml.apps.setup` into this folder (the
# variable, else `<venv>/share/tenantml/jars`); sessions then start from the local files.
DELTA_JARS_ENV = "TENANTML_JARS_DIR"
DELTA_JARS_MANIFEST = "delta-jars.json"
# Lines the JVM prints on stderr at start whatever the logging configuration says (Spark's launcher
# always adds `--add-modules=jdk.incubator.vector`): dropped on their way to this process's stderr.
_JVM_START_NOISE = (b"WARNING: Using incubator modules:",)


def on_databricks() -> bool:
    """Databricks runtimes set this variable; there the session already exists and must be reused."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
# A Spark Connect URL (`sc://...`) or a local master for a Connect server in this process; the
# config's `spark.remote` wins over it. Set, sessions are Spark Connect sessions.
SPARK_REMOTE_ENV = "SPARK_REMOTE"


def ivy_dir() -> Path:
    """Spark's Ivy folder (cache and retrieved jars) for `spark.jars.packages`."""
    return Path(os.environ.get("TENANTML_IVY_DIR", os.path.expanduser("~/.ivy2.5.2")))


def delta_package() -> str:
    """The Maven coordinate `delta.configure_spark_with_delta_pip` asks Ivy for: delta-spark built for
    this PySpark's major.minor and Scala 2.13, at the installed delta-spark version."""
    import importlib.metadata

    import pyspark

    spark_major_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_major_minor}_2.13:{importlib.metadata.version('delta-spark')}"


def delta_jars_dir() -> Path:
    """Where set-up keeps the Delta jars: ``$TENANTML_JARS_DIR``, else ``share/tenantml/jars`` in the
    environment this interpreter runs in (the project's venv)."""
    configured = os.environ.get(DELTA_JARS_ENV)
    return Path(configured).expanduser() if configured else Path(sys.prefix) / "share" / "tenantml" / "jars"


def local_delta_jars(folder: Path | None = None) -> list[Path] | None:
    """The jars set-up saved for the installed delta-spark, in Ivy's order; None when the folder does
    not hold them (no set-up yet, another Delta version, a file missing)."""
    import json

    folder = delta_jars_dir() if folder is None else folder
    try:
        manifest = json.loads((folder / DELTA_JARS_MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("package") != delta_package():
            return None
        jars = [folder / str(name) for name in manifest["jars"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return jars if jars and all(j.is_file() for j in jars) else None


def save_delta_jars(spark: SparkSession, folder: Path | None = None) -> list[Path]:
    """Copy the jars Ivy resolved for ``spark`` (a session built with ``resolve_delta=True``) into
    ``folder`` with a manifest naming the Delta package; returns the copies."""
    import json
    import shutil
    from urllib.parse import unquote, urlparse

    folder = delta_jars_dir() if folder is None else folder
    retrieved = (ivy_dir() / "jars").resolve()
    resolved = [Path(unquote(urlparse(u).path)) if u.startswith("file:") else Path(u)
                for u in (spark.sparkContext.getConf().get("spark.jars", "") or "").split(",") if u]
    jars = [j for j in resolved if j.resolve().parent == retrieved]
    if not any(j.name.startswith("io.delta_delta-spark_") for j in jars):
        raise RuntimeError(f"the session holds no Delta jar from {retrieved} (spark.jars: {resolved})")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DELTA_JARS_MANIFEST).unlink(missing_ok=True)  # no half-copied folder is ever used
    for jar in jars:
        tmp = folder / f".{jar.name}.tmp"
        shutil.copyfile(jar, tmp)
        os.replace(tmp, folder / jar.name)
    kept = {j.name for j in jars} | {DELTA_JARS_MANIFEST}
    for old in folder.iterdir():  # jars of an earlier Delta version
        if old.suffix == ".jar" and old.name not in kept:
            old.unlink()
    tmp = folder / f".{DELTA_JARS_MANIFEST}.tmp"
    tmp.write_text(json.dumps({"package": delta_package(), "jars": [j.name for j in jars]}, indent=2) + "\n",
                   encoding="utf-8")
    os.replace(tmp, folder / DELTA_JARS_MANIFEST)
    return [folder / j.name for j in jars]


def _delta_session_builder(
    builder: Any,
    *,
    app_name: str,
    shuffle_partitions: int,
    arrow_batch_size: int,
    warehouse_dir: str | None,
    extra_conf: Mapping[str, str] | None,
    resolve_delta: bool,
) -> Any:
    """``builder`` (with its master or local remote set) configured for a local Delta session: the
    settings every local session gets, the Delta jars and the caller's ``extra_conf``."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    extra = dict(extra_conf or {})
    builder = (
        builder.appName(app_name)
        .config("spark.sql.extensions", DELTA_EXTENSION)
        .config("spark.sql.catalog.spark_catalog", DELTA_CATALOG)
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
        .config("spark.jars.ivy", str(ivy_dir()))
    )
    if warehouse_dir:
        builder = builder.config("spark.sql.warehouse.dir", warehouse_dir)
    java_options = extra.pop("spark.driver.extraJavaOptions", "")
    if "log4j2.configurationFile" not in java_options:  # a caller's own logging configuration wins
        java_options = f"-Dlog4j2.configurationFile={LOG4J2_FILE.as_uri()} {java_options}".strip()
    builder = builder.config("spark.driver.extraJavaOptions", java_options)
    jars = None if resolve_delta else local_delta_jars()
    if jars is not None:
        own = extra.pop("spark.jars", "")  # a caller's jars come after Delta's
        builder = builder.config("spark.jars", ",".join([*(str(j) for j in jars), *([own] if own else [])]))
    else:
        from delta import configure_spark_with_delta_pip

        builder = configure_spark_with_delta_pip(builder)
    for key, value in extra.items():
        builder = builder.config(key, value)
    return builder


def build_local_spark(
    master: str = "local[2]",
    app_name: str = "tenantml",
    shuffle_partitions: int = 4,
    arrow_batch_size: int = 10_000,
    warehouse_dir: str | None = None,
    extra_conf: Mapping[str, str] | None = None,
    resolve_delta: bool = False,
) -> SparkSession:
    """A local session with Delta Lake.

    The Delta jars come from the folder set-up fills (`delta_jars_dir`) as ``spark.jars``, so the
    session starts offline and silently; without them (a fresh checkout before set-up, or
    ``resolve_delta``) Spark resolves them through Ivy from Maven Central, as
    `delta.configure_spark_with_delta_pip` asks, printing its dependency report on stderr.

    Workers must run this interpreter (torch, pandas and tenantml live there), so PYSPARK_PYTHON is
    pinned to ``sys.executable`` unless the caller set it.
    """
    from pyspark.sql import SparkSession

    builder = _delta_session_builder(SparkSession.builder.master(master), app_name=app_name,
                                     shuffle_partitions=shuffle_partitions, arrow_batch_size=arrow_batch_size,
                                     warehouse_dir=warehouse_dir, extra_conf=extra_conf,
                                     resolve_delta=resolve_delta)
    with _jvm_output_to_stderr():
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    # Delta's VACUUM lists a table's directories in a job of this many tasks (default 10,000):
    # locally that cost 28-40 s per small partitioned table, against 2 s at a few per core.
    if LISTING_PARALLELISM not in (extra_conf or {}):
        spark.conf.set(LISTING_PARALLELISM, str(4 * spark.sparkContext.defaultParallelism))
    return spark


def _local_cores(master: str) -> int:
    """Task slots of a ``local``, ``local[N]``, ``local[*]`` or ``local[N,F]`` master."""
    import re

    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master.strip())
    if m is None or m.group(1) is None:
        return 1
    return (os.cpu_count() or 1) if m.group(1) == "*" else max(1, int(m.group(1)))


# PySpark's client connects to a local remote's server on Spark Connect's default port.
CONNECT_LOCAL_PORT = 15002


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def build_connect_spark(
    remote: str = "local[2]",
    app_name: str = "tenantml",
    shuffle_partitions: int = 4,
    arrow_batch_size: int = 10_000,
    warehouse_dir: str | None = None,
    extra_conf: Mapping[str, str] | None = None,
    resolve_delta: bool = False,
) -> SparkSession:
    """A Spark Connect session: the client's view of Databricks serverless, standard access mode and
    Databricks Connect, where there is no ``sparkContext``, broadcast, accumulator or JVM.

    ``remote`` is a Spark Connect URL (``sc://host:port/;token=...``) or a local master
    (``local[N]``). A local remote starts a Connect server in this process from PySpark's own jars,
    configured as `build_local_spark` configures a local session (Delta extension and catalog, the
    Delta jars on the server's classpath, logging, pools, warehouse); it needs a process without a
    classic session, and listens on port 15002 (one local server per machine). A remote server
    keeps its own static configuration: only the runtime SQL settings (shuffle partitions, Arrow,
    time zone) and ``extra_conf`` are sent, and settings the server refuses are skipped.
    """
    from pyspark.sql import SparkSession

    from tenantml.core.errors import ConfigError

    extra = dict(extra_conf or {})
    local = remote.strip().startswith("local")
    if local:
        from pyspark import SparkContext

        if "SPARK_LOCAL_REMOTE" not in os.environ:  # else this process's server is reused
            if SparkContext._active_spark_context is not None:
                raise ConfigError(
                    f"spark.remote {remote!r}: a classic Spark session already runs in this process, and a "
                    "local Spark Connect server needs a process of its own (stop that session, or run "
                    "the Connect session in another process)")
            if not _port_free(CONNECT_LOCAL_PORT):
                raise ConfigError(
                    f"spark.remote {remote!r}: port {CONNECT_LOCAL_PORT}, where a local Spark Connect server "
                    "listens (PySpark connects its client there), is in use: another local Connect server? "
                    f"Use that one (spark.remote: sc://localhost:{CONNECT_LOCAL_PORT}) or stop it")
        # Task slots of the server, for `default_parallelism` (Connect has no sparkContext to ask).
        extra.setdefault("spark.default.parallelism", str(_local_cores(remote)))
        builder = _delta_session_builder(SparkSession.builder.remote(remote), app_name=app_name,
                                         shuffle_partitions=shuffle_partitions,
                                         arrow_batch_size=arrow_batch_size, warehouse_dir=warehouse_dir,
                                         extra_conf=extra, resolve_delta=resolve_delta)
        with _jvm_output_to_stderr(), _static_settings_skipped_quietly():
            spark = builder.getOrCreate()
        if LISTING_PARALLELISM not in extra:
            spark.conf.set(LISTING_PARALLELISM, str(4 * default_parallelism(spark)))
        return spark
    builder = (SparkSession.builder.remote(remote).appName(app_name)
               .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_batch_size))
               .config("spark.sql.session.timeZone", "UTC"))
    for key, value in extra.items():
        builder = builder.config(key, value)
    with _static_settings_skipped_quietly():
        return builder.getOrCreate()


@contextmanager
def _static_settings_skipped_quietly() -> Iterator[None]:
    """The Connect client sets every builder option on its session once connected; the server
    refuses the static ones (a local server was already started with them; a remote one keeps its
    own) and the client warns once per option. Those refusals are expected: not shown."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Failed to set spark\.", category=UserWarning)
        yield


_FILTERS: list[Any] = []  # the filter processes started (kept, so none is reported as left running)
_STDERR_FILTER = f"""
import sys
noise = {_JVM_START_NOISE!r}
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not line.startswith(noise):
        out.write(line)
        out.flush()
"""


@contextmanager
def _jvm_output_to_stderr() -> Iterator[None]:
    """While a session starts: the JVM it launches inherits fds 1 and 2, so both are pointed at a
    small filter process that passes everything on to this process's stderr (stdout stays clean for
    `--json`) except the JVM's own start-up warnings. The filter lives as long as the JVM (and the
    Python workers it starts) hold the pipe. Nothing changes when this process already has a JVM."""
    import subprocess

    from pyspark import SparkContext

    if SparkContext._gateway is not None or "PYSPARK_GATEWAY_PORT" in os.environ:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    try:
        _FILTERS.append(subprocess.Popen([sys.executable, "-S", "-c", _STDERR_FILTER], stdin=read_end, stdout=2,
                                         stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True))
    except OSError:  # no filter: the JVM writes to stderr directly
        os.close(read_end)
        os.close(write_end)
        read_end = write_end = -1
    else:
        os.close(read_end)
    target = write_end if write_end >= 0 else 2
    saved = os.dup(1), os.dup(2)
    os.dup2(target, 1)
    os.dup2(target, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, write_end):
            if fd >= 0:
                os.close(fd)


def spark_remote(configured: str | None = None) -> str | None:
    """The Spark Connect remote a session should use: ``configured`` (`spark.remote`), else the
    ``SPARK_REMOTE`` environment variable; None for a classic session."""
    value = configured if configured is not None else os.environ.get(SPARK_REMOTE_ENV)
    return (value.strip() or None) if value else None


def get_or_build_spark(remote: str | None = None, master: str = "local[2]", **kwargs: Any) -> SparkSession:
    """On Databricks reuse the runtime's session (its config is the cluster's); else a Spark Connect
    session when a remote is configured (``remote``, else ``SPARK_REMOTE``); else a local one."""
    if on_databricks():
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            return active
        return SparkSession.builder.getOrCreate()
    url = spark_remote(remote)
    if url is not None:
        return build_connect_spark(remote=url, **kwargs)
    return build_local_spark(master=master, **kwargs)


def is_connect(spark: Any) -> bool:
    """Whether ``spark`` is a Spark Connect session (Databricks serverless, standard access mode,
    Databricks Connect): there ``sparkContext``, broadcasts, accumulators and the JVM do not exist."""
    try:
        from pyspark.sql.connect.session import SparkSession as ConnectSession
    except ImportError:  # the Connect client packages are not installed
        return False
    return isinstance(spark, ConnectSession)


def local_frame(spark: Any, rows: Iterable[tuple[Any, ...]], schema: str | StructType) -> DataFrame:
    """A DataFrame of driver-side rows (tuples in the schema's column order), built through Arrow.

    A classic session's ``createDataFrame(list)`` ships pickled rows through a Python worker job:
    about 0.4 s even for two rows, paid by every run-log, ledger, decision and model-store write.
    An Arrow table becomes a local relation in the JVM, in about 0.04 s, with the same rows and
    schema. As ``createDataFrame`` does, a row of the wrong
    width or a null in a non-nullable column is refused. Naive datetimes mean the process's local
    time, as they do there. Spark Connect sends local rows as Arrow already."""
    data = [tuple(r) for r in rows]
    if is_connect(spark):
        return spark.createDataFrame(data, schema)
    from datetime import datetime

    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema
    from pyspark.sql.types import StructType as _StructType
    from pyspark.sql.types import TimestampType, _parse_datatype_string

    struct = schema if isinstance(schema, _StructType) else _parse_datatype_string(schema)
    if not isinstance(struct, _StructType):
        raise ValueError(f"a schema of columns is needed, not {schema!r}")
    width = len(struct.fields)
    for row in data:
        if len(row) != width:
            raise ValueError(f"a row of {len(row)} values for {width} columns ({', '.join(struct.names)}): {row!r}")
    arrow = to_arrow_schema(struct)
    columns = []
    for i, field in enumerate(struct.fields):
        values = [row[i] for row in data]
        if isinstance(field.dataType, TimestampType):
            values = [v.astimezone() if isinstance(v, datetime) and v.tzinfo is None else v for v in values]
        column = pa.array(values, type=arrow.field(i).type)
        if not field.nullable and column.null_count:
            raise ValueError(f"column {field.name} is not nullable, but {column.null_count} row(s) hold no value")
        columns.append(column)
    return spark.createDataFrame(pa.Table.from_arrays(columns, schema=arrow))


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
