"""Synthetic multi-tenant churn data with realistic skew and realistic dirt.

Tenant sizes are log-spaced over three orders of magnitude; every tenant shares a common churn
signal plus its own shift, so tenant-specific and shared models genuinely differ. A slice of rows
is dirty in the ways production data is: unparseable numbers, null labels, out-of-range values,
unknown categories, duplicate keys, unsafe tenant ids, and one tenant that is mostly garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

PLANS = ("basic", "pro", "enterprise")
REGIONS = ("emea", "amer", "apac")
HOSTILE_TENANT_IDS = ("bad tenant", "../../etc", "x'; DROP TABLE tenants; --", "a/b", "")
DIRTY_TENANT = "t-dirty"


@dataclass(frozen=True)
class DemoSpec:
    tenants: int = 24
    smallest: int = 20
    largest: int = 20_000
    dirty_fraction: float = 0.02
    seed: int = 11


def tenant_sizes(spec: DemoSpec) -> dict[str, int]:
    sizes = np.geomspace(spec.largest, spec.smallest, spec.tenants).round().astype(int)
    return {f"t{i:03d}": int(n) for i, n in enumerate(sizes)}


def _tenant_frame(tenant: str, n: int, rng: np.random.Generator, shift: np.ndarray) -> pd.DataFrame:
    tenure = rng.gamma(2.0, 12.0, n).round(1)
    spend = rng.lognormal(4.0, 0.6, n).round(2)
    tickets = rng.poisson(1.5, n)
    logins = rng.poisson(20, n)
    seats = rng.integers(1, 200, n)
    plan = rng.choice(PLANS, n, p=[0.5, 0.35, 0.15])
    region = rng.choice(REGIONS, n)
    plan_eff = np.select([plan == "basic", plan == "pro"], [0.6, 0.0], -0.6)
    logit = (-0.5 - 0.06 * (tenure - 24) + 0.45 * (tickets - 1.5) - 0.08 * (logins - 20)
             + plan_eff + shift[0] + shift[1] * (tickets - 1.5) + shift[2] * (region == "apac"))
    churned = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(int)
    start = np.datetime64("2025-01-01")
    days = rng.integers(0, 540, n)
    return pd.DataFrame({
        "tenant": tenant,
        "customer_id": [f"{tenant}-c{i:06d}" for i in range(n)],
        "tenure_months": tenure.astype(str), "monthly_spend": spend.astype(str),
        "support_tickets": tickets.astype(str), "logins_30d": logins.astype(str),
        "seats": seats.astype(str), "plan": plan, "region": region,
        "email": [f"user{i}@{tenant}.example" for i in range(n)],
        "phone": [f"+1-555-{rng.integers(1000, 9999)}" for _ in range(n)],
        "event_date": (start + days.astype("timedelta64[D]")).astype(str),
        "churned": churned.astype(str),
    })


def _dirty(df: pd.DataFrame, fraction: float, rng: np.random.Generator) -> pd.DataFrame:
    df = df.copy()
    n_bad = int(len(df) * fraction)
    if n_bad == 0:
        return df
    idx = rng.choice(len(df), n_bad, replace=False)
    kinds = rng.integers(0, 5, n_bad)
    for i, k in zip(idx, kinds, strict=True):
        if k == 0:
            df.iat[i, df.columns.get_loc("tenure_months")] = "twelve"
        elif k == 1:
            df.iat[i, df.columns.get_loc("churned")] = None
        elif k == 2:
            df.iat[i, df.columns.get_loc("monthly_spend")] = "-50"
        elif k == 3:
            df.iat[i, df.columns.get_loc("plan")] = "platinum"
        else:
            df.iat[i, df.columns.get_loc("event_date")] = "not-a-date"
    return df


def generate(spec: DemoSpec = DemoSpec()) -> pd.DataFrame:
    rng = np.random.default_rng(spec.seed)
    frames = []
    for tenant, n in tenant_sizes(spec).items():
        shift = rng.normal(0.0, [0.6, 0.3, 0.8])
        frames.append(_dirty(_tenant_frame(tenant, n, rng, shift), spec.dirty_fraction, rng))
    # One tenant whose feed is mostly garbage: validation must block it, not the others.
    garbage = _tenant_frame(DIRTY_TENANT, 300, rng, np.zeros(3))
    frames.append(_dirty(garbage, 0.6, rng))
    # Unsafe tenant ids: quarantined with a reason, never a path or a predicate.
    hostile = _tenant_frame("tmp", len(HOSTILE_TENANT_IDS) * 2, rng, np.zeros(3))
    hostile["tenant"] = list(HOSTILE_TENANT_IDS) * 2
    hostile["customer_id"] = [f"h{i}" for i in range(len(hostile))]
    frames.append(hostile)
    df = pd.concat(frames, ignore_index=True)
    # Duplicate keys: a handful of rows re-sent within the batch.
    dups = df[df["tenant"] == "t000"].sample(5, random_state=spec.seed)
    return pd.concat([df, dups], ignore_index=True)


def scoring_frame(spec: DemoSpec = DemoSpec(), fraction: float = 0.1, seed_offset: int = 1) -> pd.DataFrame:
    """Rows to score: each tenant's new customers of the next month (about ``fraction`` of its size,
    at least 5), the history's columns without the label, and a few dirty rows."""
    rng = np.random.default_rng(spec.seed + 1000 * seed_offset)
    frames = []
    for tenant, n in tenant_sizes(spec).items():
        m = max(5, int(n * fraction))
        shift = rng.normal(0.0, [0.6, 0.3, 0.8])
        df = _tenant_frame(tenant, m, rng, shift).drop(columns=["churned"])
        df["customer_id"] = [f"{tenant}-n{seed_offset:02d}-{i:06d}" for i in range(m)]
        df["event_date"] = str(np.datetime64("2026-07-01") + np.timedelta64(30 * (seed_offset - 1), "D"))
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    bad = rng.choice(len(out), max(1, len(out) // 100), replace=False)
    out.loc[bad, "tenure_months"] = "n/a"
    return out


def scoring_target(history_target: Path) -> Path:
    """Where the demo's rows to score go: beside the history (`conf/base/datasets/demo.yml`)."""
    return history_target.with_name(history_target.name + "_scoring")


def write_demo_source(target: Path, spec: DemoSpec = DemoSpec(), scoring: Path | None = None) -> Path:
    """Write the demo history as CSV (two files, like a daily drop split by an exporter) and one
    batch of rows to score (next month's customers, no label) to ``scoring`` (default: beside it)."""
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.csv"):
        old.unlink()
    df = generate(spec)
    half = len(df) // 2
    df.iloc[:half].to_csv(target / "part-0000.csv", index=False)
    df.iloc[half:].to_csv(target / "part-0001.csv", index=False)
    rows = scoring or scoring_target(target)
    rows.mkdir(parents=True, exist_ok=True)
    for old in rows.glob("*.csv"):
        old.unlink()
    scoring_frame(spec).to_csv(rows / "batch-0001.csv", index=False)
    return target


# Consent in the demo: most tenants share, one refuses to contribute data, one refuses to be
# served by models trained on other tenants' data (so both refusals are visible in a run).
DEMO_NO_SHARE = "t003"
DEMO_NO_SHARED_INFERENCE = "t005"


def demo_consents(tenant_ids: list[str]) -> dict[str, tuple[bool, bool]]:
    """tenant -> (consent_share_data, consent_shared_inference) for the demo's tenants."""
    return {t: (t != DEMO_NO_SHARE, t != DEMO_NO_SHARED_INFERENCE) for t in tenant_ids}
