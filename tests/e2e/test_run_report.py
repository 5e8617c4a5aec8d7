"""The HTML run report of a real pipeline run, rendered by headless Chromium.

The page must stand alone (no script, no URL), show one row per tenant in each section, draw its
charts, and render hostile error text as text. Chromium comes from Debian's package: `make browser`
installs it; CI sets TENANTML_REQUIRE_BROWSER so that a missing browser fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tenantml.io import read_table

pytestmark = [pytest.mark.spark, pytest.mark.slow]
CHROMIUM = Path("/usr/bin/chromium")
PAYLOAD = "<script>document.title='pwned'</script>"
CHART_COLORS = {"valid": (0x2F, 0x6D, 0xB5), "quarantined": (0xC0, 0x39, 0x2B), "tuned": (0xE0, 0x8A, 0x1E),
                "shared": (0x3A, 0x9A, 0x5B)}


def _chromium() -> Path:
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    message = f"headless Chromium is not installed at {CHROMIUM}: run `make browser`"
    if os.environ.get("TENANTML_REQUIRE_BROWSER"):
        pytest.fail(message + " (TENANTML_REQUIRE_BROWSER is set)")
    pytest.skip(message)


def _browse(page: Path, tmp: Path, *args: str) -> str:
    """Chromium headless on a file:// URL; returns its stdout (the DOM with --dump-dom)."""
    proc = subprocess.run([str(_chromium()), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", *args,
                           page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


class Dom(HTMLParser):
    """What the checks need from the rendered DOM: tags, tenant rows per table, text per element."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.rows: dict[str, list[str]] = {}  # table id -> data-tenant of its rows, in order
        self.texts: dict[str, list[str]] = {}  # tag -> text content of each such element
        self.classes: dict[str, int] = {}
        self._table: str | None = None
        self._open: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for c in (a.get("class") or "").split():
            self.classes[f"{tag}.{c}"] = self.classes.get(f"{tag}.{c}", 0) + 1
        if tag == "table":
            self._table = a.get("id") or ""
            self.rows[self._table] = []
        if tag == "tr" and self._table is not None and a.get("data-tenant") is not None:
            self.rows[self._table].append(str(a["data-tenant"]))
        if tag in ("pre", "title", "h1"):
            self._open.append(tag)
            self.texts.setdefault(tag, []).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        if self._open and self._open[-1] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open:
            self.texts[self._open[-1]][-1] += data


@pytest.fixture(scope="module")
def report(analyst_run: dict[str, Any]) -> Path:
    """The report `run_pipeline` wrote at the end of the run."""
    ctx = analyst_run["ctx"]
    path = Path(analyst_run["data_dir"]).resolve() / "reports" / f"{ctx.run_id}.html"
    assert path.is_file(), "run_pipeline did not write the run report"
    return path


def test_the_report_is_self_contained(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert not re.search(r"https?:|//[a-z0-9]|\b(src|href)\s*=", page, re.IGNORECASE), "external reference"
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # Quality, candidates, predictions, and the monitoring section's drift chart.
    assert page.count("<svg") == 4 and "<style>" in page


def test_chromium_renders_every_tenant_and_the_charts(spark: Any, analyst_run: dict[str, Any], report: Path,
                                                      tmp_path: Path) -> None:
    ctx = analyst_run["ctx"]
    dom = Dom(_browse(report, tmp_path, "--dump-dom"))
    quality = {r["tenant_id"] for r in read_table(spark, ctx.tables.quality("demo"))
               .where("purpose = 'history' AND tenant_id IS NOT NULL").collect()}
    decided = {r["tenant_id"] for r in read_table(spark, ctx.tables.promotions)
               .where(f"run_id = '{ctx.run_id}'").collect()} - {"_shared"}
    scored = {r["tenant_id"] for r in read_table(spark, ctx.tables.predictions("demo"))
              .where(f"run_id = '{ctx.run_id}'").select("tenant_id").distinct().collect()}
    assert sorted(dom.rows["quality-table"]) == sorted(quality) and "t-dirty" in quality
    assert sorted(dom.rows["strategies-table"]) == sorted(decided) == ["t000", "t001", "t002", "t003", "t004"]
    assert sorted(dom.rows["predictions-table"]) == sorted(scored) == sorted(decided)
    assert dom.tags.get("svg") == 4 and dom.classes.get("svg.chart") == 4
    # Quality: two segments per tenant (zero-width ones included); candidates: one bar per metric
    # recorded; predictions: one bar per tenant.
    n_candidates = sum(1 for r in read_table(spark, ctx.tables.promotions).where(f"run_id = '{ctx.run_id}'")
                       .collect() if r["tenant_id"] != "_shared" for c in json.loads(r["candidates_json"])
                       if c.get("auc") is not None)
    drift = re.search(r'<svg id="chart-drift".*?</svg>', report.read_text(encoding="utf-8"), re.S)
    drift_bars = drift.group(0).count('<rect class="bar"') if drift else 0
    assert dom.classes.get("rect.bar") == 2 * len(quality) + len(scored) + drift_bars
    assert dom.classes.get("circle.dot") == n_candidates
    assert dom.classes.get("circle.champion") == sum(1 for r in read_table(spark, ctx.tables.promotions)
                                                     .where(f"run_id = '{ctx.run_id}'").collect()
                                                     if r["tenant_id"] != "_shared" and r["decision"] == "promoted")
    assert dom.texts["h1"] == ["Run report: demo"] and "pwned" not in dom.texts["title"][0]
    assert dom.tags.get("script", 0) == 0
    assert "failures-table" not in dom.rows and "pre" not in dom.texts  # this run has no failure
    assert dom.classes.get("span.ok") == 1


def test_the_screenshot_shows_the_charts(report: Path, tmp_path: Path, check_png: Any) -> None:
    shot = tmp_path / "report.png"
    _browse(report, tmp_path, f"--screenshot={shot}", "--window-size=1200,2600", "--hide-scrollbars")
    img = check_png(shot, min_size=(1200, 2600), min_colors=50)
    colors = {c for _, c in img.getcolors(maxcolors=1 << 22)}

    def drawn(rgb: tuple[int, int, int]) -> bool:
        return any(all(abs(a - b) <= 3 for a, b in zip(rgb, c, strict=True)) for c in colors)

    missing = [name for name, rgb in CHART_COLORS.items() if not drawn(rgb)]
    assert not missing, f"chart colours not on screen: {missing}"


def _close_candidates_report() -> Any:
    """A run whose one tenant's candidates score 0.88 (tenant) and 0.90 (tuned, promoted)."""
    from datetime import UTC, datetime

    from tenantml.apps.report import RunReport

    log = {"run_id": "r-close", "step": "promote", "dataset": "demo", "tenant_id": "acme", "status": "ok",
           "rows_in": 500, "rows_out": 500, "rows_quarantined": 0, "seconds": 1.0, "error": None,
           "logged_at": datetime(2026, 1, 1)}
    decision = {"tenant_id": "acme", "decision": "promoted", "reason": "tuned beats champion by 0.0100",
                "metric_name": "auc", "margin": 0.005, "serving_model": "demo__acme/3", "serving_strategy": "tuned",
                "champion_before_metric": 0.89, "holdout_rows": 100, "challenger_metric": 0.90,
                "candidates_json": json.dumps([{"strategy": "tenant", "model": "demo__acme/1", "auc": 0.88},
                                               {"strategy": "tuned", "model": "demo__acme/2", "auc": 0.90}])}
    return RunReport(run_id="r-close", dataset="demo", generated_at=datetime(2026, 1, 1, tzinfo=UTC),
                     run_log=[log], decisions=[decision], metric_name="auc")


def test_chromium_draws_close_candidates_far_apart(tmp_path: Path, check_png: Any) -> None:
    """0.88 and 0.90 on the strategy chart: their dots are a large share of the plot apart, in the
    DOM Chromium builds and on its screenshot (bars from 0 put them 2% apart)."""
    import numpy as np

    from tenantml.apps.report import AXIS_COLOR, STRATEGY_COLORS, render

    page = tmp_path / "close.html"
    page.write_text(render(_close_candidates_report()), encoding="utf-8")
    markup = _browse(page, tmp_path, "--dump-dom")
    assert Dom(markup).tags.get("script", 0) == 0
    chart = markup[markup.index('id="chart-strategies"'):]
    dots = dict(re.findall(r'<circle class="dot" data-strategy="(\w+)" cx="([0-9.]+)"', chart))
    (x0, x1), = re.findall(r'<line class="axis" x1="([0-9.]+)" y1="[0-9.]+" x2="([0-9.]+)"', chart)
    assert set(dots) == {"tenant", "tuned"}
    assert (float(dots["tuned"]) - float(dots["tenant"])) / (float(x1) - float(x0)) > 0.3, (dots, x0, x1)
    assert re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', chart), "no labelled ticks"
    assert "auc on the tenant's holdout" in chart

    shot = tmp_path / "close.png"
    _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", "--hide-scrollbars")
    px = np.asarray(check_png(shot, min_size=(1200, 1400)), dtype=np.int16)

    def mask(hex_color: str) -> Any:
        rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
        return np.all(np.abs(px - rgb) <= 3, axis=2)

    # The axis: the longest horizontal run of its colour gives the plot's pixel span and its row.
    axis = mask(AXIS_COLOR)
    runs = []
    for y in np.nonzero(axis.sum(axis=1) > 200)[0]:
        xs = np.nonzero(axis[y])[0]
        breaks = np.nonzero(np.diff(xs) > 1)[0]
        for seg in np.split(xs, breaks + 1):
            runs.append((int(seg[-1] - seg[0] + 1), int(y), int(seg[0]), int(seg[-1])))
    assert runs, "no axis line on screen"
    plot_px, axis_y, left, right = max(runs)
    assert plot_px > 300, runs
    scale = plot_px / 470  # the SVG's plot width in user units
    band = slice(max(0, int(axis_y - 22 * scale)), axis_y)  # the one row of dots, below the legend
    centres = {}
    for strategy in ("tenant", "tuned"):
        _, xs = np.nonzero(mask(STRATEGY_COLORS[strategy])[band, left:right + 1])
        assert len(xs) > 10, f"no {strategy} dot drawn above the axis"
        centres[strategy] = left + float(xs.mean())
    assert (centres["tuned"] - centres["tenant"]) / plot_px > 0.3, (centres, plot_px)


def test_error_text_is_escaped_and_the_cli_writes_the_report(spark: Any, analyst_run: dict[str, Any],
                                                              report: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              restore_spark_conf: None) -> None:
    """A step fails with `<script>` in its error (the source path names it); the report of that run,
    written by `tenantml report --run-id`, shows the text and runs nothing."""
    from tenantml.apps.cli import run as cli_run
    from tenantml.core.errors import SourceError
    from tenantml.io.context import JobContext
    from tenantml.steps.runner import run_step

    run_id = "report-escape-1"
    ctx = JobContext.create(conf_dir=analyst_run["conf"], data_dir=analyst_run["data_dir"], spark=spark,
                            run_id=run_id)
    bad_source = tmp_path / PAYLOAD  # the '/' in '</script>' makes it a nested path; its text is intact
    assert PAYLOAD in str(bad_source)
    with pytest.raises(SourceError, match="does not exist"):
        run_step(ctx, "ingest", dataset="demo", source_path=str(bad_source))
    logged = read_table(spark, ctx.tables.run_log).where(f"run_id = '{run_id}'").collect()
    assert len(logged) == 1 and PAYLOAD in logged[0]["error"]

    capsys.readouterr()
    code = cli_run(["report", "--run-id", run_id, "--json", "--quiet", "--conf-dir", str(analyst_run["conf"]),
                    "--data-dir", str(analyst_run["data_dir"])])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["run_id"] == run_id
    page_path = Path(payload["report"])
    assert page_path == Path(analyst_run["data_dir"]).resolve() / "reports" / f"{run_id}.html"
    page = page_path.read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page

    dom = Dom(_browse(page_path, tmp_path, "--dump-dom"))
    assert dom.tags.get("script", 0) == 0
    assert len(dom.texts["pre"]) == 1 and PAYLOAD in dom.texts["pre"][0]  # shown as text, verbatim
    assert dom.texts["title"][0] == f"tenantml run {run_id} (demo)"  # the payload never ran (the others are SVG titles)
    assert dom.rows["failures-table"] == []  # a step-level failure: no tenant
    assert dom.classes.get("span.status") == 1 and dom.classes.get("span.failed") == 1
    # This run did not validate: each tenant's latest validation is shown, and the page says so.
    assert dom.rows["quality-table"] == Dom(report.read_text(encoding="utf-8")).rows["quality-table"]
    assert "This run did not validate" in page


def test_a_run_whose_step_raised_still_gets_its_report(spark: Any, analyst_run: dict[str, Any],
                                                       tmp_path: Path) -> None:
    from tenantml.apps.report import run_pipeline_reported
    from tenantml.core.errors import SourceError
    from tenantml.io.context import JobContext

    ctx = JobContext.create(conf_dir=analyst_run["conf"], data_dir=tmp_path / "empty", spark=spark,
                            run_id="report-raised-1")
    with pytest.raises(SourceError, match="does not exist"):  # no source files in a new data directory
        run_pipeline_reported(ctx, dataset="demo")
    page = (ctx.data_dir / "reports" / "report-raised-1.html").read_text(encoding="utf-8")
    dom = Dom(page)
    assert dom.classes.get("span.failed") == 1 and len(dom.texts["pre"]) == 1
    assert "source path" in dom.texts["pre"][0] and "No validation yet." in page


def test_a_report_that_cannot_be_written_is_logged_not_raised(analyst_run: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import tenantml.apps.report

    def broken(*args: object, **kwargs: object) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(tenantml.apps.report, "write_run_report", broken)
    with caplog.at_level("ERROR", logger="tenantml.apps.report"):
        assert tenantml.apps.report.run_pipeline_reported(analyst_run["ctx"], dataset="demo", steps=()) == []
    assert any("could not write the run report" in r.getMessage() and r.exc_info and "disk full" in str(r.exc_info[1])
               for r in caplog.records)
