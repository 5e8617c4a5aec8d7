"""Feature and prediction drift of a scoring batch against the champion model's training rows.

A *reference profile* is computed once, when a model is trained, from its training rows: per
numeric feature quantile bin edges and the share of rows per bin, per categorical feature the shares
of its most frequent values, and the distribution of the model's scores. It is plain JSON, so it can
be logged with the model. Each scoring batch is then bucketed with the same rules and compared with
the population stability index (PSI), per tenant and feature.

Bucket rules, shared by the pandas and the Spark code:

* numeric (and score) features: interior edges ``e_1 < ... < e_k`` give ``k + 1`` bins open at
  both ends, ``(-inf, e_1), [e_1, e_2), ..., [e_k, inf)``; a value's bin is the number of edges
  ``<= value``. Missing (null, NaN, +-inf, unparseable) is one more bin, the last.
* categorical features: one bin per reference category (compared as strings, integral floats
  printed as ints), then ``__other__`` for every value not in the reference, then missing (null/NaN).

The pandas part (`reference_profile`, `bin_counts`, `psi`, `drift_report`) needs no Spark;
`drift_by_tenant` does the bucketing for all tenants in one Spark query and finishes the PSI on the
driver, with the same `psi`.

Small batches: a batch's PSI is computed with half a row added to every bin of both sides
(Jeffreys smoothing, ``SMOOTHING``), so a bin that a batch of 50 rows happens to leave empty is
not a near-infinite term; for batches of thousands of rows it is the textbook PSI. Even so a PSI
over few rows is noisy: with no drift at all, ten bins and 50 rows, a third of features exceed the
usual 0.25 alert level. `psi_noise_level` is the PSI that sampling noise alone exceeds with a given
probability, ``chi2_q(bins - 1) * (1/rows + 1/reference_rows)`` (the smoothed PSI is a Jeffreys
divergence, asymptotically chi-square); each report row carries it as ``noise_psi`` so a caller can
ask for drift that is both material (above the alert level) and real (above the noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from tenantml.io.spark import local_frame
from tenantml.models.tabular import category_strings

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

PROFILE_VERSION = 1
OTHER = "__other__"
SCORE_FEATURE = "__score__"  # the `feature` of the prediction-drift row
KINDS = ("numeric", "categorical", "prediction")
REPORT_COLUMNS = ["tenant_id", "feature", "kind", "psi", "rows", "missing_share", "noise_psi"]
SMOOTHING = 0.5  # rows added to every bin of both sides of a batch's PSI (Jeffreys prior)
NOISE_CONFIDENCE = 0.99  # drift_report's default confidence for noise_psi


# ---------------------------------------------------------------------------------------- profile


def _numeric_array(values: Any) -> np.ndarray:
    """Float64 values with everything missing, non-finite or unparseable as NaN."""
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values, dtype=object))
    if not pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        series = pd.to_numeric(series.astype(object), errors="coerce")
    out = series.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(out), out, np.nan)


def _category_keys(values: Any) -> tuple[np.ndarray, np.ndarray]:
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    return category_strings(series.reset_index(drop=True))


def _shares(counts: np.ndarray) -> list[float]:
    total = float(counts.sum())
    return [float(c) / total for c in counts]


def _numeric_profile(values: np.ndarray, edges: Sequence[float], kind: str) -> dict[str, Any]:
    profile: dict[str, Any] = {"kind": kind, "edges": [float(e) for e in edges]}
    counts = bin_counts(values, profile)
    profile["shares"] = _shares(counts)
    profile["missing_share"] = profile["shares"][-1]
    return profile


def _quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0 or bins < 2:
        return []
    edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    return [float(e) for e in edges]


def _categorical_profile(values: Any, max_categories: int) -> dict[str, Any]:
    keys, missing = _category_keys(values)
    counts = pd.Series(keys[~missing], dtype=object).value_counts()
    # Sort by value first so frequency ties are cut deterministically (as the model vocabularies are).
    counts = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    profile: dict[str, Any] = {"kind": "categorical",
                               "categories": [str(k) for k in counts.index[:max_categories]]}
    shares = _shares(bin_counts(values, profile))
    profile["shares"] = shares
    profile["other_share"] = shares[-2]
    profile["missing_share"] = shares[-1]
    return profile


def reference_profile(
    train: pd.DataFrame,
    numeric: Sequence[str],
    categorical: Sequence[str],
    scores: npt.ArrayLike | None = None,
    task: str = "binary",
    bins: int = 10,
    max_categories: int = 20,
) -> dict[str, Any]:
    """Reference distributions of a model's training rows, as plain JSON (lists, floats, strings).

    ``scores`` are the model's scores of those rows; binary scores get ``bins`` equal-width bins on
    [0, 1], regression scores quantile bins like a numeric feature.
    """
    if task not in ("binary", "regression"):
        raise ValueError(f"task must be 'binary' or 'regression', got {task!r}")
    if bins < 1 or max_categories < 0:
        raise ValueError(f"bins must be >= 1 and max_categories >= 0, got {bins} and {max_categories}")
    n = len(train)
    if n == 0:
        raise ValueError("a reference profile needs at least one training row")
    absent = [c for c in (*numeric, *categorical) if c not in train.columns]
    if absent:
        raise ValueError(f"feature columns missing from the training frame: {absent}")
    profile: dict[str, Any] = {
        "version": PROFILE_VERSION, "task": task, "rows": int(n), "bins": int(bins),
        "max_categories": int(max_categories),
        "numeric": {}, "categorical": {}, "prediction": None,
    }
    for column in numeric:
        values = _numeric_array(train[column])
        profile["numeric"][column] = _numeric_profile(values, _quantile_edges(values, bins), "numeric")
    for column in categorical:
        profile["categorical"][column] = _categorical_profile(train[column], max_categories)
    if scores is not None:
        s = _numeric_array(np.asarray(scores, dtype=np.float64).reshape(-1))
        if s.size != n:
            raise ValueError(f"{s.size} scores for {n} training rows")
        edges = [i / bins for i in range(1, bins)] if task == "binary" else _quantile_edges(s, bins)
        profile["prediction"] = _numeric_profile(s, edges, "prediction")
    return profile


def feature_profile(profile: Mapping[str, Any], feature: str, kind: str) -> dict[str, Any] | None:
    """The profile of one feature (``kind`` 'numeric', 'categorical' or 'prediction'), or None."""
    if kind == "prediction":
        return profile.get("prediction")
    if kind not in ("numeric", "categorical"):
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    found: dict[str, Any] | None = profile.get(kind, {}).get(feature)
    return found


# ------------------------------------------------------------------------------------ bucketing


def bin_counts(values: Any, feature_profile: Mapping[str, Any]) -> np.ndarray:
    """Rows per bin of ``feature_profile`` (the bins, then missing last), as int64."""
    if feature_profile["kind"] == "categorical":
        categories = list(feature_profile["categories"])
        keys, missing = _category_keys(values)
        index = pd.Index(categories, dtype=object)
        codes = index.get_indexer(keys) if len(keys) else np.empty(0, dtype=np.int64)
        codes = np.where(codes < 0, len(categories), codes)  # unseen -> __other__
        codes[missing] = len(categories) + 1
        return np.bincount(codes, minlength=len(categories) + 2).astype(np.int64)
    edges = np.asarray(feature_profile["edges"], dtype=np.float64)
    v = _numeric_array(values)
    missing = np.isnan(v)
    codes = np.searchsorted(edges, v[~missing], side="right")
    counts = np.bincount(codes, minlength=edges.size + 1).astype(np.int64)
    return np.append(counts, np.int64(missing.sum()))


def psi(
    expected_shares: npt.ArrayLike,
    actual_counts_or_shares: npt.ArrayLike,
    eps: float = 1e-4,
    expected_rows: int | None = None,
    smoothing: float = 0.0,
) -> float:
    """Population stability index ``sum((a - e) * ln(a / e))`` over the bins (missing included).

    Both sides are normalised to shares. With ``smoothing`` > 0, ``actual`` must be counts and
    that many rows are added to every bin of it, and of the expected side too when
    ``expected_rows`` says how many rows its shares came from; the bins still empty are raised to
    ``eps`` so the log stays finite. NaN when ``actual`` is empty.
    """
    e = np.asarray(expected_shares, dtype=np.float64).reshape(-1)
    a = np.asarray(actual_counts_or_shares, dtype=np.float64).reshape(-1)
    if e.shape != a.shape:
        raise ValueError(f"{e.size} expected bins but {a.size} actual bins")
    if a.sum() <= 0 or e.sum() <= 0:
        return math.nan
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    e = e / e.sum()
    if smoothing:
        a = a + smoothing
        if expected_rows:
            e = e * expected_rows + smoothing
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_noise_level(expected_shares: npt.ArrayLike, rows: int, expected_rows: int | None = None,
                    confidence: float = NOISE_CONFIDENCE) -> float:
    """The PSI that a batch of ``rows`` rows drawn from the reference's own distribution exceeds
    with probability ``1 - confidence``: ``chi2_q(bins - 1) * (1/rows + 1/expected_rows)``, over
    the bins with a positive expected share. Checked against simulated batches in the tests; with
    Jeffreys smoothing it holds from about 50 rows. NaN for an empty batch."""
    from scipy.stats import chi2

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    e = np.asarray(expected_shares, dtype=np.float64).reshape(-1)
    if rows <= 0:
        return math.nan
    dof = max(int(np.count_nonzero(e > 0)) - 1, 1)
    spread = 1.0 / rows + (1.0 / expected_rows if expected_rows else 0.0)
    return float(chi2.ppf(confidence, dof) * spread)


def classify_psi(psi: float, warn: float = 0.1, alert: float = 0.25) -> str:
    """'drift' from ``alert`` up, 'warn' from ``warn`` up, else 'stable' (also for NaN: no rows)."""
    if warn > alert:
        raise ValueError(f"warn threshold {warn} is above the alert threshold {alert}")
    if psi >= alert:
        return "drift"
    if psi >= warn:
        return "warn"
    return "stable"


def _report_row(feature: str, kind: str, fp: Mapping[str, Any], counts: np.ndarray, reference_rows: int | None,
                confidence: float) -> dict[str, Any]:
    rows = int(counts.sum())
    return {"feature": feature, "kind": kind,
            "psi": psi(fp["shares"], counts, expected_rows=reference_rows, smoothing=SMOOTHING), "rows": rows,
            "missing_share": float(counts[-1]) / rows if rows else math.nan,
            "noise_psi": psi_noise_level(fp["shares"], rows, reference_rows, confidence)}


def _reference_rows(profile: Mapping[str, Any]) -> int | None:
    rows = profile.get("rows")
    return int(rows) if rows else None


def _features(numeric: Sequence[str], categorical: Sequence[str], with_score: bool) -> list[tuple[str, str]]:
    """(feature, kind) pairs in report order; the score row is named ``__score__``."""
    out = [(f, "numeric") for f in numeric] + [(f, "categorical") for f in categorical]
    return [*out, (SCORE_FEATURE, "prediction")] if with_score else out


def drift_report(
    profile: Mapping[str, Any],
    frame: pd.DataFrame,
    numeric: Sequence[str],
    categorical: Sequence[str],
    scores: npt.ArrayLike | None = None,
    confidence: float = NOISE_CONFIDENCE,
) -> list[dict[str, Any]]:
    """Drift of one tenant's batch: ``{feature, kind, psi, rows, missing_share, noise_psi}`` per
    feature (``noise_psi``: `psi_noise_level` at ``confidence``).

    The score row has feature ``__score__`` and kind 'prediction'. A feature (or the scores) absent
    from the profile raises ValueError.
    """
    wanted = _features(numeric, categorical, scores is not None)
    unknown = [f for f, kind in wanted if feature_profile(profile, f, kind) is None]
    if unknown:
        raise ValueError(f"features not in the reference profile: {unknown}")
    out = []
    for feature, kind in wanted:
        fp = feature_profile(profile, feature, kind)
        assert fp is not None
        if kind == "prediction":
            s = np.asarray(scores, dtype=np.float64).reshape(-1)
            if s.size != len(frame):
                raise ValueError(f"{s.size} scores for {len(frame)} rows")
            counts = bin_counts(s, fp)
        else:
            counts = bin_counts(frame[feature], fp)
        out.append(_report_row(feature, kind, fp, counts, _reference_rows(profile), confidence))
    return out


# ------------------------------------------------------------------------------------------ Spark


def _quoted(name: str) -> Column:
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def _as_double(df: DataFrame, name: str) -> Column:
    from pyspark.sql.types import NumericType, StringType

    col = _quoted(name)
    dtype = df.schema[name].dataType
    if isinstance(dtype, NumericType):
        return col.cast("double")
    return (col if isinstance(dtype, StringType) else col.cast("string")).try_cast("double")


def _as_category(df: DataFrame, name: str) -> Column:
    """String keys; float columns print integral values as ints and treat NaN as missing."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, FloatType

    col = _quoted(name)
    if isinstance(df.schema[name].dataType, DoubleType | FloatType):
        x = col.cast("double")
        integral = (F.abs(x) < F.lit(float(2**53))) & (x == F.floor(x))
        return (F.when(x.isNull() | F.isnan(x), F.lit(None).cast("string"))
                .when(integral, x.cast("bigint").cast("string"))
                .otherwise(x.cast("string")))
    return col.cast("string")


