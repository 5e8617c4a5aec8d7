"""Reproducible holdout splits, identical for a tenant no matter which process computes them."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def stable_seed(*parts: str | int) -> int:
    """32-bit seed from a SHA-256 of the parts; hash() is salted per process, so it cannot be used."""
    h = hashlib.sha256()
    for part in parts:
        token = f"{type(part).__name__}:{part}".encode()
        # Length-prefix each part so ("ab", "c") and ("a", "bc") differ.
        h.update(len(token).to_bytes(8, "big") + token)
    return int.from_bytes(h.digest()[:4], "big")


def _n_test(n: int, test_fraction: float) -> int:
    return min(max(1, round(n * test_fraction)), n - 1)


def holdout_split(
    df: pd.DataFrame, test_fraction: float, seed: int, event_time: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split into (train, test), both in the original row order.

    With event_time, the latest rows form the test set so evaluation mimics scoring the future;
    rows without an event time go to train. If no row has an event time, test is empty.
    Otherwise a seeded random split. With len(df) >= 2 both sides get at least one row
    (time-based: test as long as some event time is present); a single row goes to train.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(df)
    if n < 2:
        return df, df.iloc[0:0]
    n_test = _n_test(n, test_fraction)
    if event_time is None:
        test_pos = np.random.default_rng(seed).permutation(n)[:n_test]
    else:
        if event_time not in df.columns:
            raise ValueError(f"event_time column {event_time!r} is missing")
        times = pd.Series(df[event_time].array, index=np.arange(n))
        ordered = times[times.notna()].sort_values(kind="stable").index.to_numpy()
        test_pos = ordered[len(ordered) - min(n_test, len(ordered)) :]
    is_test = np.zeros(n, dtype=bool)
    is_test[test_pos] = True
    return df.iloc[np.flatnonzero(~is_test)], df.iloc[np.flatnonzero(is_test)]


def tenant_split(
    pdf: pd.DataFrame,
    tenant_id: str,
    key: str,
    *,
    test_fraction: float,
    seed: int,
    event_time: str | None = None,
    max_rows: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, int | None]:
    """(train, holdout, sampled_from) for one tenant, independent of the order rows arrived in.

    Every strategy (tenant, shared, tuned) and the promotion step call this with the same
    arguments, so every candidate is judged on exactly the same holdout rows, and the shared
    training set can exclude them. Rows are ordered by entity key first; a row quota samples
    with a tenant-derived seed (``sampled_from`` is the size before sampling, else None).
    """
    if key not in pdf.columns:
        raise ValueError(f"entity key column {key!r} is missing")
    ordered = pdf.sort_values(key, kind="stable").reset_index(drop=True)
    sampled_from = None
    if max_rows is not None and len(ordered) > max_rows:
        sampled_from = len(ordered)
        ordered = ordered.sample(n=max_rows, random_state=stable_seed(tenant_id, "quota") % (2**31))
        ordered = ordered.sort_values(key, kind="stable").reset_index(drop=True)
    train, test = holdout_split(ordered, test_fraction, stable_seed(tenant_id, seed), event_time)
    return train, test, sampled_from
