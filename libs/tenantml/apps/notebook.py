"""Notebook helpers that behave the same on Databricks and on a laptop.

On Databricks a notebook has `spark`, `dbutils` and `display` from the runtime. Elsewhere (a laptop,
CI through `tenantml.apps.notebook_runner`, `python notebooks/x.py`) these helpers stand in for them:
widgets take the values the runner was given, then `TENANTML_WIDGET_<NAME>` environment variables,
then their defaults; the context builds a local Delta-enabled Spark from config; figures are saved as
PNG files either way and shown inline where a notebook UI exists, printed as paths where none does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantml.core.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from pyspark.sql import SparkSession

    from tenantml.core.ids import TenantId
    from tenantml.io.context import JobContext
    from tenantml.io.scope import TenantScope

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")


@dataclass
class _Given:
    values: dict[str, str]
    read: set[str] = field(default_factory=set)


_GIVEN: ContextVar[_Given | None] = ContextVar("tenantml_notebook_widgets", default=None)


def _user_ns() -> dict[str, Any] | None:
    """The interactive namespace of a notebook UI (Databricks, Jupyter); None in plain Python."""
    try:
        shell = __import__("IPython").get_ipython()
    except ImportError:
        return None
    ns = getattr(shell, "user_ns", None)
    return ns if isinstance(ns, dict) else None


def widget(name: str, default: str) -> str:
    """A text widget's value on Databricks; off Databricks the runner's value, the environment
    variable ``TENANTML_WIDGET_<NAME>`` or the default, so one notebook runs unchanged in both."""
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"widget name {name!r}: use lower-case letters, digits and '_'")
    dbutils = (_user_ns() or {}).get("dbutils")
    if dbutils is not None:
        dbutils.widgets.text(name, default)
        return str(dbutils.widgets.get(name))
    given = _GIVEN.get()
    if given is not None:
        given.read.add(name)
        if name in given.values:
            return given.values[name]
    return os.environ.get(f"TENANTML_WIDGET_{name.upper()}", default)


@contextmanager
def widget_values(values: Mapping[str, str]) -> Iterator[set[str]]:
    """Widget values for notebooks run off Databricks (the runner's ``widgets``); yields the names
    the notebook read, so a caller can refuse values no widget asked for (a typo)."""
    for name in values:
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"widget name {name!r}: use lower-case letters, digits and '_'")
    given = _Given({k: str(v) for k, v in values.items()})
    token = _GIVEN.set(given)
    try:
        yield given.read
    finally:
        _GIVEN.reset(token)


def find_conf_dir(start: Path | None = None) -> Path:
    """`TENANTML_CONF_DIR`, else the nearest `conf/` holding `base/` from the working directory up:
    notebooks run from `notebooks/` in a Databricks Git folder, from the repository root locally."""
    env = os.environ.get("TENANTML_CONF_DIR")
    if env:
        return Path(env)
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "conf" / "base").is_dir():
            return d / "conf"
    raise ConfigError(f"no conf/ folder with base/ in {here} or above it: set the conf_dir widget "
                      "or TENANTML_CONF_DIR")


def notebook_context(spark: SparkSession | None = None, *, conf_dir: str = "", env: str = "",
                     data_dir: str = "") -> JobContext:
    """The notebook's JobContext around the runtime's ``spark`` (pass ``globals().get("spark")``);
    without one, a local session is built from config on first use. Empty values fall back as the
    CLI's do: TENANTML_ENV or `local`, TENANTML_DATA_DIR or `project.data_dir`."""
    from tenantml.io.context import JobContext

    return JobContext.create(conf_dir=conf_dir or find_conf_dir(), env=env or None, data_dir=data_dir or None,
                             spark=spark)


def tenant_list(value: str) -> list[TenantId] | None:
    """A comma-separated tenants widget as validated ids; None (every tenant) when empty."""
    from tenantml.core.ids import validate_tenant_ids

    ids = [t.strip() for t in value.split(",") if t.strip()]
    return validate_tenant_ids(ids, where="the tenants widget") if ids else None


def notebook_scope(ctx: JobContext, tenants: Sequence[str] | None, notebook: str) -> TenantScope:
    """The tenants a notebook reads: the tenants widget's, else every registered tenant. Notebooks
    read tenant tables only through this scope, so a notebook opened for some tenants cannot show
    another tenant's rows, whatever its cells do."""
    from tenantml.io.tenants import list_tenant_ids

    if not _FILE_RE.fullmatch(notebook):
        raise ConfigError(f"notebook name {notebook!r} is not a name")
    ids = list(tenants) if tenants else list_tenant_ids(ctx.spark, ctx.tables.tenants)
    return ctx.scope(ids, f"notebook_{notebook}")


def output_dir(ctx: JobContext, value: str, notebook: str) -> Path:
    """Where a notebook saves its figures: the ``output_dir`` widget's folder, else
    `<data_dir>/notebooks/<notebook>/` (on Databricks a Unity Catalog volume path works too)."""
    if not _FILE_RE.fullmatch(notebook):
        raise ConfigError(f"notebook name {notebook!r} cannot name a folder")
    path = Path(value) if value else ctx.data_dir / "notebooks" / notebook
    path.mkdir(parents=True, exist_ok=True)
    return path


def show_figure(fig: Figure, out_dir: Path, name: str) -> Path:
    """Save ``fig`` as `<out_dir>/<name>.png` and show it: inline in a notebook UI, as the printed
    path elsewhere. Figures are files first so CI, reports and mail can use them too."""
    if not _FILE_RE.fullmatch(name):
        raise ValueError(f"figure name {name!r}: use letters, digits, '_', '-' and '.'")
    path = out_dir / f"{name}.png"
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    if _user_ns() is not None:
        from IPython.display import Image, display

        display(Image(filename=str(path)))
    else:
        print(f"figure: {path}")
    return path


def show_table(df: pd.DataFrame, title: str = "") -> None:
    """A pandas frame as Databricks' interactive table, a Jupyter table, or plain text."""
    ns = _user_ns()
    if ns is not None and callable(ns.get("display")):
        ns["display"](df)
        return
    if title:
        print(f"\n{title} ({len(df)} rows)")
    print(df.to_string(max_rows=200, max_colwidth=80))
