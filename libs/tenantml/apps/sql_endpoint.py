"""A local SQL endpoint for BI tools: Spark's Thrift JDBC/ODBC server over the published tables.

BI clients (Power BI's Spark connector, beeline, DBeaver, PyHive) connect to it as they connect to
a Spark cluster: HiveServer2 protocol on the *binary* Thrift transport (Power BI's "Standard"
protocol), no authentication, bound to loopback unless told otherwise.

Local tables are path-based Delta without a metastore. The server's own session therefore names
each BI-facing table (`gold_*` and `predictions_*`) as an external Delta table over its location,
in an in-memory catalog: nothing is persisted or copied, every query reads the table's latest
Delta version, and pipeline processes go on writing by path while the server runs. Tables that
appear later are registered on the next refresh. The server classes ship in PySpark's own jars
(`spark-hive-thriftserver_2.13`, with the Hive and Derby jars it needs), so start-up resolves
nothing beyond the Delta jars `make setup` already fetched.
"""

from __future__ import annotations

import errno
import logging
import re
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenantml.config import SqlEndpointConfig
from tenantml.core.errors import ConfigError
from tenantml.io.tables import TableRef, Tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from tenantml.io.context import JobContext

log = logging.getLogger(__name__)

BI_TABLE_PREFIXES = ("gold_", "predictions_")  # never bronze/silver/quarantine: they hold raw rows and PII
TRANSPORT = "binary"
_DATABASE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
_SERVER_CLASS = "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2"


@dataclass(frozen=True)
class SqlEndpoint:
    """Where a BI client connects, and what it finds there."""

    host: str
    port: int
    database: str
    tables: tuple[str, ...] = ()

    @property
    def jdbc_url(self) -> str:
        return f"jdbc:hive2://{self.host}:{self.port}/{self.database}"


def bi_tables(tables: Tables) -> list[TableRef]:
    """The published Delta tables in the local warehouse (`gold_*`, `predictions_*`)."""
    root = tables.warehouse
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if not path.name.startswith(BI_TABLE_PREFIXES) or not (path / "_delta_log").is_dir():
            continue
        try:
            ref = tables.ref(path.name)
        except ValueError:  # not a name tenantml writes
            continue
        if ref.path is not None:
            found.append(ref)
    return found


def register_tables(spark: SparkSession, refs: list[TableRef], database: str) -> list[str]:
    """Name each table in the session catalog (external, over its Delta location); returns the new
    names. Idempotent: a table already named is left as it is."""
    db = _database(database)
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {db}")
    new = []
    for ref in refs:
        if ref.path is None or spark.catalog.tableExists(f"{db}.{ref.name}"):
            continue
        spark.catalog.createTable(f"{db}.{ref.name}", path=ref.path, source="delta")
        new.append(ref.name)
    return new


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (a name other than `localhost` counts as reachable)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, cfg: SqlEndpointConfig) -> None:
    """The endpoint serves every tenant's published rows: off loopback only with authentication."""
    if not is_loopback(host) and cfg.authentication == "none":
        raise ConfigError(f"serve-sql --host {host}: the endpoint would serve every tenant's rows to anyone who "
                          f"can reach {host}; bind to 127.0.0.1 (the default), or configure "
                          f"sql_endpoint.authentication (ldap, kerberos or custom, with its hive.server2.* "
                          f"settings) in conf/<env>")


def check_port_free(host: str, port: int) -> None:
    """A clear usage error instead of a JVM stack trace when the port is taken."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: must be between 1 and 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port}: already in use on {host} (another server?)") from exc
            raise ConfigError(f"--host {host!r} --port {port}: cannot listen there: {exc.strerror}") from exc


CONNECT_REFUSAL = ("serve-sql starts Spark's Thrift server inside the driver's JVM, which a Spark Connect "
                   "session (spark.remote / SPARK_REMOTE: Databricks serverless, standard access mode, "
                   "Databricks Connect) does not expose; run it with a classic local session (unset "
                   "spark.remote and SPARK_REMOTE), or connect BI tools to a Databricks SQL warehouse "
                   "(docs/powerbi.md)")


def require_classic_session(spark: SparkSession) -> None:
    """The Thrift server needs the driver's JVM: refuse a Spark Connect session clearly."""
    from tenantml.io.spark import is_connect

    if is_connect(spark):
        raise ConfigError(CONNECT_REFUSAL)


