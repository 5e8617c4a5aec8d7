"""A test double of Unity Catalog's model registry: MLflow's SQL registry store, refusing what the
Unity Catalog registry store refuses (the one thing here that stands in for a Databricks workspace).

The limits come from MLflow's own Unity Catalog client (mlflow/store/_unity_catalog/registry/
rest_store.py and uc_oss_rest_store.py): filtered or ordered `search_registered_models`, ordered
`search_model_versions` or one filtering on anything but a single `name = '...'`, stages and
`get_latest_versions`; three-level names (`catalog.schema.model`) in Unity Catalog's lower-case
characters; and a model version whose model has no signature with outputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

SCHEME = "uc-double"
_NAME_RE = re.compile(r"^[a-z0-9_]+\.[a-z0-9_]+\.[a-z0-9_]+$")
_NAME_FILTER_RE = re.compile(r"^\s*name\s*=\s*'[^']*'\s*$")
calls: list[str] = []


def _refuse(what: str) -> MlflowException:
    return MlflowException(f"Unity Catalog registry (test double): {what} is not supported")


class UnityCatalogRegistryDouble(SqlAlchemyStore):
    def __init__(self, store_uri: str) -> None:
        super().__init__("sqlite:///" + store_uri.split("://", 1)[1])  # uc-double:///abs/path.db

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME_RE.fullmatch(name):
            raise _refuse(f"model name {name!r} (three-level, lower-case letters, digits and '_')")

    def create_registered_model(self, name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append("create_registered_model")
        self._check_name(name)
        return super().create_registered_model(name, *args, **kwargs)

    def search_registered_models(self, filter_string: str | None = None, max_results: Any = None,
                                 order_by: Any = None, page_token: Any = None) -> Any:
        calls.append("search_registered_models")
        if filter_string:
            raise _refuse("search_registered_models with a filter_string")
        if order_by:
            raise _refuse("search_registered_models with order_by")
        return super().search_registered_models(None, max_results, None, page_token)

    def search_model_versions(self, filter_string: str | None = None, max_results: Any = None,
                              order_by: Any = None, page_token: Any = None) -> Any:
        calls.append("search_model_versions")
        if order_by:
            raise _refuse("search_model_versions with order_by")
        if not filter_string or not _NAME_FILTER_RE.fullmatch(filter_string):
            raise _refuse(f"search_model_versions filter {filter_string!r} (only name = '<catalog.schema.model>')")
        return super().search_model_versions(filter_string, max_results, None, page_token)

    def get_latest_versions(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse("get_latest_versions (stages)")

    def transition_model_version_stage(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse("model version stages")

    def create_model_version(self, name: str, source: str, run_id: str | None = None, tags: Any = None,
                             run_link: str | None = None, description: str | None = None, *args: Any,
                             **kwargs: Any) -> Any:
        calls.append("create_model_version")
        self._check_name(name)
        if run_link:
            raise _refuse("run_link on create_model_version")
        mlmodel = Path(urlparse(source).path) / "MLmodel"
        if not mlmodel.is_file():
            raise _refuse(f"a model version whose source {source} holds no MLmodel file")
        signature = (yaml.safe_load(mlmodel.read_text()) or {}).get("signature") or {}
        if not signature.get("outputs"):
            raise _refuse("a model version without a signature with outputs")
        return super().create_model_version(name, source, run_id, tags, run_link, description, *args, **kwargs)


def register() -> None:
    """Make `uc-double:///<path to a sqlite file>` a registry URI in this process."""
    from mlflow.tracking._model_registry.utils import _get_store_registry

    _get_store_registry().register(SCHEME, lambda store_uri=None, **_: UnityCatalogRegistryDouble(store_uri))
