"""Models are deserialised once per task and tenant, never per batch or row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tenantml.models import FeatureSpec, TrainParams, fit_tabular
from tenantml.scoring.batch import ModelCache, ServingModel, score_batches


def _model(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x": rng.normal(size=200)})
    df["y"] = (df["x"] > 0).astype(float)
    return fit_tabular(df, "y", FeatureSpec(("x",), (), "binary"), TrainParams(max_epochs=2)).model.to_bytes()


def test_one_load_per_tenant_across_many_batches() -> None:
    models = {t: ServingModel(t, f"d__{t}", "1", "tenant", "r", _model(i)) for i, t in enumerate(["a", "b"])}
    cache = ModelCache(models, "cpu")
    batches = [pd.DataFrame({"tenant_id": ["a", "b"] * 50, "k": range(100), "x": np.linspace(-1, 1, 100)})
               for _ in range(10)]
    out = pd.concat(score_batches(iter(batches), cache, "k", "binary", "run1"))
    assert cache.loads == 2 and len(out) == 1000
    assert set(out["model_name"]) == {"d__a", "d__b"}
    assert (out.groupby("tenant_id")["model_name"].first() == pd.Series({"a": "d__a", "b": "d__b"})).all()


def test_unknown_tenant_is_refused() -> None:
    cache = ModelCache({}, "cpu")
    with pytest.raises(PermissionError, match="tenant 'z'"):
        list(score_batches(iter([pd.DataFrame({"tenant_id": ["z"], "k": [1], "x": [0.0]})]), cache, "k",
                           "binary", "r"))


def test_tenants_sharing_one_model_object_share_one_load() -> None:
    shared = _model(7)
    models = {t: ServingModel(t, f"d__{t}", "1", "shared", "r", shared) for t in ("a", "b", "c")}
    cache = ModelCache(models, "cpu")
    batch = pd.DataFrame({"tenant_id": ["a", "b", "c"] * 10, "k": range(30), "x": np.linspace(-1, 1, 30)})
    out = pd.concat(score_batches(iter([batch]), cache, "k", "binary", "run1"))
    assert cache.loads == 1 and len(out) == 30
