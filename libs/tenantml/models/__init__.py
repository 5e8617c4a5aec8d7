"""Tabular torch models for per-tenant training; pure torch/numpy/pandas (no Spark, no MLflow)."""

from tenantml.models.metrics import (
    accuracy,
    baseline_predictions,
    evaluate,
    log_loss,
    mae,
    primary_metric,
    rmse,
    roc_auc,
)
from tenantml.models.split import holdout_split, stable_seed
from tenantml.models.tabular import (
    FORMAT_VERSION,
    MAX_VOCABULARY,
    FeatureSpec,
    FitResult,
    Preprocessor,
    TabularModel,
    TabularNet,
    Task,
    TrainParams,
    embedding_dim,
    fit_tabular,
    resolve_device,
)

__all__ = [
    "FORMAT_VERSION",
    "MAX_VOCABULARY",
    "FeatureSpec",
    "FitResult",
    "Preprocessor",
    "TabularModel",
    "TabularNet",
    "Task",
    "TrainParams",
    "accuracy",
    "baseline_predictions",
    "embedding_dim",
    "evaluate",
    "fit_tabular",
    "holdout_split",
    "log_loss",
    "mae",
    "primary_metric",
    "resolve_device",
    "rmse",
    "roc_auc",
    "stable_seed",
]
