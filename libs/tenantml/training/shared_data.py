"""The shared training set: consenting tenants' training rows, de-identified, sharded, pinned.

Rows leave their tenant only here, and only after three filters: the tenant consented to
contribute (`tenants.consent_share_data`), the row is not in the tenant's holdout (the same
`tenant_split` every strategy uses, so shared models are never evaluated on rows they saw), and
PII is dropped or replaced by a keyed hash inside the tenant's own group. The result is a Delta
table partitioned by shard; training processes read only their shard's files of one version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tenantml.config import DatasetSpec, TrainingConfig
from tenantml.core.ids import validate_tenant_ids
from tenantml.io.delta import overwrite
from tenantml.training.plan import row_quota
from tenantml.training.privacy import PiiPolicy

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from tenantml.io.tables import TableRef

SHARD_COL = "_shard"
ROW_ID_COL = "_row_id"


@dataclass
class SharedTrainset:
    ref: TableRef
    version: int
    fingerprint: str
    silver_version: int
    contributors: dict[str, int]  # tenant -> training rows contributed
    shard_files: list[list[str]]
    shard_rows: list[int]
    policy: PiiPolicy
    reused: bool = False
    columns: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)


def trainset_fingerprint(*, silver: str, silver_version: int, contributors: list[str], spec: DatasetSpec,
                         cfg: TrainingConfig, policy: PiiPolicy, num_shards: int) -> str:
    """Same inputs, same rows: lets a rerun reuse the table version and resume its checkpoint."""
    payload = {
        "silver": silver, "silver_version": silver_version, "contributors": sorted(contributors),
        "label": spec.label, "key": spec.entity_key, "numeric": spec.numeric_features,
        "categorical": spec.categorical_features, "event_time": spec.event_time,
        "test_fraction": cfg.test_fraction, "seed": cfg.seed,
        "quotas": {t: row_quota(cfg, t) for t in sorted(contributors)}, "policy": policy.to_dict(),
        "num_shards": num_shards,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _latest_commit(spark: SparkSession, ref: TableRef) -> tuple[int, str | None] | None:
    from tenantml.io.delta import latest_commit

    return latest_commit(spark, ref)


def _shard_files(spark: SparkSession, ref: TableRef, version: int, num_shards: int) -> list[list[str]]:
    from tenantml.io import read_table

    files = read_table(spark, ref, version=version).inputFiles()
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    for f in sorted(files):
        marker = f"/{SHARD_COL}="
        if marker not in f:
            raise RuntimeError(f"{ref.display}: file {f} is not under a {SHARD_COL}= partition")
        shards[int(f.split(marker, 1)[1].split("/", 1)[0])].append(f)
    return shards


def build_shared_trainset(spark: SparkSession, silver: DataFrame, *, silver_ref: str, silver_version: int,
                          spec: DatasetSpec, cfg: TrainingConfig, contributors: list[str], policy: PiiPolicy,
                          salt: bytes, ref: TableRef, num_shards: int) -> SharedTrainset:
    """Write (or reuse) the de-identified, sharded training set and return its pinned version."""
    import pandas as pd
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from tenantml.io import read_table

    contributors = sorted(validate_tenant_ids(contributors, where="shared training contributors"))
    fp = trainset_fingerprint(silver=silver_ref, silver_version=silver_version, contributors=contributors,
                              spec=spec, cfg=cfg, policy=policy, num_shards=num_shards)
    latest = _latest_commit(spark, ref)
    reused = latest is not None and latest[1] == fp
    if not reused:
        key, label, event_time = spec.entity_key, spec.label, spec.event_time
        pii = tuple(c for c in spec.pii_columns if c in silver.columns)
        wanted = ["tenant_id", key, label, *spec.numeric_features, *spec.categorical_features,
                  *([event_time] if event_time else []), *pii]
        wanted = list(dict.fromkeys(wanted))
        src = silver.where(F.col("tenant_id").isin(contributors)).select(*[F.col(f"`{c}`") for c in wanted])
        by_name = {f.name: f for f in src.schema.fields}
        out_fields = [T.StructField("tenant_id", T.StringType(), False),
                      T.StructField(ROW_ID_COL, T.StringType(), False)]
        features = [label, *spec.numeric_features, *spec.categorical_features]
        out_fields += [by_name[c] for c in dict.fromkeys(features) if c != key]
        if policy.action == "hash":
            out_fields += [T.StructField(c, T.StringType(), True) for c in pii if c not in features]
        schema = T.StructType(out_fields)
        names = [f.name for f in out_fields]
        quotas = {t: row_quota(cfg, t) for t in contributors}
        test_fraction, seed = cfg.test_fraction, cfg.seed
        pii_cols, action = tuple(c for c in pii if c not in features), policy.action

        def per_tenant(pdf: pd.DataFrame) -> pd.DataFrame:
            from tenantml.models import tenant_split
            from tenantml.training.privacy import deidentify, keyed_hash

            tenant = str(pdf["tenant_id"].iloc[0])
            train, _, _ = tenant_split(pdf, tenant, key, test_fraction=test_fraction, seed=seed,
                                       event_time=event_time, max_rows=quotas.get(tenant))
            salt_value = salt  # in the pickled closure, never in the query plan's text
            train = deidentify(train, pii_cols, action, salt_value)
            train[ROW_ID_COL] = [keyed_hash(salt_value, f"{tenant}/{k}") for k in train[key].tolist()]
            return train[names]

        rows = (src.groupBy("tenant_id").applyInPandas(per_tenant, schema=schema)
                .withColumn(SHARD_COL, F.expr(f"pmod(xxhash64({ROW_ID_COL}), {int(num_shards)})")))
        overwrite(rows, ref, partition_by=(SHARD_COL,), user_metadata=fp)
        latest = _latest_commit(spark, ref)
    if latest is None:
        raise RuntimeError(f"{ref.display}: no commit found after writing the shared training set")
    version = latest[0]
    pinned = read_table(spark, ref, version=version)
    counts = pinned.groupBy("tenant_id", SHARD_COL).agg(F.count(F.lit(1)).alias("n")).collect()
    per_tenant_rows: dict[str, int] = {}
    shard_rows = [0] * num_shards
    for r in counts:
        per_tenant_rows[r["tenant_id"]] = per_tenant_rows.get(r["tenant_id"], 0) + int(r["n"])
        shard_rows[int(r[SHARD_COL])] += int(r["n"])
    return SharedTrainset(ref=ref, version=version, fingerprint=fp, silver_version=silver_version,
                          contributors=dict(sorted(per_tenant_rows.items())),
                          shard_files=_shard_files(spark, ref, version, num_shards), shard_rows=shard_rows,
                          policy=policy, reused=reused,
                          columns=[c for c in pinned.columns if c != SHARD_COL])
