"""Batched training and scoring of many tenant models as one stacked network; no Spark, no MLflow."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch

from tenantml.models import (
    FeatureSpec,
    FitResult,
    TabularModel,
    TrainParams,
    fit_tabular,
    log_loss,
    rmse,
    roc_auc,
    tenant_split,
)
from tenantml.models.batched import BatchedScorer, BatchTask, fine_tune_batched, fit_tabular_batched
from tenantml.models.tabular import _validation_split

try:  # the demo generator's module moved with the package layout; accept either place
    from tenantml.apps.demo import _tenant_frame
except ImportError:  # pragma: no cover
    from tenantml.demo import _tenant_frame  # type: ignore[no-redef]

NUMERIC = ("tenure_months", "monthly_spend", "support_tickets", "logins_30d", "seats")
CATEGORICAL = ("plan", "region")
BINARY = FeatureSpec(NUMERIC, CATEGORICAL, "binary")
SIZES = (300, 450, 600, 800, 1000, 1300, 1600, 2000)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tenant_frame(tenant: str, n: int, seed: int) -> pd.DataFrame:
    """A demo tenant with string columns converted to float, as bench_tenant_models does."""
    rng = np.random.default_rng(seed)
    raw = _tenant_frame(tenant, n, rng, rng.normal(0.0, [0.6, 0.3, 0.8]))
    df = pd.DataFrame({"tenant_id": tenant, "customer_id": raw["customer_id"],
                       "churned": raw["churned"].astype(np.float64),
                       **{c: raw[c].astype(np.float64) for c in NUMERIC},
                       "plan": raw["plan"].astype(object), "region": raw["region"].astype(object)})
    return df


def split(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, test, _ = tenant_split(df, str(df["tenant_id"].iloc[0]), "customer_id", test_fraction=0.25, seed=5)
    return train, test


def ok(results: list[FitResult | Exception]) -> list[FitResult]:
    bad = [r for r in results if isinstance(r, Exception)]
    assert not bad, bad
    return [r for r in results if isinstance(r, FitResult)]


def max_state_diff(a: TabularModel, b: TabularModel) -> float:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].shape == sb[k].shape for k in sa)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def val_rows(task: BatchTask) -> pd.DataFrame:
    _, va = _validation_split(len(task.train), task.params.val_fraction, np.random.default_rng(task.params.seed))
    return task.train.iloc[va]


@pytest.fixture(scope="module")
def binary_case() -> dict[str, object]:
    """8 tenants of 300-2,000 rows trained batched and one by one with the same params."""
    frames = {f"t{i}": split(tenant_frame(f"t{i}", n, 100 + i)) for i, n in enumerate(SIZES)}
    tasks = [BatchTask(t, train, TrainParams(seed=20 + i, max_epochs=40)) for i, (t, (train, _)) in
             enumerate(frames.items())]
    batched = ok(fit_tabular_batched(tasks, "churned", BINARY))
    alone = [fit_tabular(k.train, "churned", BINARY, k.params) for k in tasks]
    return {"frames": frames, "tasks": tasks, "batched": batched, "alone": alone}


# --------------------------------------------------------------------------- quality


def test_binary_quality_matches_training_alone(binary_case: dict) -> None:
    frames, tasks = binary_case["frames"], binary_case["tasks"]
    auc_b, auc_a = [], []
    for task, rb, ra in zip(tasks, binary_case["batched"], binary_case["alone"], strict=True):
        test = frames[task.tenant_id][1]
        auc_b.append(roc_auc(test["churned"], rb.model.predict(test)))
        auc_a.append(roc_auc(test["churned"], ra.model.predict(test)))
        assert (rb.train_rows, rb.val_rows) == (ra.train_rows, ra.val_rows)
        assert rb.best_epoch >= 1 and math.isfinite(rb.best_val_loss)
        assert abs(rb.best_val_loss - ra.best_val_loss) < 0.15
    diffs = np.abs(np.array(auc_b) - np.array(auc_a))
    assert np.mean(auc_a) > 0.65  # the models learned something
    assert diffs.mean() < 0.03, (auc_b, auc_a)
    assert np.mean(auc_b) > np.mean(auc_a) - 0.01, (auc_b, auc_a)


def test_each_model_has_its_own_preprocessing_and_prior(binary_case: dict) -> None:
    for task, rb, ra in zip(binary_case["tasks"], binary_case["batched"], binary_case["alone"], strict=True):
        pb, pa = rb.model.preprocessor, ra.model.preprocessor
        np.testing.assert_array_equal(pb.medians, pa.medians)
        np.testing.assert_array_equal(pb.means, pa.means)
        assert pb.vocabularies == pa.vocabularies
        assert rb.model.params == task.params
        assert rb.model.net.arch == ra.model.net.arch


def test_without_dropout_batched_is_fit_tabular() -> None:
    """Same split, init, batch order and AdamW: without dropout's random draws only rounding differs."""
    tasks = [BatchTask(f"d{i}", tenant_frame(f"d{i}", n, 300 + i), TrainParams(seed=i, dropout=0.0, max_epochs=15))
             for i, n in enumerate((350, 700, 1100))]
    for task, rb in zip(tasks, ok(fit_tabular_batched(tasks, "churned", BINARY)), strict=True):
        ra = fit_tabular(task.train, "churned", BINARY, task.params)
        assert (rb.epochs_run, rb.best_epoch) == (ra.epochs_run, ra.best_epoch)
        assert max_state_diff(rb.model, ra.model) < 1e-4
        assert rb.best_val_loss == pytest.approx(ra.best_val_loss, abs=1e-5)


