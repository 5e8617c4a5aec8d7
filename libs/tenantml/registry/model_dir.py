"""Write MLflow model directories for many tenant models at ~file-copy cost, servable as they are.

Environment files are computed once per process and reused for every model; the MLmodel file is
rendered from a template with the per-tenant metadata and a signature built from the dataset spec.

A champion must load where tenantml is not installed (`mlflow models serve`, a serving endpoint,
`spark_udf` with a virtualenv): so the directory ships the small pure-Python runtime its loader
needs under `code/` (MLflow puts it on the path), and `requirements.txt` names only packages an
index serves, with version ranges (the driver's local build of torch, `+cu128` and the like, is
not installable anywhere else).

That runtime is its own top-level package (`tenantml_pyfunc`), a copy with its imports renamed:
MLflow puts `code/` first on `sys.path` of the process that loads the model, and a Spark Python
worker that ran `spark_udf` is reused for later tasks; a partial copy named `tenantml` would shadow
the installed platform there, and its next scoring task would fail to import `tenantml.scoring`.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import platform
import re
from pathlib import Path
from typing import Any

import yaml

from tenantml.registry.pyfunc_flavor import MODEL_FILE

RUNTIME_PACKAGE = "tenantml_pyfunc"
LOADER_MODULE = f"{RUNTIME_PACKAGE}.registry.pyfunc_flavor"
CODE_DIR = "code"
# What the loader imports: the package roots, the pure torch models and the loader itself.
RUNTIME_FILES = ("__init__.py", "models/__init__.py", "models/tabular.py", "models/metrics.py", "models/split.py",
                 "registry/__init__.py", "registry/pyfunc_flavor.py")
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _range(pkg: str) -> str:
    """``pkg>=X.Y,<X.(Y+1)`` from the installed version, local build suffix dropped; exact for mlflow
    (the model format), a major range for numpy and pandas."""
    version = re.split(r"[+]", md.version(pkg))[0]
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0]
    major, minor = parts[0], parts[1]
    if pkg == "mlflow":
        return f"mlflow=={version}"
    if pkg == "torch":
        return f"torch>={major}.{minor},<{major}.{minor + 1}"
    return f"{pkg}>={major}.{minor},<{major + 1}"


@functools.cache
def requirements() -> tuple[str, ...]:
    reqs = []
    for pkg in ("mlflow", "torch", "numpy", "pandas"):
        try:
            reqs.append(_range(pkg))
        except md.PackageNotFoundError:
            reqs.append(pkg)
    return tuple(reqs)


@functools.cache
def _env_files() -> dict[str, str]:
    py = platform.python_version()
    reqs = list(requirements())
    return {
        "requirements.txt": "\n".join(reqs) + "\n",
        "python_env.yaml": yaml.safe_dump({"python": py, "build_dependencies": ["pip"],
                                           "dependencies": ["-r requirements.txt"]}, sort_keys=False),
        "conda.yaml": yaml.safe_dump({"name": "mlflow-env", "channels": ["conda-forge"],
                                      "dependencies": [f"python={py}", "pip", {"pip": reqs}]},
                                     sort_keys=False),
    }


_IMPORTS = re.compile(rb"\b(from|import) tenantml\b")


@functools.cache
def _runtime() -> dict[str, bytes]:
    """The loader's files under their own package name, imports renamed to match."""
    return {f"{RUNTIME_PACKAGE}/{rel}": _IMPORTS.sub(rb"\1 " + RUNTIME_PACKAGE.encode(), (_PACKAGE_ROOT / rel).read_bytes())
            for rel in RUNTIME_FILES}


def signature(numeric: list[str], categorical: list[str]) -> dict[str, str]:
    """Inputs typed `any`: users' frames have integer, float and string columns, and a `double`
    column refuses int64 values (the model itself reads numbers from any of them)."""
    import json

    inputs = [{"name": c, "type": "any", "required": False} for c in [*numeric, *categorical]]
    outputs = [{"name": "score", "type": "double", "required": True},
               {"name": "prediction", "type": "double", "required": True}]
    return {"inputs": json.dumps(inputs), "outputs": json.dumps(outputs), "params": None}  # type: ignore[dict-item]


def write_model_dir(target: Path, blob: bytes, *, run_id: str, artifact_path: str,
                    numeric: list[str], categorical: list[str], metadata: dict[str, Any],
                    model_id: str | None = None) -> Path:
    """One MLflow pyfunc model directory; loadable by ``mlflow.pyfunc.load_model`` and servable.

    ``model_id`` (a LoggedModel's id) is written as MLflow 3's own ``log_model`` writes it, so the
    loaded model knows which LoggedModel it is (``PyFuncModel.model_id``)."""
    import mlflow

    target.mkdir(parents=True, exist_ok=True)
    (target / MODEL_FILE).write_bytes(blob)
    for name, text in _env_files().items():
        (target / name).write_text(text)
    for rel, data in _runtime().items():
        path = target / CODE_DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    mlmodel = {
        "artifact_path": artifact_path,
        "flavors": {
            "python_function": {
                "loader_module": LOADER_MODULE,
                "data": MODEL_FILE,
                "code": CODE_DIR,
                "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
                "python_version": platform.python_version(),
            }
        },
        "mlflow_version": mlflow.__version__,
        "run_id": run_id,
        "signature": signature(numeric, categorical),
        "metadata": metadata,
    }
    if model_id is not None:
        mlmodel["model_id"] = mlmodel["model_uuid"] = model_id
    # libyaml's dumper where installed: the same text, ~10x faster (a tenth of all tracking time per model)
    (target / "MLmodel").write_text(yaml.dump(mlmodel, Dumper=_DUMPER, sort_keys=False))
    return target


__all__ = ["CODE_DIR", "LOADER_MODULE", "RUNTIME_FILES", "RUNTIME_PACKAGE", "requirements", "signature", "write_model_dir"]
