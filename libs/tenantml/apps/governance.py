"""Unity Catalog access rules generated from the tenants table.

Two mechanisms, both per published table: a row filter (one SQL function, applied to the table,
that lets a principal see a row only if it belongs to that row's tenant group), and per-tenant
dynamic views with a grant to the tenant's group, for workspaces that publish views instead.
Statements are built from validated identifiers only; nothing from data is spliced unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tenantml.core.ids import validate_tenant_id

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_GROUP = re.compile(r"^[A-Za-z0-9_. -]{1,200}$")


def _ident(name: str, what: str) -> str:
    if not _IDENT.fullmatch(name):
        raise ValueError(f"unsafe {what} identifier {name!r}")
    return name


def _fqn(catalog: str, schema: str, name: str) -> str:
    return ".".join(_ident(p, w) for p, w in ((catalog, "catalog"), (schema, "schema"), (name, "table")))


@dataclass(frozen=True)
class AccessPolicy:
    """Where the rules live and which groups they name."""

    catalog: str
    schema: str
    group_prefix: str = "tenant-"   # a tenant's principals are in account group <prefix><tenant_id>
    admin_group: str = "tenantml-admins"
    filter_function: str = "tenant_row_filter"

    def __post_init__(self) -> None:
        _ident(self.catalog, "catalog")
        _ident(self.schema, "schema")
        _ident(self.filter_function, "function")
        for g in (self.group_prefix + "x", self.admin_group):
            if not _GROUP.fullmatch(g):
                raise ValueError(f"unsafe group name {g!r}")

    def group(self, tenant_id: str) -> str:
        return f"{self.group_prefix}{validate_tenant_id(tenant_id)}"


def row_filter_function_sql(policy: AccessPolicy) -> str:
    fn = _fqn(policy.catalog, policy.schema, policy.filter_function)
    return (f"CREATE OR REPLACE FUNCTION {fn}(tenant_id STRING) RETURNS BOOLEAN\n"
            f"RETURN is_account_group_member('{policy.admin_group}')\n"
            f"    OR is_account_group_member(concat('{policy.group_prefix}', tenant_id))")


def apply_row_filter_sql(policy: AccessPolicy, table: str) -> str:
    fn = _fqn(policy.catalog, policy.schema, policy.filter_function)
    return f"ALTER TABLE {_fqn(policy.catalog, policy.schema, table)} SET ROW FILTER {fn} ON (tenant_id)"


def tenant_view_name(table: str, tenant_id: str) -> str:
    """An injective encoding ('_' -> '_0', '-' -> '_1'): view names allow neither quotes nor '-'
    everywhere, and 'acme-eu' and 'acme_eu' must never share a view."""
    encoded = validate_tenant_id(tenant_id).replace("_", "_0").replace("-", "_1")
    return f"{_ident(table, 'table')}__t_{encoded}"


def tenant_views_sql(policy: AccessPolicy, table: str, tenants: Iterable[str],
                     source: str | None = None) -> list[str]:
    """Per tenant: a view holding only its rows, and SELECT granted to its group only.

    ``source`` replaces the table reference (e.g. ``delta.`/path``` to run the views locally).
    """
    src = source or _fqn(policy.catalog, policy.schema, table)
    out = []
    for t in sorted(set(tenants)):
        view = _fqn(policy.catalog, policy.schema, tenant_view_name(table, t))
        out.append(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {src} WHERE tenant_id = '{validate_tenant_id(t)}'")
        out.append(f"GRANT SELECT ON VIEW {view} TO `{policy.group(t)}`")
    return out


def governance_sql(policy: AccessPolicy, tables: Iterable[str], tenants: Iterable[str]) -> list[str]:
    """Everything an operator runs on Databricks after publishing: filter function, filters, views."""
    ids = sorted({validate_tenant_id(t) for t in tenants})
    stmts = [row_filter_function_sql(policy)]
    for table in tables:
        stmts.append(apply_row_filter_sql(policy, table))
        stmts.extend(tenant_views_sql(policy, table, ids))
    return stmts
