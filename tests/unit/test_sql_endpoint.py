"""The SQL endpoint's choices that need no Spark: which tables it exposes, ports, names, refusals."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from tenantml.apps.sql_endpoint import SqlEndpoint, bi_tables, check_port_free, register_tables, serve
from tenantml.config import TablesConfig
from tenantml.core.errors import ConfigError
from tenantml.io.context import JobContext
from tenantml.io.tables import Tables

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def test_only_published_delta_tables_are_exposed(tmp_path: Path) -> None:
    for name, delta in (("gold_demo_prediction_fact", True), ("gold_tenant_dim", True),
                        ("predictions_demo", True), ("silver_demo", True), ("bronze_demo", True),
                        ("quarantine_demo", True), ("gold_half_written", False), ("gold_Bad-Name", True)):
        (tmp_path / name / ("_delta_log" if delta else "part-0")).mkdir(parents=True)
    refs = bi_tables(Tables(TablesConfig(), tmp_path))
    assert [r.name for r in refs] == ["gold_demo_prediction_fact", "gold_tenant_dim", "predictions_demo"]
    assert all(r.path == str(tmp_path / r.name) for r in refs)
    assert bi_tables(Tables(TablesConfig(), tmp_path / "missing")) == []


def test_jdbc_url() -> None:
    assert SqlEndpoint("127.0.0.1", 10000, "tenantml").jdbc_url == "jdbc:hive2://127.0.0.1:10000/tenantml"


def test_a_taken_or_invalid_port_is_a_usage_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}: already in use on 127.0.0.1"):
            check_port_free("127.0.0.1", port)
    for bad in (0, 70000):
        with pytest.raises(ConfigError, match="between 1 and 65535"):
            check_port_free("127.0.0.1", bad)


def test_unsafe_database_names_are_refused_before_any_sql() -> None:
    with pytest.raises(ConfigError, match="--database"):
        register_tables(None, [], "x; DROP TABLE t")  # type: ignore[arg-type]  # refused before spark is used


def test_catalog_tables_are_refused(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(REPO_CONF, conf)
    (conf / "local" / "uc.yml").write_text("tables: {catalog: main, schema: tenantml}\n")
    ctx = JobContext.create(conf_dir=conf, data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match="Databricks SQL warehouse"):
        serve(ctx, port=1)  # refused before a session or a port is touched
    assert ctx.spark_session is None and "spark" not in ctx.__dict__


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "bi.example.internal"])
def test_a_reachable_host_is_refused_without_authentication(tmp_path: Path, host: str) -> None:
    """serve-sql exposes every tenant's rows: off loopback it needs sql_endpoint.authentication, and
    it refuses before any Spark or socket work."""
    ctx = JobContext.create(conf_dir=REPO_CONF, data_dir=tmp_path)
    with pytest.raises(ConfigError, match=rf"--host {host}: the endpoint would serve every tenant's rows.*"
                                          r"sql_endpoint\.authentication"):
        serve(ctx, host=host, port=1)
    assert "spark" not in ctx.__dict__  # no session was started


def test_loopback_is_allowed_and_authentication_opens_other_hosts() -> None:
    from tenantml.apps.sql_endpoint import check_exposure, is_loopback
    from tenantml.config import SqlEndpointConfig

    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.3.4.5"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.2", "example.com"))
    check_exposure("127.0.0.1", SqlEndpointConfig())
    ldap = SqlEndpointConfig(authentication="ldap",
                             settings={"hive.server2.authentication.ldap.url": "ldaps://ldap.internal"})
    check_exposure("0.0.0.0", ldap)
    with pytest.raises(ValueError, match=r"needs its hive\.server2"):
        SqlEndpointConfig(authentication="ldap")
    with pytest.raises(ValueError, match=r"hive\.server2"):
        SqlEndpointConfig(authentication="custom", settings={"spark.x": "y"})
