"""The configuration schema: typed, validated data and nothing else.

Unknown keys, missing keys and type errors are rejected before any work starts. Rules that apply
the settings (tiers, quotas, budgets, entitlement) live with the code that applies them
(`tenantml.training.plan`, `tenantml.core.policy`), so the schema stays data.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tenantml.core.errors import ConfigError
from tenantml.core.ids import is_valid_tenant_id
from tenantml.core.secrets import check_reference

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_column(name: str) -> str:
    if not _COLUMN_RE.fullmatch(name):
        raise ValueError(f"column name {name!r} is not allowed (letters, digits, '_', ' ', '.', '-')")
    return name


class SourceSpec(_Strict):
    """Where a dataset's raw rows come from: files (csv, parquet, json) or an existing table."""

    path: str | None = None
    table: str | None = None
    format: Literal["csv", "parquet", "json", "delta", "table"] = "csv"
    options: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_location(self) -> SourceSpec:
        if (self.path is None) == (self.table is None):
            raise ValueError("give exactly one of 'path' or 'table'")
        if self.table is not None and self.format not in ("table", "delta"):
            raise ValueError("a 'table' source needs format 'table' or 'delta'")
        if self.path is not None and self.format == "table":
            raise ValueError("format 'table' needs 'table' (a catalog name), not 'path'")
        return self