def with_value_label(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """A regression label with signal: an account value from tenure, tickets, logins and plan."""
    noise = np.random.default_rng(seed).normal(0.0, 5.0, len(df))
    plan = df["plan"].map({"basic": 0.0, "pro": 10.0, "enterprise": 25.0}).to_numpy()
    value = 0.5 * df["tenure_months"] + 4.0 * df["support_tickets"] - 0.3 * df["logins_30d"] + plan + noise
    return df.assign(value=value.to_numpy())


REGRESSION = FeatureSpec(NUMERIC, CATEGORICAL, "regression")


def test_regression_quality_matches_training_alone() -> None:
    frames = {f"r{i}": split(with_value_label(tenant_frame(f"r{i}", n, 200 + i), i))
              for i, n in enumerate((400, 900, 1500))}
    tasks = [BatchTask(t, train, TrainParams(seed=40 + i, max_epochs=30)) for i, (t, (train, _)) in
             enumerate(frames.items())]
    batched = ok(fit_tabular_batched(tasks, "value", REGRESSION))
    for task, rb in zip(tasks, batched, strict=True):
        ra = fit_tabular(task.train, "value", REGRESSION, task.params)
        test = frames[task.tenant_id][1]
        tr_pos, _ = _validation_split(len(task.train), 0.15, np.random.default_rng(task.params.seed))
        y = task.train["value"].iloc[tr_pos]
        assert rb.model.target_mean == pytest.approx(float(y.mean()))
        assert rb.model.target_std == pytest.approx(float(y.std(ddof=0)))
        err_b = rmse(test["value"], rb.model.predict(test))
        err_a = rmse(test["value"], ra.model.predict(test))
        baseline = rmse(test["value"], np.full(len(test), float(y.mean())))
        assert err_b < 0.95 * baseline, (err_b, baseline)  # the signal is learned (0.35-0.85 seen)
        assert abs(err_b - err_a) < 0.15 * err_a, (err_b, err_a)  # up to 6% seen across seeds


# --------------------------------------------------------------------------- early stopping, quotas


def test_early_stopping_is_per_tenant_and_keeps_the_best_epoch() -> None:
    tasks = [BatchTask(f"e{i}", tenant_frame(f"e{i}", n, 400 + i), TrainParams(seed=i, patience=2, max_epochs=60))
             for i, n in enumerate((300, 500, 800, 1200))]
    tasks.append(BatchTask("cap", tenant_frame("cap", 600, 499), TrainParams(seed=9, patience=50, max_epochs=3)))
    results = ok(fit_tabular_batched(tasks, "churned", BINARY))
    stopped_early = results[:4]
    assert len({r.epochs_run for r in stopped_early}) > 1  # tenants stopped at different epochs
    for r in stopped_early:
        assert r.epochs_run < 60 and r.epochs_run - r.best_epoch == 2 and not r.time_quota_hit
    assert results[4].epochs_run == 3  # its own max_epochs
    for task, r in zip(tasks, results, strict=True):
        # The kept weights are the best epoch's: their validation loss is the reported best ...
        val = val_rows(task)
        assert log_loss(val["churned"], r.model.predict(val)) == pytest.approx(r.best_val_loss, abs=2e-5)
    for task, r in zip(tasks[:2], results[:2], strict=True):
        # ... and equal the weights of a run that simply ends at that epoch.
        short = BatchTask(task.tenant_id, task.train,
                          TrainParams(seed=task.params.seed, patience=50, max_epochs=r.best_epoch))
        (rs,) = ok(fit_tabular_batched([short], "churned", BINARY))
        assert max_state_diff(rs.model, r.model) < 1e-6


def test_max_seconds_is_per_tenant() -> None:
    df = tenant_frame("q", 500, 7)
    tasks = [BatchTask("quota", df, TrainParams(seed=1, max_epochs=20, patience=50, max_seconds=0.0)),
             BatchTask("free", df, TrainParams(seed=2, max_epochs=20, patience=50)),
             BatchTask("roomy", df, TrainParams(seed=3, max_epochs=20, patience=50, max_seconds=3600.0))]
    quota, free, roomy = ok(fit_tabular_batched(tasks, "churned", BINARY))
    assert quota.epochs_run == 1 and quota.time_quota_hit  # the first epoch always runs
    assert free.epochs_run == 20 and not free.time_quota_hit
    assert roomy.epochs_run == 20 and not roomy.time_quota_hit
    assert all(r.seconds > 0 for r in (quota, free, roomy))
    assert quota.seconds < free.seconds


# --------------------------------------------------------------------------- isolation, failures


def test_a_tenants_weights_do_not_depend_on_its_batch_mates() -> None:
    a = BatchTask("A", tenant_frame("A", 400, 1), TrainParams(seed=1, max_epochs=20, batch_size=128))
    b = BatchTask("B", tenant_frame("B", 1100, 2), TrainParams(seed=2, max_epochs=20))
    c = BatchTask("C", tenant_frame("C", 700, 3), TrainParams(seed=3, max_epochs=20, learning_rate=1e-2))
    (alone,) = ok(fit_tabular_batched([a], "churned", BINARY))
    with_others = ok(fit_tabular_batched([b, a, c], "churned", BINARY))
    assert with_others[1].epochs_run == alone.epochs_run
    assert with_others[1].best_epoch == alone.best_epoch
    assert max_state_diff(with_others[1].model, alone.model) < 1e-6


def test_bad_tenants_fail_alone() -> None:
    good = BatchTask("good", tenant_frame("good", 400, 11), TrainParams(seed=4, max_epochs=10))
    nan = tenant_frame("nan", 400, 12)
    nan.loc[3, "churned"] = np.nan
    no_col = tenant_frame("nocol", 300, 13).drop(columns=["seats"])
    tasks = [BatchTask("nan", nan, TrainParams()), good, BatchTask("empty", nan.iloc[0:0], TrainParams()),
             BatchTask("nocol", no_col, TrainParams())]
    results = fit_tabular_batched(tasks, "churned", BINARY)
    assert isinstance(results[0], ValueError) and "NaN" in str(results[0])
    assert isinstance(results[2], ValueError) and "empty" in str(results[2])
    assert isinstance(results[3], ValueError) and "seats" in str(results[3])
    assert isinstance(results[1], FitResult)
    (solo,) = ok(fit_tabular_batched([good], "churned", BINARY))
    assert max_state_diff(results[1].model, solo.model) < 1e-6


def test_padded_embedding_tables_are_unstacked_to_the_tenants_own_size() -> None:
    wide = tenant_frame("wide", 500, 21)
    wide.loc[wide.index[:60], "plan"] = "platinum"  # 4 plans: same embedding dim, one more row
    tasks = [BatchTask("wide", wide, TrainParams(seed=1, max_epochs=8)),
             BatchTask("std", tenant_frame("std", 500, 22), TrainParams(seed=2, max_epochs=8))]
    together = ok(fit_tabular_batched(tasks, "churned", BINARY))
    assert together[0].model.net.embeddings[0].weight.shape == (5, 3)
    assert together[1].model.net.embeddings[0].weight.shape == (4, 3)
    (alone,) = ok(fit_tabular_batched(tasks[:1], "churned", BINARY))
    assert max_state_diff(together[0].model, alone.model) < 1e-6


# --------------------------------------------------------------------------- scoring


def test_scorer_matches_each_model_and_its_round_trip(binary_case: dict) -> None:
    models = {k.tenant_id: r.model for k, r in zip(binary_case["tasks"], binary_case["batched"], strict=True)}
    # One regression model with the same architecture joins the binary ones in a stacked group.
    reg_task = BatchTask("reg", tenant_frame("reg", 500, 31), TrainParams(seed=3, max_epochs=10))
    spec = FeatureSpec((*NUMERIC[:-1], "churned"), CATEGORICAL, "regression")
    models["reg"] = ok(fit_tabular_batched([reg_task], "seats", spec))[0].model
    frames = [test for _, test in binary_case["frames"].values()] + [reg_task.train.iloc[:150]]
    df = pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=0).reset_index(drop=True)
    for chunk_rows in (64, 256, 4096):
        scorer = BatchedScorer(models, chunk_rows=chunk_rows)
        scores = scorer.predict(df)
        for tenant, model in models.items():
            rows = df["tenant_id"].to_numpy() == tenant
            restored = TabularModel.from_bytes(model.to_bytes())
            np.testing.assert_allclose(scores[rows], restored.predict(df[rows]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(scores[rows], model.predict(df[rows]), rtol=1e-5, atol=1e-5)
    assert scorer.predict(df.iloc[0:0]).shape == (0,)


def test_scorer_refuses_unknown_tenants(binary_case: dict) -> None:
    models = {k.tenant_id: r.model for k, r in zip(binary_case["tasks"][:2], binary_case["batched"][:2],
                                                    strict=True)}
    scorer = BatchedScorer(models)
    test = binary_case["frames"]["t0"][1]
    mixed = pd.concat([test, test.iloc[:3].assign(tenant_id="stranger")], ignore_index=True)
    with pytest.raises(KeyError, match="stranger"):
        scorer.predict(mixed)
    with pytest.raises(KeyError):
        scorer.predict(test.assign(tenant_id=None))


# --------------------------------------------------------------------------- fine-tuning


def test_fine_tune_batched_freezes_and_never_gets_worse(binary_case: dict) -> None:
    base = binary_case["alone"][-1].model  # the largest tenant's model stands in for a shared base
    tasks = [BatchTask(f"f{i}", tenant_frame(f"f{i}", n, 500 + i), TrainParams(seed=60 + i, batch_size=128))
             for i, n in enumerate((300, 600, 900))]
    freeze = ["embeddings", "mlp.0"]
    results = ok(fine_tune_batched(base, tasks, "churned", freeze=freeze, learning_rate=2e-3, max_epochs=8,
                                   patience=3))
    base_state = base.net.state_dict()
    for task, r in zip(tasks, results, strict=True):
        tuned = r.model
        assert tuned.preprocessor is base.preprocessor
        state = tuned.net.state_dict()
        for name, value in state.items():
            if name.startswith(("embeddings.", "mlp.0.")):
                assert torch.equal(value, base_state[name]), name
        if r.best_epoch > 0:
            assert any(not torch.equal(state[n], base_state[n]) for n in ("mlp.3.weight", "head.weight"))
        val = val_rows(task)
        assert log_loss(val["churned"], tuned.predict(val)) <= log_loss(val["churned"], base.predict(val)) + 1e-6
    assert any(r.best_epoch > 0 for r in results)
    with pytest.raises(ValueError, match="match no parameter"):
        fine_tune_batched(base, tasks, "churned", freeze=["nope"], learning_rate=1e-3, max_epochs=2, patience=1)


# --------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    tasks = [BatchTask(f"g{i}", tenant_frame(f"g{i}", n, 600 + i), TrainParams(seed=i, dropout=0.0, max_epochs=5))
             for i, n in enumerate((300, 700))]
    on_cpu = ok(fit_tabular_batched(tasks, "churned", BINARY))
    on_gpu = ok(fit_tabular_batched(tasks, "churned", BINARY, device="cuda"))
    for rc, rg in zip(on_cpu, on_gpu, strict=True):
        assert rg.model.device == "cuda"
        assert max_state_diff(rc.model.to("cpu"), rg.model.to("cpu")) < 1e-3
    scores = BatchedScorer({t.tenant_id: r.model for t, r in zip(tasks, on_gpu, strict=True)},
                           device="cuda").predict(pd.concat([t.train for t in tasks]))
    assert np.isfinite(scores).all()
