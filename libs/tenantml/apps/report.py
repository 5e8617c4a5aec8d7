"""The run report: one self-contained HTML page per pipeline run, `<data_dir>/reports/<run_id>.html`.

For the people who read a run rather than query it: per tenant the data quality, the strategy chosen
and its holdout metrics, what was scored, and every failure with its error. Everything is inline (CSS,
charts as SVG, no script, no URL), so the file can be attached to a ticket or mailed and opened
offline; its Content-Security-Policy forbids scripts and remote loads besides. Every value is escaped:
tenant ids are validated upstream, but error text is whatever an exception said.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantml.core.errors import RunNotFoundError, TableNotFoundError, TenantMLError
from tenantml.core.ids import validate_run_id

if TYPE_CHECKING:
    from tenantml.io.context import JobContext
    from tenantml.steps.base import StepResult

INVALID_TENANT = "(invalid tenant id)"
STRATEGY_COLORS = {"tenant": "#2f6db5", "tuned": "#e08a1e", "shared": "#3a9a5b"}
VALID_COLOR, QUARANTINED_COLOR = "#2f6db5", "#c0392b"
NONE = "\u2013"  # an en dash: no value
MAX_CHART_ROWS = 40  # tables list every tenant; charts the first 40 (a chart of 5,000 bars says nothing)


@dataclass
class RunReport:
    """What the page shows, gathered from the tables; rendering needs no Spark."""

    run_id: str
    dataset: str
    generated_at: datetime
    run_log: list[dict[str, Any]]
    quality: list[dict[str, Any]] = field(default_factory=list)
    quality_from_run: bool = True  # False: this run did not validate; the latest validation is shown
    decisions: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    metric_name: str = "metric"
    scoring_quality: list[dict[str, Any]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)  # per tenant: largest feature PSI, prediction PSI
    realised: list[dict[str, Any]] = field(default_factory=list)  # per tenant: realised vs promoted metric
    retraining: list[dict[str, Any]] = field(default_factory=list)  # the monitor step's decisions
    retraining_run: str | None = None  # set when the run's monitor was skipped: the run whose decisions stand
    tainted: list[dict[str, Any]] = field(default_factory=list)  # score: tenant, note (fell back / kept serving)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.run_log if r["status"] == "failed"]

    @property
    def status(self) -> str:
        failed = {r["tenant_id"] for r in self.failures}
        if not failed:
            return "ok"
        return "failed" if None in failed or failed >= {r["tenant_id"] for r in self.run_log
                                                         if not _step_note(r)} else "partial"


def report_path(ctx: JobContext, run_id: str) -> Path:
    return ctx.data_dir / "reports" / f"{validate_run_id(run_id)}.html"


def latest_run_id(ctx: JobContext, dataset: str) -> str:
    """The dataset's most recent run in `run_log` (by the time its rows were logged)."""
    from pyspark.sql import functions as F

    from tenantml.io import read_table, table_exists

    if not table_exists(ctx.spark, ctx.tables.run_log):
        raise TableNotFoundError(f"table {ctx.tables.run_log.display} does not exist yet: no run to report on")
    row = (read_table(ctx.spark, ctx.tables.run_log).where(F.col("dataset") == dataset)
           .groupBy("run_id").agg(F.max("logged_at").alias("at")).orderBy(F.col("at").desc()).first())
    if row is None:
        raise RunNotFoundError(f"{ctx.tables.run_log.display} holds no run of dataset {dataset!r}")
    return str(row["run_id"])


