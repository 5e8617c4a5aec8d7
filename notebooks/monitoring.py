# Databricks notebook source
# MAGIC %md
# MAGIC # Monitoring: drift, realised accuracy and retraining
# MAGIC Per tenant: how far its latest rows to score moved from the rows its champion was trained on (the PSI
# MAGIC of every feature, and of the scores), how the champion did once the labels of rows it scored arrived
# MAGIC (the realised metric next to the holdout metric it was promoted with), and the retraining decision
# MAGIC the monitor step took (`retraining_<ds>`, with its reasons). Reads `monitoring_<ds>`; aggregates are
# MAGIC computed in Spark, so only one row per tenant and feature reaches the driver.
# MAGIC
# MAGIC Locally: `python -m tenantml.apps.notebook_runner notebooks/monitoring.py -w dataset=flights`.

# COMMAND ----------

# MAGIC %md
# MAGIC ## Parameters
# MAGIC | widget | empty means |
# MAGIC | --- | --- |
# MAGIC | `dataset` | `project.default_dataset` |
# MAGIC | `tenants` | every tenant (else comma-separated ids) |
# MAGIC | `top` | the 30 tenants with the largest drift in the heatmap |
# MAGIC | `output_dir` | `<data_dir>/notebooks/monitoring` (figures) |
# MAGIC | `conf_dir`, `env`, `data_dir` | off Databricks: the `conf/` found from the working directory, `TENANTML_ENV` or `local`, `TENANTML_DATA_DIR` or `project.data_dir` |

# COMMAND ----------

from tenantml.apps.notebook import (notebook_context, notebook_scope, output_dir, show_figure, show_table, tenant_list,
                                   widget)
from tenantml.core.errors import ConfigError

ctx = notebook_context(globals().get("spark"), conf_dir=widget("conf_dir", ""), env=widget("env", ""),
                       data_dir=widget("data_dir", ""))
dataset, spec = ctx.config.dataset(widget("dataset", "") or None)
tenants = tenant_list(widget("tenants", ""))
try:
    top = int(widget("top", "30"))
except ValueError:
    raise ConfigError("widget top: a whole number of tenants") from None
out = output_dir(ctx, widget("output_dir", ""), "monitoring")
psi_warn, psi_alert = ctx.config.monitoring.psi_warn, ctx.config.monitoring.psi_alert

# COMMAND ----------

from pyspark.sql import Window
from pyspark.sql import functions as F

from tenantml.io import table_exists
from tenantml.core.errors import TableNotFoundError

view = notebook_scope(ctx, tenants, "monitoring")  # the only way this notebook reads tenant rows
mon_ref = ctx.tables.monitoring(dataset)
if not table_exists(ctx.spark, mon_ref):
    raise TableNotFoundError(f"table {mon_ref.display} does not exist yet: run `tenantml monitor` or `tenantml score`")
mon = view.read(mon_ref).where(F.col("dataset") == dataset)

# Each tenant's latest monitored batch: its feature and prediction PSI.
drift_kinds = F.col("kind").isin("numeric", "categorical", "prediction")
latest = (mon.where(drift_kinds).groupBy("tenant_id", "batch_id").agg(F.max("computed_at").alias("at"))
          .withColumn("_n", F.row_number().over(Window.partitionBy("tenant_id").orderBy(F.col("at").desc(),
                                                                                         F.col("batch_id").desc())))
          .where("_n = 1").select("tenant_id", "batch_id"))
psi = (mon.where(drift_kinds).join(latest, ["tenant_id", "batch_id"])
       .select("tenant_id", "batch_id", "kind", "feature", "psi", "status", "rows").toPandas())
features = psi[psi["kind"] != "prediction"]
drift = features.pivot_table(index="tenant_id", columns="feature", values="psi", aggfunc="max")
prediction_psi = (psi[psi["kind"] == "prediction"].set_index("tenant_id")[["batch_id", "psi", "status", "rows"]]
                  .sort_values("psi", ascending=False))
show_table(drift.round(3).reset_index(), f"feature PSI of each tenant's latest batch (warn > {psi_warn:g}, "
                                         f"drift > {psi_alert:g})")

# COMMAND ----------

realised = (mon.where(F.col("kind") == "realised")
            .select("tenant_id", "batch_id", "metric_name", "value", "promoted_value", "rows", "model_version",
                    "computed_at")
            .orderBy("tenant_id", "computed_at").toPandas())
show_table(realised, "realised metric of scored rows whose labels arrived, against the promoted holdout metric")

