# Databricks notebook source
# MAGIC %md
# MAGIC # Tenant overview
# MAGIC One row per tenant of a dataset: its settings, its latest data quality, the champion that serves it
# MAGIC (strategy, holdout metric against the constant baseline) and how many of its rows are scored.
# MAGIC
# MAGIC Runs unchanged on Databricks (widgets, the cluster's `spark`) and locally:
# MAGIC `python -m tenantml.apps.notebook_runner notebooks/tenant_overview.py -w dataset=demo`.

# COMMAND ----------

# MAGIC %md
# MAGIC ## Parameters
# MAGIC | widget | empty means |
# MAGIC | --- | --- |
# MAGIC | `dataset` | `project.default_dataset` |
# MAGIC | `tenants` | every tenant (else comma-separated ids) |
# MAGIC | `output_dir` | `<data_dir>/notebooks/tenant_overview` (figures) |
# MAGIC | `conf_dir`, `env`, `data_dir` | off Databricks: the `conf/` found from the working directory, `TENANTML_ENV` or `local`, `TENANTML_DATA_DIR` or `project.data_dir` |

# COMMAND ----------

from tenantml.apps.notebook import (notebook_context, notebook_scope, output_dir, show_figure, show_table, tenant_list,
                                   widget)

ctx = notebook_context(globals().get("spark"), conf_dir=widget("conf_dir", ""), env=widget("env", ""),
                       data_dir=widget("data_dir", ""))
dataset, spec = ctx.config.dataset(widget("dataset", "") or None)
tenants = tenant_list(widget("tenants", ""))
out = output_dir(ctx, widget("output_dir", ""), "tenant_overview")
print(f"dataset {dataset}; data in {ctx.data_dir}; figures in {out}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Gather
# MAGIC Settings from `tenants`, quality from `quality_<ds>`, champions from the registry (the `champion`
# MAGIC alias) with their metrics from `model_store`, scored rows from `predictions_<ds>`.

# COMMAND ----------

import pandas as pd
from pyspark.sql import functions as F

from tenantml.io import table_exists
from tenantml.registry.tracking import champion_versions

view = notebook_scope(ctx, tenants, "tenant_overview")  # the only way this notebook reads tenant rows
settings = view.read(ctx.tables.tenants).toPandas().set_index("tenant_id")
quality = view.read(ctx.tables.quality(dataset)).where("purpose = 'history'").toPandas().set_index("tenant_id")
known = set(quality.index) | set(settings.index)
ids = sorted(known & set(tenants) if tenants else known)

champions = champion_versions(ctx, dataset, ids)
champion_rows = pd.DataFrame(
    [{"tenant_id": t, "model_name": mv.name, "model_version": str(mv.version)} for t, mv in champions.items()],
    columns=["tenant_id", "model_name", "model_version"])
store = (view.read(ctx.tables.model_store).where(F.col("dataset") == dataset)
         .select("tenant_id", "model_name", "model_version", "strategy", "metric_name", "metric",
                 "baseline_metric", "train_rows").toPandas())
models = champion_rows.merge(store, on=["tenant_id", "model_name", "model_version"], how="left").set_index("tenant_id")

pred_ref = ctx.tables.predictions(dataset)
scored = (view.read(pred_ref).groupBy("tenant_id")
          .agg(F.count(F.lit(1)).alias("rows_scored"), F.avg("score").alias("mean_score")).toPandas()
          .set_index("tenant_id")) if table_exists(ctx.spark, pred_ref) else pd.DataFrame(
              columns=["rows_scored", "mean_score"])

# COMMAND ----------

overview = pd.DataFrame(index=pd.Index(ids, name="tenant_id"))
overview = (overview
            .join(settings[["strategy", "consent_share_data", "consent_shared_inference", "status"]]
                  .rename(columns={"strategy": "strategy_setting"}), how="left")
            .join(quality[["rows_in", "rows_valid", "rows_quarantined", "rejected_fraction", "blocked"]], how="left")
            .join(models[["model_version", "strategy", "metric_name", "metric", "baseline_metric"]]
                  .rename(columns={"strategy": "serving_strategy"}), how="left")
            .join(scored, how="left"))
overview["rows_scored"] = overview["rows_scored"].fillna(0).astype(int)
overview["lift_over_baseline"] = overview["metric"] - overview["baseline_metric"]
overview = overview.sort_values("rows_in", ascending=False, na_position="last")
show_table(overview.reset_index(), f"tenant overview: {dataset}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Rows and model quality per tenant
# MAGIC Left: valid and quarantined rows (log scale; blocked tenants in red). Right: each champion's holdout
# MAGIC metric next to the constant baseline on the same holdout.

# COMMAND ----------

from matplotlib.figure import Figure
from matplotlib.patches import Patch

STRATEGY_COLORS = {"tenant": "#2f6db5", "tuned": "#e08a1e", "shared": "#3a9a5b"}
plotted = overview[overview["rows_in"].notna()].iloc[::-1]
fig = Figure(figsize=(11, max(3.0, 0.35 * len(plotted) + 1.5)))
ax_rows, ax_metric = fig.subplots(1, 2)
y = range(len(plotted))
ax_rows.barh(y, plotted["rows_valid"], color="#2f6db5", label="valid")
ax_rows.barh(y, plotted["rows_quarantined"], left=plotted["rows_valid"], color="#c0392b", label="quarantined")
ax_rows.set_yticks(list(y), plotted.index)
for label, blocked in zip(ax_rows.get_yticklabels(), plotted["blocked"].eq(True), strict=True):
    label.set_color("#c0392b" if blocked else "black")
ax_rows.set_xscale("log")
ax_rows.set_xlim(left=1)
ax_rows.set_xlabel("rows (log scale)")
ax_rows.set_title("rows per tenant")
ax_rows.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small")

modelled = overview[overview["metric"].notna()].iloc[::-1]
ym = range(len(modelled))
ax_metric.barh([i + 0.2 for i in ym], modelled["metric"], height=0.4,
               color=[STRATEGY_COLORS.get(s, "grey") for s in modelled["serving_strategy"]])
ax_metric.barh([i - 0.2 for i in ym], modelled["baseline_metric"], height=0.4, color="#bbbbbb")
ax_metric.set_yticks(list(ym), modelled.index)
metric_name = modelled["metric_name"].dropna().iloc[0] if len(modelled) else "metric"
ax_metric.set_xlabel(f"{metric_name} on the tenant's holdout")
ax_metric.set_title("champion vs baseline (colour: serving strategy)")
ax_metric.legend(handles=[*(Patch(color=c, label=f"champion: {s}") for s, c in STRATEGY_COLORS.items()),
                          Patch(color="#bbbbbb", label="baseline")], loc="upper center", bbox_to_anchor=(0.5, -0.14),
                 ncol=4, fontsize="small")
fig.tight_layout()
overview_figure = show_figure(fig, out, "tenant_overview")
