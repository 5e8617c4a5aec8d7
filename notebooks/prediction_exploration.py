# Databricks notebook source
# MAGIC %md
# MAGIC # Prediction exploration
# MAGIC How each tenant's scores are distributed, and how that differs by the strategy that served them
# MAGIC (tenant-specific, tuned-shared or shared). Reads the gold fact table `gold_<ds>_prediction_fact`
# MAGIC (each tenant's latest published scoring run), or `predictions_<ds>` when nothing is published yet.
# MAGIC Aggregates (summary statistics, histogram bins) are computed in Spark: only small frames reach the
# MAGIC driver, whatever the number of scored rows.
# MAGIC
# MAGIC Locally: `python -m tenantml.apps.notebook_runner notebooks/prediction_exploration.py -w dataset=demo`.

# COMMAND ----------

# MAGIC %md
# MAGIC ## Parameters
# MAGIC | widget | empty means |
# MAGIC | --- | --- |
# MAGIC | `dataset` | `project.default_dataset` |
# MAGIC | `tenants` | every tenant (else comma-separated ids) |
# MAGIC | `source` | `gold` when the fact table exists, else `predictions` |
# MAGIC | `bins` | 20 histogram bins |
# MAGIC | `output_dir` | `<data_dir>/notebooks/prediction_exploration` (figures) |
# MAGIC | `conf_dir`, `env`, `data_dir` | off Databricks: the `conf/` found from the working directory, `TENANTML_ENV` or `local`, `TENANTML_DATA_DIR` or `project.data_dir` |

# COMMAND ----------

from tenantml.core.errors import ConfigError
from tenantml.apps.notebook import (notebook_context, notebook_scope, output_dir, show_figure, show_table, tenant_list,
                                   widget)

ctx = notebook_context(globals().get("spark"), conf_dir=widget("conf_dir", ""), env=widget("env", ""),
                       data_dir=widget("data_dir", ""))
dataset, spec = ctx.config.dataset(widget("dataset", "") or None)
tenants = tenant_list(widget("tenants", ""))
source = widget("source", "").strip()
if source not in ("", "gold", "predictions"):
    raise ConfigError(f"widget source={source!r}: use gold, predictions or leave it empty")
bins = int(widget("bins", "20"))
out = output_dir(ctx, widget("output_dir", ""), "prediction_exploration")

# COMMAND ----------

from pyspark.sql import functions as F

from tenantml.io import table_exists

view = notebook_scope(ctx, tenants, "prediction_exploration")  # the only way this notebook reads tenant rows

fact_ref = ctx.tables.gold_prediction_fact(dataset)
if source == "gold" or (not source and table_exists(ctx.spark, fact_ref)):
    source = "gold"
    fact = view.read(fact_ref)
    # Every published scoring run is kept in the fact; each tenant's latest one is its current scores.
    latest = fact.groupBy("tenant_id").agg(F.max_by("scoring_run_id", "scored_at").alias("scoring_run_id"))
    scores = fact.join(latest, ["tenant_id", "scoring_run_id"])
else:
    source = "predictions"
    scores = view.read(ctx.tables.predictions(dataset)).withColumnRenamed("run_id", "scoring_run_id")
