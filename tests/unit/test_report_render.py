"""Rendering the run report from gathered rows (no Spark): escaping, status, sections, charts."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from tenantml.apps.report import MAX_CHART_ROWS, RunReport, bar_chart, render


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
    # quality: valid + quarantined; candidates: the two with a metric; predictions: one.
    assert page.count('class="bar"') == 2 + 2 + 1 and page.count("<svg") == 3


def test_charts_escape_labels_and_cap_their_rows() -> None:
    labels = [f"t{i}" for i in range(MAX_CHART_ROWS + 5)] + ["<x>"]
    svg = bar_chart("c", "title <t>", labels, [("s", "#123456", [1.0] * len(labels))], stacked=True)
    assert svg.count('class="bar"') == MAX_CHART_ROWS and "<x>" not in svg and "<t>" not in svg
    grouped = bar_chart("g", "g", ["a"], [("one", "#111111", [0.5]), ("two", "#222222", [float("nan")])],
                        stacked=False)
    assert grouped.count('class="bar"') == 1