def drift_by_tenant(
    df: DataFrame,
    profiles: Mapping[str, Mapping[str, Any]],
    numeric: Sequence[str],
    categorical: Sequence[str],
    score_col: str | None,
    tenant_col: str = "tenant_id",
    confidence: float = NOISE_CONFIDENCE,
) -> pd.DataFrame:
    """`drift_report` for every tenant of ``df`` in one Spark query (one collect).

    The rows are unpivoted to (tenant, feature, value), joined to a broadcast table of each tenant's
    bin edges / categories, bucketed with SQL higher-order functions and counted per (tenant,
    feature, bucket); the few counts are collected and the PSI is finished on the driver. The score
    row's feature is ``__score__``. Columns: tenant_id, feature, kind, psi, rows, missing_share,
    noise_psi.
    However many tenants, this is three Spark jobs under adaptive execution (the bins' broadcast,
    the shuffle map stage, the result stage).

    Tenants without a profile are skipped and listed in ``result.attrs["missing_profile"]``;
    features a tenant's profile lacks are skipped and listed per tenant in
    ``result.attrs["missing_features"]``. Rows with a null tenant are ignored.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, DoubleType, IntegerType, StringType, StructField, StructType

    wanted = _features(numeric, categorical, score_col is not None)
    spec_rows: list[tuple[str, str, int, list[float], list[str]]] = []
    for tenant, profile in profiles.items():
        for feature, kind in wanted:
            fp = feature_profile(profile, feature, kind)
            if fp is None:
                continue
            code = KINDS.index(kind)
            if kind == "categorical":
                spec_rows.append((str(tenant), feature, code, [], [str(c) for c in fp["categories"]]))
            else:
                spec_rows.append((str(tenant), feature, code, [float(e) for e in fp["edges"]], []))
    spec_schema = StructType([
        StructField("_tenant", StringType(), False), StructField("_feature", StringType(), False),
        StructField("_code", IntegerType(), False), StructField("_edges", ArrayType(DoubleType(), False)),
        StructField("_categories", ArrayType(StringType(), False)),
    ])
    spark = df.sparkSession
    spec = local_frame(spark, spec_rows, spec_schema)

    # Unpivot: one row per (row, feature) with the value as a double (x) or a string key (c).
    null_x, null_c = F.lit(None).cast("double"), F.lit(None).cast("string")
    cells = []
    for feature, kind in wanted:
        source = score_col if kind == "prediction" else feature
        assert source is not None
        if kind == "categorical":
            x, c = null_x, _as_category(df, source)
        else:
            x, c = _as_double(df, source), null_c
        cells.append(F.struct(F.lit(feature).alias("_feature"), x.alias("_x"), c.alias("_c")))
    if not cells:
        raise ValueError("nothing to compare: no numeric, categorical or score column given")
    long = (df.where(_quoted(tenant_col).isNotNull())
            .select(_quoted(tenant_col).cast("string").alias("_tenant"), F.inline(F.array(*cells))))
    joined = long.join(F.broadcast(spec), on=["_tenant", "_feature"], how="left")

    x, c = F.col("_x"), F.col("_c")
    edges, categories = F.col("_edges"), F.col("_categories")
    x_missing = x.isNull() | F.isnan(x) | (F.abs(x) == F.lit(float("inf")))
    numeric_bucket = F.when(x_missing, F.size(edges) + 1).otherwise(F.size(F.filter(edges, lambda e: e <= x)))
    position = F.array_position(categories, c)
    categorical_bucket = (F.when(c.isNull(), F.size(categories) + 1)
                          .when(position == 0, F.size(categories))
                          .otherwise(position - 1))
    bucket = (F.when(F.col("_code").isNull(), F.lit(-1))  # no profile for this tenant / feature
              .when(F.col("_code") == KINDS.index("categorical"), categorical_bucket)
              .otherwise(numeric_bucket)).cast("int")
    counted = joined.groupBy("_tenant", "_feature", bucket.alias("_bucket")).count().collect()

    counts: dict[tuple[str, str], dict[int, int]] = {}
    for row in counted:
        counts.setdefault((row["_tenant"], row["_feature"]), {})[int(row["_bucket"])] = int(row["count"])
    missing_profile = sorted({t for (t, _), by in counts.items() if -1 in by and t not in profiles})
    missing_features: dict[str, list[str]] = {}
    out: list[dict[str, Any]] = []
    for tenant in sorted({t for t, _ in counts if t in profiles}):
        for feature, kind in wanted:
            by_bucket = counts.get((tenant, feature), {})
            fp = feature_profile(profiles[tenant], feature, kind)
            if fp is None:
                missing_features.setdefault(tenant, []).append(feature)
                continue
            vector = np.zeros(len(fp["shares"]), dtype=np.int64)
            for b, n in by_bucket.items():
                vector[b] += n
            out.append({"tenant_id": tenant, **_report_row(feature, kind, fp, vector, _reference_rows(profiles[tenant]),
                                                             confidence)})
    result = pd.DataFrame(out, columns=REPORT_COLUMNS)
    result["rows"] = result["rows"].astype("int64")
    result.attrs["missing_profile"] = missing_profile
    result.attrs["missing_features"] = missing_features
    return result
