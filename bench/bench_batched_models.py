#!/usr/bin/env python
"""Benchmark (not a test): batched tenant models against the one-model-at-a-time loop, one thread.

Two figures, both measured in this one run on the same data and printed as ratios:

  (a) training  tenant models per minute through ``fit_tabular_batched`` (all tenants stacked into
                one network) vs a loop calling ``fit_tabular`` per tenant; the mean holdout AUC of
                both is printed too, so speed is never bought with quality;
  (b) scoring   rows/s through ``BatchedScorer.predict`` vs the per-tenant loop
                ``for t, rows in df.groupby("tenant_id"): models[t].predict(rows)``, for a few chunk
                sizes of the scorer (an unbounded chunk pads every tenant to the largest tenant),
                with equal tenants (b) and with sizes log-spaced over two orders of magnitude (b').

Nothing here asserts a time.

    .venv/bin/python bench/bench_batched_models.py            # 200 tenants x 500 rows, 200 x 250 scored
    .venv/bin/python bench/bench_batched_models.py --quick    # 20 x 200, 20 x 250: well under a minute
    .venv/bin/python bench/bench_batched_models.py --json     # report on stderr, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

NUMERIC = ("tenure_months", "monthly_spend", "support_tickets", "logins_30d", "seats")
CATEGORICAL = ("plan", "region")
LABEL = "churned"

_OUT = sys.stdout


def say(msg: str = "") -> None:
    print(msg, file=_OUT, flush=True)


def tenant_frames(n_tenants: int, rows: int, seed: int) -> dict[str, pd.DataFrame]:
    """Demo tenants (same generator, a shift per tenant, no dirt) with string columns as floats,
    as bench_tenant_models.py builds them."""
    try:
        from tenantml.apps.demo import _tenant_frame
    except ImportError:  # older package layout
        from tenantml.demo import _tenant_frame  # type: ignore[no-redef]

    rng = np.random.default_rng(seed)
    out: dict[str, pd.DataFrame] = {}
    for i in range(n_tenants):
        tid = f"t{i:04d}"
        raw = _tenant_frame(tid, rows, rng, rng.normal(0.0, [0.6, 0.3, 0.8]))
        out[tid] = pd.DataFrame({
            "tenant_id": tid, "customer_id": raw["customer_id"], LABEL: raw[LABEL].astype(np.float64),
            **{c: raw[c].astype(np.float64) for c in NUMERIC},
            **{c: raw[c].astype(object) for c in CATEGORICAL},
        })
    return out


def best_of(reps: int, fn: Any) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(reps):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=None, help="tenants to train (default 200; --quick 20)")
    p.add_argument("--rows", type=int, default=None, help="rows per tenant (default 500; --quick 200)")
    p.add_argument("--score-tenants", type=int, default=None, help="tenants scored (default 200; --quick 20)")
    p.add_argument("--score-rows", type=int, default=250, help="rows scored per tenant (default 250)")
    p.add_argument("--max-epochs", type=int, default=50)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: 20 tenants x 200 rows")
    p.add_argument("--json", action="store_true", help="figures as JSON on stdout (report on stderr)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global _OUT
    args = parse_args(argv)
    if args.json:
        _OUT = sys.stderr
    n_tenants = args.tenants or (20 if args.quick else 200)
    rows = args.rows or (200 if args.quick else 500)
    n_score = args.score_tenants or (20 if args.quick else 200)

    import torch

    torch.set_num_threads(1)
    from tenantml.models import FeatureSpec, TrainParams, fit_tabular, roc_auc, tenant_split
    from tenantml.models.batched import BatchedScorer, BatchTask, fit_tabular_batched

    spec = FeatureSpec(NUMERIC, CATEGORICAL, "binary")
    frames = tenant_frames(n_tenants, rows, args.seed)
    splits = {t: tenant_split(df, t, "customer_id", test_fraction=0.2, seed=args.seed)[:2] for t, df in frames.items()}
    tasks = [BatchTask(t, train, TrainParams(seed=1000 + i, max_epochs=args.max_epochs))
             for i, (t, (train, _)) in enumerate(splits.items())]
    say(f"tenantml batched models benchmark: {n_tenants} tenants x {rows} rows (80% train), one torch thread, "
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cpus")

    def auc_of(models: dict[str, Any]) -> float:
        aucs = [roc_auc(test[LABEL], models[t].predict(test)) for t, (_, test) in splits.items() if t in models]
        return float(np.nanmean(aucs))

    # (a) training: the loop first (it also warms torch), then the batched run.
    t_loop, loop_results = best_of(1, lambda: [fit_tabular(k.train, LABEL, spec, k.params) for k in tasks])
    t_batch, batch_results = best_of(1, lambda: fit_tabular_batched(tasks, LABEL, spec))
    failed = [str(r) for r in batch_results if isinstance(r, Exception)]
    loop_models = {k.tenant_id: r.model for k, r in zip(tasks, loop_results, strict=True)}
    batch_models = {k.tenant_id: r.model for k, r in zip(tasks, batch_results, strict=True)
                    if not isinstance(r, Exception)}
    auc_loop, auc_batch = auc_of(loop_models), auc_of(batch_models)
    epochs_loop = float(np.mean([r.epochs_run for r in loop_results]))
    epochs_batch = float(np.mean([r.epochs_run for r in batch_results if not isinstance(r, Exception)]))
    per_min_loop, per_min_batch = 60 * n_tenants / t_loop, 60 * len(batch_models) / t_batch
    say()
    say("(a) training")
    say(f"    fit_tabular loop     {t_loop:7.2f} s  {per_min_loop:9,.0f} models/min  "
        f"mean epochs {epochs_loop:5.1f}  mean holdout AUC {auc_loop:.4f}")
    say(f"    fit_tabular_batched  {t_batch:7.2f} s  {per_min_batch:9,.0f} models/min  "
        f"mean epochs {epochs_batch:5.1f}  mean holdout AUC {auc_batch:.4f}")
    say(f"    ratio batched / loop: {per_min_batch / per_min_loop:.2f}x" + (f"  ({len(failed)} failed)" if failed else ""))

    # (b) scoring: the batched models, on fresh rows of the first n_score tenants (200 x 250 default).
    score_models = dict(list(batch_models.items())[:n_score])
    while len(score_models) < n_score:  # more scored tenants than trained ones: reuse models
        t = f"s{len(score_models):04d}"
        score_models[t] = list(batch_models.values())[len(score_models) % len(batch_models)]
    fresh = tenant_frames(n_score, args.score_rows, args.seed + 1)
    pieces = [df.assign(tenant_id=t) for t, df in zip(score_models, fresh.values(), strict=True)]
    score_df = pd.concat(pieces, ignore_index=True).sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    n_rows = len(score_df)

    reps = 5

    def score_case(df: pd.DataFrame) -> dict[str, Any]:
        def loop_predict() -> np.ndarray:
            out = np.empty(len(df))
            for t, part in df.groupby("tenant_id", sort=False):
                out[part.index.to_numpy()] = score_models[str(t)].predict(part)
            return out

        def preprocess_only() -> None:  # the floor of every design: each tenant's own Preprocessor
            for t, part in df.groupby("tenant_id", sort=False):
                score_models[str(t)].preprocessor.transform(part)

        scorers = {label: BatchedScorer(score_models, chunk_rows=chunk) for label, chunk in
                   (("chunks of 64", 64), ("chunks of 256 (default)", 256), ("pad to largest tenant", 10**9))}
        ref = loop_predict()
        runs: dict[str, Any] = {"loop": loop_predict, "preprocess": preprocess_only,
                                **{label: sc.predict for label, sc in scorers.items()}}
        best = dict.fromkeys(runs, float("inf"))
        diffs = {label: float(np.abs(sc.predict(df) - ref).max()) for label, sc in scorers.items()}
        for _ in range(reps):  # round robin, so a change in the machine's load hits every variant alike
            for name, fn in runs.items():
                started = time.perf_counter()
                fn(df) if name in scorers else fn()
                best[name] = min(best[name], time.perf_counter() - started)
        t_loop, t_pre = best["loop"], best["preprocess"]
        designs = {label: {"seconds": best[label], "rows_per_s": len(df) / best[label],
                           "ratio": t_loop / best[label], "max_abs_diff": diffs[label]} for label in scorers}
        say(f"    per-tenant predict loop              {t_loop * 1000:8.1f} ms  {len(df) / t_loop:11,.0f} rows/s")
        for label, d in designs.items():
            say(f"    BatchedScorer, {label:<23} {d['seconds'] * 1000:8.1f} ms  {d['rows_per_s']:11,.0f} rows/s  "
                f"ratio {d['ratio']:5.2f}x  (max |diff| {d['max_abs_diff']:.1e})")
        say(f"    of which per-tenant Preprocessor.transform (groupby included): {t_pre * 1000:.1f} ms")
        return {"rows": len(df), "loop_s": t_loop, "loop_rows_per_s": len(df) / t_loop, "preprocess_s": t_pre,
                "designs": designs}

    say()
    say(f"(b) scoring {n_score} tenants x {args.score_rows} rows = {n_rows:,} rows (best of {reps})")
    equal = score_case(score_df)
    # Unequal tenants: sizes log-spaced from 8x to 1/10 of --score-rows.
    sizes = np.geomspace(8 * args.score_rows, max(2, args.score_rows // 10), n_score).round().astype(int)
    rng_parts = [tenant_frames(1, int(n), args.seed + 2 + i)["t0000"].assign(tenant_id=t)
                 for i, (t, n) in enumerate(zip(score_models, sizes, strict=True))]
    uneven_df = (pd.concat(rng_parts, ignore_index=True).sample(frac=1.0, random_state=args.seed)
                 .reset_index(drop=True))
    say()
    say(f"(b') scoring {n_score} tenants of {sizes.min()}-{sizes.max()} rows = {len(uneven_df):,} rows "
        f"(best of {reps})")
    uneven = score_case(uneven_df)

    figures = {
        "tenants": n_tenants, "rows_per_tenant": rows, "threads": 1,
        "training": {"loop_s": t_loop, "batched_s": t_batch, "loop_models_per_min": per_min_loop,
                     "batched_models_per_min": per_min_batch, "ratio": per_min_batch / per_min_loop,
                     "loop_mean_epochs": epochs_loop, "batched_mean_epochs": epochs_batch,
                     "loop_mean_holdout_auc": auc_loop, "batched_mean_holdout_auc": auc_batch,
                     "failed": failed},
        "scoring": {"tenants": n_score, "rows_per_tenant": args.score_rows, **equal},
        "scoring_uneven": {"tenants": n_score, "min_rows": int(sizes.min()), "max_rows": int(sizes.max()),
                           **uneven},
    }
    if args.json:
        print(json.dumps(figures, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
