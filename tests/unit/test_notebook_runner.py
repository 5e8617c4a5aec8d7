"""The notebook runner and widget fallbacks, on small Databricks-source notebooks (no Spark)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tenantml.apps.notebook import find_conf_dir, show_figure, tenant_list, widget
from tenantml.apps.notebook_runner import main, parse_notebook, run_notebook
from tenantml.core.errors import ConfigError, InvalidTenantIdError, NotebookError

SEP = "# COMMAND ----------"


def _notebook(tmp_path: Path, *cells: str, header: str = "# Databricks notebook source") -> Path:
    path = tmp_path / "nb.py"
    path.write_text(header + "\n" + f"\n\n{SEP}\n\n".join(cells) + "\n")
    return path


def test_cells_share_one_namespace_and_markdown_is_skipped(tmp_path: Path) -> None:
    nb = _notebook(tmp_path, "# MAGIC %md\n# MAGIC # Title\n# MAGIC text", "x = 2",
                   "# MAGIC %python\n# MAGIC y = x * 21", "z = y + seed")
    cells = parse_notebook(nb)
    assert [c.kind for c in cells] == ["markdown", "python", "python", "python"]
    ns = run_notebook(nb, namespace={"seed": 0})
    assert (ns["x"], ns["y"], ns["z"]) == (2, 42, 42) and ns["__file__"] == str(nb.resolve())


def test_a_failing_cell_is_named_with_its_line_and_error(tmp_path: Path) -> None:
    nb = _notebook(tmp_path, "a = 1", "# the second code cell\nb = a + 1\nc = {}['missing']", "never = True")
    with pytest.raises(NotebookError) as err:
        run_notebook(nb)
    lines = nb.read_text().splitlines()
    raising = next(i for i, line in enumerate(lines, start=1) if "missing" in line)
    message = str(err.value)
    assert err.value.cell == 2 and "cell 2" in message and f"line {raising}" in message, message
    assert "KeyError: 'missing'" in message and "# the second code cell" in message
    assert isinstance(err.value.__cause__, KeyError)


def test_only_databricks_notebooks_and_python_cells_are_run(tmp_path: Path) -> None:
    with pytest.raises(NotebookError, match="not a Databricks-source notebook"):
        run_notebook(_notebook(tmp_path, "x = 1", header="# a plain script"))
    with pytest.raises(NotebookError, match=r"cell 2 .* uses %sql") as err:
        run_notebook(_notebook(tmp_path, "x = 1", "# MAGIC %sql\n# MAGIC SELECT 1"))
    assert err.value.cell == 2


def test_widgets_take_the_runner_value_then_the_environment_then_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tenantml.apps.notebook import widget as w

    nb = _notebook(tmp_path, "from tenantml.apps.notebook import widget\n"
                             "a = widget('a', 'da')\nb = widget('b', 'db')\nc = widget('c', 'dc')")
    monkeypatch.setenv("TENANTML_WIDGET_B", "from-env")
    monkeypatch.setenv("TENANTML_WIDGET_A", "env-loses")
    ns = run_notebook(nb, {"a": "given"})
    assert (ns["a"], ns["b"], ns["c"]) == ("given", "from-env", "dc")
    assert w("a", "da") == "env-loses"  # outside the runner: the environment, then the default
    with pytest.raises(NotebookError, match="no widget named 'typo'"):
        run_notebook(nb, {"typo": "x"})
    with pytest.raises(ConfigError):
        widget("Bad-Name", "")


def test_tenants_widget_is_validated(tmp_path: Path) -> None:
    assert tenant_list(" ") is None and tenant_list("t1, t2") == ["t1", "t2"]
    with pytest.raises(InvalidTenantIdError, match="tenants widget"):
        tenant_list("t1,../etc")


def test_conf_dir_is_found_from_a_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENANTML_CONF_DIR", raising=False)
    (tmp_path / "conf" / "base").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    assert find_conf_dir(tmp_path / "notebooks") == tmp_path / "conf"
    monkeypatch.setenv("TENANTML_CONF_DIR", "/elsewhere")
    assert find_conf_dir(tmp_path / "notebooks") == Path("/elsewhere")


def test_figures_are_saved_as_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    fig.subplots().plot([0, 1, 2], [1, 0, 1])
    path = show_figure(fig, tmp_path, "line")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figure: {path}" in capsys.readouterr().out
    with pytest.raises(ValueError):
        show_figure(fig, tmp_path, "../escape")


def test_command_line_reports_the_failing_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = _notebook(tmp_path, "from tenantml.apps.notebook import widget\nprint('v=' + widget('v', 'd'))")
    assert main([str(ok), "-w", "v=1"]) == 0 and "v=1" in capsys.readouterr().out
    bad = _notebook(tmp_path, "x = 1", "raise RuntimeError('boom')")
    assert main([str(bad)]) == 1
    assert "cell 2" in capsys.readouterr().err
