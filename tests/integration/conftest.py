"""The nightly job on demo data, run once per session through the local workflow runner.

test_workflows.py checks the run itself; test_publish.py checks the gold tables it published, on a
copy of its data directory taken as the job ended (those tests publish and score again, and the
workflow tests score again: neither sees the other's changes).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def nightly_run(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from localbundle import load_bundle, run_job

    from tenantml.apps.demo import DemoSpec, write_demo_source
    from tenantml.io.context import JobContext

    conf = tmp_path_factory.mktemp("conf")
    shutil.copytree(REPO / "conf", conf, dirs_exist_ok=True)
    # Small and fast. No tenant consents to sharing (the default), so the shared and tuned tasks run
    # their entry points but train nothing: tests/integration/test_strategies.py trains them.
    # Spark and Arrow settings equal the session fixture's: the tasks reuse that session.
    (conf / "local" / "workflow.yml").write_text(
        "training: {min_rows: 100, max_epochs: 3, patience: 2, shared: {max_epochs: 2}}\n"
        "spark: {shuffle_partitions: 2}\n"
        "scoring: {arrow_batch_size: 10000}\n")
    data_dir = tmp_path_factory.mktemp("nightly")
    ctx = JobContext.create(conf_dir=conf, data_dir=data_dir, spark=spark)
    write_demo_source(ctx.source_path("demo"), DemoSpec(tenants=5, largest=900, smallest=20))
    run = run_job(load_bundle(REPO / "workflows", "prod"), "nightly", conf_dir=str(conf), data_dir=str(data_dir))
    copy = tmp_path_factory.mktemp("nightly-copy") / "data"
    shutil.copytree(data_dir, copy)
    return {"run": run, "ctx": ctx, "conf": str(conf), "data_copy": copy}
