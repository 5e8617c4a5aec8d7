"""De-identification before rows leave their tenant: PII dropped or replaced by a keyed hash.

The salt is resolved from a secret reference at run time and only ever held in memory (and in a
pickled closure of the hashing tasks); it is never put in a query plan, a config file, a log
line or an MLflow param. Hashes are HMAC-SHA256, so equal values still join within one salt
while the raw value cannot be recovered by hashing guesses without the salt.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenantml.config import PrivacyConfig
from tenantml.core.secrets import resolve_secret

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
    return resolve_secret(cfg.pii_salt, data_dir, key="privacy.pii_salt", generate=cfg.generate_local_salt,
                          generate_key="privacy.generate_local_salt", dbutils=dbutils)


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
