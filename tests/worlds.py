"""Copy a built world (a data directory after a pipeline run) so several test modules share one build.

A pipeline run costs minutes on two cores; a copy costs seconds. Delta tables are self-contained
folders (their log names files relative to the table), but MLflow's SQLite store records absolute
artifact locations (experiments, runs, model versions, logged models): the copy rewrites them to
point into the copy, so deleting or overwriting artifacts in one world never touches another.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path


def copy_world(src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst`` with every absolute path into ``src`` in MLflow's stores rewritten."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    shutil.copytree(src, dst)
    for db in dst.rglob("*.db"):
        # Spark's warehouse names database folders `<name>.db`: only SQLite files are MLflow's stores.
        if db.is_file() and db.read_bytes()[:16] == b"SQLite format 3\x00":
            _rewrite(db, str(src), str(dst))
    return dst


def _rewrite(db: Path, old: str, new: str) -> None:
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cols = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')
                    if (r[2] or "").upper().startswith(("VARCHAR", "TEXT", "CHAR"))]
            for col in cols:
                con.execute(f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) WHERE instr("{col}", ?) > 0',
                            (old, new, old))
        con.commit()
    finally:
        con.close()
