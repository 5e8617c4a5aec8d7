"""Data-parallel training of the shared model: one worker function, two launchers.

`run_shared_worker` is what every process runs, under TorchDistributor (torch DDP; gloo on CPU,
NCCL on GPU) or Horovod (gloo). Each process reads only the Parquet files of its own shard of a
pinned Delta version, exported to the staging folder every executor sees (`training.staging_dir`),
takes the same number of steps per epoch (so collectives line up), agrees on early stopping
through an all-reduced validation loss, and rank 0 checkpoints after every epoch so that an
interrupted run resumes where it stopped instead of starting over.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenantml.core.errors import ConfigError

BACKENDS = ("torch_distributor", "horovod")
HOROVOD_INSTALL_HINT = ("Horovod is not installed in this environment; install it with `make horovod` "
                        "(builds horovod 0.28.1 for torch 2.x, CPU/gloo) or choose "
                        "training.shared.backend: torch_distributor")


@dataclass(frozen=True)
class SharedJob:
    """Everything a training process needs; pickled once to every process."""

    shard_files: tuple[tuple[str, ...], ...]
    spec: dict[str, Any]
    label: str
    preprocessor: dict[str, Any]
    target_mean: float
    target_std: float
    prior: float | None
    params: dict[str, Any]
    steps_per_epoch: int
    checkpoint_path: str
    checkpoint_key: str
    backend: str
    use_gpu: bool
    torch_threads: int = 1
    # Local mode: rank 0 writes its result here. TorchDistributor's local launcher has every
    # rank pickle its return value to one shared file, so the last rank to finish would win.
    result_path: str | None = None


def horovod_available() -> bool:
    return importlib.util.find_spec("horovod") is not None


HOROVOD_CONNECT_REFUSAL = (
    "training.shared.backend is 'horovod', which runs on the classic SparkContext; this is a Spark "
    "Connect session (spark.remote / SPARK_REMOTE: Databricks serverless, standard access mode, "
    "Databricks Connect), which has none: choose training.shared.backend: torch_distributor")


def spark_connect_mode() -> bool:
    """Whether this process runs Spark Connect (the mode PySpark switches to when a Connect session
    is built; then no SparkContext belongs to the caller's session)."""
    try:
        from pyspark.sql.utils import is_remote
    except ImportError:
        return False
    return bool(is_remote())


def require_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"training.shared.backend: unknown backend {backend!r} (choose one of {BACKENDS})")
    if backend == "horovod" and spark_connect_mode():
        raise ConfigError(HOROVOD_CONNECT_REFUSAL)
    if backend == "horovod":
        try:
            import horovod.torch  # noqa: F401
        except Exception as exc:  # ImportError, or a build that does not match this torch
            raise ConfigError(f"training.shared.backend is 'horovod': {HOROVOD_INSTALL_HINT} "
                              f"({type(exc).__name__}: {exc})") from exc


class _TorchComm:
    """torch.distributed under torchrun (TorchDistributor sets RANK/WORLD_SIZE/MASTER_*)."""

    def __init__(self, use_gpu: bool) -> None:
        import torch
        import torch.distributed as dist

        self.rank = int(os.environ.get("RANK", "0"))
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = f"cuda:{local_rank}" if use_gpu else "cpu"
        if use_gpu:
            torch.cuda.set_device(local_rank)
        self._dist = dist
        self.distributed = self.size > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if use_gpu else "gloo")
        self.backend_name = ("nccl" if use_gpu else "gloo") if self.distributed else "none"

    def wrap_model(self, net: Any) -> Any:
        if not self.distributed:
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [int(self.device.split(":")[1])] if self.device.startswith("cuda") else None
        return DistributedDataParallel(net, device_ids=ids)  # broadcasts rank 0's weights

    def wrap_optimizer(self, optimizer: Any, net: Any) -> Any:
        return optimizer  # DDP all-reduces gradients in backward

    def allreduce_sum(self, values: list[float]) -> list[float]:
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu().tolist()]

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        self._dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed and self._dist.is_initialized():
            self._dist.destroy_process_group()


