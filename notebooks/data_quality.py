# Databricks notebook source
# MAGIC %md
# MAGIC # Data-quality review
# MAGIC Per tenant: rows validated, rows quarantined, the rejected share against the blocking threshold
# MAGIC (`quality_<ds>`, the latest validation of each tenant), and why rows were quarantined
# MAGIC (`quarantine_<ds>`: every failed rule of a row is in `_reason`). Rows whose tenant id was missing or
# MAGIC unsafe have no tenant; they are shown as `(invalid tenant id)`.
# MAGIC
# MAGIC Locally: `python -m tenantml.apps.notebook_runner notebooks/data_quality.py -w dataset=demo`.

# COMMAND ----------

# MAGIC %md
# MAGIC ## Parameters
# MAGIC | widget | empty means |
# MAGIC | --- | --- |
# MAGIC | `dataset` | `project.default_dataset` |
# MAGIC | `tenants` | every tenant and the rows without a valid tenant id (else comma-separated ids) |
# MAGIC | `purpose` | `history` (the labelled rows models train on); `scoring` for the rows to score |
# MAGIC | `output_dir` | `<data_dir>/notebooks/data_quality` (figures) |
# MAGIC | `conf_dir`, `env`, `data_dir` | off Databricks: the `conf/` found from the working directory, `TENANTML_ENV` or `local`, `TENANTML_DATA_DIR` or `project.data_dir` |

# COMMAND ----------

from tenantml.apps.notebook import (notebook_context, notebook_scope, output_dir, show_figure, show_table, tenant_list,
                                   widget)
from tenantml.core.errors import ConfigError

ctx = notebook_context(globals().get("spark"), conf_dir=widget("conf_dir", ""), env=widget("env", ""),
                       data_dir=widget("data_dir", ""))
dataset, spec = ctx.config.dataset(widget("dataset", "") or None)
tenants = tenant_list(widget("tenants", ""))
purpose = widget("purpose", "history").strip()
if purpose not in ("history", "scoring"):
    raise ConfigError(f"widget purpose={purpose!r}: use history (labelled rows) or scoring (rows to score)")
out = output_dir(ctx, widget("output_dir", ""), "data_quality")

# COMMAND ----------

import pandas as pd
from pyspark.sql import functions as F

from tenantml.quality.rules import build_rules

INVALID = "(invalid tenant id)"
view = notebook_scope(ctx, tenants, "data_quality")  # the only way this notebook reads tenant rows
quality = view.read(ctx.tables.quality(dataset)).where(F.col("purpose") == purpose)
quarantine = view.read(ctx.tables.quarantine(dataset), include_null=not tenants).where(F.col("_purpose") == purpose)
quality = (quality.select("tenant_id", "purpose", "rows_in", "rows_valid", "rows_quarantined", "rejected_fraction", "blocked",
                          "threshold", "run_id", "validated_at")
           .orderBy(F.col("rejected_fraction").desc(), "tenant_id").toPandas())
show_table(quality, f"quality_{dataset}: latest validation per tenant ({purpose} rows)")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Quarantine reasons
# MAGIC A row can fail several rules; it is counted once under each. The reasons are the dataset's rule texts
# MAGIC (`tenantml.quality.rules.build_rules`), matched in `_reason`; anything else is `other`.

# COMMAND ----------

known = list(dict.fromkeys(r.reason for r in build_rules(spec, registered_tenants=[])))
tenant = F.coalesce(F.col("tenant_id"), F.lit(INVALID)).alias("tenant")
matches = [(F.instr(F.col("_reason"), reason) > 0) for reason in known]
unmatched = ~F.greatest(*[m.cast("int") for m in matches]).cast("boolean")
per_tenant = (quarantine.groupBy(tenant)
              .agg(F.count(F.lit(1)).alias("rows_quarantined"),
                   *[F.sum(m.cast("long")).alias(f"r{i}") for i, m in enumerate(matches)],
                   F.sum(unmatched.cast("long")).alias("other"))
              .toPandas())
reasons = (per_tenant.melt(id_vars=["tenant", "rows_quarantined"], var_name="key", value_name="rows")
           .assign(reason=lambda d: d["key"].map({f"r{i}": r for i, r in enumerate(known)} | {"other": "other"}))
           .query("rows > 0")[["tenant", "reason", "rows"]]
           .sort_values(["tenant", "rows"], ascending=[True, False]).reset_index(drop=True))
reasons["rows"] = reasons["rows"].astype(int)
reason_matrix = reasons.pivot_table(index="tenant", columns="reason", values="rows", aggfunc="sum", fill_value=0)
show_table(reasons, "quarantined rows per tenant and reason")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Rejected share and reasons per tenant
# MAGIC Left: the share of each tenant's rows quarantined; tenants above the threshold (dashed) are blocked
# MAGIC (red) and train and score skip them. Right: quarantined rows by reason.

# COMMAND ----------

from matplotlib import colormaps
from matplotlib.figure import Figure

shares = quality.sort_values("rejected_fraction")
fig = Figure(figsize=(13, max(3.5, 0.35 * max(len(shares), len(reason_matrix)) + 2)))
ax_share, ax_reason = fig.subplots(1, 2, width_ratios=[2, 3])
ax_share.barh(shares["tenant_id"], shares["rejected_fraction"],
              color=["#c0392b" if b else "#2f6db5" for b in shares["blocked"]])
for threshold in sorted(set(shares["threshold"].dropna())):
    ax_share.axvline(threshold, color="black", linestyle="--", linewidth=1)
ax_share.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
ax_share.set_xlabel("rows quarantined (dashed: blocking threshold)")
ax_share.set_title("rejected share per tenant")

palette = colormaps["tab20"]
left = pd.Series(0, index=reason_matrix.index)
for i, reason in enumerate(reason_matrix.columns):
    ax_reason.barh(reason_matrix.index, reason_matrix[reason], left=left, color=palette(i % 20), label=reason)
    left = left + reason_matrix[reason]
ax_reason.set_xlabel("quarantined rows (a row counts once per failed rule)")
ax_reason.set_title("quarantine reasons")
ax_reason.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="x-small")
fig.tight_layout()
quality_figure = show_figure(fig, out, "data_quality")