scores = scores.select("tenant_id", "strategy", "scoring_run_id", "score", "prediction").cache()
print(f"source: {source}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Summary per tenant and serving strategy

# COMMAND ----------

summary = (scores.groupBy("tenant_id", "strategy")
           .agg(F.count(F.lit(1)).alias("rows"), F.avg("score").alias("mean_score"),
                F.stddev("score").alias("std_score"), F.min("score").alias("min_score"),
                F.percentile_approx("score", [0.1, 0.5, 0.9], 1000).alias("q"), F.max("score").alias("max_score"),
                F.avg("prediction").alias("mean_prediction"), F.max("scoring_run_id").alias("scoring_run_id"))
           .withColumn("p10", F.col("q")[0]).withColumn("median", F.col("q")[1]).withColumn("p90", F.col("q")[2])
           .drop("q").orderBy("tenant_id", "strategy").toPandas())
if spec.task == "binary":
    summary = summary.rename(columns={"mean_prediction": "positive_rate"})
show_table(summary, f"scores per tenant and strategy ({source})")

# COMMAND ----------

lo, hi = (float(summary["min_score"].min()), float(summary["max_score"].max())) if len(summary) else (0.0, 1.0)
if spec.task == "binary":
    lo, hi = 0.0, 1.0  # probabilities: the same bins for every tenant
width = (hi - lo) / bins if hi > lo else 1.0
bin_of = F.least(F.floor((F.col("score") - F.lit(lo)) / F.lit(width)).cast("int"), F.lit(bins - 1))
histogram = (scores.withColumn("bin", bin_of).groupBy("tenant_id", "strategy", "bin").count()
             .orderBy("tenant_id", "bin").toPandas())
histogram["bin_start"] = lo + histogram["bin"] * width
histogram["share"] = histogram["count"] / histogram.groupby("tenant_id")["count"].transform("sum")
scores.unpersist()

# COMMAND ----------

# MAGIC %md
# MAGIC ## Score distributions
# MAGIC One panel per tenant (the 24 largest when there are more), coloured by the strategy serving it; then
# MAGIC every tenant's median with its 10th to 90th percentile range.

# COMMAND ----------

import math

from matplotlib.figure import Figure
from matplotlib.patches import Patch

COLORS = {"tenant": "#2f6db5", "tuned": "#e08a1e", "shared": "#3a9a5b"}
shown = summary.groupby("tenant_id")["rows"].sum().sort_values(ascending=False).head(24).index.sort_values()
cols = min(4, max(1, len(shown)))
rows = max(1, math.ceil(len(shown) / cols))
fig = Figure(figsize=(3.2 * cols, 2.4 * rows + 0.6))
axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
for ax, tenant in zip(axes.flat, shown, strict=False):
    h = histogram[histogram["tenant_id"] == tenant]
    for strategy, g in h.groupby("strategy"):
        ax.bar(g["bin_start"], g["share"], width=width, align="edge", color=COLORS.get(strategy, "#999999"))
    n = int(summary.loc[summary["tenant_id"] == tenant, "rows"].sum())
    ax.set_title(f"{tenant} ({n} rows)", fontsize="small")
    ax.set_xlim(lo, hi)
    ax.tick_params(labelbottom=True, labelsize="small")
for ax in list(axes.flat)[len(shown):]:
    ax.set_visible(False)
fig.supxlabel("score")
fig.supylabel("share of the tenant's rows")
fig.legend(handles=[Patch(color=c, label=s) for s, c in COLORS.items()], loc="upper right", fontsize="small")
fig.tight_layout(rect=(0, 0, 0.92, 1))
histogram_figure = show_figure(fig, out, "score_histograms")

# COMMAND ----------

ranked = summary.sort_values("median").reset_index(drop=True)
fig = Figure(figsize=(8, max(3.0, 0.3 * len(ranked) + 1.2)))
ax = fig.subplots()
for strategy, g in ranked.groupby("strategy"):
    ax.errorbar(g["median"].to_numpy(), g.index.to_numpy(), fmt="o",
                xerr=[(g["median"] - g["p10"]).to_numpy(), (g["p90"] - g["median"]).to_numpy()],
                color=COLORS.get(strategy, "#999999"), label=strategy, capsize=3)
ax.set_yticks(ranked.index, [f"{t} ({s})" for t, s in zip(ranked["tenant_id"], ranked["strategy"], strict=True)])
ax.set_xlabel("score: median, 10th to 90th percentile")
ax.set_title(f"score range per tenant ({source})")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize="small")
fig.tight_layout()
range_figure = show_figure(fig, out, "score_ranges")