def gather(ctx: JobContext, dataset: str, run_id: str) -> RunReport:
    """The run's rows of run_log, quality, promotions, predictions, monitoring and retraining (small
    queries, each aggregated per tenant in Spark)."""
    from pyspark.sql import functions as F

    from tenantml.io import read_table, table_exists
    from tenantml.models import primary_metric

    run_id = validate_run_id(run_id)
    name, spec = ctx.config.dataset(dataset)
    spark, t = ctx.spark, ctx.tables
    in_run = (F.col("run_id") == run_id)
    log_rows = ([r.asDict() for r in read_table(spark, t.run_log)
                 .where(in_run & (F.col("dataset") == name)).collect()]
                if table_exists(spark, t.run_log) else [])
    tainted = []
    for row in log_rows:
        detail = row.pop("detail", None)
        if _step_note(row) and detail:  # the run whose result a skipped step's stands on
            row["unchanged_since"] = (json.loads(detail) or {}).get("unchanged_since")
        if row["step"] == "score" and detail and "tainted" in detail:
            note = (json.loads(detail) or {}).get("tainted")
            if note:
                tainted.append({"tenant_id": row["tenant_id"], "note": note})
    if not log_rows:
        raise RunNotFoundError(f"{t.run_log.display} holds no rows of run {run_id!r} for dataset {name!r}")
    report = RunReport(run_id=run_id, dataset=name, generated_at=datetime.now(UTC), run_log=log_rows,
                       metric_name=primary_metric(spec.task)[0], tainted=tainted)  # type: ignore[arg-type]

    if table_exists(spark, t.quality(name)):
        # Rows of an invalid tenant id have no tenant: run_log counts them (shown as such below).
        quality = read_table(spark, t.quality(name)).where(F.col("tenant_id").isNotNull())
        history = quality.where(F.col("purpose") == "history")
        rows = history.where(in_run).collect()
        if not rows:  # this run did not validate: show what the steps it ran relied on
            report.quality_from_run = False
            rows = history.collect()
        report.quality = sorted((r.asDict() for r in rows), key=lambda r: (-int(r["rows_in"] or 0), r["tenant_id"]))
        report.scoring_quality = sorted((r.asDict() for r in quality.where(in_run & (F.col("purpose") == "scoring"))
                                         .collect()), key=lambda r: r["tenant_id"])
    if table_exists(spark, t.monitoring(name)):
        mon = read_table(spark, t.monitoring(name)).where(in_run & (F.col("dataset") == name))
        # A PSI over fewer than monitoring.min_drift_rows rows is noise (status too_few_rows): it is
        # neither the largest drift of a tenant nor a reason to rank it first.
        measured = F.col("status") != "too_few_rows"
        feature = F.col("kind").isin("numeric", "categorical") & measured
        report.drift = [r.asDict() for r in mon.where(F.col("kind").isin("numeric", "categorical", "prediction", "rows"))
                        .groupBy("tenant_id").agg(
                            F.max(F.when(feature, F.col("psi"))).alias("max_feature_psi"),
                            F.max_by(F.when(feature, F.col("feature")), F.when(feature, F.col("psi")))
                            .alias("feature"),
                            F.max_by(F.when(feature, F.col("status")), F.when(feature, F.col("psi")))
                            .alias("feature_status"),
                            F.sum((feature & (F.col("status") == "drift")).cast("long")).alias("drifted_features"),
                            F.max(F.when((F.col("kind") == "prediction") & measured, F.col("psi")))
                            .alias("prediction_psi"),
                            F.max(F.when(F.col("kind") == "rows", F.col("rows"))).alias("rows"))
                        .orderBy("tenant_id").collect()]
        report.realised = [r.asDict() for r in mon.where(F.col("kind") == "realised")
                           .select("tenant_id", "batch_id", "metric_name", "value", "promoted_value", "rows")
                           .orderBy("tenant_id", "batch_id").collect()]
    if table_exists(spark, t.retraining(name)):
        # A monitor skipped as unchanged made no decisions of its own: those of the run it stood on hold.
        stood = next((row.get("unchanged_since") for row in log_rows if row["step"] == "monitor"
                      and row.get("unchanged_since")), None)
        report.retraining_run = stood
        report.retraining = [r.asDict() for r in read_table(spark, t.retraining(name))
                             .where((F.col("run_id") == (stood or run_id)) & (F.col("dataset") == name))
                             .orderBy("tenant_id").collect()]
    if table_exists(spark, t.promotions):
        report.decisions = sorted((r.asDict() for r in read_table(spark, t.promotions)
                                   .where(in_run & (F.col("dataset") == name)).collect()),
                                  key=lambda r: r["tenant_id"])
    if table_exists(spark, t.predictions(name)):
        report.predictions = [r.asDict() for r in read_table(spark, t.predictions(name)).where(in_run)
                              .groupBy("tenant_id", "strategy")
                              .agg(F.count(F.lit(1)).alias("rows"), F.avg("score").alias("mean_score"),
                                   F.avg("prediction").alias("mean_prediction"))
                              .orderBy("tenant_id", "strategy").collect()]
    return report


