"""JobContext: what every step needs (config, spark, tables, tracking), built lazily and replaceable.

Tests and notebooks hand in their own SparkSession; jobs build one from config. Nothing is started
at import time or before a step first asks for it.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantml.config import Config, load_config
from tenantml.core.errors import ConfigError
from tenantml.core.progress import NullProgress, Progress
from tenantml.io.tables import Tables

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from pyspark.sql import SparkSession

    from tenantml.io.scope import TenantScope

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """Sortable and unique: a timestamp for humans plus randomness for concurrent runs."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def git_commit(cwd: Path | None = None) -> str:
    """Recorded with every model; 'unknown' outside a git checkout (e.g. an installed wheel)."""
    env_commit = os.environ.get("TENANTML_GIT_COMMIT")
    if env_commit:
        return env_commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def exclusive_file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) across processes.

    Blocks until a lock held by another process is released; released on exit, also when that
    process dies. Where ``fcntl`` is unavailable it locks nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@dataclass
class JobContext:
    config: Config
    data_dir: Path
    run_id: str = field(default_factory=new_run_id)
    progress: Progress = field(default_factory=NullProgress)
    spark_session: SparkSession | None = None
    # Facts derived from one version of a Delta table (e.g. rows per tenant of silver at version
    # 12), shared by the steps of a run: a version never changes, so they are never stale.
    by_version: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)
    # (step, dataset) -> the run whose result stands, for the steps this run skipped as unchanged
    # (None: the step ran in this run).
    stood_on: dict[tuple[str, str], str | None] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, conf_dir: str | Path = "conf", env: str | None = None, data_dir: str | Path | None = None,
               spark: SparkSession | None = None, run_id: str | None = None,
               progress: Progress | None = None) -> JobContext:
        config = load_config(conf_dir, env)
        root = Path(data_dir or os.environ.get("TENANTML_DATA_DIR") or config.project.data_dir)
        if "\x00" in str(root):
            raise ConfigError(f"data directory {str(root)!r} is not a path")
        root = root.resolve()
        if root.exists() and not root.is_dir():
            raise ConfigError(f"data directory {root} exists and is not a folder")
        for parent in root.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"data directory {root}: {parent} is a file, not a folder")
                break
        ctx = cls(config=config, data_dir=root, spark_session=spark)
        if run_id:
            ctx.run_id = run_id
        if progress is not None:
            ctx.progress = progress
        return ctx

    @cached_property
    def spark(self) -> SparkSession:
        if self.spark_session is not None:
            return self.spark_session
        from tenantml.io.spark import get_or_build_spark

        sc = self.config.spark
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return get_or_build_spark(remote=sc.remote, master=sc.master, app_name=sc.app_name,
                                  shuffle_partitions=sc.shuffle_partitions,
                                  arrow_batch_size=self.config.scoring.arrow_batch_size,
                                  warehouse_dir=str(self.data_dir / "spark-warehouse"),
                                  extra_conf=sc.conf)

    @cached_property
    def tables(self) -> Tables:
        return Tables(self.config.tables, self.data_dir / "warehouse")

    @property
    def tracking_uri(self) -> str:
        uri = self.config.tracking.tracking_uri
        if uri:
            return uri
        db = self.data_dir / "mlflow" / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}"

    @property
    def registry_uri(self) -> str:
        return self.config.tracking.registry_uri or self.tracking_uri

    @property
    def artifact_location(self) -> str:
        loc = self.config.tracking.artifact_location
        if loc:
            return loc
        path = self.data_dir / "mlflow" / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()

    @cached_property
    def mlflow(self) -> MlflowClient:
        """A client bound to this context's store; the global mlflow URIs are set to match."""
        import mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri)
        # Opening a SQLite store that lacks its tables creates them (MLflow's migrations) and the
        # default experiment; two processes doing that at once fail ("table ... already exists",
        # "Online migration expected to match one row"). The client opens the tracking store as it
        # is built and the registry store on first use: do both under a lock on each SQLite file,
        # shared by every process using it.
        stores = [db for db in (_sqlite_path(self.tracking_uri), _sqlite_path(self.registry_uri)) if db]
        with ExitStack() as locks:
            for db in sorted(set(stores)):
                locks.enter_context(exclusive_file_lock(db.with_name(db.name + ".init.lock")))
            client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
            if _sqlite_path(self.registry_uri):
                client.search_registered_models(max_results=1)
        return client

    def experiment_id(self) -> str:
        client = self.mlflow
        name = self.config.tracking.experiment
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            # A managed tracking server (Databricks) keeps artifacts where the experiment's permissions
            # apply: a custom location would bypass them. Only the local store is given one.
            location = self.artifact_location if self.tracking_uri.startswith(("sqlite:", "file:")) or \
                self.config.tracking.artifact_location else None
            return str(client.create_experiment(name, artifact_location=location))
        except Exception:  # created concurrently by another run
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def dbutils(self) -> Any:
        """Databricks' dbutils for this session (secret scopes), or None off Databricks."""
        try:
            from pyspark.dbutils import DBUtils  # type: ignore[import-not-found]

            return DBUtils(self.spark)
        except ImportError:
            return None

    @cached_property
    def signing_key(self) -> bytes:
        """The key that signs model_store rows (`tracking.signing_key`), resolved once per context."""
        from tenantml.core.secrets import resolve_secret

        t = self.config.tracking
        return resolve_secret(t.signing_key, self.data_dir, key="tracking.signing_key",
                              generate=t.generate_local_signing_key,
                              generate_key="tracking.generate_local_signing_key", dbutils=self.dbutils())

    def scope(self, tenants: Iterable[str], step: str) -> TenantScope:
        """A tenant scope over ``tenants`` for ``step``: how steps and readers touch tenant data."""
        from tenantml.io.scope import TenantScope

        return TenantScope(lambda: self.spark, tenants, step, model_store=self.tables.model_store,
                           model_prefix=self.config.tracking.model_name_prefix,
                           datasets=tuple(self.config.datasets), data_dir=self.data_dir)

    def resolve_path(self, path: str) -> Path:
        """Config paths may start from the project data directory: ``${data_dir}/sources/x``."""
        return Path(path.replace("${data_dir}", str(self.data_dir)))

    @property
    def staging_dir(self) -> Path:
        """`training.staging_dir`: where training leaves files for processes on other machines
        (executors), so it must be a folder every one of them sees; default <data_dir>/staging."""
        configured = self.config.training.staging_dir
        path = self.resolve_path(configured) if configured else self.data_dir / "staging"
        return path if path.is_absolute() else self.data_dir / path

    def source_path(self, dataset: str) -> Path:
        _, spec = self.config.dataset(dataset)
        if spec.source.path is None:
            raise ConfigError(f"dataset {dataset!r} reads table {spec.source.table!r}, not files")
        return self.resolve_path(spec.source.path)


__all__ = ["JobContext", "git_commit", "load_config", "new_run_id"]