class _HorovodComm:
    def __init__(self, use_gpu: bool) -> None:
        import horovod.torch as hvd
        import torch

        hvd.init()
        self._hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.device = f"cuda:{hvd.local_rank()}" if use_gpu else "cpu"
        if use_gpu:
            torch.cuda.set_device(hvd.local_rank())
        self.distributed = self.size > 1
        self.backend_name = "horovod-gloo" if not use_gpu else "horovod"

    def wrap_model(self, net: Any) -> Any:
        self._hvd.broadcast_parameters(net.state_dict(), root_rank=0)
        return net

    def wrap_optimizer(self, optimizer: Any, net: Any) -> Any:
        opt = self._hvd.DistributedOptimizer(optimizer, named_parameters=net.named_parameters())
        self._hvd.broadcast_optimizer_state(opt, root_rank=0)
        return opt

    def allreduce_sum(self, values: list[float]) -> list[float]:
        import torch

        t = self._hvd.allreduce(torch.tensor(values, dtype=torch.float64), op=self._hvd.Sum)
        return [float(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        return list(self._hvd.allgather_object(obj))

    def close(self) -> None:
        self._hvd.shutdown()


def _read_shard(files: tuple[str, ...]) -> Any:
    """This process's shard: local paths (the staging folder's export), or URIs pyarrow can open."""
    import pyarrow.parquet as pq
    from pyarrow import fs

    if not files:
        raise RuntimeError("this process's shard of the shared training set is empty")
    tables = []
    for name in files:
        if name.startswith("/"):
            tables.append(pq.read_table(name))
            continue
        filesystem, path = fs.FileSystem.from_uri(name if "://" in name else name.replace("file:", "file://", 1))
        tables.append(pq.read_table(path, filesystem=filesystem))
    import pyarrow as pa

    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous epoch's checkpoint


def _load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    import torch

    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state if state.get("key") == key else None


def run_shared_worker(job: SharedJob) -> dict[str, Any] | None:
    """One data-parallel process; rank 0 returns the model and the run's figures, others None."""
    import numpy as np
    import torch
    from torch import nn

    from tenantml.models import FeatureSpec, Preprocessor, TabularNet, TrainParams

    torch.set_num_threads(job.torch_threads)
    comm: Any = _HorovodComm(job.use_gpu) if job.backend == "horovod" else _TorchComm(job.use_gpu)
    try:
        rank, size, device = comm.rank, comm.size, comm.device
        if len(job.shard_files) != size:
            raise RuntimeError(f"{len(job.shard_files)} shards for {size} processes")
        pdf = _read_shard(job.shard_files[rank])
        manifest = {str(k): int(v) for k, v in pdf["tenant_id"].value_counts().items()}
        spec = FeatureSpec.from_dict(job.spec)
        params = TrainParams.from_dict(job.params)
        pre = Preprocessor.from_dict(job.preprocessor)
        x_num, x_cat = pre.transform(pdf)
        y_raw = pdf[job.label].to_numpy(dtype=np.float64)
        y = torch.from_numpy(((y_raw - job.target_mean) / job.target_std).astype(np.float32))
        rng = np.random.default_rng(params.seed + 1000 * rank)
        n = len(pdf)
        n_val = min(max(1, round(n * params.val_fraction)), n - 1) if n > 1 else 0
        perm = rng.permutation(n)
        va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        xn_tr, xc_tr, y_tr = (t[torch.from_numpy(tr)].to(device) for t in (x_num, x_cat, y))
        xn_va, xc_va, y_va = (t[torch.from_numpy(va)].to(device) for t in (x_num, x_cat, y))

        torch.manual_seed(params.seed)
        net = TabularNet(len(spec.numeric), pre.cardinalities, params.hidden_units, params.dropout,
                         params.max_embedding_dim).to(device)
        with torch.no_grad():
            if job.prior is not None:
                net.head.bias.fill_(math.log(job.prior / (1 - job.prior)))
        optimizer = torch.optim.AdamW(net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
        ckpt_path = Path(job.checkpoint_path)
        state = _load_checkpoint(ckpt_path, job.checkpoint_key)
        start_epoch, best_loss, best_epoch, samples_before = 1, math.inf, 0, 0
        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if state is not None:
            net.load_state_dict(state["model"])
            best_state = state["best_state"]
            start_epoch, best_loss, best_epoch = state["epoch"] + 1, state["best_loss"], state["best_epoch"]
            samples_before = int(state.get("samples", 0))
        stopped = bool(state and state.get("stopped"))
        model = comm.wrap_model(net)
        optimizer = comm.wrap_optimizer(optimizer, net)
        if state is not None and state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        loss_fn: nn.Module = nn.BCEWithLogitsLoss() if spec.task == "binary" else nn.MSELoss()
        batch, steps = params.batch_size, job.steps_per_epoch
        samples, train_seconds, epochs_run = 0, 0.0, state["epoch"] if state else 0
        epoch, loop_start, quota_hit = start_epoch, time.perf_counter(), False
        while not stopped and epoch <= params.max_epochs:
            t0 = time.perf_counter()
            model.train()
            order = np.random.default_rng([params.seed, epoch, rank]).permutation(len(tr))
            idx = torch.from_numpy(np.resize(order, steps * batch)) if len(tr) else None
            if idx is None:
                raise RuntimeError(f"rank {rank}: no training rows left after the validation split")
            for s in range(steps):
                b = idx[s * batch:(s + 1) * batch].to(device)
                loss = loss_fn(model(xn_tr[b], xc_tr[b]), y_tr[b])
                optimizer.zero_grad()  # Horovod's wrapper takes no arguments
                loss.backward()
                optimizer.step()
            samples += steps * batch
            model.eval()
            with torch.no_grad():
                local = float(loss_fn(net(xn_va, xc_va), y_va)) * len(va) if len(va) else 0.0
            # A time quota (a giant tenant's `max_seconds`) stops every rank after the same epoch:
            # one rank stopping alone would leave the others waiting in their next all-reduce.
            over = params.max_seconds is not None and time.perf_counter() - loop_start >= params.max_seconds
            total_loss, total_n, ranks_over = comm.allreduce_sum([local, float(len(va)), float(over)])
            val_loss = total_loss / total_n if total_n else math.inf
            train_seconds += time.perf_counter() - t0
            epochs_run = epoch
            if not math.isfinite(val_loss):
                stopped = True
            elif val_loss < best_loss - 1e-7:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            elif epoch - best_epoch >= params.patience:
                stopped = True
            if not stopped and ranks_over > 0 and epoch < params.max_epochs:
                stopped = quota_hit = True
            if rank == 0:
                _save_checkpoint(ckpt_path, {
                    "key": job.checkpoint_key, "epoch": epoch, "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(), "best_state": best_state, "best_loss": best_loss,
                    "best_epoch": best_epoch, "stopped": stopped,
                    "samples": samples_before + samples * size})
                print(f"[shared rank0] epoch {epoch}/{params.max_epochs} val_loss={val_loss:.5f} "
                      f"best={best_loss:.5f}@{best_epoch}", file=sys.stderr, flush=True)
            epoch += 1
        manifests = comm.gather({"rank": rank, "rows": n, "tenants": manifest, "samples": samples,
                                 "train_seconds": train_seconds})
        if rank != 0:
            return None
        net.load_state_dict(best_state)
        result = _rank0_result(job, net, spec, params, pre, state, start_epoch, epochs_run, best_epoch,
                               best_loss, size, comm.backend_name, device, manifests)
        result["time_quota_hit"] = quota_hit
        if job.result_path:
            _save_result(Path(job.result_path), result)
            return None
        return result
    finally:
        comm.close()


def _save_result(path: Path, result: dict[str, Any]) -> None:
    import pickle

    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, path)


def _rank0_result(job: SharedJob, net: Any, spec: Any, params: Any, pre: Any, state: dict[str, Any] | None,
                  start_epoch: int, epochs_run: int, best_epoch: int, best_loss: float, size: int,
                  comm_name: str, device: str, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    from tenantml.models import TabularModel

    final = TabularModel(spec, params, pre, net.cpu(), job.target_mean, job.target_std, "cpu")
    slowest = max(m["train_seconds"] for m in manifests)
    total_samples = sum(m["samples"] for m in manifests)
    return {
        "model": final.to_bytes(), "epochs_run": epochs_run, "best_epoch": best_epoch,
        "best_val_loss": best_loss, "start_epoch": start_epoch, "resumed": state is not None,
        "world_size": size, "comm": comm_name, "device": device,
        "samples": total_samples, "train_seconds": slowest,
        "samples_per_second": total_samples / slowest if slowest > 0 else 0.0,
        "read_manifest": manifests,
    }


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Launchers print their children's output on stdout; keep stdout for the CLI's --json."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def launch(job: SharedJob, *, backend: str, num_processes: int, local_mode: bool) -> dict[str, Any]:
    """Run ``run_shared_worker`` on ``num_processes`` processes; returns rank 0's result.

    Off local mode the processes run in barrier tasks on executors and rank 0's task returns the
    result through Spark. In local mode they run on the driver and rank 0 leaves its result beside
    the checkpoint (a folder the driver sees, never a driver temp folder), removed once read.
    """
    import dataclasses
    import pickle
    import secrets

    require_backend(backend)
    path: Path | None = None
    if local_mode:
        ckpt = Path(job.checkpoint_path)
        path = ckpt.parent / f".{ckpt.stem}.result-{secrets.token_hex(4)}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        job = dataclasses.replace(job, result_path=str(path))
    try:
        result = _launch(job, backend=backend, num_processes=num_processes, local_mode=local_mode)
        if path is not None:
            if not path.exists():
                raise RuntimeError(f"shared training with {backend} finished without a result from rank 0")
            result = pickle.loads(path.read_bytes())
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
            path.with_suffix(".tmp").unlink(missing_ok=True)
    if not isinstance(result, dict):
        raise RuntimeError(f"shared training with {backend} returned no result from rank 0")
    return result


def _launch(job: SharedJob, *, backend: str, num_processes: int, local_mode: bool) -> Any:
    with _stdout_to_stderr():
        if backend == "torch_distributor":
            from pyspark.ml.torch.distributor import TorchDistributor

            result = TorchDistributor(num_processes=num_processes, local_mode=local_mode,
                                      use_gpu=job.use_gpu).run(run_shared_worker, job)
        else:
            import horovod.spark

            # Loopback in local mode: Horovod otherwise picks an interface at random between runs.
            nics = {"lo"} if local_mode else None
            results = horovod.spark.run(run_shared_worker, args=(job,), num_proc=num_processes,
                                        use_gloo=True, verbose=0, nics=nics, start_timeout=180)
            result = next((r for r in results if r is not None), None)
    return result
