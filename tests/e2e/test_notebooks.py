"""Every analyst notebook in notebooks/, executed cell by cell on a real pipeline run.

The notebooks run as on Databricks: the runtime's `spark` is in their namespace (here the session
fixture), widgets carry the parameters. One runs without `spark`, as `python notebooks/x.py` would
locally, and builds its own context. Each notebook's frames are checked against the tables they
summarise, and its figures must be real, non-blank PNG files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pyspark.sql import functions as F

from tenantml.apps.notebook_runner import parse_notebook, run_notebook
from tenantml.io import read_table
from tenantml.quality.rules import unlabelled_reason

pytestmark = [pytest.mark.spark, pytest.mark.slow]
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
TENANTS = ["t-dirty", "t000", "t001", "t002", "t003", "t004"]
MODELLED = ["t000", "t001", "t002", "t003", "t004"]  # all but the blocked tenant


def _widgets(run: dict[str, Any], out: Path | None) -> dict[str, str]:
    widgets = {"dataset": "demo", "conf_dir": str(run["conf"]), "data_dir": str(run["data_dir"])}
    if out is not None:
        widgets["output_dir"] = str(out)
    return widgets


def _counts(df: Any) -> dict[str, int]:
    return {r["tenant_id"]: int(r["count"]) for r in df.groupBy("tenant_id").count().collect()}


def check_tenant_overview(ns: dict[str, Any], run: dict[str, Any], spark: Any) -> list[str]:
    ctx = run["ctx"]
    overview: pd.DataFrame = ns["overview"]
    assert sorted(overview.index) == TENANTS
    assert {"rows_in", "rows_valid", "rows_quarantined", "blocked", "serving_strategy", "metric",
            "baseline_metric", "lift_over_baseline", "rows_scored", "mean_score"} <= set(overview.columns)
    quality = (read_table(spark, ctx.tables.quality("demo")).where("purpose = 'history' AND tenant_id IS NOT NULL")
               .toPandas().set_index("tenant_id"))
    assert overview["rows_in"].to_dict() == quality["rows_in"].to_dict()
    scored = _counts(read_table(spark, ctx.tables.predictions("demo")))
    assert overview["rows_scored"].to_dict() == {t: scored.get(t, 0) for t in TENANTS}
    assert bool(overview.loc["t-dirty", "blocked"]) and pd.isna(overview.loc["t-dirty", "metric"])
    serving = (read_table(spark, ctx.tables.promotions).where(f"run_id = '{ctx.run_id}'").toPandas()
               .set_index("tenant_id")["serving_strategy"])
    assert overview.loc[MODELLED, "serving_strategy"].to_dict() == serving.loc[MODELLED].to_dict()
    assert overview.loc[MODELLED, "metric"].notna().all()
    return ["tenant_overview"]


def check_strategy_comparison(ns: dict[str, Any], run: dict[str, Any], spark: Any) -> list[str]:
    ctx = run["ctx"]
    comparison: pd.DataFrame = ns["comparison"].set_index("tenant_id")
    assert sorted(comparison.index) == MODELLED  # no blocked tenant, no `_shared` row
    assert {"tenant", "tuned", "shared", "decision", "serving_strategy", "best_candidate"} <= set(comparison.columns)
    decisions = read_table(spark, ctx.tables.promotions).where(f"run_id = '{ctx.run_id}'").toPandas()
    candidates = [(r.tenant_id, c["strategy"], c["auc"]) for r in decisions.itertuples()
                  if r.tenant_id != "_shared" for c in json.loads(r.candidates_json)]
    recorded = {(t, s): v for t, s, v in candidates if v is not None}
    shown = {(t, s): comparison.loc[t, s] for t in MODELLED for s in ("tenant", "tuned", "shared")
             if pd.notna(comparison.loc[t, s])}
    assert shown == pytest.approx(recorded)
    # t000-t002 trained their own model; t003 and t004 were below min_rows and only have shared-based ones.
    assert comparison.loc[["t000", "t001", "t002"], "tenant"].notna().all()
    assert comparison.loc[["t003", "t004"], "tenant"].isna().all()
    assert comparison["shared"].notna().sum() >= 3
    serving = decisions.set_index("tenant_id")["serving_strategy"]
    assert comparison["serving_strategy"].to_dict() == serving.loc[MODELLED].to_dict()
    assert len(ns["candidates"]) == len(candidates) and len(ns["shared_decision"]) == 1
    for tenant in MODELLED:  # the best candidate on AUC (higher is better), whatever was promoted
        mine = {s: v for (t, s), v in recorded.items() if t == tenant}
        assert comparison.loc[tenant, "best_candidate"] == (max(mine, key=lambda s: mine[s]) if mine else None)
    return ["strategy_comparison"]


def check_prediction_exploration(ns: dict[str, Any], run: dict[str, Any], spark: Any) -> list[str]:
    ctx = run["ctx"]
    assert ns["source"] == "gold"
    summary: pd.DataFrame = ns["summary"]
    assert {"tenant_id", "strategy", "rows", "mean_score", "p10", "median", "p90", "positive_rate"} <= set(
        summary.columns)
    preds = read_table(spark, ctx.tables.predictions("demo")).toPandas()
    expected = preds.groupby(["tenant_id", "strategy"]).agg(rows=("score", "size"), mean=("score", "mean"))
    got = summary.set_index(["tenant_id", "strategy"])
    assert sorted(got.index) == sorted(expected.index) and sorted(got.index.get_level_values(0)) == MODELLED
    assert got["rows"].to_dict() == expected["rows"].to_dict()
    assert got["mean_score"].to_dict() == pytest.approx(expected["mean"].to_dict())
    assert ((got["p10"] <= got["median"]) & (got["median"] <= got["p90"])).all()
    shares = ns["histogram"].groupby("tenant_id")["share"].sum()
    assert shares.to_dict() == pytest.approx(dict.fromkeys(MODELLED, 1.0))
    return ["score_histograms", "score_ranges"]


def check_data_quality(ns: dict[str, Any], run: dict[str, Any], spark: Any) -> list[str]:
    ctx = run["ctx"]
    quality: pd.DataFrame = ns["quality"].set_index("tenant_id")
    assert sorted(quality.index) == TENANTS
    assert quality.loc["t-dirty", "blocked"] and not quality.drop(index="t-dirty")["blocked"].any()
    reasons: pd.DataFrame = ns["reasons"]
    assert list(reasons.columns) == ["tenant", "reason", "rows"]
    assert "other" not in set(reasons["reason"])  # every reason is one of the dataset's rules
    # Unlabelled history rows sit in quarantine with their reason but are not rejected rows.
    quarantine = (read_table(spark, ctx.tables.quarantine("demo")).where("_purpose = 'history'")
                  .where(F.col("_reason") != unlabelled_reason(ctx.config.dataset("demo")[1])))
    counts = _counts(quarantine)
    per_tenant = reasons.groupby("tenant")["rows"].sum()
    for tenant, n in counts.items():
        label = ns["INVALID"] if tenant is None else tenant
        assert per_tenant[label] >= n, label  # a row counts once per failed rule
        if tenant is not None:
            assert int(quality.loc[tenant, "rows_quarantined"]) == n, tenant
    invalid = reasons[reasons["tenant"] == ns["INVALID"]]
    assert list(invalid["rows"]) == [counts[None]] and invalid["reason"].str.startswith("tenant id").all()
    assert reasons[reasons["tenant"] == "t-dirty"]["reason"].nunique() >= 4
    assert (ns["reason_matrix"].sum(axis=1) == per_tenant.reindex(ns["reason_matrix"].index)).all()
    return ["data_quality"]


def check_monitoring(ns: dict[str, Any], run: dict[str, Any], spark: Any) -> list[str]:
    """The demo's first night: no champion existed when monitor ran, so the score step measured each
    tenant's first batch against the champion it scored it with (feature PSI per feature, and the
    scores' PSI against the champion's training scores); no realised metric yet."""
    ctx = run["ctx"]
    mon = read_table(spark, ctx.tables.monitoring("demo")).where("kind = 'prediction'").toPandas().set_index("tenant_id")
    got = ns["prediction_psi"]
    assert sorted(got.index) == sorted(mon.index) == MODELLED
    assert got["psi"].to_dict() == pytest.approx(mon["psi"].to_dict())
    assert got["status"].to_dict() == mon["status"].to_dict()
    features = read_table(spark, ctx.tables.monitoring("demo")).where("kind IN ('numeric', 'categorical')").toPandas()
    assert sorted(ns["drift"].index) == sorted(features["tenant_id"].unique()) == MODELLED
    assert sorted(ns["drift"].columns) == sorted(features["feature"].unique())
    # ... against the very champion that scored the batch
    assert features.groupby("tenant_id")["model_version"].agg(set).to_dict() == {
        t: {v} for t, v in mon["model_version"].to_dict().items()}
    assert ns["realised"].empty
    decisions = ns["decisions"].set_index("tenant_id")
    assert decisions["retrain"].all() and decisions["reasons"].str.contains("no champion").all()
    return ["drift_heatmap", "prediction_drift"]


CHECKS = {"tenant_overview": check_tenant_overview, "monitoring": check_monitoring, "strategy_comparison": check_strategy_comparison,
          "prediction_exploration": check_prediction_exploration, "data_quality": check_data_quality}


def test_every_notebook_is_checked() -> None:
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))
    assert found == sorted(CHECKS), "add the new notebook's checks to CHECKS"
    for path in NOTEBOOKS.glob("*.py"):
        cells = parse_notebook(path)
        assert cells[0].kind == "markdown" and sum(c.kind == "python" for c in cells) >= 3, path
        assert "sys.path" not in path.read_text(), path  # the library is installed, never path-hacked


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs_and_produces_its_frames_and_figures(name: str, spark: Any, analyst_run: dict[str, Any],
                                                           tmp_path: Path, check_png: Any) -> None:
    out = tmp_path / "figures"
    ns = run_notebook(NOTEBOOKS / f"{name}.py", _widgets(analyst_run, out), namespace={"spark": spark})
    assert ns["ctx"].spark is spark and ns["dataset"] == "demo" and ns["out"] == out
    figures = CHECKS[name](ns, analyst_run, spark)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{f}.png" for f in figures)
    for f in figures:
        check_png(out / f"{f}.png")


def test_a_notebook_without_spark_builds_its_own_context(analyst_run: dict[str, Any], check_png: Any,
                                                         restore_spark_conf: None) -> None:
    """Off Databricks there is no `spark` global: the notebook builds its context from config (the
    local session, here the one already running) and saves figures under the data directory."""
    ns = run_notebook(NOTEBOOKS / "data_quality.py", _widgets(analyst_run, None))
    assert "spark" not in ns and ns["ctx"].spark_session is None
    default = Path(analyst_run["data_dir"]).resolve() / "notebooks" / "data_quality"
    assert ns["out"] == default and ns["ctx"].data_dir == Path(analyst_run["data_dir"]).resolve()
    check_png(default / "data_quality.png")
    assert sorted(ns["quality"]["tenant_id"]) == TENANTS
