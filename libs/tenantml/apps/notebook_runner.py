"""Run a Databricks-source `.py` notebook outside Databricks, cell by cell, in one namespace.

What CI and a laptop need to prove a notebook works before anyone opens it in a workspace: each
`# COMMAND ----------` cell is compiled with the notebook's file name and its real line numbers (a
traceback points into the notebook), `# MAGIC %md` cells are skipped, widgets get the values given
(`tenantml.apps.notebook.widget`), and the first cell that raises stops the run with a `NotebookError`
naming the cell, its line and the error. `python -m tenantml.apps.notebook_runner NOTEBOOK -w k=v` does
the same from a shell.
"""

from __future__ import annotations

import argparse
import builtins
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tenantml.core.errors import EXIT_FAILURE, EXIT_OK, NotebookError

log = logging.getLogger(__name__)

HEADER = "# Databricks notebook source"
SEPARATOR = "# COMMAND ----------"
MAGIC = "# MAGIC"


@dataclass(frozen=True)
class Cell:
    index: int  # 1-based, as Databricks numbers cells
    line: int  # the cell's first line in the file, 1-based
    kind: Literal["python", "markdown"]
    source: str

    @property
    def title(self) -> str:
        """The first line that says something: what an error message quotes."""
        for text in self.source.splitlines():
            if text.strip():
                return text.strip()[:80]
        return ""


def parse_notebook(path: Path) -> list[Cell]:
    """The notebook's cells; a file without the Databricks header, or a magic this runner cannot
    run (`%sql`, `%sh`, `%pip`, `%run`, ...), is refused naming the file and the cell."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise NotebookError(f"cannot read notebook {path}: {exc}") from exc
    lines = text.splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise NotebookError(f"{path} is not a Databricks-source notebook: its first line is not {HEADER!r}")
    chunks: list[tuple[int, list[str]]] = [(2, [])]
    for number, line in enumerate(lines[1:], start=2):
        if line.strip() == SEPARATOR:
            chunks.append((number + 1, []))
        else:
            chunks[-1][1].append(line)
    cells: list[Cell] = []
    for first, body in chunks:
        if not any(s.strip() for s in body):
            continue
        index = len(cells) + 1
        code = [s for s in body if s.strip()]
        if all(s.startswith(MAGIC) for s in code):
            # A magic cell: every line is `# MAGIC ...`; the first non-empty one names the language.
            stripped = [s[len(MAGIC):].removeprefix(" ") if s.startswith(MAGIC) else s for s in body]
            magic = next(s.strip() for s in stripped if s.strip()).split()[0]
            if magic.startswith("%md"):  # %md and %md-sandbox: documentation, nothing to run
                cells.append(Cell(index, first, "markdown", "\n".join(stripped)))
                continue
            if magic != "%python":
                raise NotebookError(f"{path}: cell {index} (line {first}) uses {magic}, which only runs on "
                                    "Databricks; write it in Python", cell=index)
            stripped = ["" if s.strip() == "%python" else s for s in stripped]  # keep line numbers
            cells.append(Cell(index, first, "python", "\n".join(stripped)))
        else:
            cells.append(Cell(index, first, "python", "\n".join(body)))
    return cells


def run_notebook(path: str | Path, widgets: Mapping[str, str] | None = None,
                 namespace: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Execute every Python cell of the notebook in one namespace and return that namespace.

    ``widgets`` are the widget values (names no widget reads are refused: a typo would otherwise
    run the notebook on defaults); ``namespace`` seeds the globals, as the Databricks runtime seeds
    `spark` and `dbutils` (a notebook without `spark` builds its own local session).
    """
    from tenantml.apps.notebook import widget_values

    path = Path(path).resolve()
    cells = parse_notebook(path)
    ns: dict[str, Any] = {"__name__": "__main__", "__file__": str(path), "__builtins__": builtins,
                          **(namespace or {})}
    with widget_values(widgets or {}) as read:
        for cell in cells:
            if cell.kind != "python":
                continue
            # Padding keeps the file's line numbers, so tracebacks and the message point into the file.
            code = compile("\n" * (cell.line - 1) + cell.source, str(path), "exec")
            started = time.perf_counter()
            try:
                exec(code, ns)
            except Exception as exc:
                raise NotebookError(_failure(path, cell, exc), cell=cell.index) from exc
            log.info("%s: cell %d ok in %.1fs", path.name, cell.index, time.perf_counter() - started)
    unread = sorted(set(widgets or {}) - read)
    if unread:
        raise NotebookError(f"{path}: no widget named {', '.join(map(repr, unread))} (it reads "
                            f"{', '.join(sorted(read)) or 'none'})")
    ns.pop("__builtins__", None)
    return ns


def _failure(path: Path, cell: Cell, exc: BaseException) -> str:
    """One line: the notebook, the cell, the line inside it that raised, and the error."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
    where = f", line {frames[-1].lineno}" if frames else ""
    error = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (f"{path}: cell {cell.index} (starting line {cell.line}: {cell.title!r}) failed{where}: "
            f"{error[0] if error else type(exc).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tenantml.apps.notebook_runner",
                                description="Run a Databricks-source notebook locally, cell by cell")
    p.add_argument("notebook", type=Path)
    p.add_argument("-w", "--widget", action="append", default=[], metavar="NAME=VALUE",
                   help="a widget value (repeatable)")
    args = p.parse_args(argv)
    widgets: dict[str, str] = {}
    for item in args.widget:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--widget {item!r}: expected NAME=VALUE")
        widgets[name.strip()] = value
    logging.basicConfig(level=os.environ.get("TENANTML_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "py4j", "great_expectations", "alembic", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run_notebook(args.notebook, widgets)
    except NotebookError as exc:
        print(f"notebook failed: {exc}", file=sys.stderr)
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        return EXIT_FAILURE
    print(f"notebook ok: {args.notebook}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
