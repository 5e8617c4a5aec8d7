"""Giant tenants: one tenant's own model trained data-parallel on every core.

A tenant holding a large share of all rows would otherwise pin one core for most of the job.
The other tiers train first (their many short tasks finish as if the giant were absent), then
each giant trains with torch DDP (or Horovod) across all cores through the same launcher as the
shared model, on the same holdout, early stopping and evaluation as every tenant model.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tenantml.config import TrainingConfig
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
                processes: int) -> dict[str, object]:
    """One giant tenant on the distributed path; the same result row as a task-trained tenant."""
    with tempfile.TemporaryDirectory(prefix=f"tenantml-giant-{tenant_id}-") as tmp:
        row = train_one_tenant(tenant_id, pdf, plan,
                               fitter=distributed_fitter(tenant_id, cfg, processes, Path(tmp)))
    # Every process was busy for the whole wall time: that is the compute the tenant used.
    row["seconds"] = float(row["seconds"]) * processes
    return row
