"""The package's shape: no import cycles, every module imports on its own, dependencies one way."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "libs" / "tenantml"


def _modules() -> list[str]:
    mods = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def test_every_module_imports_alone() -> None:
    """Each module is imported with every tenantml module unloaded first, so a cycle that only bites
    when a module is imported first (say, a notebook importing the registry helpers) fails here.
    One interpreter for all (third-party imports stay loaded: they cannot take part in a cycle of ours)."""
    script = (
        "import importlib, json, sys\n"
        "failures = {}\n"
        "for m in json.loads(sys.argv[1]):\n"
        "    for k in [k for k in sys.modules if k == 'tenantml' or k.startswith('tenantml.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as exc:\n"
        "        failures[m] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(failures))\n"
    )
    modules = _modules()
    assert len(modules) > 60 and "tenantml.registry.tracking" in modules
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(modules)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


def test_import_linter_contracts_hold() -> None:
    """The layers and the pure-models rule in pyproject.toml ([tool.importlinter])."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (it is a dev dependency)"
    proc = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_a_cycle_would_be_caught(tmp_path: Path) -> None:
    """The import test above is not vacuous: two modules importing each other fail it."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from cyc.a import A\nB = 2\n")
    proc = subprocess.run([sys.executable, "-c", "import cyc.a"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode != 0 and "circular import" in proc.stderr
