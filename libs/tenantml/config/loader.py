"""The layered loader: conf/base, then conf/<env> on top, merged key by key.

Mappings merge, everything else replaces. The file that set each key is remembered so a validation
error can name the file *and* the key at fault (`conf/local/x.yml: unknown key 'training.min_rowz'`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tenantml.config.schema import Config
from tenantml.core.errors import ConfigError


def _merge(base: dict[str, Any], top: Mapping[str, Any], origin: dict[tuple[str, ...], str],
           source: str, prefix: tuple[str, ...] = ()) -> None:
    for key, value in top.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, origin, source, path)
        else:
            base[key] = _deepcopy(value)
            _mark(value, origin, source, path)


def _mark(value: Any, origin: dict[tuple[str, ...], str], source: str, path: tuple[str, ...]) -> None:
    origin[path] = source
    if isinstance(value, Mapping):
        for k, v in value.items():
            _mark(v, origin, source, (*path, str(k)))


def _deepcopy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def _config_files(conf_dir: Path, env: str) -> list[Path]:
    files: list[Path] = []
    for layer in ("base", env):
        layer_dir = conf_dir / layer
        if layer == env and layer != "base" and not layer_dir.is_dir():
            raise ConfigError(f"config environment {env!r} has no folder {layer_dir}")
        if layer_dir.is_dir():
            files.extend(sorted(p for p in layer_dir.rglob("*") if p.suffix in (".yml", ".yaml")))
        if layer == env:
            break
    return files


def _origin_of(loc: tuple[str | int, ...], origin: dict[tuple[str, ...], str]) -> str:
    keys = tuple(str(p) for p in loc)
    for n in range(len(keys), 0, -1):
        if keys[:n] in origin:
            return origin[keys[:n]]
    return "defaults"


def load_config(conf_dir: str | Path = "conf", env: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Load conf/base then conf/<env> (env from the argument, TENANTML_ENV, or 'local')."""
    conf_path = Path(conf_dir)
    env = env or os.environ.get("TENANTML_ENV", "local")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", env):
        raise ConfigError(f"invalid config environment name {env!r}")
    if not conf_path.is_dir():
        raise ConfigError(f"config folder {conf_path} does not exist")
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for path in _config_files(conf_path, env):
        try:
            content = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(content, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _merge(merged, content, origin, str(path))
    if overrides:
        _merge(merged, overrides, origin, "command-line overrides")
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc)
            where = _origin_of(loc, origin)
            if err["type"] == "missing":
                where = _origin_of(loc[:-1], origin)
                lines.append(f"{where}: missing key '{key}'")
            elif err["type"] == "extra_forbidden":
                lines.append(f"{where}: unknown key '{key}'")
            else:
                lines.append(f"{where}: key '{key}': {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None
