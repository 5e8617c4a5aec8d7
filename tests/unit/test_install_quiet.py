"""Building the project prints no setuptools deprecation warning (the license is an SPDX expression,
no license classifier), and the wheel carries the resources local sessions start with."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_build_prints_no_deprecation_warning(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "libs", src / "libs", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    # Verbose: pip shows the build backend's own output (where setuptools warns) only with -v.
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "-v", "--wheel-dir", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [line for line in (proc.stdout + proc.stderr).splitlines() if "deprecat" in line.lower()]
    assert not noisy, "\n".join(noisy)
    (wheel,) = out.glob("tenantml-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(meta_name).decode())
    assert meta["License-Expression"] == "Apache-2.0"
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    assert {"tenantml/resources/log4j2.properties", "tenantml/resources/fairscheduler.xml"} <= names


@pytest.mark.parametrize("key", ["license", "requires"])
def test_pyproject_uses_the_current_license_fields(key: str) -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    if key == "license":
        assert project["project"]["license"] == "Apache-2.0"  # an SPDX string, not a {text|file} table
    else:
        assert any(r.replace(" ", "").startswith("setuptools>=77") for r in project["build-system"]["requires"])
