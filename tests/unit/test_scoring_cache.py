"""The scoring worker: models arrive as rows before the data, are deserialised once per task, and
every row is scored by its own tenant's model (Arrow in, Arrow out)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tenantml.models import FeatureSpec, TabularModel, TrainParams, fit_tabular
from tenantml.scoring.batch import BLOB, IS_MODEL, ModelCache, score_arrow


def _model(seed: int, flip: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x": rng.normal(size=300)})
    df["y"] = ((df["x"] < 0) if flip else (df["x"] > 0)).astype(float)
    return fit_tabular(df, "y", FeatureSpec(("x",), (), "binary"), TrainParams(max_epochs=8, seed=seed)).model.to_bytes()


def _batches(models: dict[str, bytes], data: pd.DataFrame, per_batch: int = 50) -> list[pa.RecordBatch]:
    """What a partition looks like: the model rows sorted first, then the data rows."""
    rows = [{"tenant_id": t, "k": None, "_batch_id": None, "x": None, IS_MODEL: 1, BLOB: b} for t, b in models.items()]
    rows += [{"tenant_id": r.tenant_id, "k": str(r.k), "_batch_id": "b1", "x": float(r.x), IS_MODEL: 0, BLOB: None}
             for r in data.itertuples(index=False)]
    schema = pa.schema([("tenant_id", pa.string()), ("k", pa.string()), ("_batch_id", pa.string()), ("x", pa.float64()),
                        (IS_MODEL, pa.int32()), (BLOB, pa.binary())])
    table = pa.Table.from_pylist(rows, schema=schema)
    return table.to_batches(max_chunksize=per_batch)


def test_every_row_is_scored_by_its_own_tenants_model_with_one_load_each() -> None:
    models = {"a": _model(1), "b": _model(2, flip=True)}
    data = pd.DataFrame({"tenant_id": ["a", "b"] * 100, "k": range(200), "x": np.linspace(-2, 2, 200)})
    out = pa.Table.from_batches(list(score_arrow(_batches(models, data), key="k", features=["x"], task="binary",
                                                 device="cpu"))).to_pandas()
    assert len(out) == 200 and set(out["batch_id"]) == {"b1"}
    for t in ("a", "b"):
        mine = out[out["tenant_id"] == t].sort_values("entity_key", key=lambda s: s.astype(int))
        rows = data[data["tenant_id"] == t]
        expected = TabularModel.from_bytes(models[t]).predict(rows)
        assert np.allclose(mine["score"].to_numpy(), expected, atol=1e-5)
    # The two tenants' models disagree (one learned x > 0, the other x < 0): no row met the other's.
    a, b = out[out["tenant_id"] == "a"], out[out["tenant_id"] == "b"]
    assert a["score"].corr(a["entity_key"].astype(float)) > 0.9 and b["score"].corr(b["entity_key"].astype(float)) < -0.9
    assert out["_seconds"].sum() > 0 and (out["_seconds"] >= 0).all()


def test_a_row_whose_tenant_has_no_model_fails_the_task() -> None:
    with pytest.raises(KeyError, match="'z'"):
        list(score_arrow(_batches({"a": _model(1)}, pd.DataFrame({"tenant_id": ["a", "z"], "k": [1, 2], "x": [0.0, 1.0]})),
                         key="k", features=["x"], task="binary", device="cpu"))


def test_tenants_sharing_one_model_share_one_load() -> None:
    shared = _model(7)
    cache = ModelCache("cpu")
    for t in ("a", "b", "c"):
        cache.add(t, bytes(shared))
    cache.add("a", bytes(shared))  # a second model row of the same tenant (another slice) loads nothing
    assert cache.loads == 1 and set(cache.models) == {"a", "b", "c"}
