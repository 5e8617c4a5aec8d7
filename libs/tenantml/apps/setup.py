"""`python -m tenantml.apps.setup`: what `make setup` runs once after installing the packages.

Starts a local Delta-enabled session (which resolves the Delta jars into the local cache) and checks
that this Spark ships the Thrift JDBC/ODBC server `serve-sql` needs, so a broken install fails at
set-up rather than at the first command.
"""

from __future__ import annotations

import sys


def main() -> None:
    from tenantml.apps.sql_endpoint import require_thrift_server
    from tenantml.io.spark import build_local_spark

    session = build_local_spark(app_name="tenantml-setup")
    session.range(1).write.format("noop").mode("overwrite").save()
    require_thrift_server(session)
    print(f"Spark {session.version} with Delta Lake and the Thrift JDBC/ODBC server is ready", file=sys.stderr)
    session.stop()


if __name__ == "__main__":
    main()
