"""One small pipeline run for the analyst-facing tests (notebooks, run report), built once per session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
# Small and quick, but every strategy appears: tenants too small for their own model fall back to
# shared or tuned candidates, so the strategy comparison has something to compare.
FAST_TRAINING = ("training: {min_rows: 100, max_epochs: 3, patience: 2, shared: {max_epochs: 2}, "
                 "tuned: {max_epochs: 2}}\n")


@pytest.fixture(scope="session")
def analyst_run(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo pipeline on 5 tenants (900 to 20 rows, one of them mostly garbage), with the demo's
    consents set between validate and training as `tenantml demo` sets them."""
    from tenantml.context import JobContext
    from tenantml.demo import DemoSpec, demo_consents, write_demo_source
    from tenantml.pipeline import STEPS, run_pipeline
    from tenantml.tenants import list_tenant_ids, update_tenants

    root = tmp_path_factory.mktemp("analyst")
    conf = root / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "local" / "test.yml").write_text(FAST_TRAINING)
    ctx = JobContext.create(conf_dir=conf, data_dir=root / "data", spark=spark)
    write_demo_source(ctx.source_path("demo"), DemoSpec(tenants=5, largest=900, smallest=20))
    results = run_pipeline(ctx, dataset="demo", steps=STEPS[:2])
    consents = demo_consents(list_tenant_ids(spark, ctx.tables.tenants))
    for share in (True, False):
        ids = [t for t, (s, _) in consents.items() if s is share]
        if ids:
            update_tenants(spark, ctx.tables.tenants, ids, consent_share_data=share)
    for inference in (True, False):
        ids = [t for t, (_, i) in consents.items() if i is inference]
        if ids:
            update_tenants(spark, ctx.tables.tenants, ids, consent_shared_inference=inference)
    results += run_pipeline(ctx, dataset="demo", steps=STEPS[2:])
    assert all(r.status == "ok" for r in results), {r.step: r.status for r in results}
    return {"ctx": ctx, "conf": conf, "data_dir": root / "data", "results": {r.step: r for r in results}}


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


@pytest.fixture()
def restore_spark_conf(spark: Any) -> Iterator[None]:
    """For code that builds "its own" local session (the CLI, a notebook without `spark`): in this
    process that is the shared session, with the config's runtime settings applied; undo them."""
    before = dict(spark.conf.getAll)
    yield
    for key, value in before.items():
        if spark.conf.get(key, None) != value:
            spark.conf.set(key, value)
