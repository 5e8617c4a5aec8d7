"""Per-tenant model monitoring: feature and prediction drift of scoring batches, realised metrics.

Pure numpy/pandas building blocks plus Spark versions that cover all tenants in one query; Spark is
imported only inside the functions that need it.
"""

from tenantml.monitoring.drift import (
    OTHER,
    PROFILE_VERSION,
    SCORE_FEATURE,
    bin_counts,
    classify_psi,
    drift_by_tenant,
    drift_report,
    feature_profile,
    psi,
    psi_noise_level,
    reference_profile,
)
from tenantml.monitoring.realised import realised_metrics, realised_metrics_pandas

__all__ = [
    "OTHER",
    "PROFILE_VERSION",
    "SCORE_FEATURE",
    "bin_counts",
    "classify_psi",
    "drift_by_tenant",
    "drift_report",
    "feature_profile",
    "psi",
    "psi_noise_level",
    "realised_metrics",
    "realised_metrics_pandas",
    "reference_profile",
]