ret_ref = ctx.tables.retraining(dataset)
if table_exists(ctx.spark, ret_ref):
    last = Window.partitionBy("tenant_id").orderBy(F.col("decided_at").desc(), F.col("run_id").desc())
    decisions = (view.read(ret_ref).where(F.col("dataset") == dataset).withColumn("_n", F.row_number().over(last))
                 .where("_n = 1").drop("_n", "dataset").orderBy(F.col("retrain").desc(), "tenant_id").toPandas())
else:
    decisions = None
if decisions is not None:
    show_table(decisions[["tenant_id", "run_id", "retrain", "reasons", "champion", "new_rows", "drifted_features"]],
               "latest retraining decision per tenant")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Figures
# MAGIC The feature heatmap (the `top` tenants with the largest PSI, the colour scale stopping at twice the drift
# MAGIC threshold), the prediction PSI per tenant against the thresholds, and, once labels have arrived, each
# MAGIC tenant's realised metric against the metric its champion was promoted with.

# COMMAND ----------

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

figures = []
if len(drift):
    ranked = drift.loc[drift.max(axis=1).sort_values(ascending=False).index[:top]]
    levels = [0.0, psi_warn, psi_alert, 2 * psi_alert]
    cmap = ListedColormap(["#e8f3ec", "#f6d7a7", "#e3796b"]).with_extremes(over="#a8261b", bad="#dddddd")
    fig = Figure(figsize=(max(5.0, 0.9 * ranked.shape[1] + 3), max(3.0, 0.32 * len(ranked) + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(ranked.to_numpy(dtype=float)), aspect="auto", cmap=cmap,
                      norm=BoundaryNorm(levels, cmap.N), interpolation="nearest")
    ax.set_xticks(range(ranked.shape[1]), list(ranked.columns), rotation=30, ha="right")
    ax.set_yticks(range(len(ranked)), list(ranked.index))
    for (i, j), v in np.ndenumerate(ranked.to_numpy(dtype=float)):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="x-small")
    fig.colorbar(image, ax=ax, extend="max", label="PSI against the champion's training rows")
    ax.set_title(f"feature drift of each tenant's latest batch ({dataset})")
    fig.tight_layout()
    figures.append(show_figure(fig, out, "drift_heatmap"))

if len(prediction_psi):
    shown = prediction_psi.head(top).iloc[::-1]
    fig = Figure(figsize=(8, max(3.0, 0.3 * len(shown) + 1.2)))
    ax = fig.subplots()
    # The step's own status: a batch with too few rows for a PSI to mean anything, or a PSI within the
    # sampling noise of its batch size (within_noise), is grey, not green or red.
    status_colors = {"drift": "#c0392b", "warn": "#e08a1e", "stable": "#3a9a5b"}
    colors = [status_colors.get(str(s), "#bbbbbb") for s in shown["status"]]
    ax.barh([f"{t} ({int(n):,} rows)" for t, n in zip(shown.index, shown["rows"], strict=True)],
            shown["psi"].to_numpy(dtype=float), color=colors)
    for x, label in ((psi_warn, "warn"), (psi_alert, "drift")):
        ax.axvline(x, color="#555555", linestyle="--", linewidth=1)
        ax.text(x, len(shown) - 0.4, f" {label}", fontsize="small", color="#555555")
    ax.set_xlabel("PSI of the scores against the champion's training scores")
    ax.set_title(f"prediction drift of each tenant's latest scored batch ({dataset})")
    fig.tight_layout()
    figures.append(show_figure(fig, out, "prediction_drift"))

if len(realised):
    latest_real = realised.groupby("tenant_id").tail(1).sort_values("value").reset_index(drop=True)
    metric = str(latest_real["metric_name"].iloc[0])
    fig = Figure(figsize=(8, max(3.0, 0.3 * len(latest_real) + 1.2)))
    ax = fig.subplots()
    y = np.arange(len(latest_real))
    ax.hlines(y, latest_real["promoted_value"], latest_real["value"], color="#999999", linewidth=1)
    ax.scatter(latest_real["promoted_value"], y, marker="|", s=160, color="#222222", label="promoted with (holdout)")
    ax.scatter(latest_real["value"], y, color="#2f6db5", zorder=3, label="realised on labelled scored rows")
    ax.set_yticks(y, [f"{t} ({int(n):,})" for t, n in zip(latest_real["tenant_id"], latest_real["rows"], strict=True)])
    ax.set_xlabel(metric)
    ax.set_title(f"realised {metric} against the promoted {metric} ({dataset})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize="small")
    fig.tight_layout()
    figures.append(show_figure(fig, out, "realised_metrics"))
if not figures:
    print("nothing monitored yet: no batch has been scored or monitored for these tenants")
