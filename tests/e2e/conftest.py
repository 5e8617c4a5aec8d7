"""One small demo run for the whole session: `tenantml demo` in a separate process, as a user runs it.

The CLI tests (test_cli_demo.py) check what that process printed and left behind; the analyst-facing
tests (notebooks, run report) read the tables, models and report it wrote, in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
# Small and quick, but every strategy appears: tenants too small for their own model fall back to
# shared or tuned candidates, so the strategy comparison has something to compare.
FAST_TRAINING = ("training: {min_rows: 100, max_epochs: 3, patience: 2, shared: {max_epochs: 2}, "
                 "tuned: {max_epochs: 2}}\n")
DEMO_ARGS = ("--tenants-count", "5", "--largest", "900", "--smallest", "20")


@pytest.fixture(scope="session")
def demo_cli_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`tenantml demo --json` on 5 tenants (900 to 20 rows, one of them mostly garbage), run once: it
    ingests and validates, sets the demo's consents, then trains, promotes, scores and publishes.

    Returns its working directory (conf/ and data/ in it), its JSON summary, and `cli_data`: a copy
    of data/ taken as soon as the process ended, for the CLI tests to list and to fail a run on
    without seeing (or changing) what the in-process tests add to data/."""
    root = tmp_path_factory.mktemp("demo")
    shutil.copytree(REPO / "conf", root / "conf")
    (root / "conf" / "local" / "test.yml").write_text(FAST_TRAINING)
    proc = subprocess.run([sys.executable, "-m", "tenantml.apps.cli", "demo", "--json", "--data-dir", "data",
                           *DEMO_ARGS], cwd=root, env={**os.environ, "PYSPARK_PYTHON": sys.executable},
                          text=True, capture_output=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(root / "data", root / "cli-data")
    return {"root": root, "conf": root / "conf", "data_dir": root / "data", "cli_data": root / "cli-data",
            "summary": json.loads(proc.stdout), "stderr": proc.stderr}


@pytest.fixture(scope="session")
def analyst_run(spark: Any, demo_cli_run: dict[str, Any]) -> dict[str, Any]:
    """The demo run, opened in this process: a context on its conf and data under its run id."""
    from tenantml.io.context import JobContext

    summary = demo_cli_run["summary"]
    steps = {s["step"]: s for s in summary["steps"]}
    assert summary["status"] == "ok" and all(s["status"] == "ok" for s in steps.values()), \
        {k: s["status"] for k, s in steps.items()}
    (run_id,) = {s["run_id"] for s in steps.values()}
    ctx = JobContext.create(conf_dir=demo_cli_run["conf"], data_dir=demo_cli_run["data_dir"], spark=spark,
                            run_id=run_id)
    return {"ctx": ctx, "conf": demo_cli_run["conf"], "data_dir": demo_cli_run["data_dir"], "results": steps}


def _check_png(path: Path, min_size: tuple[int, int] = (200, 120), min_colors: int = 8) -> Any:
    """A real, non-blank PNG: the signature, a full decode, a sensible size and enough colours that
    something was drawn. Returns the decoded RGB image for further checks."""
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()  # the whole stream decodes (CRCs, no truncation)
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    assert rgb.width >= min_size[0] and rgb.height >= min_size[1], (path, rgb.size)
    colors = rgb.getcolors(maxcolors=1 << 20) or []
    assert len(colors) >= min_colors, f"{path} looks blank: {len(colors)} colour(s)"
    return rgb


@pytest.fixture(scope="session")
def check_png() -> Any:
    return _check_png


