# Databricks notebook source
# MAGIC %md
# MAGIC # Strategy comparison per tenant
# MAGIC For every tenant, each candidate strategy's metric on the tenant's holdout (tenant-specific,
# MAGIC tuned-shared, shared, and the champion it had before), the promotion decision and the strategy that
# MAGIC serves it now. Read from the `promotions` table, where `promote` records every decision: all
# MAGIC candidates of a tenant were judged on the same holdout rows, so the numbers compare directly.
# MAGIC
# MAGIC Locally: `python -m tenantml.apps.notebook_runner notebooks/strategy_comparison.py -w dataset=demo`.

# COMMAND ----------

# MAGIC %md
# MAGIC ## Parameters
# MAGIC | widget | empty means |
# MAGIC | --- | --- |
# MAGIC | `dataset` | `project.default_dataset` |
# MAGIC | `tenants` | every tenant (else comma-separated ids) |
# MAGIC | `run_id` | each tenant's latest decision (else the decisions of that run) |
# MAGIC | `output_dir` | `<data_dir>/notebooks/strategy_comparison` (figures) |
# MAGIC | `conf_dir`, `env`, `data_dir` | off Databricks: the `conf/` found from the working directory, `TENANTML_ENV` or `local`, `TENANTML_DATA_DIR` or `project.data_dir` |

# COMMAND ----------

from tenantml.apps.notebook import (notebook_context, notebook_scope, output_dir, show_figure, show_table, tenant_list,
                                   widget)
from tenantml.core.ids import validate_run_id

ctx = notebook_context(globals().get("spark"), conf_dir=widget("conf_dir", ""), env=widget("env", ""),
                       data_dir=widget("data_dir", ""))
dataset, spec = ctx.config.dataset(widget("dataset", "") or None)
tenants = tenant_list(widget("tenants", ""))
run_id = widget("run_id", "").strip()
run_id = validate_run_id(run_id) if run_id else None
out = output_dir(ctx, widget("output_dir", ""), "strategy_comparison")
print(f"dataset {dataset}; {'run ' + run_id if run_id else 'latest decisions'}; figures in {out}")

# COMMAND ----------

import json

import pandas as pd
from pyspark.sql import Window
from pyspark.sql import functions as F

from tenantml.models import primary_metric
from tenantml.core.ids import SHARED_ID

metric_name, higher_is_better = primary_metric(spec.task)
view = notebook_scope(ctx, tenants, "strategy_comparison")  # the only way this notebook reads tenant rows
decisions = view.read(ctx.tables.promotions, shared=True).where(F.col("dataset") == dataset)
if run_id:
    decisions = decisions.where(F.col("run_id") == run_id)
else:  # each tenant's latest decision
    latest = Window.partitionBy("tenant_id").orderBy(F.col("decided_at").desc(), F.col("run_id").desc())
    decisions = decisions.withColumn("_n", F.row_number().over(latest)).where(F.col("_n") == 1).drop("_n")
decisions = decisions.toPandas()
# The shared model's own decision (tenant `_shared`) is not a tenant's: shown on its own.
shared_decision = decisions[decisions["tenant_id"] == SHARED_ID]
decisions = decisions[decisions["tenant_id"] != SHARED_ID]
if tenants:
    decisions = decisions[decisions["tenant_id"].isin(tenants)]
decisions = decisions.sort_values("tenant_id").reset_index(drop=True)

# One row per (tenant, candidate): every candidate's holdout metric, as `promote` recorded it.
candidates = pd.DataFrame(
    [{"tenant_id": r.tenant_id, "run_id": r.run_id, "strategy": c["strategy"], "model": c.get("model"),
      "metric": c.get(r.metric_name)}
     for r in decisions.itertuples(index=False) for c in json.loads(r.candidates_json or "[]")],
    columns=["tenant_id", "run_id", "strategy", "model", "metric"])
candidates["metric"] = pd.to_numeric(candidates["metric"], errors="coerce")
candidates = candidates.merge(decisions[["tenant_id", "serving_strategy"]], on="tenant_id", how="left")
candidates["serving"] = candidates.pop("serving_strategy") == candidates["strategy"]
show_table(candidates, "candidates")

# COMMAND ----------

STRATEGIES = ["tenant", "tuned", "shared"]
wide = candidates.pivot_table(index="tenant_id", columns="strategy", values="metric", aggfunc="first")
comparison = (decisions.set_index("tenant_id")[[
    "run_id", "decision", "serving_strategy", "serving_model", "champion_before_strategy", "champion_before_metric",
    "holdout_rows", "reason"]]
    .join(wide.reindex(columns=STRATEGIES), how="left"))
ranked = comparison[STRATEGIES] if higher_is_better else -comparison[STRATEGIES]
comparison["best_candidate"] = [row.idxmax() if row.notna().any() else None for _, row in ranked.iterrows()]
comparison["serving_is_best"] = comparison["best_candidate"] == comparison["serving_strategy"]
comparison = comparison.reset_index()[["tenant_id", *STRATEGIES, "champion_before_strategy", "champion_before_metric",
                                       "best_candidate", "decision", "serving_strategy", "serving_is_best",
                                       "serving_model", "holdout_rows", "run_id", "reason"]]
show_table(comparison, f"{metric_name} per candidate ({'higher' if higher_is_better else 'lower'} is better)")
if len(shared_decision):
    show_table(shared_decision[["run_id", "decision", "serving_model", "challenger_metric", "reason"]],
               "the shared model's own decision")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Candidates side by side
# MAGIC One group of bars per tenant; the serving strategy's bar is outlined in black. A missing bar is a
# MAGIC candidate that was not trained or not entitled for that tenant (too few rows, no consent, or a
# MAGIC holdout too small to compute the metric).

# COMMAND ----------

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

COLORS = {"tenant": "#2f6db5", "tuned": "#e08a1e", "shared": "#3a9a5b"}
fig = Figure(figsize=(max(6.0, 1.1 * len(comparison) + 2), 4.5))
ax, ax_mix = fig.subplots(1, 2, width_ratios=[3, 1])
width = 0.8 / len(STRATEGIES)
for i, strategy in enumerate(STRATEGIES):
    xs = [t + (i - 1) * width for t in range(len(comparison))]
    values = comparison[strategy]
    ax.bar(xs, values.fillna(0), width=width, color=COLORS[strategy],
           edgecolor=["black" if s == strategy else "none" for s in comparison["serving_strategy"]], linewidth=1.6)
ax.set_xticks(range(len(comparison)), comparison["tenant_id"], rotation=45, ha="right")
ax.set_ylabel(f"{metric_name} on the tenant's holdout")
ax.set_title("candidates per tenant (outlined: serving)")
ax.legend(handles=[Patch(color=COLORS[s], label=s) for s in STRATEGIES], loc="upper center",
          bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize="small")

mix = comparison["serving_strategy"].fillna("none").value_counts().reindex([*STRATEGIES, "none"], fill_value=0)
ax_mix.barh(mix.index[::-1], mix.values[::-1], color=[COLORS.get(s, "#999999") for s in mix.index[::-1]])
ax_mix.xaxis.set_major_locator(MaxNLocator(integer=True))
ax_mix.set_title("serving strategy")
ax_mix.set_xlabel("tenants")
fig.tight_layout()
comparison_figure = show_figure(fig, out, "strategy_comparison")
