"""De-identification: salts come from secret references, PII is hashed or dropped, never echoed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from tenantml.config import PrivacyConfig
from tenantml.core.errors import ConfigError
from tenantml.training.privacy import deidentify, keyed_hash, resolve_salt, salt_id


def test_salt_reference_must_not_be_a_value() -> None:
    with pytest.raises(ValueError, match="secret reference"):
        PrivacyConfig(pii_salt="hunter2")


def test_env_salt_missing_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TM_TEST_SALT", raising=False)
    with pytest.raises(ConfigError, match="TM_TEST_SALT is not set"):
        resolve_salt(PrivacyConfig(pii_salt="env:TM_TEST_SALT"), tmp_path)
    monkeypatch.setenv("TM_TEST_SALT", "s3cret")
    assert resolve_salt(PrivacyConfig(pii_salt="env:TM_TEST_SALT"), tmp_path) == b"s3cret"


def test_file_salt_is_generated_once_with_owner_only_permissions(tmp_path: Path) -> None:
    cfg = PrivacyConfig(pii_salt="file:secrets/salt", generate_local_salt=True)
    first = resolve_salt(cfg, tmp_path)
    assert len(first) == 64 and resolve_salt(cfg, tmp_path) == first
    mode = stat.S_IMODE(os.stat(tmp_path / "secrets" / "salt").st_mode)
    assert mode == 0o600
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_salt(PrivacyConfig(pii_salt="file:other"), tmp_path)


def test_databricks_secret_needs_dbutils(tmp_path: Path) -> None:
    cfg = PrivacyConfig(pii_salt="secret:scope/key")
    with pytest.raises(ConfigError, match="no Databricks runtime"):
        resolve_salt(cfg, tmp_path)

    class Secrets:  # stands in for a Databricks workspace's secret scope
        def get(self, scope: str, key: str) -> str:
            assert (scope, key) == ("scope", "key")
            return "from-scope"

    class DBUtils:
        secrets = Secrets()

    assert resolve_salt(cfg, tmp_path, dbutils=DBUtils()) == b"from-scope"


def test_keyed_hash_depends_on_salt_and_hides_value() -> None:
    a, b = keyed_hash(b"salt-a", "jane@x.io"), keyed_hash(b"salt-b", "jane@x.io")
    assert a != b and a == keyed_hash(b"salt-a", "jane@x.io") and len(a or "") == 32
    assert "jane" not in (a or "") and keyed_hash(b"s", None) is None and keyed_hash(b"s", float("nan")) is None
    assert salt_id(b"salt-a") != salt_id(b"salt-b") and "salt" not in salt_id(b"salt-a")


def test_deidentify_hashes_or_drops_only_pii() -> None:
    df = pd.DataFrame({"email": ["a@x", None], "phone": ["1", "2"], "spend": [1.0, 2.0]})
    hashed = deidentify(df, ("email", "phone"), "hash", b"k")
    assert hashed["spend"].tolist() == [1.0, 2.0] and hashed["email"].iloc[1] is None
    assert not set(hashed["email"].dropna()) & {"a@x"} and not set(hashed["phone"]) & {"1", "2"}
    dropped = deidentify(df, ("email", "phone"), "drop", b"k")
    assert list(dropped.columns) == ["spend"]
    assert df["email"].iloc[0] == "a@x"  # the input frame is untouched
