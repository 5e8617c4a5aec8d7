"""Driver side of shared training: fit the feature encoding once, size the steps, launch, return."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantml.config import DatasetSpec, TrainingConfig
from tenantml.training.distributed import SharedJob, launch
from tenantml.training.shared_data import SharedTrainset

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass
class SharedTrainingResult:
    blob: bytes
    figures: dict[str, Any]
    job: SharedJob


def resolve_use_gpu(setting: object) -> bool:
    if setting == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return bool(setting)


def prepare_shared_job(spark: SparkSession, trainset: SharedTrainset, spec: DatasetSpec, cfg: TrainingConfig,
                       checkpoint_dir: Path, dataset: str) -> SharedJob:
    """Everything the processes share, computed once on the driver from the pinned version."""
    from pyspark.sql import functions as F

    from tenantml.io import read_table
    from tenantml.models import FeatureSpec, Preprocessor, TrainParams

    sh = cfg.shared
    pinned = read_table(spark, trainset.ref, version=trainset.version)
    fspec = FeatureSpec(tuple(spec.numeric_features), tuple(spec.categorical_features), spec.task)
    fraction = min(1.0, sh.preprocess_sample_rows / max(1, trainset.rows))
    sample = (pinned.sample(fraction=fraction, seed=cfg.seed) if fraction < 1.0 else pinned)
    sample_pdf = sample.select(*[F.col(f"`{c}`") for c in fspec.columns]).toPandas()
    pre = Preprocessor.fit(sample_pdf, fspec)
    stats = pinned.agg(F.avg(F.col(f"`{spec.label}`")).alias("m"),
                       F.stddev_pop(F.col(f"`{spec.label}`")).alias("s")).collect()[0]
    mean, std = float(stats["m"] or 0.0), float(stats["s"] or 0.0)
    prior = float(min(max(mean, 1e-4), 1 - 1e-4)) if spec.task == "binary" else None
    target_mean, target_std = (0.0, 1.0) if spec.task == "binary" else (mean, std if std > 0 else 1.0)
    params = TrainParams(hidden_units=tuple(sh.hidden_units or cfg.hidden_units), dropout=cfg.dropout,
                         max_embedding_dim=cfg.max_embedding_dim, learning_rate=sh.learning_rate,
                         weight_decay=cfg.weight_decay, batch_size=sh.batch_size, max_epochs=sh.max_epochs,
                         patience=sh.patience, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if min(trainset.shard_rows) < 2:
        raise ValueError(f"{trainset.ref.display} v{trainset.version}: a shard has fewer than 2 rows "
                         f"({trainset.shard_rows}); too little shared data for {sh.num_processes} processes")
    # Every process takes the same number of steps (smaller shards cycle), so collectives line up.
    largest_train = max(n - min(max(1, round(n * cfg.val_fraction)), n - 1) for n in trainset.shard_rows)
    steps = max(1, math.ceil(largest_train / sh.batch_size))
    use_gpu = resolve_use_gpu(sh.use_gpu)
    # max_epochs stays out of the key: raising it continues a finished run from its checkpoint.
    key_payload = {"trainset": trainset.fingerprint,
                   "params": {k: v for k, v in params.to_dict().items() if k != "max_epochs"},
                   "world": sh.num_processes,
                   "backend": sh.backend, "pre": hashlib.sha256(json.dumps(pre.to_dict()).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(key_payload, sort_keys=True).encode()).hexdigest()[:24]
    return SharedJob(
        shard_files=tuple(tuple(f) for f in trainset.shard_files), spec=fspec.to_dict(), label=spec.label,
        preprocessor=pre.to_dict(), target_mean=target_mean, target_std=target_std, prior=prior,
        params=params.to_dict(), steps_per_epoch=steps,
        checkpoint_path=str(checkpoint_dir / f"shared-{dataset}-{key}.pt"), checkpoint_key=key,
        backend="horovod" if sh.backend == "horovod" else "ddp", use_gpu=use_gpu,
        torch_threads=sh.torch_threads)


def train_shared_model(spark: SparkSession, trainset: SharedTrainset, spec: DatasetSpec, cfg: TrainingConfig,
                       checkpoint_dir: Path, dataset: str) -> SharedTrainingResult:
    job = prepare_shared_job(spark, trainset, spec, cfg, checkpoint_dir, dataset)
    figures = launch(job, backend=cfg.shared.backend, num_processes=cfg.shared.num_processes,
                     local_mode=cfg.shared.local_mode)
    blob = figures.pop("model")
    return SharedTrainingResult(blob=blob, figures=figures, job=job)
