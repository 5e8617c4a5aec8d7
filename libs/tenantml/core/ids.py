"""Identifier rules: tenant ids, run ids, dataset and model names, checked before they reach a
path, a SQL predicate, a model name or an MLflow key.

Tenant ids are data. They are validated once at the edge (CLI, job arguments, widgets, config,
ingest) into a :data:`TenantId`; code below the edge takes ``TenantId`` and does not re-check,
except where SQL text is built (:func:`tenant_in_predicate`) or a name is formed
(:func:`model_name`), which check again because a mistake there is an injection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NewType

from tenantml.core.errors import InvalidRunIdError, InvalidTenantIdError

TenantId = NewType("TenantId", str)

# Letters, digits, '_' and '-', starting with a letter or digit: safe in paths, SQL literals, model
# names and MLflow metric keys alike. Case is kept (ids are data), length is bounded. Ids are unique
# case-insensitively (Unity Catalog lower-cases names; some disks ignore case): see `canonical`.
TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_TENANT_ID_RE = re.compile(TENANT_ID_PATTERN)
# The same rule for Spark's `rlike` (Java regex) so rows can be checked where they live. Java's `$`
# also matches before a final line break, so the end anchor is `\z` there.
TENANT_ID_JAVA_REGEX = TENANT_ID_PATTERN[:-1] + r"\z"
# The shared model's owner id in tables and the registry; tenant ids never start with "_".
SHARED_ID = TenantId("_shared")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_valid_tenant_id(value: object) -> bool:
    return isinstance(value, str) and bool(_TENANT_ID_RE.fullmatch(value))


def describe_invalid(value: object) -> str:
    """A printable, bounded rendering of a rejected value (it may hold quotes, slashes or control chars)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_tenant_id(value: object, *, where: str = "") -> TenantId:
    if not is_valid_tenant_id(value):
        suffix = f" in {where}" if where else ""
        raise InvalidTenantIdError(
            f"invalid tenant id {describe_invalid(value)}{suffix}: tenant ids must match "
            f"{TENANT_ID_PATTERN} (letters, digits, '_' and '-', at most 64 characters)"
        )
    return TenantId(str(value))


def validate_tenant_ids(values: Iterable[object], *, where: str = "") -> list[TenantId]:
    return [validate_tenant_id(v, where=where) for v in values]


def canonical(tenant_id: str) -> str:
    """The case-insensitive identity of a tenant id: two ids with the same canonical form collide."""
    return tenant_id.casefold()


def validate_run_id(run_id: object, *, where: str = "run id") -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id):
        raise InvalidRunIdError(f"invalid {where} {describe_invalid(run_id)}: use letters, digits, '_' "
                                f"and '-' (at most 64)")
    return run_id


def sql_identifier(name: str, what: str = "column") -> str:
    """A bare SQL identifier (column, step or dataset name) checked before it goes into SQL text."""
    if not _IDENT_RE.fullmatch(name):
        raise ValueError(f"unsafe {what} name {name!r} in SQL text")
    return name


def tenant_in_predicate(tenants: Iterable[str], column: str = "tenant_id", allow: tuple[str, ...] = ()) -> str:
    """A Delta ``replaceWhere`` predicate; ids are re-validated here because this builds SQL text.

    ``allow`` names platform constants (like the shared model's "_shared") accepted verbatim.
    """
    items = list(tenants)
    ids = sorted(set(validate_tenant_ids([t for t in items if t not in allow], where="a table predicate"))
                 | {t for t in items if t in allow})
    if not ids:
        raise ValueError("tenant_in_predicate needs at least one tenant")
    sql_identifier(column)
    return f"{column} IN ({', '.join(repr(t) for t in ids)})"


_UC_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.$")


def is_unity_catalog_prefix(prefix: str) -> bool:
    """A `catalog.schema.` prefix: the registry is Unity Catalog's (three-level names)."""
    return bool(_UC_PREFIX_RE.fullmatch(prefix))


def uc_name_part(text: str) -> str:
    """An injective encoding into Unity Catalog's lower-case name characters: lower case (tenant ids
    are unique case-insensitively, so this loses nothing), '_' -> '_0', '-' -> '_1'."""
    return text.lower().replace("_", "_0").replace("-", "_1")


def model_name(prefix: str, dataset: str, tenant_id: str) -> str:
    """One registered model per (dataset, tenant): a champion lookup is one alias read.

    Every strategy's versions for a tenant live here (tags say which), so `@champion` is always
    the one model that serves the tenant, whichever strategy produced it. Under a Unity Catalog
    prefix (`catalog.schema.`) the name is lower case and uses only letters, digits and '_'
    (`uc_name_part`), so it is valid there and two tenants never share one.
    """
    tid = tenant_id if tenant_id == SHARED_ID else validate_tenant_id(tenant_id, where="a model name")
    if is_unity_catalog_prefix(prefix):
        return f"{prefix.lower()}{dataset.lower()}__{'shared' if tid == SHARED_ID else 't_' + uc_name_part(tid)}"
    return f"{prefix}{dataset}__{tid}"


def shared_model_name(prefix: str, dataset: str) -> str:
    return model_name(prefix, dataset, SHARED_ID)
