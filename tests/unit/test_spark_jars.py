"""Where local sessions get the Delta jars from (no JVM starts here): the folder set-up fills, or
Ivy's resolution when the folder does not hold the installed Delta's jars; and what the stderr
filter of the JVM's start-up drops."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from tenantml.io import spark as spark_mod
from tenantml.io.spark import DELTA_JARS_MANIFEST, delta_jars_dir, delta_package, local_delta_jars


def _folder(tmp_path: Path, package: str | None = None, names: tuple[str, ...] = ("a.jar", "b.jar")) -> Path:
    folder = tmp_path / "jars"
    folder.mkdir(parents=True)
    for n in names:
        (folder / n).write_bytes(b"PK")
    (folder / DELTA_JARS_MANIFEST).write_text(json.dumps({"package": package or delta_package(),
                                                          "jars": list(names)}))
    return folder


def test_the_delta_package_is_the_one_delta_pip_asks_for() -> None:
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    builder = configure_spark_with_delta_pip(SparkSession.builder)
    assert builder._options["spark.jars.packages"] == delta_package()  # type: ignore[attr-defined]


def test_the_folder_is_used_only_when_it_holds_this_deltas_jars(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert local_delta_jars(tmp_path / "missing") is None
    folder = _folder(tmp_path, names=("z.jar", "a.jar"))
    assert local_delta_jars(folder) == [folder / "z.jar", folder / "a.jar"]  # Ivy's order, kept
    (folder / "a.jar").unlink()
    assert local_delta_jars(folder) is None
    other = _folder(tmp_path / "old", package="io.delta:delta-spark_4.0_2.13:4.0.0")
    assert local_delta_jars(other) is None
    (folder / DELTA_JARS_MANIFEST).write_text("{not json")
    assert local_delta_jars(folder) is None
    monkeypatch.setenv("TENANTML_JARS_DIR", str(other))
    assert delta_jars_dir() == other
    monkeypatch.delenv("TENANTML_JARS_DIR")
    assert delta_jars_dir() == Path(sys.prefix) / "share" / "tenantml" / "jars"


class _Built(Exception):
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options


def _options(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> dict[str, str]:
    """The configuration `build_local_spark` hands to getOrCreate (which is not run)."""
    from pyspark.sql import SparkSession

    def capture(builder: Any) -> Any:
        raise _Built(dict(builder._options))

    monkeypatch.setattr(SparkSession.Builder, "getOrCreate", capture)
    monkeypatch.setattr(spark_mod, "_jvm_output_to_stderr", nullcontext)
    with pytest.raises(_Built) as built:
        spark_mod.build_local_spark(**kwargs)
    return built.value.options


def test_sessions_start_from_the_local_jars_with_quiet_logging(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path)
    monkeypatch.setenv("TENANTML_JARS_DIR", str(folder))
    opts = _options(monkeypatch)
    assert "spark.jars.packages" not in opts
    assert opts["spark.jars"] == f"{folder / 'a.jar'},{folder / 'b.jar'}"
    assert opts["spark.driver.extraJavaOptions"] == f"-Dlog4j2.configurationFile={spark_mod.LOG4J2_FILE.as_uri()}"
    assert spark_mod.LOG4J2_FILE.is_file()
    # A caller's own jars and JVM options are kept; its own log4j2 configuration wins.
    opts = _options(monkeypatch, extra_conf={"spark.jars": "/x/mine.jar",
                                             "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1"})
    assert opts["spark.jars"].endswith(",/x/mine.jar") and opts["spark.jars"].count(",") == 2
    assert opts["spark.driver.extraJavaOptions"].endswith(" -XX:TieredStopAtLevel=1")
    mine = "-Dlog4j2.configurationFile=file:/x/log4j2.properties"
    assert _options(monkeypatch, extra_conf={"spark.driver.extraJavaOptions": mine}
                    )["spark.driver.extraJavaOptions"] == mine


def test_without_the_jars_ivy_resolves_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTML_JARS_DIR", str(tmp_path / "empty"))
    opts = _options(monkeypatch)
    assert opts["spark.jars.packages"] == delta_package() and "spark.jars" not in opts
    monkeypatch.setenv("TENANTML_JARS_DIR", str(_folder(tmp_path)))
    assert _options(monkeypatch, resolve_delta=True)["spark.jars.packages"] == delta_package()


def test_the_stderr_filter_drops_only_the_jvm_start_warning() -> None:
    text = ("WARNING: Using incubator modules: jdk.incubator.vector\n"
            "26/01/01 10:00:00 ERROR SparkContext: a real error\n"
            "WARNING: something else\npartial line")
    proc = subprocess.run([sys.executable, "-S", "-c", spark_mod._STDERR_FILTER], input=text,
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout == ("26/01/01 10:00:00 ERROR SparkContext: a real error\n"
                           "WARNING: something else\npartial line")
