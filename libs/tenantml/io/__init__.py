"""Delta reads and writes: tenant-scoped, idempotent, retried on concurrent-commit conflicts."""

from tenantml.io.delta import (
    append,
    read_table,
    replace_tenants,
    replace_where,
    table_exists,
    table_version,
)

__all__ = ["append", "read_table", "replace_tenants", "replace_where", "table_exists", "table_version"]
