"""Rendering the run report from gathered rows (no Spark): escaping, status, sections, charts."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from tenantml.apps.report import MAX_CHART_ROWS, DotRow, RunReport, bar_chart, dot_plot, nice_ticks, render


def _log(step: str, tenant: str | None, status: str, error: str | None = None) -> dict[str, Any]:
    return {"run_id": "r1", "step": step, "dataset": "demo", "tenant_id": tenant, "status": status,
            "rows_in": 10, "rows_out": 9, "rows_quarantined": 1, "seconds": 0.1, "error": error,
            "logged_at": datetime(2026, 1, 1)}


def _report(**kw: Any) -> RunReport:
    base: dict[str, Any] = {
        "run_id": "r1", "dataset": "demo", "generated_at": datetime(2026, 1, 1, tzinfo=UTC),
        "run_log": [_log("validate", "acme", "ok"), _log("train", "acme", "ok"), _log("train", "beta", "ok")],
        "quality": [{"tenant_id": "acme", "run_id": "r1", "rows_in": 10, "rows_valid": 9, "rows_quarantined": 1,
                     "rejected_fraction": 0.1, "blocked": False, "threshold": 0.2}],
        "decisions": [{"tenant_id": "acme", "decision": "promoted", "reason": "better <b>by far</b>",
                       "metric_name": "auc", "serving_model": "demo__acme/2", "serving_strategy": "tuned",
                       "champion_before_metric": None, "holdout_rows": 20, "challenger_metric": 0.8,
                       "candidates_json": json.dumps([{"strategy": "tenant", "auc": 0.7},
                                                      {"strategy": "tuned", "auc": 0.8},
                                                      {"strategy": "shared", "auc": None}])}],
        "predictions": [{"tenant_id": "acme", "strategy": "tuned", "rows": 9, "mean_score": 0.25,
                         "mean_prediction": 0.1}],
        "metric_name": "auc"}
    base.update(kw)
    return RunReport(**base)


def test_hostile_text_is_escaped_everywhere() -> None:
    error = "<script>alert(1)</script> & <img src=x onerror=alert(2)> \"quoted\""
    r = _report(run_log=[_log("train", "acme", "failed", error), _log("score", None, "failed", error)])
    page = render(r)
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(2)&gt; "
                      "&quot;quoted&quot;") == 2
    assert "better &lt;b&gt;by far&lt;/b&gt;" in page
    assert not re.search(r"https?://", page)


def test_status_and_empty_sections() -> None:
    assert _report().status == "ok"
    partial = _report(run_log=[_log("train", "acme", "failed", "x"), _log("train", "beta", "ok")])
    assert partial.status == "partial"
    assert _report(run_log=[_log("ingest", None, "failed", "x")]).status == "failed"
    page = render(_report(quality=[], decisions=[], predictions=[]))
    assert "No validation yet." in page and "No promotion decisions in this run." in page
    assert "No rows were scored in this run." in page and "No tenant and no step failed." in page
    assert page.count("<svg") == 0


def test_sections_list_tenants_and_draw_bars() -> None:
    page = render(_report())
    assert re.findall(r'<tr data-tenant="([^"]+)"', page) == ["acme", "acme", "acme"]
    # quality: valid + quarantined; predictions: one; candidates: a dot each for the two with a metric.
    assert page.count('class="bar"') == 2 + 1 and page.count("<svg") == 3
    assert page.count('class="dot"') == 2


def test_charts_escape_labels_and_cap_their_rows() -> None:
    labels = [f"t{i}" for i in range(MAX_CHART_ROWS + 5)] + ["<x>"]
    svg = bar_chart("c", "title <t>", labels, [("s", "#123456", [1.0] * len(labels))], stacked=True)
    assert svg.count('class="bar"') == MAX_CHART_ROWS and "<x>" not in svg and "<t>" not in svg
    grouped = bar_chart("g", "g", ["a"], [("one", "#111111", [0.5]), ("two", "#222222", [float("nan")])],
                        stacked=False)
    assert grouped.count('class="bar"') == 1


def _dots(svg: str) -> dict[str, list[float]]:
    """strategy -> cx of its dots, in row order."""
    out: dict[str, list[float]] = {}
    for strategy, cx in re.findall(r'<circle class="dot" data-strategy="([^"]+)" cx="([0-9.]+)"', svg):
        out.setdefault(strategy, []).append(float(cx))
    return out


def _axis(svg: str) -> tuple[float, float]:
    (x1, x2), = re.findall(r'<line class="axis" x1="([0-9.]+)" y1="[0-9.]+" x2="([0-9.]+)"', svg)
    return float(x1), float(x2)


SERIES = [("tenant", "#2f6db5"), ("tuned", "#e08a1e"), ("shared", "#3a9a5b")]


def test_the_strategy_dots_spread_close_metrics_over_the_plot() -> None:
    svg = dot_plot("c", "auc", [DotRow("acme → tuned", {"tenant": 0.88, "tuned": 0.90, "shared": None},
                                       champion="tuned")], SERIES, metric_name="auc")
    x0, x1 = _axis(svg)
    dots = _dots(svg)
    assert set(dots) == {"tenant", "tuned"}  # no dot for a missing metric
    assert (dots["tuned"][0] - dots["tenant"][0]) / (x1 - x0) > 0.3  # a bar chart from 0 gave 2%
    assert x0 <= dots["tenant"][0] < dots["tuned"][0] <= x1
    # Labelled ticks within the data's neighbourhood, and the metric named on the axis.
    ticks = [float(t) for t in re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', svg)]
    assert len(ticks) >= 3 and 0.85 <= ticks[0] <= 0.88 and 0.90 <= ticks[-1] <= 0.92, ticks
    assert "auc on the tenant&#x27;s holdout, higher is better" in svg
    # The serving champion is ringed where its dot is.
    (ring,) = re.findall(r'<circle class="champion" cx="([0-9.]+)"', svg)
    assert float(ring) == dots["tuned"][0]
    assert "<script" not in svg and 'fill="#e08a1e"' in svg


def test_the_champion_before_and_its_margin_are_marked() -> None:
    rows = [DotRow("a → tenant", {"tenant": 0.80, "tuned": 0.81}, champion=None, before=0.812, margin=0.005,
                   served=0.812),
            DotRow("b → tuned", {"tenant": 0.70, "tuned": 0.74}, champion="tuned", before=0.72, margin=0.005)]
    svg = dot_plot("c", "auc", rows, SERIES, metric_name="auc")
    assert svg.count('class="baseline"') == 2 and svg.count('class="margin"') == 2
    assert svg.count('class="champion"') == 1  # row a: the champion before still serves
    values = re.findall(r'class="value">([^<]+)</text>', svg)
    assert values == ["0.812", "0.740"]
    start, end = float(re.search(r'data-axis-start="([^"]+)"', svg)[1]), float(re.search(r'data-axis-end="([^"]+)"', svg)[1])  # type: ignore[index]
    assert 0.6 < start <= 0.70 and 0.817 <= end <= 0.9  # the margin's end (0.817) is on the axis too
    # Lower is better: the margin lies below the champion before.
    low = dot_plot("c", "rmse", [DotRow("a", {"tenant": 2.0}, before=2.5, margin=0.1)], SERIES, metric_name="rmse")
    assert "lower is better" in low
    (mx, mw), = re.findall(r'<rect class="margin" x="([0-9.]+)" y="[0-9.]+" width="([0-9.]+)"', low)
    (bx,) = re.findall(r'<rect class="baseline" x="([0-9.]+)"', low)
    assert abs(float(mx) + float(mw) - (float(bx) + 1)) < 0.2


def test_dot_plot_escapes_and_caps_rows_and_handles_one_value() -> None:
    rows = [DotRow(f"t{i}", {"<s>": 0.5}) for i in range(MAX_CHART_ROWS + 3)] + [DotRow("<x>", {"<s>": 0.5})]
    svg = dot_plot("c", "title <t>", rows, [("<s>", "#123456")], metric_name="auc")
    assert "<x>" not in svg and "<t>" not in svg and "<s>" not in svg
    assert svg.count('class="dot"') == MAX_CHART_ROWS
    x0, x1 = _axis(svg)
    assert x0 < _dots(svg)["&lt;s&gt;"][0] < x1  # a single value sits inside a small axis around it
    empty = dot_plot("c", "t", [DotRow("a", {"tenant": None, "tuned": float("nan")})], SERIES, metric_name="auc")
    assert 'class="dot"' not in empty and not re.search(r"\bnan\b|inf", empty)


def test_nice_ticks() -> None:
    start, end, ticks, decimals = nice_ticks(0.88, 0.90)
    assert start <= 0.88 and end >= 0.90 and end - start <= 0.04
    assert ticks[0] == start and abs(ticks[-1] - end) < 1e-9 and decimals == 3
    assert nice_ticks(5.0, 5.0)[0] < 5.0 < nice_ticks(5.0, 5.0)[1]
    assert nice_ticks(120.0, 480.0)[3] == 0


def test_the_monitoring_section_ranks_drift_and_marks_realised_against_promoted() -> None:
    drift = [{"tenant_id": "acme", "max_feature_psi": 0.05, "feature": "tenure", "drifted_features": 0,
              "prediction_psi": 0.01, "rows": 40},
             {"tenant_id": "beta", "max_feature_psi": 1.7, "feature": "<hour>", "drifted_features": 2,
              "prediction_psi": 0.4, "rows": 60},
             {"tenant_id": "gamma", "max_feature_psi": 0.15, "feature": "distance", "drifted_features": 0,
              "prediction_psi": None, "rows": 55},
             # above the alert level, but not above the noise of a 52-row batch: grey, not red
             {"tenant_id": "delta", "max_feature_psi": 0.6, "feature": "distance", "drifted_features": 0,
              "prediction_psi": None, "rows": 52, "feature_status": "within_noise"}]
    realised = [{"tenant_id": "acme", "batch_id": "b1", "metric_name": "auc", "value": 0.71, "promoted_value": 0.8,
                 "rows": 120}]
    retraining = [{"tenant_id": "acme", "retrain": False, "reasons": "champion current", "champion": "m/1",
                   "new_rows": 0},
                  {"tenant_id": "beta", "retrain": True, "reasons": "drift in batch b2: feature(s) hour",
                   "champion": "m/2", "new_rows": 3}]
    page = render(_report(drift=drift, realised=realised, retraining=retraining), psi_warn=0.1, psi_alert=0.25)
    section = page[page.index('<section id="monitoring">'):page.index('<section id="failures">')]
    assert "3 tenants monitored" not in section and "2 tenants monitored; 1 retrained" in section
    # worst first, each bar coloured by its level, the feature name escaped
    assert re.findall(r'<tr data-tenant="([^"]+)"', section.split('id="drift-table"')[1].split("</table>")[0]) == [
        "beta", "delta", "gamma", "acme"]
    chart = section[section.index('id="chart-drift"'):section.index("</svg>")]
    assert re.findall(r'class="bar"[^>]*fill="(#[0-9a-f]+)"', chart) == ["#c0392b", "#9aa5b1", "#e08a1e", "#3a9a5b"]
    assert "within noise" in chart and "grey: within the noise" in section
    assert "&lt;hour&gt;" in chart and "<hour>" not in page
    # realised: one ringed dot and the promoted bar; the retrained tenant is listed first
    real = section[section.index('id="chart-realised"'):]
    assert real.count('class="dot"') == 1 and real.count('class="baseline"') == 1
    assert "promoted with" in real and "0.710" in real
    assert re.findall(r'<tr data-tenant="([^"]+)"', section.split('id="retraining-table"')[1]) == ["beta", "acme"]
    assert "This run did not monitor." in render(_report())
