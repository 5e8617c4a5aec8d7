# Databricks notebook source
# MAGIC %md
# MAGIC # Tenant overview
# MAGIC Data quality, model quality and scoring coverage per tenant for one dataset.
# MAGIC Runs on Databricks (widgets) and locally: `python notebooks/tenant_overview.py`.

# COMMAND ----------

from tenantml.notebook import widget

dataset = widget("dataset", "demo")
data_dir = widget("data_dir", ".data")
env = widget("env", "local")

# COMMAND ----------

from tenantml.context import JobContext
from tenantml.io import read_table

ctx = JobContext.create(conf_dir=widget("conf_dir", "conf"), env=env, data_dir=data_dir)
quality = read_table(ctx.spark, ctx.tables.quality(dataset)).toPandas().set_index("tenant_id")
models = (read_table(ctx.spark, ctx.tables.model_store).where(f"dataset = '{dataset}'")
          .drop("model").toPandas().sort_values("created_at").groupby("tenant_id").last())
scored = (read_table(ctx.spark, ctx.tables.predictions(dataset)).groupBy("tenant_id").count()
          .toPandas().set_index("tenant_id")["count"].rename("rows_scored"))

# COMMAND ----------

overview = quality[["rows_in", "rows_quarantined", "rejected_fraction", "blocked"]].join(
    models[["model_version", "metric_name", "metric", "baseline_metric"]], how="left").join(scored, how="left")
overview["lift_over_baseline"] = overview["metric"] - overview["baseline_metric"]
print(overview.sort_values("rows_in", ascending=False).to_string())