def require_thrift_server(spark: SparkSession) -> None:
    """Fail with what to do when this Spark lacks the Thrift server (PySpark's pip distribution
    ships `spark-hive-thriftserver_2.13` in pyspark/jars; a trimmed Spark may not)."""
    require_classic_session(spark)
    jvm: Any = spark.sparkContext._jvm
    try:
        jvm.java.lang.Class.forName(_SERVER_CLASS)
    except Exception as exc:
        raise ConfigError(
            f"this Spark {spark.version} has no {_SERVER_CLASS} (jar spark-hive-thriftserver_2.13): "
            f"serve-sql needs the pip `pyspark` distribution, which ships it in pyspark/jars") from exc


def start_thrift_server(spark: SparkSession, host: str, port: int, log_dir: str | None = None,
                        auth: SqlEndpointConfig | None = None) -> Any:
    """Start Spark's HiveServer2 inside this driver, sharing its catalog; returns the JVM server.

    Each connection gets its own Spark session over the shared catalog, as on a cluster.
    """
    check_port_free(host, port)
    require_thrift_server(spark)
    jvm: Any = spark.sparkContext._jvm
    if log_dir:  # the server's scratch Derby (execution metadata only) logs here, not into the cwd
        jvm.java.lang.System.setProperty("derby.stream.error.file", f"{log_dir}/derby.log")
    mode = "NONE" if auth is None else auth.authentication.upper()
    for key, value in (("hive.server2.thrift.bind.host", host), ("hive.server2.thrift.port", str(port)),
                       ("hive.server2.transport.mode", TRANSPORT), ("hive.server2.authentication", mode),
                       *((auth.settings if auth is not None else {}).items())):
        spark.conf.set(key, value)
    server_class = jvm.org.apache.spark.sql.hive.thriftserver.HiveThriftServer2
    return server_class.startWithContext(spark._jsparkSession.sqlContext())  # type: ignore[attr-defined]


def serve(ctx: JobContext, host: str = "127.0.0.1", port: int = 10000, database: str = "tenantml",
          refresh_seconds: float = 30.0, on_ready: Callable[[SqlEndpoint], None] | None = None,
          stop: threading.Event | None = None) -> SqlEndpoint:
    """Serve the published tables until Ctrl-C, SIGTERM or ``stop``; then shut the server down.

    Returns the endpoint as it was at shutdown (with every table it exposed).
    """
    from tenantml.io.spark import on_databricks, spark_remote

    if ctx.tables.tenants.fqn or on_databricks():
        raise ConfigError("serve-sql serves the local path-based warehouse; with tables.catalog/tables.schema "
                          "set, connect BI tools to a Databricks SQL warehouse instead (docs/powerbi.md)")
    if ctx.spark_session is None and spark_remote(ctx.config.spark.remote) is not None:
        raise ConfigError(CONNECT_REFUSAL)  # before any session starts
    db = _database(database)
    check_exposure(host, ctx.config.sql_endpoint)
    check_port_free(host, port)
    spark = ctx.spark
    require_classic_session(spark)
    ctx.progress.phase(f"serve-sql: registering the published tables of {ctx.tables.warehouse}")
    names = register_tables(spark, bi_tables(ctx.tables), db)
    if not names:
        log.warning("no published tables under %s yet: run `tenantml publish`; they appear on refresh",
                    ctx.tables.warehouse)
    log_dir = ctx.data_dir / "sql-endpoint"
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx.progress.phase(f"serve-sql: starting the Thrift server on {host}:{port}")
    server = start_thrift_server(spark, host, port, str(log_dir), auth=ctx.config.sql_endpoint)
    endpoint = SqlEndpoint(host, port, db, tuple(sorted(names)))
    stop = stop or threading.Event()
    restore = _on_sigterm(stop.set)
    try:
        if on_ready is not None:
            on_ready(endpoint)
        while not stop.wait(refresh_seconds):
            added = register_tables(spark, bi_tables(ctx.tables), db)
            if added:
                endpoint = SqlEndpoint(host, port, db, tuple(sorted({*endpoint.tables, *added})))
                ctx.progress.phase(f"serve-sql: new tables {', '.join(added)}")
    except KeyboardInterrupt:
        pass
    finally:
        restore()
        ctx.progress.phase("serve-sql: stopping the Thrift server")
        server.stop()
    return endpoint


def _database(name: str) -> str:
    if not _DATABASE_RE.fullmatch(name):
        raise ConfigError(f"--database {name!r}: use lower-case letters, digits and '_' (max 64)")
    return name


def _on_sigterm(handler: Callable[[], None]) -> Callable[[], None]:
    """Stop on SIGTERM as on Ctrl-C (service managers send it); returns the undo. Signals can only
    be set from the main thread, so elsewhere the caller's ``stop`` event is the way to stop."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda *_: handler())

    def undo() -> None:
        signal.signal(signal.SIGTERM, previous)

    return undo
