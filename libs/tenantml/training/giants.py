"""Giant tenants: one tenant's own model trained data-parallel on every core.

A tenant holding a large share of all rows would otherwise pin one core for most of the job.
The other tiers train first (their many short tasks finish as if the giant were absent), then
each giant trains with torch DDP (or Horovod) across all cores through the same launcher as the
shared model, on the same holdout, early stopping and evaluation as every tenant model. Its shards
and checkpoint live in the staging folder (`training.staging_dir`), which executors also see.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tenantml.config import TrainingConfig
from tenantml.core.errors import ConfigError
from tenantml.training.fit import Fitter, train_one_tenant
from tenantml.training.plan import TrainingPlan

if TYPE_CHECKING:
    from tenantml.models import FeatureSpec, FitResult, TrainParams


def distributed_fitter(tenant_id: str, cfg: TrainingConfig, processes: int, workdir: Path) -> Fitter:
    """A drop-in for `fit_tabular` that trains on ``processes`` data-parallel processes."""

    def fit(train: pd.DataFrame, label: str, spec: FeatureSpec, params: TrainParams) -> FitResult:
        from tenantml.models import FitResult, Preprocessor, TabularModel
        from tenantml.models.tabular import _labels
        from tenantml.training.distributed import SharedJob, launch
        from tenantml.training.shared import resolve_use_gpu

        started = time.perf_counter()
        if len(train) < 2 * processes:
            raise ValueError(f"tenant {tenant_id!r}: {len(train)} training rows are too few for "
                             f"{processes} data-parallel processes")
        y = _labels(train, label, spec.task)
        pre = Preprocessor.fit(train, spec)
        if spec.task == "regression":
            std = float(y.std())
            target_mean, target_std, prior = float(y.mean()), (std if std > 0 else 1.0), None
        else:
            target_mean, target_std = 0.0, 1.0
            prior = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
        order = np.random.default_rng(params.seed).permutation(len(train))
        cols = ["tenant_id", label, *spec.columns]
        frame = train.assign(tenant_id=tenant_id)[cols]
        shard_files, shard_rows = [], []
        for rank, idx in enumerate(np.array_split(order, processes)):
            path = workdir / f"shard-{rank}.parquet"
            frame.iloc[np.sort(idx)].to_parquet(path, index=False)
            shard_files.append((str(path),))
            shard_rows.append(len(idx))
        largest_train = max(n - min(max(1, round(n * params.val_fraction)), n - 1) for n in shard_rows)
        steps = max(1, math.ceil(largest_train / params.batch_size))
        key = hashlib.sha256(json.dumps({
            "tenant": tenant_id, "rows": len(train),
            "data": int(pd.util.hash_pandas_object(frame, index=False).sum()),
            "params": params.to_dict(), "world": processes}, sort_keys=True, default=str).encode()).hexdigest()[:24]
        sh = cfg.shared
        job = SharedJob(
            shard_files=tuple(shard_files), spec=spec.to_dict(), label=label, preprocessor=pre.to_dict(),
            target_mean=target_mean, target_std=target_std, prior=prior, params=params.to_dict(),
            steps_per_epoch=steps, checkpoint_path=str(workdir / f"giant-{key}.pt"), checkpoint_key=key,
            backend="horovod" if sh.backend == "horovod" else "ddp", use_gpu=resolve_use_gpu(sh.use_gpu),
            torch_threads=sh.torch_threads)
        result = launch(job, backend=sh.backend, num_processes=processes, local_mode=sh.local_mode)
        model = TabularModel.from_bytes(result["model"])
        val_rows = sum(min(max(1, round(n * params.val_fraction)), n - 1) for n in shard_rows)
        return FitResult(model=model, epochs_run=int(result["epochs_run"]), best_epoch=int(result["best_epoch"]),
                         best_val_loss=float(result["best_val_loss"]), train_rows=len(train) - val_rows,
                         val_rows=val_rows, seconds=time.perf_counter() - started,
                         time_quota_hit=bool(result.get("time_quota_hit", False)))

    return fit


def train_giant(tenant_id: str, pdf: pd.DataFrame, plan: TrainingPlan, cfg: TrainingConfig,
                processes: int, staging_dir: Path | None = None) -> dict[str, object]:
    """One giant tenant on the distributed path; the same result row as a task-trained tenant.

    Its shards and checkpoint go to ``<staging_dir>/giants/<tenant>-<random>/`` (`training.staging_dir`,
    seen by every executor), removed when it ends. Without ``staging_dir`` (a caller outside a job)
    only local mode can train it: its processes then run on the driver and read a driver temp folder.
    """
    with _workdir(tenant_id, staging_dir, local_mode=cfg.shared.local_mode) as workdir:
        row = train_one_tenant(tenant_id, pdf, plan,
                               fitter=distributed_fitter(tenant_id, cfg, processes, workdir))
    # Every process was busy for the whole wall time: that is the compute the tenant used.
    row["seconds"] = float(row["seconds"]) * processes
    return row


STALE_SECONDS = 86_400  # a folder a killed run left behind


@contextlib.contextmanager
def _workdir(tenant_id: str, staging_dir: Path | None, *, local_mode: bool) -> Iterator[Path]:
    if staging_dir is None:
        if not local_mode:
            raise ConfigError(f"giant tenant {tenant_id!r}: data-parallel training on executors "
                              "(training.shared.local_mode: false) needs a staging folder every executor "
                              "sees (training.staging_dir)")
        with tempfile.TemporaryDirectory(prefix=f"tenantml-giant-{tenant_id}-") as tmp:
            yield Path(tmp)
        return
    root = staging_dir / "giants"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():  # best effort: what a killed run left (its tenant's rows) goes too
        with contextlib.suppress(OSError):
            if old.is_dir() and time.time() - old.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
    workdir = root / f"{tenant_id}-{secrets.token_hex(6)}"
    workdir.mkdir()
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
