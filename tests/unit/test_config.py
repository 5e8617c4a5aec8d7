"""Config layering and its errors: file + key named, unknown and missing keys rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenantml.config import load_config
from tenantml.core.errors import ConfigError

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"

DATASET = """
datasets:
  sales:
    source: {path: /tmp/x, format: csv}
    tenant_column: tenant
    entity_key: id
    label: y
    task: regression
    numeric_features: [a, b]
    categorical_features: [c]
"""


def _conf(tmp_path: Path, base: str, local: str = "") -> Path:
    (tmp_path / "conf" / "base").mkdir(parents=True)
    (tmp_path / "conf" / "local").mkdir()
    (tmp_path / "conf" / "base" / "main.yml").write_text(base)
    if local:
        (tmp_path / "conf" / "local" / "over.yml").write_text(local)
    return tmp_path / "conf"


def test_repo_config_loads_with_both_datasets() -> None:
    cfg = load_config(REPO_CONF, "local")
    assert set(cfg.datasets) >= {"demo", "mlc_churn"}
    name, spec = cfg.dataset(None)
    assert name == "demo" and spec.task == "binary" and spec.event_time == "event_date"
    assert "email" in spec.pii_columns and "email" not in spec.feature_columns


def test_env_layer_overrides_key_by_key(tmp_path: Path) -> None:
    conf = _conf(tmp_path, DATASET + "training: {min_rows: 50, max_epochs: 9}\n",
                 "training: {min_rows: 10}\n")
    cfg = load_config(conf, "local")
    assert cfg.training.min_rows == 10 and cfg.training.max_epochs == 9
    assert cfg.datasets["sales"].numeric_features == ["a", "b"]


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    conf = _conf(tmp_path, DATASET, "training: {min_rowz: 10}\n")
    with pytest.raises(ConfigError) as err:
        load_config(conf, "local")
    assert "over.yml" in str(err.value) and "training.min_rowz" in str(err.value)
    assert "unknown key" in str(err.value)


def test_misspelled_dataset_key_names_file(tmp_path: Path) -> None:
    conf = _conf(tmp_path, DATASET.replace("label: y", "labels: y"))
    with pytest.raises(ConfigError) as err:
        load_config(conf, "local")
    msg = str(err.value)
    assert "main.yml" in msg and "datasets.sales.labels" in msg and "datasets.sales.label" in msg
    assert "missing key" in msg


def test_missing_env_folder_and_bad_yaml(tmp_path: Path) -> None:
    conf = _conf(tmp_path, DATASET)
    with pytest.raises(ConfigError, match="environment 'prod'"):
        load_config(conf, "prod")
    (conf / "base" / "bad.yml").write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yml: not valid YAML"):
        load_config(conf, "local")


def test_spec_consistency_errors(tmp_path: Path) -> None:
    conf = _conf(tmp_path, DATASET.replace("categorical_features: [c]", "categorical_features: [a]"))
    with pytest.raises(ConfigError, match="declared twice"):
        load_config(conf, "local")
    conf2 = _conf(tmp_path / "x", DATASET + "    pii_columns: [a]\n")
    with pytest.raises(ConfigError, match="PII columns"):
        load_config(conf2, "local")


def test_unknown_dataset_lists_known(tmp_path: Path) -> None:
    cfg = load_config(_conf(tmp_path, DATASET), "local")
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope'.*sales"):
        cfg.dataset("nope")


def test_config_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    a = load_config(_conf(tmp_path / "a", DATASET), "local")
    b = load_config(_conf(tmp_path / "b", DATASET), "local")
    c = load_config(_conf(tmp_path / "c", DATASET, "training: {min_rows: 11}\n"), "local")
    assert a.config_hash() == b.config_hash() != c.config_hash()
