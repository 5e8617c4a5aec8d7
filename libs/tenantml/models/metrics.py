"""Evaluation metrics in plain numpy, so scoring adds no dependency beyond the model itself."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from tenantml.models.tabular import Task

ArrayLike = npt.ArrayLike


def _pair(y_true: ArrayLike, other: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(y_true, dtype=np.float64).reshape(-1)
    b = np.asarray(other, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"length mismatch: y_true has {a.size} values, predictions have {b.size}")
    return a, b


def roc_auc(y_true: ArrayLike, score: ArrayLike) -> float:
    """Mann-Whitney U with average ranks for ties; NaN when AUC is undefined (one class)."""
    y, s = _pair(y_true, score)
    positive = y == 1
    n_pos = int(positive.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average 1-based rank of each tie group: last rank of the group minus half its extra width.
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def rmse(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    y, p = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean((y - p) ** 2))) if y.size else math.nan


def mae(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    y, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(y - p))) if y.size else math.nan


def log_loss(y_true: ArrayLike, p: ArrayLike, eps: float = 1e-7) -> float:
    y, q = _pair(y_true, p)
    if not y.size:
        return math.nan
    q = np.clip(q, eps, 1 - eps)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def accuracy(y_true: ArrayLike, p: ArrayLike, threshold: float = 0.5) -> float:
    y, q = _pair(y_true, p)
    return float(np.mean((q >= threshold) == (y == 1))) if y.size else math.nan


def evaluate(y_true: ArrayLike, y_pred: ArrayLike, task: Task) -> dict[str, float]:
    if task == "binary":
        return {
            "auc": roc_auc(y_true, y_pred),
            "log_loss": log_loss(y_true, y_pred),
            "accuracy": accuracy(y_true, y_pred),
        }
    if task == "regression":
        return {"rmse": rmse(y_true, y_pred), "mae": mae(y_true, y_pred)}
    raise ValueError(f"unknown task {task!r}")


def primary_metric(task: Task) -> tuple[str, bool]:
    """(metric name, higher is better) used to compare a model with its baseline or predecessor."""
    if task == "binary":
        return "auc", True
    if task == "regression":
        return "rmse", False
    raise ValueError(f"unknown task {task!r}")


def baseline_predictions(y_train: ArrayLike, n: int, task: Task) -> np.ndarray:
    """The constant predictor a model must beat to be worth serving."""
    y = np.asarray(y_train, dtype=np.float64).reshape(-1)
    if not y.size:
        raise ValueError("baseline needs at least one training label")
    if task not in ("binary", "regression"):
        raise ValueError(f"unknown task {task!r}")
    return np.full(n, float(y.mean()), dtype=np.float64)
