"""Notebook helpers that behave the same on Databricks and on a laptop."""

from __future__ import annotations


def widget(name: str, default: str) -> str:
    """A text widget's value on Databricks; the default elsewhere (no dbutils off Databricks)."""
    try:
        dbutils = __import__("IPython").get_ipython().user_ns["dbutils"]
    except (ImportError, AttributeError, KeyError):
        return default
    dbutils.widgets.text(name, default)
    return str(dbutils.widgets.get(name))
