"""The single gate for tenant ids: validation before an id reaches a path, predicate or model name."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tenantml.errors import InvalidTenantIdError

# Letters, digits, '_' and '-', starting with a letter or digit: safe in paths, SQL literals, model
# names and MLflow metric keys alike. Case is kept (ids are data), length is bounded.
TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_TENANT_ID_RE = re.compile(TENANT_ID_PATTERN)
# The same rule for Spark's `rlike` (Java regex) so rows can be checked where they live. Java's `$`
# also matches before a final line break, so the end anchor is `\z` there.
TENANT_ID_JAVA_REGEX = TENANT_ID_PATTERN[:-1] + r"\z"


def is_valid_tenant_id(value: object) -> bool:
    return isinstance(value, str) and bool(_TENANT_ID_RE.fullmatch(value))


def describe_invalid(value: object) -> str:
    """A printable, bounded rendering of a rejected id (it may hold quotes, slashes or control chars)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_tenant_id(value: object, *, where: str = "") -> str:
    if not is_valid_tenant_id(value):
        suffix = f" in {where}" if where else ""
        raise InvalidTenantIdError(
            f"invalid tenant id {describe_invalid(value)}{suffix}: tenant ids must match "
            f"{TENANT_ID_PATTERN} (letters, digits, '_' and '-', at most 64 characters)"
        )
    return str(value)


def validate_tenant_ids(values: Iterable[object], *, where: str = "") -> list[str]:
    return [validate_tenant_id(v, where=where) for v in values]


def tenant_in_predicate(tenants: Iterable[str], column: str = "tenant_id", allow: tuple[str, ...] = ()) -> str:
    """A Delta ``replaceWhere`` predicate; ids are re-validated here because this builds SQL text.

    ``allow`` names platform constants (like the shared model's "_shared") accepted verbatim.
    """
    items = list(tenants)
    ids = sorted(set(validate_tenant_ids([t for t in items if t not in allow], where="a table predicate"))
                 | {t for t in items if t in allow})
    if not ids:
        raise ValueError("tenant_in_predicate needs at least one tenant")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", column):
        raise ValueError(f"unsafe column name {column!r} in a table predicate")
    return f"{column} IN ({', '.join(repr(t) for t in ids)})"
