"""Holdout stability, fine-tuning and the shared worker's checkpoint resume, without Spark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tenantml.models import FeatureSpec, Preprocessor, TrainParams, fine_tune, fit_tabular, tenant_split
from tenantml.training.distributed import SharedJob, require_backend, run_shared_worker

SPEC = FeatureSpec(numeric=("x1", "x2"), categorical=("c",), task="binary")


def frame(n: int, seed: int, shift: float = 0.0, tenant: str = "t1") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    c = rng.choice(["a", "b", "c"], n)
    logit = 1.5 * x1 - x2 + shift * (c == "a")
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame({"tenant_id": tenant, "key": [f"k{i:05d}" for i in range(n)], "x1": x1, "x2": x2,
                         "c": c, "y": y})


def test_tenant_split_ignores_row_order_and_samples_reproducibly() -> None:
    df = frame(300, 1)
    a_tr, a_te, _ = tenant_split(df, "t1", "key", test_fraction=0.2, seed=7)
    _b_tr, b_te, _ = tenant_split(df.sample(frac=1.0, random_state=3), "t1", "key", test_fraction=0.2, seed=7)
    assert sorted(a_te["key"]) == sorted(b_te["key"]) and len(a_te) == 60
    assert not set(a_tr["key"]) & set(a_te["key"])
    c_tr, c_te, sampled = tenant_split(df, "t1", "key", test_fraction=0.2, seed=7, max_rows=100)
    assert sampled == 300 and len(c_tr) + len(c_te) == 100
    _d_tr, d_te, _ = tenant_split(df.iloc[::-1], "t1", "key", test_fraction=0.2, seed=7, max_rows=100)
    assert sorted(d_te["key"]) == sorted(c_te["key"])
    _other_tr, other_te, _ = tenant_split(df, "t2", "key", test_fraction=0.2, seed=7)
    assert sorted(other_te["key"]) != sorted(a_te["key"])  # seeded per tenant


def test_fine_tune_keeps_frozen_layers_and_never_gets_worse_on_validation() -> None:
    base = fit_tabular(frame(1500, 2), "y", SPEC, TrainParams(max_epochs=8, seed=1)).model
    tenant = frame(300, 3, shift=2.5)
    before = {n: p.detach().clone() for n, p in base.net.named_parameters()}
    fit = fine_tune(base, tenant, "y", freeze=["embeddings"], learning_rate=3e-3, max_epochs=10, patience=3,
                    batch_size=128, val_fraction=0.2, seed=5)
    tuned = dict(fit.model.net.named_parameters())
    assert all(torch.equal(before[n], tuned[n]) for n in before if n.startswith("embeddings"))
    assert any(not torch.equal(before[n], tuned[n]) for n in before if n.startswith("mlp"))
    assert fit.model.preprocessor is base.preprocessor
    # The base model itself was not modified.
    assert all(torch.equal(before[n], p) for n, p in base.net.named_parameters())
    with pytest.raises(ValueError, match="match no parameter"):
        fine_tune(base, tenant, "y", freeze=["embedings"], learning_rate=1e-3, max_epochs=1, patience=1,
                  batch_size=64, val_fraction=0.2, seed=5)
    with pytest.raises(ValueError, match="nothing left"):
        fine_tune(base, tenant, "y", freeze=["embeddings", "mlp", "head"], learning_rate=1e-3, max_epochs=1,
                  patience=1, batch_size=64, val_fraction=0.2, seed=5)


def _job(tmp_path: Path, max_epochs: int) -> SharedJob:
    df = frame(800, 4)
    path = tmp_path / "shard0.parquet"
    if not path.exists():
        df.to_parquet(path)
    pre = Preprocessor.fit(df, SPEC)
    params = TrainParams(max_epochs=max_epochs, patience=50, batch_size=128, seed=3)
    return SharedJob(shard_files=((f"file://{path}",),), spec=SPEC.to_dict(), label="y",
                     preprocessor=pre.to_dict(), target_mean=0.0, target_std=1.0, prior=float(df["y"].mean()),
                     params=params.to_dict(), steps_per_epoch=6, checkpoint_path=str(tmp_path / "ckpt.pt"),
                     checkpoint_key="k1", backend="ddp", use_gpu=False)


def test_shared_worker_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    first = run_shared_worker(_job(tmp_path, max_epochs=2))
    assert first is not None and first["start_epoch"] == 1 and not first["resumed"] and first["epochs_run"] == 2
    assert first["read_manifest"][0]["tenants"] == {"t1": 800}
    assert first["samples"] == 2 * 6 * 128
    resumed = run_shared_worker(_job(tmp_path, max_epochs=4))
    assert resumed is not None and resumed["resumed"] and resumed["start_epoch"] == 3
    assert resumed["epochs_run"] == 4 and resumed["samples"] == 2 * 6 * 128  # only epochs 3-4 ran now
    # A checkpoint written for other data (another key) is ignored: training starts over.
    fresh = run_shared_worker(SharedJob(**{**_job(tmp_path, 2).__dict__, "checkpoint_key": "other"}))
    assert fresh is not None and fresh["start_epoch"] == 1 and not fresh["resumed"]


def test_unknown_backend_is_a_config_error() -> None:
    from tenantml.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown backend"):
        require_backend("mpi")


def test_missing_horovod_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from tenantml.core.errors import ConfigError

    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # as if horovod were not installed
    with pytest.raises(ConfigError, match="make horovod"):
        require_backend("horovod")
    require_backend("torch_distributor")  # the default needs nothing extra


def test_time_quota_stops_training_after_the_epoch_that_uses_it_up() -> None:
    df = frame(2000, 9)
    free = fit_tabular(df, "y", SPEC, TrainParams(max_epochs=30, patience=30, seed=1))
    capped = fit_tabular(df, "y", SPEC, TrainParams(max_epochs=30, patience=30, seed=1, max_seconds=1e-6))
    assert free.epochs_run == 30 and not free.time_quota_hit
    assert capped.epochs_run == 1 and capped.time_quota_hit
    assert capped.model.predict(df.head(5)).shape == (5,)
