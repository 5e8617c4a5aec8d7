"""De-identification before rows leave their tenant: PII dropped or replaced by a keyed hash.

The salt is resolved from a secret reference at run time and only ever held in memory (and in a
Spark broadcast for the hashing tasks); it is never put in a query plan, a config file, a log
line or an MLflow param. Hashes are HMAC-SHA256, so equal values still join within one salt
while the raw value cannot be recovered by hashing guesses without the salt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenantml.config import PrivacyConfig
from tenantml.core.errors import ConfigError

HASH_HEX_CHARS = 32


@dataclass(frozen=True)
class PiiPolicy:
    """What was applied, safe to log: column names, the action and the salt's reference and id."""

    columns: tuple[str, ...]
    action: str
    salt_reference: str
    salt_id: str  # first hex chars of SHA-256(salt): tells salts apart without revealing one

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "action": self.action,
                "salt_reference": self.salt_reference, "salt_id": self.salt_id}


def resolve_salt(cfg: PrivacyConfig, data_dir: Path, dbutils: Any = None) -> bytes:
    """The salt behind ``cfg.pii_salt``; a missing secret is an error that says how to provide it."""
    kind, _, ref = cfg.pii_salt.partition(":")
    value: str | None
    if kind == "env":
        value = os.environ.get(ref)
        if not value:
            raise ConfigError(f"privacy.pii_salt: environment variable {ref} is not set; export a random "
                              f"secret (e.g. `export {ref}=$(openssl rand -hex 32)`) or point "
                              f"privacy.pii_salt at file:PATH or secret:SCOPE/KEY")
    elif kind == "file":
        path = Path(ref) if Path(ref).is_absolute() else data_dir / ref
        if not path.exists():
            if not cfg.generate_local_salt:
                raise ConfigError(f"privacy.pii_salt: salt file {path} does not exist (set "
                                  f"privacy.generate_local_salt: true to create one)")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        value = path.read_text().strip()
        if not value:
            raise ConfigError(f"privacy.pii_salt: salt file {path} is empty")
    else:
        scope, _, key = ref.partition("/")
        if not scope or not key:
            raise ConfigError(f"privacy.pii_salt: {cfg.pii_salt!r} must be secret:SCOPE/KEY")
        if dbutils is None:
            raise ConfigError(f"privacy.pii_salt: {cfg.pii_salt!r} is a Databricks secret, but no "
                              f"Databricks runtime (dbutils) is available here; use env: or file: locally")
        value = dbutils.secrets.get(scope=scope, key=key)
        if not value:
            raise ConfigError(f"privacy.pii_salt: Databricks secret {scope}/{key} is empty")
    return value.encode()


def salt_id(salt: bytes) -> str:
    return hashlib.sha256(b"tenantml-salt-id:" + salt).hexdigest()[:12]


def keyed_hash(salt: bytes, value: object) -> str | None:
    """HMAC-SHA256 of the value's text, truncated; None stays None."""
    if value is None:
        return None
    try:
        if value != value:  # NaN
            return None
    except Exception:
        pass
    return hmac.new(salt, str(value).encode(), hashlib.sha256).hexdigest()[:HASH_HEX_CHARS]


def deidentify(pdf: Any, pii_columns: tuple[str, ...], action: str, salt: bytes) -> Any:
    """pandas frame with PII columns dropped or hashed (in place of their values)."""
    out = pdf.copy()
    present = [c for c in pii_columns if c in out.columns]
    if action == "drop":
        return out.drop(columns=present)
    for c in present:
        out[c] = [keyed_hash(salt, v) for v in out[c].tolist()]
    return out