def write_run_report(ctx: JobContext, dataset: str | None = None, run_id: str | None = None) -> Path:
    """Render the run's report to `<data_dir>/reports/<run_id>.html` (atomically: a reader never
    sees half a page) and return its path. Defaults: the context's dataset and run id."""
    name, _ = ctx.config.dataset(dataset)
    report = gather(ctx, name, run_id or ctx.run_id)
    path = report_path(ctx, report.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mcfg = ctx.config.monitoring
    tmp.write_text(render(report, mcfg.psi_warn, mcfg.psi_alert), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_pipeline_reported(ctx: JobContext, dataset: str | None = None, tenants: Sequence[str] | None = None,
                          steps: Sequence[str] | None = None, report: bool = True,
                          **options: Any) -> list[StepResult]:
    """`run_pipeline`, then the run's HTML report, also when a step raised (its failure is in
    run_log by then). A report that cannot be written is logged, never fails the run."""
    from tenantml.steps.runner import run_pipeline

    try:
        return run_pipeline(ctx, dataset=dataset, tenants=tenants, steps=steps, **options)
    finally:
        if report:
            _write_report(ctx, dataset)


def _write_report(ctx: JobContext, dataset: str | None) -> None:
    import logging

    log = logging.getLogger(__name__)
    try:
        ctx.progress.phase(f"run report: {write_run_report(ctx, dataset, ctx.run_id)}")
    except TenantMLError as exc:  # e.g. a run that failed before it logged anything
        log.warning("run report of run %s not written: %s", ctx.run_id, exc)
    except Exception:
        log.exception("could not write the run report of run %s", ctx.run_id)


# ---------------------------------------------------------------------------------------- rendering

def _e(value: Any) -> str:
    """Every value goes through here on its way into the page."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return NONE if value is None or not math.isfinite(float(value)) else f"{float(value):.1%}"


def _table(table_id: str, headers: Sequence[str], rows: Sequence[tuple[str | None, Sequence[str]]],
           numeric: Sequence[int] = ()) -> str:
    """``rows``: (tenant id for the row's data-tenant attribute, already-escaped cells); ``numeric``:
    the column indexes aligned right."""
    def cls(i: int) -> str:
        return ' class="num"' if i in numeric else ""

    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(headers))
    body = []
    for tenant, cells in rows:
        attr = f' data-tenant="{_e(tenant)}"' if tenant is not None else ""
        tds = "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(cells))
        body.append(f"<tr{attr}>{tds}</tr>")
    return (f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def bar_chart(chart_id: str, title: str, labels: Sequence[str],
              series: Sequence[tuple[str, str, Sequence[float | None]]], *, stacked: bool,
              fmt: Callable[[float], str] = lambda v: f"{v:,.0f}") -> str:
    """A horizontal bar chart as inline SVG: one row per label; ``series`` are (name, colour,
    values), stacked into one bar or grouped as thin bars. Text is escaped; no script, no font file."""
    labels = list(labels)[:MAX_CHART_ROWS]
    label_w, plot_w, value_w, legend_h = 170, 470, 90, 26
    bar_h = 16 if stacked else max(5, 16 // max(1, len(series)) + 2)
    row_h = (bar_h if stacked else bar_h * len(series)) + 8
    height = legend_h + row_h * len(labels) + 6
    width = label_w + plot_w + value_w

    def value(s: int, i: int) -> float | None:
        v = series[s][2][i] if i < len(series[s][2]) else None
        return None if v is None or not math.isfinite(float(v)) else float(v)

    totals = [sum(value(s, i) or 0.0 for s in range(len(series))) if stacked
              else max((value(s, i) or 0.0 for s in range(len(series))), default=0.0) for i in range(len(labels))]
    vmax = max([abs(v) for v in totals] + [1e-12])
    parts = [f'<svg id="{_e(chart_id)}" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
             f"<title>{_e(title)}</title>"]
    x = label_w
    for name, color, _ in series:  # legend
        parts.append(f'<rect x="{x}" y="6" width="12" height="12" fill="{_e(color)}"></rect>'
                     f'<text x="{x + 16}" y="16" class="legend">{_e(name)}</text>')
        x += 24 + 7 * len(name)
    for i, label in enumerate(labels):
        top = legend_h + i * row_h
        parts.append(f'<text x="{label_w - 6}" y="{top + row_h / 2 + 4:.0f}" text-anchor="end">{_e(label)}</text>')
        left = 0.0
        for s, (name, color, _) in enumerate(series):
            v = value(s, i)
            if v is None:
                continue
            w = max(0.0, v) / vmax * plot_w
            y = top + 4 if stacked else top + 4 + s * bar_h
            x0 = label_w + (left if stacked else 0.0)
            parts.append(f'<rect class="bar" x="{x0:.1f}" y="{y}" width="{w:.1f}" height="{bar_h - 1}" '
                         f'fill="{_e(color)}"><title>{_e(label)}: {_e(name)} {_e(fmt(v))}</title></rect>')
            if stacked:
                left += w
        total = totals[i] if any(value(s, i) is not None for s in range(len(series))) else None
        parts.append(f'<text x="{label_w + plot_w + 6}" y="{top + row_h / 2 + 4:.0f}" class="value">'
                     f'{_e(NONE if total is None else fmt(total))}</text>')
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class DotRow:
    """One tenant's row of `dot_plot`: each candidate strategy's metric, the candidate now serving
    (``champion``: ringed; None when no candidate of this run serves), the champion before the
    decision with the margin a challenger had to clear, and the serving model's metric (``served``:
    the value column; default the ringed candidate's)."""

    label: str
    values: dict[str, float | None]
    champion: str | None = None
    before: float | None = None
    margin: float | None = None
    served: float | None = None


HIGHER_IS_BETTER = {"auc": True, "rmse": False}
_BOUNDED_01 = {"auc"}
AXIS_COLOR, GRID_COLOR, MARK_COLOR = "#5a5a5a", "#e4e7ec", "#222222"


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def nice_ticks(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float], int]:
    """An axis over [lo, hi], padded a little and rounded to a 1-2-2.5-5 step: (start, end, ticks,
    decimals for their labels). A zero span gets a small one around the value."""
    span = hi - lo
    if span <= 0:
        span = max(abs(hi) * 0.02, 0.01)
        lo, hi = lo - span / 2, hi + span / 2
    lo, hi = lo - span * 0.08, hi + span * 0.08
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start, end = math.floor(lo / step) * step, math.ceil(hi / step) * step
    n = round((end - start) / step)
    ticks = [start + i * step for i in range(n + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / mag, 6) == 2.5 else 0)
    return start, end, ticks, decimals


def dot_plot(chart_id: str, title: str, rows: Sequence[DotRow], series: Sequence[tuple[str, str]], *,
             metric_name: str, axis_label: str | None = None, before_label: str = "champion before (+ margin)") -> str:
    """A dot plot as inline SVG: one row per tenant, one dot per candidate (``series``: strategy and
    colour), the serving champion ringed, the champion before as a bar with its promotion margin
    shaded. The axis spans only the values drawn (so 0.88 and 0.90 are far apart), with labelled
    ticks and the metric's name. Text is escaped; no script, no font file."""
    rows = list(rows)[:MAX_CHART_ROWS]
    higher = HIGHER_IS_BETTER.get(metric_name)
    label_w, plot_w, value_w, legend_h, row_h, axis_h = 170, 470, 90, 26, 22, 44
    width, height = label_w + plot_w + value_w, legend_h + row_h * len(rows) + axis_h
    drawn: list[float] = []
    for row in rows:
        drawn += [v for v in (_finite(x) for x in row.values.values()) if v is not None]
        before = _finite(row.before)
        if before is not None:
            drawn.append(before)
            if _finite(row.margin) and higher is not None:
                drawn.append(before + (1 if higher else -1) * float(row.margin or 0))
    lo, hi = (min(drawn), max(drawn)) if drawn else (0.0, 1.0)
    start, end, ticks, decimals = nice_ticks(lo, hi)
    if metric_name in _BOUNDED_01:  # no axis room beyond what the metric can reach
        start, end = max(start, 0.0), min(end, 1.0)
        ticks = [t for t in ticks if start - 1e-12 <= t <= end + 1e-12]

    def x(v: float) -> float:
        return label_w + (v - start) / (end - start) * plot_w

    def fmt(v: float) -> str:
        return f"{v:.{max(3, decimals)}f}"

    parts = [f'<svg id="{_e(chart_id)}" class="chart dotplot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" '
             f'data-axis-start="{start:.6g}" data-axis-end="{end:.6g}">',
             f"<title>{_e(title)}</title>"]
    lx = label_w
    for name, color in series:  # legend
        parts.append(f'<circle class="key" cx="{lx + 6}" cy="12" r="5" fill="{_e(color)}"></circle>'
                     f'<text x="{lx + 16}" y="16" class="legend">{_e(name)}</text>')
        lx += 24 + 7 * len(name)
    parts.append(f'<circle cx="{lx + 6}" cy="12" r="8" fill="none" stroke="{MARK_COLOR}" stroke-width="1.5"></circle>'
                 f'<text x="{lx + 18}" y="16" class="legend">serving</text>')
    lx += 80
    parts.append(f'<rect x="{lx}" y="4" width="2" height="16" fill="{MARK_COLOR}"></rect>'
                 f'<text x="{lx + 8}" y="16" class="legend">{_e(before_label)}</text>')
    top, bottom = legend_h, legend_h + row_h * len(rows)
    for t in ticks:  # grid, behind the dots
        parts.append(f'<line class="grid" x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{bottom}" '
                     f'stroke="{GRID_COLOR}" stroke-width="1"></line>')
    for i, row in enumerate(rows):
        cy = top + i * row_h + row_h / 2
        parts.append(f'<text x="{label_w - 8}" y="{cy + 4:.0f}" text-anchor="end">{_e(row.label)}</text>')
        before, margin = _finite(row.before), _finite(row.margin)
        if before is not None:
            if margin and higher is not None:
                x0, x1 = sorted((x(before), x(before + (margin if higher else -margin))))
                parts.append(f'<rect class="margin" x="{x0:.1f}" y="{cy - 8:.1f}" width="{max(x1 - x0, 1.0):.1f}" '
                             f'height="16" fill="{MARK_COLOR}" fill-opacity="0.12">'
                             f'<title>{_e(row.label)}: promotion margin {_e(fmt(margin))}</title></rect>')
            parts.append(f'<rect class="baseline" x="{x(before) - 1:.1f}" y="{cy - 8:.1f}" width="2" height="16" '
                         f'fill="{MARK_COLOR}"><title>{_e(row.label)}: champion before {_e(fmt(before))}</title></rect>')
        xs = {name: x(v) for name, _ in series if (v := _finite(row.values.get(name))) is not None}
        for s, (name, color) in enumerate(series):
            v = _finite(row.values.get(name))
            if v is None:
                continue
            # Dots that would overlap move apart vertically, so equal values stay visible.
            close = any(abs(xs[name] - other) < 10 for o, other in xs.items() if o != name)
            dy = (s - (len(series) - 1) / 2) * 5 if close else 0.0
            if name == row.champion:
                parts.append(f'<circle class="champion" cx="{x(v):.1f}" cy="{cy + dy:.1f}" r="8" fill="none" '
                             f'stroke="{MARK_COLOR}" stroke-width="1.5"></circle>')
            parts.append(f'<circle class="dot" data-strategy="{_e(name)}" cx="{x(v):.1f}" cy="{cy + dy:.1f}" '
                         f'r="5" fill="{_e(color)}" stroke="#ffffff" stroke-width="1">'
                         f'<title>{_e(row.label)}: {_e(name)} {_e(fmt(v))}</title></circle>')
        served = _finite(row.served) if row.served is not None else _finite(row.values.get(row.champion or ""))
        parts.append(f'<text x="{label_w + plot_w + 8}" y="{cy + 4:.0f}" class="value">'
                     f'{_e(NONE if served is None else fmt(served))}</text>')
    parts.append(f'<line class="axis" x1="{label_w}" y1="{bottom + 0.5}" x2="{label_w + plot_w}" y2="{bottom + 0.5}" '
                 f'stroke="{AXIS_COLOR}" stroke-width="1" shape-rendering="crispEdges"></line>')
    for t in ticks:
        parts.append(f'<line x1="{x(t):.1f}" y1="{bottom}" x2="{x(t):.1f}" y2="{bottom + 5}" stroke="{AXIS_COLOR}" '
                     f'stroke-width="1"></line><text class="tick" x="{x(t):.1f}" y="{bottom + 17}" '
                     f'text-anchor="middle">{_e(f"{t:.{decimals}f}")}</text>')
    better = "" if higher is None else (", higher is better" if higher else ", lower is better")
    axis = axis_label or f"{metric_name} on the tenant's holdout"
    parts.append(f'<text class="axis-label" x="{label_w + plot_w / 2}" y="{bottom + 37}" text-anchor="middle">'
                 f"{_e(axis)}{_e(better)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _figure(svg: str, caption: str, shown: int, total: int) -> str:
    more = f" ({shown} of {total} shown)" if total > shown else ""
    return f'<figure>{svg}<figcaption>{_e(caption + more)}</figcaption></figure>'


def _step_note(row: dict[str, Any]) -> bool:
    """A step-level "skipped" row (no tenant): the step had nothing to do, or nothing it depends on
    changed since it last ran. It is not a tenant's outcome and is not counted as one."""
    return row["tenant_id"] is None and row["status"] == "skipped"


def _unchanged(row: dict[str, Any]) -> str | None:
    """The run a skipped step's result stands on (the runner skips a step none of whose tables,
    config or tenants changed since its last clean run); None for every other row."""
    since = row.get("unchanged_since") if _step_note(row) else None
    return str(since) if since else None


def _steps_section(r: RunReport) -> str:
    by_step: dict[str, list[dict[str, Any]]] = {}
    for row in r.run_log:
        by_step.setdefault(row["step"], []).append(row)
    from tenantml.steps.base import pipeline_order

    step_order = pipeline_order()
    order = sorted(by_step, key=lambda s: (step_order.index(s) if s in step_order else len(step_order), s))
    rows = []
    for step in order:
        rs = by_step[step]
        since = next((_unchanged(x) for x in rs if _unchanged(x)), None)
        count = {k: sum(1 for x in rs if x["status"] == k and not _step_note(x))
                 for k in ("ok", "skipped", "blocked", "failed")}
        label = f"{step} (unchanged since run {since})" if since else step
        rows.append((None, [_e(label), *(_num(count[k]) for k in count),
                            _num(sum(int(x["rows_in"]) for x in rs)), _num(sum(int(x["rows_out"]) for x in rs)),
                            _num(sum(int(x["rows_quarantined"]) for x in rs))]))
    return ('<section id="steps"><h2>Steps</h2>'
            + _table("steps-table", ["step", "ok", "skipped", "blocked", "failed", "rows in", "rows out",
                                     "quarantined"], rows, numeric=range(1, 8)) + "</section>")


def _quality_section(r: RunReport) -> str:
    if not r.quality:
        return '<section id="quality"><h2>Data quality</h2><p class="note">No validation yet.</p></section>'
    note = "" if r.quality_from_run else (
        '<p class="note">This run did not validate; the latest validation of each tenant is shown '
        "(its run id is in the table).</p>")
    invalid = [x for x in r.run_log if x["step"] == "validate" and x["tenant_id"] is None and not _step_note(x)]
    rows = [(q["tenant_id"], [_e(q["tenant_id"]), _num(q["rows_in"]), _num(q["rows_valid"]),
                              _num(q["rows_quarantined"]), _pct(q["rejected_fraction"]),
                              '<span class="bad">blocked</span>' if q["blocked"] else "no",
                              _pct(q["threshold"]), f"<code>{_e(q['run_id'])}</code>"])
            for q in r.quality]
    rows += [(None, [_e(INVALID_TENANT), _num(x["rows_in"]), _num(x["rows_out"]), _num(x["rows_quarantined"]),
                     NONE, NONE, NONE, f"<code>{_e(r.run_id)}</code>"]) for x in invalid]
    labels = [f"{q['tenant_id']} (blocked)" if q["blocked"] else str(q["tenant_id"]) for q in r.quality]
    chart = bar_chart("chart-quality", "rows per tenant: valid and quarantined", labels, [
        ("valid", VALID_COLOR, [float(q["rows_valid"]) for q in r.quality]),
        ("quarantined", QUARANTINED_COLOR, [float(q["rows_quarantined"]) for q in r.quality])], stacked=True)
    blocked = [q["tenant_id"] for q in r.quality if q["blocked"]]
    summary = (f'<p>{_num(len(r.quality))} tenants validated; blocked (above the rejected-share threshold, '
               f'skipped by train and score): {_e(", ".join(blocked)) if blocked else "none"}.</p>')
    return ('<section id="quality"><h2>Data quality</h2>' + note + summary
            + _figure(chart, "Rows per tenant, valid and quarantined", min(len(labels), MAX_CHART_ROWS), len(labels))
            + _table("quality-table", ["tenant", "rows in", "valid", "quarantined", "rejected", "blocked",
                                       "threshold", "validated in run"], rows, numeric=(1, 2, 3, 4, 6)) + "</section>")


def _candidates(row: dict[str, Any]) -> dict[str, float | None]:
    """strategy -> holdout metric, from the decision's `candidates_json`."""
    try:
        raw = json.loads(row.get("candidates_json") or "[]")
    except ValueError:
        return {}
    out: dict[str, float | None] = {}
    for c in raw if isinstance(raw, list) else []:
        if isinstance(c, dict) and c.get("strategy"):
            v = c.get(row["metric_name"])
            out[str(c["strategy"])] = float(v) if isinstance(v, int | float) else None
    return out


def _dot_row(label: str, d: dict[str, Any], values: dict[str, float | None]) -> DotRow:
    """A decision as a dot-plot row. Promoted: the candidate of the serving strategy serves. Kept: the
    champion before serves, which is a candidate of this run only when its model is one."""
    champion: str | None = None
    if d["decision"] == "promoted":
        champion = d["serving_strategy"]
    elif d["decision"] == "kept":
        try:
            raw = json.loads(d.get("candidates_json") or "[]")
        except ValueError:
            raw = []
        champion = next((str(c["strategy"]) for c in raw if isinstance(raw, list) and isinstance(c, dict)
                         and c.get("model") and c.get("model") == d.get("serving_model")), None)
    served = values.get(champion) if champion else None
    if served is None and d["decision"] == "kept":
        served = d["champion_before_metric"]
    return DotRow(label, values, champion=champion, before=d["champion_before_metric"], margin=d.get("margin"),
                  served=_finite(served))


def _strategy_section(r: RunReport) -> str:
    from tenantml.core.ids import SHARED_ID

    tenants = [d for d in r.decisions if d["tenant_id"] != SHARED_ID]
    shared = [d for d in r.decisions if d["tenant_id"] == SHARED_ID]
    if not r.decisions:
        return ('<section id="strategies"><h2>Strategies and metrics</h2>'
                '<p class="note">No promotion decisions in this run.</p></section>')
    strategies = ["tenant", "tuned", "shared"]
    cands = [_candidates(d) for d in tenants]
    rows = [(d["tenant_id"], [_e(d["tenant_id"]), *(_num(c.get(s)) for s in strategies),
                              _num(d["champion_before_metric"]), _e(d["decision"]),
                              f'<span class="strategy {_e(d["serving_strategy"])}">{_e(d["serving_strategy"])}</span>'
                              if d["serving_strategy"] else NONE,
                              _e(d["serving_model"] or NONE), _num(d["holdout_rows"]), _e(d["reason"])])
            for d, c in zip(tenants, cands, strict=True)]
    labels = [f"{d['tenant_id']} → {d['serving_strategy'] or 'none'}" for d in tenants]
    chart = dot_plot("chart-strategies", f"{r.metric_name} of each candidate on the tenant's holdout",
                     [_dot_row(label, d, c) for label, d, c in zip(labels, tenants, cands, strict=True)],
                     [(s, STRATEGY_COLORS[s]) for s in strategies], metric_name=r.metric_name)
    shared_note = "".join(
        f'<p>Shared model: <b>{_e(d["decision"])}</b> {_e(d["serving_model"] or "")} '
        f'({_e(r.metric_name)} {_num(d["challenger_metric"])}): {_e(d["reason"])}</p>' for d in shared)
    return ('<section id="strategies"><h2>Strategies and metrics</h2>' + shared_note
            + _figure(chart, f"{r.metric_name} per candidate, on a scale that spans only these values; ringed: the "
                      "candidate now serving (the label names its strategy); bar: the champion before, which still "
                      "serves where no dot is ringed; shaded: the margin a challenger had to clear",
                      min(len(labels), MAX_CHART_ROWS), len(labels))
            + _table("strategies-table", ["tenant", f"tenant {r.metric_name}", f"tuned {r.metric_name}",
                                          f"shared {r.metric_name}", "champion before", "decision", "serving",
                                          "serving model", "holdout rows", "reason"], rows, numeric=(1, 2, 3, 4, 8))
            + "</section>")


def _scoring_quality_note(r: RunReport) -> str:
    if not r.scoring_quality:
        return ""
    valid = sum(int(q["rows_valid"] or 0) for q in r.scoring_quality)
    bad = sum(int(q["rows_quarantined"] or 0) for q in r.scoring_quality)
    blocked = [q["tenant_id"] for q in r.scoring_quality if q["blocked"]]
    return (f"<p>Rows to score validated in this run: {_num(valid)} valid, {_num(bad)} quarantined"
            + (f"; blocked (not scored): {_e(', '.join(blocked))}" if blocked else "") + ".</p>")


def _predictions_section(r: RunReport) -> str:
    if not r.predictions:
        return ('<section id="predictions"><h2>Predictions</h2>' + _scoring_quality_note(r)
                + '<p class="note">No rows were scored in this run.</p></section>')
    rows = [(p["tenant_id"], [_e(p["tenant_id"]), _e(p["strategy"]), _num(int(p["rows"])), _num(p["mean_score"]),
                              _num(p["mean_prediction"])]) for p in r.predictions]
    labels = [f"{p['tenant_id']} ({int(p['rows']):,} rows)" for p in r.predictions]
    strategies = sorted({str(p["strategy"]) for p in r.predictions})
    chart = bar_chart("chart-predictions", "mean score per tenant", labels,
                      [(s, STRATEGY_COLORS.get(s, "#888888"),
                        [p["mean_score"] if p["strategy"] == s else None for p in r.predictions]) for s in strategies],
                      stacked=True, fmt=lambda v: f"{v:.3f}")
    total = sum(int(p["rows"]) for p in r.predictions)
    return ('<section id="predictions"><h2>Predictions</h2>' + _scoring_quality_note(r) +
            f'<p>{_num(total)} rows scored for {_num(len({p["tenant_id"] for p in r.predictions}))} tenants.</p>'
            + _figure(chart, "Mean score per tenant, coloured by the serving strategy",
                      min(len(labels), MAX_CHART_ROWS), len(labels))
            + _table("predictions-table", ["tenant", "strategy", "rows", "mean score", "mean prediction"], rows,
                     numeric=(2, 3, 4)) + "</section>")


PSI_COLORS = {"stable": "#3a9a5b", "within_noise": "#9aa5b1", "warn": "#e08a1e", "drift": "#c0392b"}


def _monitoring_section(r: RunReport, psi_warn: float, psi_alert: float) -> str:
    """Drift per tenant (largest feature PSI and the prediction PSI of the batches monitored in this
    run), realised against promoted metrics where labels arrived, and who is retrained and why."""
    if r.tainted:  # scored this run by a tainted champion's replacement, or by the tainted champion itself
        notes = "".join(f"<li>{_e(x['tenant_id'])}: {_e(x['note'])}</li>" for x in r.tainted)
        warn = f'<div id="tainted"><p class="bad">Tainted champions at scoring time:</p><ul>{notes}</ul></div>'
    else:
        warn = ""
    if not (r.drift or r.realised or r.retraining):
        if warn:
            return f'<section id="monitoring"><h2>Monitoring and retraining</h2>{warn}</section>'
        return ('<section id="monitoring"><h2>Monitoring and retraining</h2>'
                '<p class="note">This run did not monitor.</p></section>')

    def level(d: dict[str, Any]) -> str:
        """The monitor's own status of the tenant's largest feature PSI (within_noise: above a
        threshold, but not above what sampling noise reaches for a batch of that size)."""
        if d.get("feature_status") in PSI_COLORS:
            return str(d["feature_status"])
        f = _finite(d["max_feature_psi"])
        return "drift" if f is not None and f >= psi_alert else "warn" if f is not None and f >= psi_warn else "stable"

    parts = ['<section id="monitoring"><h2>Monitoring and retraining</h2>']
    retrain = [d for d in r.retraining if d["retrain"]]
    consent = [d for d in retrain if "withdrew consent" in (d["reasons"] or "") or "offboarded" in (d["reasons"] or "")]
    if consent:
        parts.append(f'<p class="bad">{_num(len(consent))} tenant(s) retrained because their champion learned from '
                     f'a tenant that withdrew consent or was offboarded: {_e(", ".join(d["tenant_id"] for d in consent))}'
                     ".</p>")
    parts.append(warn)
    if r.retraining and r.retraining_run:
        parts.append(f'<p class="note">The monitor was skipped: nothing it reads changed since run '
                     f"{_e(r.retraining_run)}, whose decisions stand ({_num(len(r.retraining))} tenants, "
                     f"{_num(len(retrain))} to retrain).</p>")
    elif r.retraining:
        parts.append(f"<p>{_num(len(r.retraining))} tenants monitored; {_num(len(retrain))} retrained this run, "
                     f"{_num(len(r.retraining) - len(retrain))} kept their champions.</p>")
    if r.drift:
        ranked = sorted(r.drift, key=lambda d: -(_finite(d["max_feature_psi"]) or 0.0))
        labels = [f"{d['tenant_id']} ({d['feature'] or NONE})" for d in ranked]
        chart = bar_chart("chart-drift", "largest feature PSI per tenant", labels,
                          [(name.replace("_", " "), color, [d["max_feature_psi"] if level(d) == name else None
                                          for d in ranked]) for name, color in PSI_COLORS.items()],
                          stacked=True, fmt=lambda v: f"{v:.3f}")
        parts.append(_figure(chart, f"Largest feature PSI of each tenant's batch against its champion's training "
                             f"rows, worst first; warn above {psi_warn:g}, drift above {psi_alert:g}, grey: within the "
                             "noise of a batch of that size",
                             min(len(labels), MAX_CHART_ROWS), len(labels)))
        parts.append(_table("drift-table", ["tenant", "rows", "largest feature PSI", "feature", "drifted features",
                                            "prediction PSI"],
                            [(d["tenant_id"], [_e(d["tenant_id"]), _num(d["rows"]), _num(d["max_feature_psi"]),
                                               _e(d["feature"] or NONE), _num(d["drifted_features"]),
                                               _num(d["prediction_psi"])]) for d in ranked], numeric=(1, 2, 4, 5)))
    if r.realised:
        metric = str(r.realised[0]["metric_name"] or r.metric_name)
        rows = [DotRow(f"{x['tenant_id']} ({int(x['rows'] or 0):,} labelled)", {"realised": x["value"]},
                       champion="realised", before=x["promoted_value"], served=_finite(x["value"]))
                for x in r.realised]
        chart = dot_plot("chart-realised", f"realised {metric} against the {metric} each champion was promoted with",
                         rows, [("realised", "#2f6db5")], metric_name=metric,
                         axis_label=f"{metric} on rows scored earlier, now labelled", before_label="promoted with")
        parts.append(_figure(chart, f"Realised {metric} of each tenant's scored rows once their labels arrived; bar: "
                             "the holdout metric its champion was promoted with",
                             min(len(rows), MAX_CHART_ROWS), len(rows)))
        parts.append(_table("realised-table", ["tenant", "batch", "labelled rows", f"realised {metric}",
                                               f"promoted {metric}"],
                            [(x["tenant_id"], [_e(x["tenant_id"]), f"<code>{_e(x['batch_id'])}</code>",
                                               _num(x["rows"]), _num(x["value"]), _num(x["promoted_value"])])
                             for x in r.realised], numeric=(2, 3, 4)))
    if r.retraining:
        ordered = sorted(r.retraining, key=lambda d: (not d["retrain"], d["tenant_id"]))
        parts.append(_table("retraining-table", ["tenant", "retrain", "reasons", "champion", "new labelled rows"],
                            [(d["tenant_id"], [_e(d["tenant_id"]),
                                               '<span class="bad">yes</span>' if d["retrain"] else "no",
                                               _e(d["reasons"]), _e(d["champion"] or NONE), _num(d["new_rows"])])
                             for d in ordered], numeric=(4,)))
    parts.append("</section>")
    return "".join(parts)


def _failures_section(r: RunReport) -> str:
    failures = r.failures
    if not failures:
        return '<section id="failures"><h2>Failures</h2><p>No tenant and no step failed.</p></section>'
    rows = [(f["tenant_id"], [_e(f["step"]), _e(f["tenant_id"] or "(whole step)"),
                              f'<pre class="error">{_e(f["error"] or "")}</pre>'])
            for f in sorted(failures, key=lambda f: (f["step"], f["tenant_id"] or ""))]
    return (f'<section id="failures"><h2>Failures</h2><p class="bad">{_num(len(failures))} failure(s); '
            "rerun the failed tenants with <code>--resume --run-id</code>.</p>"
            + _table("failures-table", ["step", "tenant", "error"], rows) + "</section>")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;
max-width:1100px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:12px 0;font-size:13px;width:100%}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f8}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
code{background:#f3f5f8;padding:1px 4px;border-radius:3px}
pre.error{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px;max-height:16em;overflow:auto}
.bad{color:#c0392b;font-weight:600}.note{color:#666;font-style:italic}
.status{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:600}
.status.ok{background:#3a9a5b}.status.partial{background:#e08a1e}.status.failed{background:#c0392b}
.strategy{font-weight:600}.strategy.tenant{color:#2f6db5}.strategy.tuned{color:#e08a1e}
.strategy.shared{color:#3a9a5b}
figure{margin:12px 0}figcaption{font-size:12px;color:#666}
svg.chart{font-size:12px;font-family:inherit;max-width:100%;height:auto}
svg.chart text.value,svg.chart text.legend,svg.chart text.tick{fill:#444}
svg.chart text.axis-label{fill:#444;font-size:12px}
"""


def render(r: RunReport, psi_warn: float = 0.1, psi_alert: float = 0.25) -> str:
    """The whole page as one string: head (inline CSS, a policy that allows no script or remote
    load), then steps, data quality, strategies, predictions, monitoring and failures."""
    tenants = {x["tenant_id"] for x in r.run_log if x["tenant_id"] is not None}
    header = (f"<header><h1>Run report: {_e(r.dataset)}</h1>"
              f'<p>run <code>{_e(r.run_id)}</code> · <span class="status {_e(r.status)}">{_e(r.status)}</span> · '
              f"{_num(len(tenants))} tenants · {_num(len(r.failures))} failure(s) · generated "
              f"{_e(r.generated_at.strftime('%Y-%m-%d %H:%M:%S UTC'))}</p></header>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'; img-src data:\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>tenantml run {_e(r.run_id)} ({_e(r.dataset)})</title><style>{_CSS}</style></head>"
            f"<body>{header}<main>{_steps_section(r)}{_quality_section(r)}{_strategy_section(r)}"
            f"{_predictions_section(r)}{_monitoring_section(r, psi_warn, psi_alert)}{_failures_section(r)}"
            "</main></body></html>\n")
