"""The MLflow ``python_function`` loader for tenantml models.

Any champion loads with the standard API: ``mlflow.pyfunc.load_model("models:/<name>@champion")``.
The directory is written by tenantml itself (see model_dir.py) rather than by ``log_model``, which
costs seconds per model in requirement inference; the result is the same MLflow model format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

MODEL_FILE = "model.tml"


class TenantModelWrapper:
    """pyfunc-compatible: returns a DataFrame with `score` (probability or value) and `prediction`."""

    def __init__(self, blob: bytes) -> None:
        from tenantml.models import TabularModel, resolve_device

        self.model = TabularModel.from_bytes(blob, device=resolve_device("auto"))

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        score = self.model.predict(model_input)
        if self.model.spec.task == "binary":
            threshold = float((params or {}).get("threshold", 0.5))
            return pd.DataFrame({"score": score, "prediction": (score >= threshold).astype("float64")})
        return pd.DataFrame({"score": score, "prediction": score})


def _load_pyfunc(data_path: str) -> TenantModelWrapper:
    path = Path(data_path)
    if path.is_dir():
        path = path / MODEL_FILE
    return TenantModelWrapper(path.read_bytes())
