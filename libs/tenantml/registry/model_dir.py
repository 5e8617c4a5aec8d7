"""Write MLflow model directories for many tenant models at ~file-copy cost.

Environment files are computed once per process and reused for every model; the MLmodel file is
rendered from a template with the per-tenant metadata and a signature built from the dataset spec.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import platform
from pathlib import Path
from typing import Any

import yaml

from tenantml.registry.pyfunc_flavor import MODEL_FILE

LOADER_MODULE = "tenantml.registry.pyfunc_flavor"
_RUNTIME_PACKAGES = ("tenantml", "torch", "numpy", "pandas", "mlflow")


@functools.cache
def _requirements() -> tuple[str, ...]:
    reqs = []
    for pkg in _RUNTIME_PACKAGES:
        try:
            reqs.append(f"{pkg}=={md.version(pkg)}")
        except md.PackageNotFoundError:
            reqs.append(pkg)
    return tuple(reqs)


@functools.cache
def _env_files() -> dict[str, str]:
    py = platform.python_version()
    reqs = list(_requirements())
    return {
        "requirements.txt": "\n".join(reqs) + "\n",
        "python_env.yaml": yaml.safe_dump({"python": py, "build_dependencies": ["pip"],
                                           "dependencies": ["-r requirements.txt"]}, sort_keys=False),
        "conda.yaml": yaml.safe_dump({"name": "mlflow-env", "channels": ["conda-forge"],
                                      "dependencies": [f"python={py}", "pip", {"pip": reqs}]},
                                     sort_keys=False),
    }


def _signature(numeric: list[str], categorical: list[str]) -> dict[str, str]:
    import json

    inputs = [{"name": c, "type": "double", "required": False} for c in numeric]
    inputs += [{"name": c, "type": "string", "required": False} for c in categorical]
    outputs = [{"name": "score", "type": "double", "required": True},
               {"name": "prediction", "type": "double", "required": True}]
    return {"inputs": json.dumps(inputs), "outputs": json.dumps(outputs), "params": None}  # type: ignore[dict-item]


def write_model_dir(target: Path, blob: bytes, *, run_id: str, artifact_path: str,
                    numeric: list[str], categorical: list[str], metadata: dict[str, Any]) -> Path:
    """One MLflow pyfunc model directory; loadable by ``mlflow.pyfunc.load_model``."""
    import mlflow

    target.mkdir(parents=True, exist_ok=True)
    (target / MODEL_FILE).write_bytes(blob)
    for name, text in _env_files().items():
        (target / name).write_text(text)
    mlmodel = {
        "artifact_path": artifact_path,
        "flavors": {
            "python_function": {
                "loader_module": LOADER_MODULE,
                "data": MODEL_FILE,
                "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
                "python_version": platform.python_version(),
            }
        },
        "mlflow_version": mlflow.__version__,
        "run_id": run_id,
        "signature": _signature(numeric, categorical),
        "metadata": metadata,
    }
    (target / "MLmodel").write_text(yaml.safe_dump(mlmodel, sort_keys=False))
    return target
