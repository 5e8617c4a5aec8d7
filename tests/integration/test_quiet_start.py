"""A local session started from the jar folder set-up fills: no Ivy resolution, no Spark banner, and
Delta Lake (its SQL extension included) works. In a separate process, as a command starts one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

IVY_LINES = (":: resolving dependencies", "found io.delta", "downloading", "Ivy Default Cache", ":: retrieving")
BANNER_LINES = ("Using Spark's default log4j profile", "Setting default log level", "sc.setLogLevel",
                "Using incubator modules", " WARN ")

_START = """
import sys
from tenantml.io.spark import build_local_spark
print("first line: the command's own", file=sys.stderr, flush=True)
spark = build_local_spark(app_name="quiet-start")
conf = spark.sparkContext.getConf()
print(conf.get("spark.jars.packages", "-"))
print(conf.get("spark.jars"))
path = sys.argv[1]
spark.range(5).write.format("delta").save(path)
spark.sql(f"UPDATE delta.`{path}` SET id = id + 10 WHERE id < 2")  # needs Delta's SQL extension
print(sorted(r.id for r in spark.read.format("delta").load(path).collect()))
print("last line", file=sys.stderr, flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, **extra}


@pytest.fixture(scope="module")
def jar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder `make setup` filled; without set-up, one filled here the same way (one resolution)."""
    from tenantml.io.spark import delta_jars_dir, local_delta_jars

    if local_delta_jars() is not None:
        return delta_jars_dir()
    folder = tmp_path_factory.mktemp("jars")
    fill = ("from tenantml.io.spark import build_local_spark, save_delta_jars\n"
            "save_delta_jars(build_local_spark(resolve_delta=True))\n")
    proc = subprocess.run([sys.executable, "-c", fill], env=_env(TENANTML_JARS_DIR=str(folder)),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert local_delta_jars(folder) is not None
    return folder


def test_a_session_from_the_local_jars_starts_silently(jar_folder: Path, tmp_path: Path) -> None:
    from tenantml.io.spark import local_delta_jars

    proc = subprocess.run([sys.executable, "-c", _START, str(tmp_path / "t")], cwd=tmp_path,
                          env=_env(TENANTML_JARS_DIR=str(jar_folder)), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    packages, jars, ids = proc.stdout.splitlines()
    assert packages == "-" and jars.split(",") == [str(j) for j in local_delta_jars(jar_folder) or []]
    assert ids == str([2, 3, 4, 10, 11])
    err = proc.stderr.splitlines()
    assert not [line for line in err if any(s in line for s in IVY_LINES)], proc.stderr[-3000:]
    assert not [line for line in err if any(s in line for s in BANNER_LINES)], proc.stderr[-3000:]
    assert err[0] == "first line: the command's own" and err[-1] == "last line", proc.stderr[-3000:]
