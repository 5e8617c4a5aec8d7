"""Choosing and configuring a Spark Connect session, and what refuses to run on one (no JVM starts
here: the builders' options are captured before `getOrCreate`)."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from tenantml.core.errors import ConfigError
from tenantml.io import spark as spark_mod
from tenantml.io.delta import quote_identifier, sql_name
from tenantml.io.tables import TableRef

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def test_sql_names_quote_paths_whole_and_catalog_names_part_by_part() -> None:
    assert sql_name(TableRef("t", path="/data/warehouse/t")) == "delta.`/data/warehouse/t`"
    assert sql_name(TableRef("t", path="/odd/pa`th")) == "delta.`/odd/pa``th`"
    assert sql_name(TableRef("t", fqn="main.tenantml.tenants")) == "`main`.`tenantml`.`tenants`"
    assert quote_identifier("a`b") == "`a``b`"


def test_the_remote_comes_from_config_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARK_REMOTE", raising=False)
    assert spark_mod.spark_remote(None) is None
    monkeypatch.setenv("SPARK_REMOTE", "sc://env-host:15002")
    assert spark_mod.spark_remote(None) == "sc://env-host:15002"
    assert spark_mod.spark_remote("local[2]") == "local[2]"
    monkeypatch.setenv("SPARK_REMOTE", "  ")
    assert spark_mod.spark_remote(None) is None


def test_a_remote_selects_a_connect_session(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(spark_mod, "build_connect_spark", lambda **kw: built.append(("connect", kw)))
    monkeypatch.setattr(spark_mod, "build_local_spark", lambda **kw: built.append(("local", kw)))
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    monkeypatch.delenv("SPARK_REMOTE", raising=False)
    spark_mod.get_or_build_spark(remote=None, master="local[3]", app_name="a")
    spark_mod.get_or_build_spark(remote="sc://h", master="local[3]", app_name="a")
    monkeypatch.setenv("SPARK_REMOTE", "local[2]")
    spark_mod.get_or_build_spark(master="local[3]", app_name="a")
    assert built == [("local", {"master": "local[3]", "app_name": "a"}),
                     ("connect", {"remote": "sc://h", "app_name": "a"}),
                     ("connect", {"remote": "local[2]", "app_name": "a"})]


class _Built(Exception):
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options


def _connect_options(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> dict[str, str]:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    def capture(builder: Any) -> Any:
        raise _Built(dict(builder._options))

    monkeypatch.setattr(SparkSession.Builder, "getOrCreate", capture)
    monkeypatch.setattr(spark_mod, "_jvm_output_to_stderr", nullcontext)
    monkeypatch.setattr(SparkContext, "_active_spark_context", None)  # a suite's classic session
    monkeypatch.setattr(spark_mod, "_port_free", lambda port: True)  # a Connect test's server
    with pytest.raises(_Built) as built:
        spark_mod.build_connect_spark(**kwargs)
    return built.value.options


def test_a_local_remote_starts_its_server_like_a_local_session(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "jars"
    folder.mkdir()
    (folder / "d.jar").write_bytes(b"PK")
    (folder / spark_mod.DELTA_JARS_MANIFEST).write_text(json.dumps({"package": spark_mod.delta_package(),
                                                                    "jars": ["d.jar"]}))
    monkeypatch.setenv("TENANTML_JARS_DIR", str(folder))
    opts = _connect_options(monkeypatch, remote="local[3]", shuffle_partitions=2, warehouse_dir="/w")
    assert opts["spark.remote"] == "local[3]" and "spark.master" not in opts
    assert opts["spark.sql.extensions"] == spark_mod.DELTA_EXTENSION
    assert opts["spark.sql.catalog.spark_catalog"] == spark_mod.DELTA_CATALOG
    assert opts["spark.jars"] == str(folder / "d.jar")  # the server loads the project's Delta jars
    assert opts["spark.sql.warehouse.dir"] == "/w" and opts["spark.sql.shuffle.partitions"] == "2"
    assert opts["spark.default.parallelism"] == "3"  # what default_parallelism reads over Connect
    assert "log4j2.configurationFile" in opts["spark.driver.extraJavaOptions"]


def test_a_remote_server_gets_only_runtime_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = _connect_options(monkeypatch, remote="sc://example:15002", shuffle_partitions=8,
                            extra_conf={"spark.sql.ansi.enabled": "true"})
    assert opts["spark.remote"] == "sc://example:15002"
    assert opts["spark.sql.shuffle.partitions"] == "8" and opts["spark.sql.ansi.enabled"] == "true"
    assert not {"spark.jars", "spark.jars.packages", "spark.driver.memory", "spark.sql.extensions"} & set(opts)


def test_a_local_remote_needs_a_process_without_a_classic_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyspark import SparkContext

    monkeypatch.setattr(SparkContext, "_active_spark_context", object())
    monkeypatch.delenv("SPARK_LOCAL_REMOTE", raising=False)
    with pytest.raises(ConfigError, match="a process of its own"):
        spark_mod.build_connect_spark(remote="local[2]")


def test_a_local_remote_refuses_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from pyspark import SparkContext

    monkeypatch.setattr(SparkContext, "_active_spark_context", None)
    monkeypatch.delenv("SPARK_LOCAL_REMOTE", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        monkeypatch.setattr(spark_mod, "CONNECT_LOCAL_PORT", s.getsockname()[1])
        with pytest.raises(ConfigError, match="is in use: another local Connect server"):
            spark_mod.build_connect_spark(remote="local[2]")


@pytest.mark.parametrize(("master", "cores"), [("local", 1), ("local[3]", 3), ("local[2, 4]", 2), ("yarn", 1)])
def test_local_cores(master: str, cores: int) -> None:
    assert spark_mod._local_cores(master) == cores


def test_is_connect_is_false_for_anything_else() -> None:
    assert not spark_mod.is_connect(object())


def test_horovod_refuses_spark_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    from tenantml.training.distributed import require_backend

    monkeypatch.setenv("SPARK_CONNECT_MODE_ENABLED", "1")
    with pytest.raises(ConfigError, match=r"Spark Connect.*torch_distributor"):
        require_backend("horovod")
    require_backend("torch_distributor")  # TorchDistributor runs from a Connect client


def test_serve_sql_refuses_a_connect_config_before_any_session(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tenantml.apps.sql_endpoint import serve
    from tenantml.io.context import JobContext

    conf = tmp_path / "conf"
    shutil.copytree(REPO_CONF, conf)
    (conf / "local" / "connect.yml").write_text("spark: {remote: 'sc://localhost:15002'}\n")
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    ctx = JobContext.create(conf_dir=conf, data_dir=tmp_path / "data")
    assert ctx.config.spark.remote == "sc://localhost:15002"
    with pytest.raises(ConfigError, match="Spark Connect"):
        serve(ctx)
    assert "spark" not in ctx.__dict__  # refused before a session was built
