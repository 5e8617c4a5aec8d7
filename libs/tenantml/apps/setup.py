"""`python -m tenantml.apps.setup`: what `make setup` runs once after installing the packages.

Resolves the Delta Lake jars once (a local session asks Ivy for `delta.configure_spark_with_delta_pip`'s
package, from Maven Central into the Ivy cache) and copies exactly the jars Ivy put on that session's
`spark.jars` into the project's jar folder (`tenantml.io.spark.delta_jars_dir`: `$TENANTML_JARS_DIR`,
default `<venv>/share/tenantml/jars`), with a manifest naming the Delta package. Every later session
starts from those files: no resolution, no network, nothing on stderr. Then it checks, in a fresh
interpreter, that a session started from the folder writes and reads a Delta table, and that this
Spark ships the Thrift JDBC/ODBC server `serve-sql` needs, so a broken install fails at set-up
rather than at the first command.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

# Run in a fresh interpreter (one JVM per process: this one's was started from the Ivy resolution).
_CHECK = """
import sys
from tenantml.io.spark import build_local_spark, local_delta_jars
assert local_delta_jars(), "no Delta jars in the jar folder"
spark = build_local_spark(app_name="tenantml-setup-check")
assert spark.sparkContext.getConf().get("spark.jars.packages", None) is None, "the session resolved packages"
path = sys.argv[1] + "/check"
spark.range(3).write.format("delta").save(path)
assert spark.read.format("delta").load(path).count() == 3
spark.sql(f"DESCRIBE HISTORY delta.`{path}`").collect()  # Delta's SQL extension is loaded
spark.stop()
"""


def main() -> None:
    from tenantml.apps.sql_endpoint import require_thrift_server
    from tenantml.io.spark import build_local_spark, delta_jars_dir, delta_package, save_delta_jars

    session = build_local_spark(app_name="tenantml-setup", resolve_delta=True)
    session.range(1).write.format("noop").mode("overwrite").save()
    require_thrift_server(session)
    jars = save_delta_jars(session)
    session.stop()
    print(f"{delta_package()}: {len(jars)} jars in {delta_jars_dir()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tenantml-setup-") as tmp:
        check = subprocess.run([sys.executable, "-c", _CHECK, tmp], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        sys.stderr.write(check.stderr[-4000:])
        sys.exit(f"set-up: a session started from {delta_jars_dir()} cannot use Delta Lake (see above)")
    print(f"Spark {session.version} with Delta Lake (local jars) and the Thrift JDBC/ODBC server is ready",
          file=sys.stderr)


if __name__ == "__main__":
    main()
