"""Secret references: `env:NAME`, `file:PATH` (relative to the data directory) or
`secret:SCOPE/KEY` (a Databricks secret scope). Config holds the reference, never the value."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from tenantml.core.errors import ConfigError

KINDS = ("env", "file", "secret")


def check_reference(value: str) -> str:
    """For config validators: a reference of a known kind, never a bare secret value."""
    kind, _, rest = value.partition(":")
    if kind not in KINDS or not rest:
        raise ValueError("must be a secret reference env:NAME, file:PATH or secret:SCOPE/KEY, "
                         "never the secret value itself")
    return value


def resolve_secret(reference: str, data_dir: Path, *, key: str, generate: bool = False,
                   generate_key: str = "", dbutils: Any = None) -> bytes:
    """The value behind ``reference`` (config key ``key``); a missing secret is an error that says how
    to provide it. ``generate`` creates a random file secret once (mode 0600) for the local default."""
    kind, _, ref = reference.partition(":")
    value: str | None
    if kind == "env":
        value = os.environ.get(ref)
        if not value:
            raise ConfigError(f"{key}: environment variable {ref} is not set; export a random secret (e.g. "
                              f"`export {ref}=$(openssl rand -hex 32)`) or point {key} at file:PATH or "
                              f"secret:SCOPE/KEY")
    elif kind == "file":
        path = Path(ref) if Path(ref).is_absolute() else data_dir / ref
        if not path.exists():
            if not generate:
                hint = f" (set {generate_key}: true to create one)" if generate_key else ""
                raise ConfigError(f"{key}: secret file {path} does not exist{hint}")
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # created concurrently by another process
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
        value = path.read_text().strip()
        if not value:
            raise ConfigError(f"{key}: secret file {path} is empty")
    elif kind == "secret":
        scope, _, name = ref.partition("/")
        if not scope or not name:
            raise ConfigError(f"{key}: {reference!r} must be secret:SCOPE/KEY")
        if dbutils is None:
            raise ConfigError(f"{key}: {reference!r} is a Databricks secret, but no Databricks runtime "
                              f"(dbutils) is available here; use env: or file: locally")
        value = dbutils.secrets.get(scope=scope, key=name)
        if not value:
            raise ConfigError(f"{key}: Databricks secret {scope}/{name} is empty")
    else:
        raise ConfigError(f"{key}: {reference!r} is not a secret reference (env:, file: or secret:)")
    return value.encode()
