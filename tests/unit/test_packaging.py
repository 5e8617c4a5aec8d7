"""The wheel's requirements: Spark and Delta only in the `local` extra, which local set-up installs.

A Databricks runtime brings its own PySpark and Delta; the bundle installs the wheel there without
extras, so a base requirement on either would install other versions over the runtime's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
LOCAL_ONLY = {"pyspark", "delta-spark"}


@pytest.fixture(scope="module")
def requires_dist(tmp_path_factory: pytest.TempPathFactory) -> list[Requirement]:
    """Requires-Dist of the wheel built from a copy of the project (no network, no build isolation)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "libs", src / "libs",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pyc"))
    out = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--wheel-dir", str(out)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = out.glob("tenantml-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(meta_name).decode())
    assert "local" in (meta.get_all("Provides-Extra") or [])
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def _extras_of(req: Requirement) -> set[str]:
    """The extras whose installation pulls in this requirement ('' for a base requirement)."""
    if req.marker is None:
        return {""}
    return {e for e in ("", "local", "dev") if req.marker.evaluate({"extra": e})}


def test_spark_and_delta_only_in_local_extra(requires_dist: list[Requirement]) -> None:
    by_name: dict[str, list[Requirement]] = {}
    for req in requires_dist:
        by_name.setdefault(req.name.lower(), []).append(req)

    for name in LOCAL_ONLY:
        reqs = by_name.get(name)
        assert reqs, f"{name} missing from the wheel's requirements"
        for req in reqs:
            assert str(req.marker) == 'extra == "local"', f"{req}: must be required only by the local extra"

    gx_spark = [r for r in by_name["great-expectations"] if "spark" in r.extras]
    assert gx_spark and all(str(r.marker) == 'extra == "local"' for r in gx_spark), gx_spark


def test_base_requirements(requires_dist: list[Requirement]) -> None:
    base = {r.name.lower(): r for r in requires_dist if "" in _extras_of(r)}
    assert {"mlflow", "torch", "great-expectations"} <= base.keys(), sorted(base)
    assert not base["great-expectations"].extras, "base GX must not carry the spark extra (it requires pyspark)"
    assert not LOCAL_ONLY & base.keys(), sorted(LOCAL_ONLY & base.keys())


def test_local_setup_installs_local_extra() -> None:
    makefile = (REPO / "Makefile").read_text()
    installs = re.findall(r"pip install\b.*?-e\s+'?\.\[([^\]]*)\]", makefile)
    assert installs, "Makefile setup does not install the project"
    for extras in installs:
        assert {"dev", "local"} <= {e.strip() for e in extras.split(",")}, extras


def test_bundle_installs_wheel_without_extras() -> None:
    """On Databricks the runtime's Spark and Delta are used: the wheel is built without deps and
    attached as a plain whl library (a cluster library has no way to ask for an extra)."""
    root = yaml.safe_load((REPO / "workflows" / "databricks.yml").read_text())
    build = root["artifacts"]["tenantml"]["build"]
    assert "--no-deps" in build and "[" not in build, build
    for path in (REPO / "workflows" / "resources").glob("*.yml"):
        text = path.read_text()
        for whl in re.findall(r"whl:\s*(\S+)", text):
            assert whl.endswith(".whl") and "[" not in whl, f"{path.name}: {whl}"
