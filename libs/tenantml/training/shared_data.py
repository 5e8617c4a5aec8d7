"""The shared training set: consenting tenants' training rows, de-identified, sharded, pinned.

Rows leave their tenant only here, and only after three filters: the tenant consented to
contribute (`tenants.consent_share_data`), the row is not in the tenant's holdout (the same
`tenant_split` every strategy uses, so shared models are never evaluated on rows they saw), and
PII is dropped or replaced by a keyed hash inside the tenant's own group. The result is a Delta
table partitioned by shard; its pinned version is exported once as plain Parquet to the staging
folder (`training.staging_dir`, seen by every executor), and each training process reads only its
shard's files of that export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
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


EXPORT_MANIFEST = "_tenantml_export.json"


def _export_manifest(target: Path, *, version: int, fingerprint: str, num_shards: int) -> list[list[str]] | None:
    """The shard files of a finished export at ``target`` (absolute paths), or None if there is none,
    it was made for other data, or a file is missing."""
    try:
        manifest = json.loads((target / EXPORT_MANIFEST).read_text(encoding="utf-8"))
        if (manifest["version"], manifest["fingerprint"], manifest["num_shards"]) != (version, fingerprint,
                                                                                      num_shards):
            return None
        shards = [[str(target / rel) for rel in files] for files in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return shards if all(Path(f).is_file() for files in shards for f in files) else None


def export_shards(spark: SparkSession, ref: TableRef, *, version: int, fingerprint: str, num_shards: int,
                  root: Path) -> list[list[str]]:
    """Pinned version ``version`` of the training set as plain Parquet under ``root`` (a staging folder
    every executor sees), one folder per shard; returns each shard's files as local paths.

    Torch processes then read files that belong to this export alone (not the Delta table's, which a
    later overwrite and VACUUM may remove), through a path they can open with pyarrow wherever they
    run. One export per version and fingerprint, reused by reruns; older versions' exports are removed.
    """
    import shutil

    from tenantml.io import read_table

    name = f"v{int(version)}-{fingerprint}"
    target = root / name
    shards = _export_manifest(target, version=version, fingerprint=fingerprint, num_shards=num_shards)
    if shards is None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            # One pass over the pinned files; each task writes a file per shard it holds. The folder
            # is this call's own (a random name), so overwrite only names the mode Spark Connect
            # accepts (it refuses errorifexists).
            read_table(spark, ref, version=version).write.mode("overwrite") \
                .partitionBy(SHARD_COL).parquet(str(tmp))
            rel: list[list[str]] = [[] for _ in range(num_shards)]
            for part in sorted(tmp.glob(f"{SHARD_COL}=*")):
                rel[int(part.name.split("=", 1)[1])] = sorted(
                    f"{part.name}/{f.name}" for f in part.iterdir()
                    if f.name.endswith(".parquet") and not f.name.startswith((".", "_")))
            (tmp / EXPORT_MANIFEST).write_text(json.dumps({
                "table": ref.display, "version": int(version), "fingerprint": fingerprint,
                "num_shards": num_shards, "shards": rel}, indent=1), encoding="utf-8")
            if _export_manifest(target, version=version, fingerprint=fingerprint, num_shards=num_shards) is None:
                shutil.rmtree(target, ignore_errors=True)  # an unfinished or mismatched export
                with contextlib.suppress(OSError):  # else another run just finished it: use that one
                    os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shards = _export_manifest(target, version=version, fingerprint=fingerprint, num_shards=num_shards)
        if shards is None:
            raise RuntimeError(f"{ref.display} v{version}: the shard export at {target} is incomplete")
    _remove_stale_exports(root, keep=name, version=version)
    return shards


def _remove_stale_exports(root: Path, *, keep: str, version: int) -> None:
    """Best effort: exports of older versions, and temporary folders a killed run left (a day old)."""
    import shutil
    import time

    for entry in root.iterdir():
        try:
            if entry.name == keep or not entry.is_dir():
                continue
            if entry.name.startswith("v"):
                if int(entry.name[1:].split("-", 1)[0]) < version:
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.endswith(".tmp") and time.time() - entry.stat().st_mtime > 86_400:
                shutil.rmtree(entry, ignore_errors=True)
        except (OSError, ValueError):
            continue


def remove_shared_exports(staging_dir: Path, dataset: str) -> None:
    """Every shard export of ``dataset``'s training set (e.g. after a tenant's rows were deleted from
    the table: the exports hold copies; the next shared training exports again)."""
    import shutil

    shutil.rmtree(staging_dir / "shared" / dataset, ignore_errors=True)


def build_shared_trainset(spark: SparkSession, silver: DataFrame, *, silver_ref: str, silver_version: int,
                          spec: DatasetSpec, cfg: TrainingConfig, contributors: list[str], policy: PiiPolicy,
                          salt: bytes, ref: TableRef, num_shards: int, staging_dir: Path,
                          dataset: str) -> SharedTrainset:
    """Write (or reuse) the de-identified, sharded training set and return its pinned version, exported
    for the training processes under ``<staging_dir>/shared/<dataset>/`` (`export_shards`)."""
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
                          shard_files=export_shards(spark, ref, version=version, fingerprint=fp,
                                                    num_shards=num_shards,
                                                    root=staging_dir / "shared" / dataset),
                          shard_rows=shard_rows,
                          policy=policy, reused=reused,
                          columns=[c for c in pinned.columns if c != SHARD_COL])
