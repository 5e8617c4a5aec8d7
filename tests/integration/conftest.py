"""The nightly job on demo data, run once per session through the local workflow runner.

test_workflows.py checks the run itself; test_publish.py checks the gold tables it published, on a
copy of its data directory taken as the job ended (those tests publish and score again, and the
workflow tests score again: neither sees the other's changes). `pristine` is a further copy that no
test changes: modules that need the world exactly as the job left it copy that one.
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
    from worlds import copy_world

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
    pristine = copy_world(data_dir, tmp_path_factory.mktemp("nightly-pristine") / "data")
    copy = copy_world(pristine, tmp_path_factory.mktemp("nightly-copy") / "data")
    return {"run": run, "ctx": ctx, "conf": str(conf), "data_copy": copy, "pristine": pristine}


SHARING_CONF = ("training: {min_rows: 100, max_epochs: 3, patience: 2, shared: {max_epochs: 2}, "
                "tuned: {max_epochs: 2}}\n")


@pytest.fixture(scope="session")
def sharing_world(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four demo tenants that all consent to share their data, after one full pipeline run (the
    shared model, tuned models and promotion included). Built once; every module that changes it
    (offboarding, consent withdrawal) works on its own copy from `copy_sharing_world`."""
    from tenantml.apps.demo import DemoSpec, write_demo_source
    from tenantml.apps.report import run_pipeline_reported
    from tenantml.io.context import JobContext
    from tenantml.io.tenants import list_tenant_ids, update_tenants
    from tenantml.steps.runner import pipeline_steps, run_pipeline

    conf = tmp_path_factory.mktemp("sharing-conf")
    shutil.copytree(REPO / "conf", conf, dirs_exist_ok=True)
    (conf / "local" / "test.yml").write_text(SHARING_CONF)
    data = tmp_path_factory.mktemp("sharing") / "data"
    ctx = JobContext.create(conf_dir=conf, data_dir=data, spark=spark, run_id="share-1")
    write_demo_source(ctx.source_path("demo"), DemoSpec(tenants=4, largest=800, smallest=150))
    results = run_pipeline(ctx, dataset="demo", steps=pipeline_steps(stop="validate_scoring"))
    update_tenants(spark, ctx.tables.tenants, list_tenant_ids(spark, ctx.tables.tenants), consent_share_data=True)
    results += run_pipeline_reported(ctx, dataset="demo", steps=pipeline_steps(start="monitor"))
    failed = {r.step: r.to_dict()["failures"] for r in results if r.status not in ("ok", "skipped")}
    assert not failed, failed
    return {"conf": conf, "data": data, "run_id": "share-1", "results": {r.step: r for r in results}}


@pytest.fixture(scope="session")
def copy_sharing_world(sharing_world: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``copy(name)`` -> (conf, data dir) of a private copy of the sharing world, as it was built."""
    from worlds import copy_world

    def copy(name: str) -> tuple[Path, Path]:
        return sharing_world["conf"], copy_world(sharing_world["data"], tmp_path_factory.mktemp(name) / "data")

    return copy
