"""Configuration: the typed schema (data only) and the layered loader."""

from tenantml.config.loader import load_config
from tenantml.config.schema import (
    Config,
    DatasetSpec,
    PrivacyConfig,
    ProjectConfig,
    RangeRule,
    ScoringConfig,
    SharedTrainingConfig,
    SourceSpec,
    SparkConfig,
    TablesConfig,
    TenantQuota,
    TenantsConfig,
    TierConfig,
    TrackingConfig,
    TrainingConfig,
    TunedTrainingConfig,
    ValidationConfig,
    ValidationRules,
)

__all__ = ["Config", "DatasetSpec", "PrivacyConfig", "ProjectConfig", "RangeRule", "ScoringConfig",
           "SharedTrainingConfig", "SourceSpec", "SparkConfig", "TablesConfig", "TenantQuota", "TenantsConfig",
           "TierConfig", "TrackingConfig", "TrainingConfig", "TunedTrainingConfig", "ValidationConfig",
           "ValidationRules", "load_config"]
