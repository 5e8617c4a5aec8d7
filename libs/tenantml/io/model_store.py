"""The `model_store` Delta table: every registered model's bytes and lineage, one row per version.

Scoring reads model bytes here in one query instead of downloading thousands of MLflow
artifacts; MLflow stays the source of truth for which version is champion. Every row is signed
(HMAC-SHA256 with `tracking.signing_key`) over its dataset, owner, strategy, model name, version
and the SHA-256 of its bytes, and the registry version carries the same SHA-256 as a tag: a row
whose bytes, owner or strategy were changed after training, or a registry version that points at
other bytes, is refused by :func:`verify`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from tenantml.core.ids import SHARED_ID, tenant_in_predicate, validate_run_id, validate_tenant_ids
from tenantml.io import read_table, replace_where, table_exists
from tenantml.io.spark import local_frame
from tenantml.io.tables import TableRef

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession


class TenantCheck(Protocol):
    """What writing needs of a tenant scope (`io.scope.TenantScope`, which reads this module): the
    check that every row's tenant is one the step acts for."""

    def check(self, tenants: Iterable[str], what: str) -> None: ...

STORE_SCHEMA = (
    "dataset string, tenant_id string, strategy string, model_name string, model_version string, "
    "mlflow_run_id string, run_id string, metric_name string, metric double, baseline_metric double, "
    "metrics_json string, train_rows long, delta_version long, git_commit string, config_hash string, "
    "model binary, created_at timestamp, model_sha256 string, signature string, profile_json string"
)
STORE_COLUMNS = [c.split()[0] for c in STORE_SCHEMA.split(", ")]


def model_sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _sign(key: bytes, row: dict[str, Any], sha: str) -> str:
    fields = (row["dataset"], row["tenant_id"], row["strategy"], row["model_name"], str(row["model_version"]), sha)
    return hmac.new(key, "\x1f".join(map(str, fields)).encode(), hashlib.sha256).hexdigest()


def verify(row: Any, key: bytes, registry_tags: dict[str, str] | None = None) -> str | None:
    """None when a stored row is what training wrote (and what the registry version names), else why not."""
    get = row.get if isinstance(row, dict) else (lambda k: getattr(row, k, None))
    what = f"model store row of {get('model_name')} v{get('model_version')} (tenant {get('tenant_id')!r})"
    if get("_bytes_sha256") is not None:  # digested in Spark (see `digests`)
        sha = str(get("_bytes_sha256"))
    else:
        blob = get("model")
        if blob is None:
            return f"{what} holds no model bytes: refused"
        sha = model_sha256(bytes(blob))
    signature = get("signature")
    if not signature or get("model_sha256") != sha:
        return f"{what}: its bytes do not match the digest recorded at training: refused"
    expected = _sign(key, {k: get(k) for k in ("dataset", "tenant_id", "strategy", "model_name", "model_version")},
                     sha)
    if not hmac.compare_digest(str(signature), expected):
        return f"{what}: its signature does not match its owner, strategy or bytes (tampered?): refused"
    if registry_tags is not None and registry_tags.get("model_sha256") != sha:
        return (f"registry version {get('model_name')} v{get('model_version')} names bytes "
                f"{str(registry_tags.get('model_sha256'))[:12]}..., the model store holds {sha[:12]}...: refused")
    return None


def write_models(spark: SparkSession, ref: TableRef, rows: list[dict[str, Any]], dataset: str,
                 run_id: str, strategy: str, *, key: bytes, scope: TenantCheck | None = None) -> None:
    """Idempotent per (run, dataset, strategy, tenant): a rerun replaces its own tenants' rows
    only, so a resumed run keeps the models its first attempt registered for the other tenants.
    With ``scope`` every row's tenant must be one the step acts for; every row is signed with ``key``."""
    validate_run_id(run_id)
    if scope is not None:
        scope.check([r["tenant_id"] for r in rows], f"writing {ref.display} rows")
    if strategy not in ("tenant", "shared", "tuned"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if not rows:
        return
    now = datetime.now(UTC).replace(tzinfo=None)
    data = []
    for r in rows:
        sha = model_sha256(bytes(r["model"]))
        full = {"profile_json": None, **r, "created_at": now, "model_sha256": sha, "signature": _sign(key, r, sha)}
        data.append(tuple(full[c] for c in STORE_COLUMNS))
    df = local_frame(spark, data, STORE_SCHEMA)
    tenants = tenant_in_predicate([r["tenant_id"] for r in rows], allow=(SHARED_ID,))
    replace_where(df, ref, f"run_id = '{run_id}' AND dataset = '{dataset}' AND strategy = '{strategy}' "
                           f"AND {tenants}",
                  partition_by=("tenant_id",))


def load_models(spark: SparkSession, ref: TableRef, wanted: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Rows for exactly the (model_name, version) of each tenant in ``wanted``."""
    import pandas as pd
    from pyspark.sql import functions as F

    if not wanted or not table_exists(spark, ref):
        return pd.DataFrame(columns=STORE_COLUMNS)
    tenants = [t for t in wanted if t == SHARED_ID] + validate_tenant_ids(
        [t for t in wanted if t != SHARED_ID], where="the model store")
    keys = local_frame(spark, [(t, n, v) for t, (n, v) in wanted.items()],
                                 "tenant_id string, model_name string, model_version string")
    df = (read_table(spark, ref).where(F.col("tenant_id").isin(tenants))
          .join(F.broadcast(keys), on=["tenant_id", "model_name", "model_version"], how="inner")
          .dropDuplicates(["tenant_id", "model_name", "model_version"]))
    return df.toPandas()


def stored_rows(spark: SparkSession, ref: TableRef, wanted: dict[str, tuple[str, str]]) -> DataFrame:
    """The model_store rows of exactly the (model_name, version) of each tenant in ``wanted``, as a
    Spark frame (the bytes stay in Spark: scoring joins them to the rows it scores)."""
    from pyspark.sql import functions as F

    tenants = [t for t in wanted if t == SHARED_ID] + validate_tenant_ids(
        [t for t in wanted if t != SHARED_ID], where="the model store")
    keys = local_frame(spark, [(t, n, v) for t, (n, v) in wanted.items()],
                                 "tenant_id string, model_name string, model_version string")
    return (read_table(spark, ref).where(F.col("tenant_id").isin(tenants))
            .join(F.broadcast(keys), on=["tenant_id", "model_name", "model_version"], how="inner")
            .dropDuplicates(["tenant_id", "model_name", "model_version"]))


def digests(rows: DataFrame) -> list[dict[str, Any]]:
    """Every field `verify` checks, with the SHA-256 of the bytes computed inside Spark, so the
    driver verifies thousands of models without fetching their bytes."""
    from pyspark.sql import functions as F

    cols = [c for c in STORE_COLUMNS if c not in ("model",) and c in rows.columns]
    return [r.asDict() for r in rows.select(*cols, F.sha2(F.col("model"), 256).alias("_bytes_sha256")).collect()]