class RangeRule(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> RangeRule:
        if self.min is None and self.max is None:
            raise ValueError("a range needs 'min', 'max' or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is above max {self.max}")
        return self


class ValidationRules(_Strict):
    """Row rules; they compile into a Great Expectations suite (see tenantml.quality)."""

    not_null: list[str] = Field(default_factory=list)
    ranges: dict[str, RangeRule] = Field(default_factory=dict)
    allowed_values: dict[str, list[str]] = Field(default_factory=dict)
    unique_key: bool = True
    max_rejected_fraction: float | None = Field(default=None, ge=0.0, le=1.0)


class DatasetSpec(_Strict):
    """A user's dataset: where it is, who owns each row, what to predict from what."""

    source: SourceSpec
    # Rows that need predictions: the same columns as `source` minus the label (optional).
    scoring_source: SourceSpec | None = None
    tenant_column: str
    entity_key: str
    label: str
    task: Literal["binary", "regression"]
    positive_label: str | None = None
    numeric_features: list[str] = Field(default_factory=list)
    categorical_features: list[str] = Field(default_factory=list)
    pii_columns: list[str] = Field(default_factory=list)
    event_time: str | None = None
    rules: ValidationRules = Field(default_factory=ValidationRules)

    @field_validator("tenant_column", "entity_key", "label", "event_time")
    @classmethod
    def _col(cls, v: str | None) -> str | None:
        return None if v is None else _check_column(v)

    @field_validator("numeric_features", "categorical_features", "pii_columns")
    @classmethod
    def _cols(cls, v: list[str]) -> list[str]:
        return [_check_column(c) for c in v]

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if not self.numeric_features and not self.categorical_features:
            raise ValueError("declare at least one of numeric_features / categorical_features")
        feats = self.numeric_features + self.categorical_features
        dup = sorted({c for c in feats if feats.count(c) > 1})
        if dup:
            raise ValueError(f"columns declared twice as features: {dup}")
        for special in (self.tenant_column, self.entity_key, self.label):
            if special in feats:
                raise ValueError(f"column {special!r} cannot be both a feature and tenant/key/label")
        leaked = sorted(set(self.pii_columns) & set(feats))
        if leaked:
            raise ValueError(f"PII columns {leaked} cannot be model features")
        declared = set(self.declared_columns)
        undeclared = sorted({*self.rules.not_null, *self.rules.ranges, *self.rules.allowed_values} - declared)
        if undeclared:
            raise ValueError(f"rules name undeclared column(s) {undeclared}")
        if self.task == "regression" and self.positive_label is not None:
            raise ValueError("positive_label only applies to task 'binary'")
        return self

    @property
    def feature_columns(self) -> list[str]:
        return [*self.numeric_features, *self.categorical_features]

    @property
    def scoring_columns(self) -> list[str]:
        """The columns a scoring batch carries: every declared column but the label."""
        return [c for c in self.declared_columns if c != self.label]

    @property
    def declared_columns(self) -> list[str]:
        """Every source column the platform reads; order is stable and duplicates removed."""
        cols = [self.tenant_column, self.entity_key, self.label, *self.feature_columns,
                *self.pii_columns]
        if self.event_time:
            cols.append(self.event_time)
        return list(dict.fromkeys(cols))


class ProjectConfig(_Strict):
    name: str = "tenantml"
    data_dir: str = ".data"
    default_dataset: str = "demo"


class SparkConfig(_Strict):
    master: str = "local[2]"
    # Spark Connect instead of a classic session: a URL (`sc://host:port/;token=...`) or a local
    # master (`local[2]`: a Connect server in this process). Unset, `SPARK_REMOTE` may set it.
    remote: str | None = None
    app_name: str = "tenantml"
    shuffle_partitions: int = Field(default=4, ge=1)
    conf: dict[str, str] = Field(default_factory=dict)


class TablesConfig(_Strict):
    """Local path-based Delta by default; a catalog + schema make names `catalog.schema.table`."""

    catalog: str | None = None
    schema_: str | None = Field(default=None, alias="schema")
    location: str | None = None
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TrackingConfig(_Strict):
    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "tenantml"
    model_name_prefix: str = ""
    champion_alias: str = "champion"
    # Every tenant candidate is an MLflow LoggedModel of the job's run; true also gives each tenant a
    # child run per job (the old layout: 10,000 tenants x 3 candidates nightly reach Databricks'
    # 500,000-runs-per-experiment cap in about two weeks).
    tenant_runs: bool = False
    # Key of the HMAC that signs every model_store row (a secret reference, like privacy.pii_salt):
    # scoring refuses a row whose bytes, owner or strategy were changed after training.
    signing_key: str = "file:secrets/model_signing_key"
    generate_local_signing_key: bool = True  # file: references only; creates a random key once (0600)

    @field_validator("signing_key")
    @classmethod
    def _key_reference(cls, v: str) -> str:
        return check_reference(v)


class TenantsConfig(_Strict):
    auto_register: bool = True
    default_strategy: Literal["auto", "tenant", "shared", "tuned"] = "auto"
    default_consent_share_data: bool = False
    default_consent_shared_inference: bool = True
    budget_seconds_per_month: float | None = Field(default=None, gt=0)
    budgets: dict[str, float] = Field(default_factory=dict)  # tenant -> compute seconds per month
    budget_action: Literal["warn", "stop"] = "warn"



class ValidationConfig(_Strict):
    max_rejected_fraction: float = Field(default=0.2, ge=0.0, le=1.0)


class TenantQuota(_Strict):
    """Per-tenant limits that keep one tenant from holding a training task for long."""

    max_rows: int | None = Field(default=None, ge=2)
    max_epochs: int | None = Field(default=None, ge=1)
    max_seconds: float | None = Field(default=None, gt=0)  # training stops after the epoch that passes it
    tier: Literal["small", "standard", "giant"] | None = None  # default: from rows (training.tiers)
    scoring_concurrency: int | None = Field(default=None, ge=1)  # scoring tasks the tenant may hold at once


class SharedTrainingConfig(_Strict):
    """The shared model: one network over every consenting tenant's de-identified rows."""

    backend: Literal["torch_distributor", "horovod"] = "torch_distributor"
    num_processes: int = Field(default=2, ge=1)
    local_mode: bool = True            # TorchDistributor: processes on the driver (torchrun)
    use_gpu: Literal["auto", True, False] = False  # NCCL when on GPU, gloo on CPU
    min_tenants: int = Field(default=2, ge=1)   # fewer consenting tenants: no shared model
    max_epochs: int = Field(default=20, ge=1)
    patience: int = Field(default=4, ge=1)
    batch_size: int = Field(default=512, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0.0)
    hidden_units: list[int] | None = None   # default: training.hidden_units
    preprocess_sample_rows: int = Field(default=200_000, ge=100)
    checkpoint_dir: str | None = None  # default <data_dir>/checkpoints; resumes an interrupted run
    torch_threads: int = Field(default=1, ge=1)


class TunedTrainingConfig(_Strict):
    """Fine-tuning the shared champion on one tenant: what is frozen and how hard it trains."""

    min_rows: int = Field(default=30, ge=2)
    freeze: list[str] = Field(default_factory=lambda: ["embeddings"])  # parameter-name prefixes
    learning_rate: float = Field(default=1e-3, gt=0.0)
    max_epochs: int = Field(default=15, ge=1)
    patience: int = Field(default=3, ge=1)


class TierConfig(_Strict):
    """Tenant tiers by training rows. Each tier trains in its own FAIR scheduler pool.

    A giant trains in its own task in the lowest-weight pool, or (``giant_path: distributed``) after
    the other tiers, data-parallel across all cores. ``auto`` picks per job the plan with the lower
    estimated wall time: a giant's task holds one core for its whole run, while data-parallel
    training frees that core at the price of its launch and all-reduce overhead.
    """

    small_max_rows: int = Field(default=5_000, ge=1)      # below: small
    # A giant is big in absolute terms AND holds a large share of the job's rows: only then does
    # its one task outlast everything the other cores can do (a big tenant among bigger ones packs fine).
    giant_min_rows: int = Field(default=50_000, ge=2)
    giant_share: float = Field(default=0.25, gt=0.0, le=1.0)
    # task: the giant's own task in the giant pool; the cheapest in compute. distributed: after the
    # other tiers, data-parallel on all cores; on CPU it costs more compute-seconds than one process
    # (launch and all-reduce: 2.7x for a 60,000-row giant on 2 cores) but frees the small tenants.
    # auto: the plan with the lower estimated job wall time (plan.giant_plan_estimates), from the
    # rows of each tier and the measured data-parallel efficiency below.
    giant_path: Literal["auto", "distributed", "task"] = "auto"
    giant_processes: int | None = Field(default=None, ge=1)  # default: the cores Spark has
    # Wall-time speedup of a giant's data-parallel fit over one process, per process. Measured by
    # bench/bench_noisy_neighbour.py: 0.37 on 2 CPU cores with gloo (2 processes run 0.74x as fast
    # as one); set it from that benchmark on GPU clusters, where it is far higher.
    data_parallel_efficiency: float = Field(default=0.37, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> TierConfig:
        if self.giant_min_rows <= self.small_max_rows:
            raise ValueError(f"giant_min_rows ({self.giant_min_rows}) must exceed small_max_rows "
                             f"({self.small_max_rows})")
        return self


class TrainingConfig(_Strict):
    strategies: list[Literal["tenant", "shared", "tuned"]] = Field(
        default_factory=lambda: ["tenant", "shared", "tuned"])  # type: ignore[arg-type]  # candidates trained each run
    promotion_margin: float = Field(default=0.005, ge=0.0)  # challenger must beat champion by this
    # ... plus this many standard errors of the metric difference on the tenant's holdout (small
    # holdouts are noisy); a candidate that saw less data must clear the same bar to be put forward.
    promotion_noise_z: float = Field(default=1.0, ge=0.0)
    shared: SharedTrainingConfig = Field(default_factory=SharedTrainingConfig)
    tuned: TunedTrainingConfig = Field(default_factory=TunedTrainingConfig)
    tiers: TierConfig = Field(default_factory=TierConfig)
    min_rows: int = Field(default=200, ge=2)
    max_rows_per_tenant: int | None = Field(default=None, ge=2)
    max_seconds_per_tenant: float | None = Field(default=None, gt=0)
    retries: int = Field(default=1, ge=0)
    tenant_quotas: dict[str, TenantQuota] = Field(default_factory=dict)
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    val_fraction: float = Field(default=0.15, gt=0.0, lt=1.0)
    max_epochs: int = Field(default=40, ge=1)
    patience: int = Field(default=5, ge=1)
    batch_size: int = Field(default=256, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0.0)
    weight_decay: float = Field(default=1e-5, ge=0.0)
    hidden_units: list[int] = Field(default_factory=lambda: [64, 32])
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_embedding_dim: int = Field(default=8, ge=1)
    seed: int = 7
    torch_threads: int = Field(default=1, ge=1)
    parallelism: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    # Train a task's tenants as stacked networks (models/batched.py), each still a model of its own;
    # a tenant whose batched fit fails is retrained alone. Group size: None is 64 on CPU, 1024 on CUDA.
    batched: bool = True
    batched_group_size: int | None = Field(default=None, ge=1)
    # A folder every executor reads and writes: the shared model's shard exports and giant tenants'
    # shards and checkpoints. "" is <data_dir>/staging; a relative path is taken from the data
    # directory. A local path, not a URI (torch processes read it with pyarrow): on Databricks a UC
    # Volume path (/Volumes/...), which executors see through FUSE.
    staging_dir: str = ""

    @field_validator("staging_dir")
    @classmethod
    def _local_path(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("staging_dir is not a path")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", v):
            raise ValueError(f"staging_dir {v!r} is a URI: give a local path every executor sees "
                             "(on Databricks a UC Volume path, /Volumes/<catalog>/<schema>/<volume>/...)")
        return v.strip()

    @field_validator("tenant_quotas")
    @classmethod
    def _quota_ids(cls, v: dict[str, TenantQuota]) -> dict[str, TenantQuota]:
        bad = [t for t in v if not is_valid_tenant_id(t)]
        if bad:
            raise ValueError(f"invalid tenant id(s) {bad}")
        return v



class PrivacyConfig(_Strict):
    """How PII leaves a tenant for shared training: dropped, or replaced by a keyed hash."""

    pii_action: Literal["hash", "drop"] = "hash"
    # A secret reference, never the salt itself: env:NAME, file:PATH (relative to data_dir),
    # or secret:SCOPE/KEY (a Databricks secret scope).
    pii_salt: str = "env:TENANTML_PII_SALT"
    generate_local_salt: bool = False  # file: references only; creates a random salt once (0600)

    @field_validator("pii_salt")
    @classmethod
    def _salt_reference(cls, v: str) -> str:
        return check_reference(v)


class ScoringConfig(_Strict):
    arrow_batch_size: int = Field(default=50_000, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallelism: int | None = Field(default=None, ge=1)
    # Scoring tasks one tenant may hold at once (a tenant's own quota overrides it); None: half
    # of the scoring tasks, at least one, so no tenant can take every core.
    tenant_concurrency: int | None = Field(default=None, ge=1)
    rows_per_slice: int = Field(default=100_000, ge=1)  # a tenant spreads over more tasks only above this


class MonitoringConfig(_Strict):
    """When a tenant's champion counts as drifted or degraded (per scoring batch)."""

    psi_warn: float = Field(default=0.1, ge=0.0)
    psi_alert: float = Field(default=0.25, ge=0.0)   # a feature or the prediction above this: drift
    drift_features: int = Field(default=1, ge=1)      # features in drift before the tenant counts as drifted
    metric_drop: float = Field(default=0.05, ge=0.0)  # realised metric worse than promoted by more: degraded
    min_labelled_rows: int = Field(default=30, ge=1)  # labelled, scored rows a realised metric needs
    min_drift_rows: int = Field(default=50, ge=1)     # rows a batch needs before its PSI counts (noise below)
    # A feature drifts only when its PSI is also above what sampling noise alone reaches for a batch
    # of its size against the champion's training rows, at this confidence per tenant and batch
    # (over all its features); None: the PSI thresholds alone decide, however small the batch.
    drift_confidence: float | None = Field(default=0.99, gt=0.5, lt=1.0)
    bins: int = Field(default=10, ge=2, le=100)       # reference bins per numeric feature

    @model_validator(mode="after")
    def _ordered(self) -> MonitoringConfig:
        if self.psi_warn > self.psi_alert:
            raise ValueError(f"psi_warn ({self.psi_warn}) must not exceed psi_alert ({self.psi_alert})")
        return self


class RetrainingConfig(_Strict):
    """Which tenants the train steps retrain each run (decided by the monitor step)."""

    force: bool = False                     # retrain every eligible tenant every run
    min_new_rows: int = Field(default=200, ge=1)          # new labelled rows since the champion's data ...
    min_new_fraction: float = Field(default=0.25, gt=0.0)  # ... or this share of its training rows
    on_drift: bool = True
    on_degradation: bool = True
    max_age_days: float | None = Field(default=30.0, gt=0)  # champions older than this are retrained
    # The shared model learns from every consenting tenant: it is retrained when at least this share of
    # them need retraining (or it has no champion, is tainted, too old, or retraining is forced); below
    # that, the few that retrain fine-tune from the shared champion as it is, and it stays unchanged.
    shared_min_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    # A model that learned from a tenant that withdrew consent or was offboarded (io/lineage.py) is
    # retrained at the next run; until then: fall_back = its tenants are served by their own model
    # (or not at all), keep_serving = it keeps serving, with a warning in the summary and the report.
    tainted_models: Literal["fall_back", "keep_serving"] = "fall_back"


class SqlEndpointConfig(_Strict):
    """`serve-sql`: who may connect. Without authentication it binds to loopback only."""

    authentication: Literal["none", "ldap", "kerberos", "custom"] = "none"
    # hive.server2.* properties for the chosen mode, e.g. hive.server2.authentication.ldap.url
    settings: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _hive_keys(self) -> SqlEndpointConfig:
        bad = [k for k in self.settings if not k.startswith("hive.server2.")]
        if bad:
            raise ValueError(f"settings must be hive.server2.* properties, not {bad}")
        if self.authentication != "none" and not self.settings:
            raise ValueError(f"authentication {self.authentication!r} needs its hive.server2.* settings")
        return self


class Config(_Strict):
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    tables: TablesConfig = Field(default_factory=TablesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tenants: TenantsConfig = Field(default_factory=TenantsConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    sql_endpoint: SqlEndpointConfig = Field(default_factory=SqlEndpointConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    retraining: RetrainingConfig = Field(default_factory=RetrainingConfig)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, v: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        for name in v:
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"dataset name {name!r} must match {_NAME_RE.pattern}")
        return v

    def dataset(self, name: str | None = None) -> tuple[str, DatasetSpec]:
        name = name or self.project.default_dataset
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise ConfigError(f"unknown dataset {name!r} (datasets in config: {known})")
        return name, self.datasets[name]

    def config_hash(self) -> str:
        """Stable hash recorded with every model so a prediction can be traced to its config."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
