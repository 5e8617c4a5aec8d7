"""Small tabular torch models, cheap enough to train one per tenant in a single-threaded process."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

Task = Literal["binary", "regression"]
TASKS: tuple[Task, ...] = ("binary", "regression")
FORMAT_VERSION = 1
MAX_VOCABULARY = 1000
_PREDICT_CHUNK = 65_536


@dataclass(frozen=True)
class FeatureSpec:
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    task: Task

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML/JSON) but keep the frozen value hashable.
        object.__setattr__(self, "numeric", tuple(self.numeric))
        object.__setattr__(self, "categorical", tuple(self.categorical))
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        columns = self.numeric + self.categorical
        if not columns:
            raise ValueError("FeatureSpec needs at least one numeric or categorical column")
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates:
            raise ValueError(f"feature columns listed more than once: {duplicates}")

    @property
    def columns(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": list(self.numeric), "categorical": list(self.categorical), "task": self.task}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(numeric=tuple(d["numeric"]), categorical=tuple(d["categorical"]), task=d["task"])


@dataclass(frozen=True)
class TrainParams:
    hidden_units: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    max_embedding_dim: int = 8
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    batch_size: int = 256
    max_epochs: int = 50
    patience: int = 5  # early stopping on validation loss
    val_fraction: float = 0.15  # split off the training frame for early stopping
    seed: int = 7
    device: str = "cpu"  # "cpu", "cuda", or "auto" (cuda when available)
    max_seconds: float | None = None  # time quota: no new epoch starts once it is used up

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_units", tuple(int(h) for h in self.hidden_units))
        if any(h < 1 for h in self.hidden_units):
            raise ValueError(f"hidden_units must be positive, got {self.hidden_units}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if min(self.max_embedding_dim, self.batch_size, self.max_epochs, self.patience) < 1:
            raise ValueError("max_embedding_dim, batch_size, max_epochs and patience must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_units"] = list(self.hidden_units)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainParams:
        known = {f.name for f in fields(cls)}  # tolerate keys added by newer writers
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _missing_columns(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    present = set(df.columns)
    return [c for c in columns if c not in present]


def _numeric_values(df: pd.DataFrame, column: str) -> np.ndarray:
    """Float64 view with non-finite values as NaN, so missing and inf are imputed alike."""
    try:
        values = df[column].to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"numeric feature {column!r} has non-numeric values: {exc}") from exc
    return np.where(np.isfinite(values), values, np.nan)


def category_strings(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """String keys plus a missing mask; integral floats print as ints so that a column that
    gained a NaN (and became float) at training time still matches int values at serving time."""
    missing = series.isna().to_numpy()
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        keys = values.astype(str).astype(object)
        integral = ~missing & (np.abs(values) < 2**53) & (values == np.round(values))
        keys[integral] = values[integral].astype(np.int64).astype(str)
    else:
        keys = series.astype(str).to_numpy(dtype=object)
    return keys, missing


class Preprocessor:
    """Feature encoding fitted on training rows only, so validation/holdout rows never leak into it."""

    def __init__(
        self,
        spec: FeatureSpec,
        medians: Sequence[float],
        means: Sequence[float],
        stds: Sequence[float],
        vocabularies: Sequence[Sequence[str]],
    ) -> None:
        self.spec = spec
        self.medians = np.asarray(medians, dtype=np.float64).reshape(-1)
        self.means = np.asarray(means, dtype=np.float64).reshape(-1)
        self.stds = np.asarray(stds, dtype=np.float64).reshape(-1)
        self.vocabularies = [list(v) for v in vocabularies]
        if not len(self.medians) == len(self.means) == len(self.stds) == len(spec.numeric):
            raise ValueError("numeric statistics do not match spec.numeric")
        if len(self.vocabularies) != len(spec.categorical):
            raise ValueError("vocabularies do not match spec.categorical")
        self._indexes = [pd.Index(v, dtype=object) for v in self.vocabularies]

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) for v in self.vocabularies]

    @classmethod
    def fit(cls, df: pd.DataFrame, spec: FeatureSpec) -> Preprocessor:
        missing = _missing_columns(df, spec.columns)
        if missing:
            raise ValueError(f"feature column {missing[0]!r} is missing (all missing: {missing})")
        medians, means, stds = [], [], []
        for column in spec.numeric:
            values = _numeric_values(df, column)
            values = values[~np.isnan(values)]
            std = float(values.std()) if values.size else 1.0
            medians.append(float(np.median(values)) if values.size else 0.0)
            means.append(float(values.mean()) if values.size else 0.0)
            stds.append(std if std > 0 and math.isfinite(std) else 1.0)
        vocabularies = []
        for column in spec.categorical:
            keys, is_missing = category_strings(df[column])
            counts = pd.Series(keys[~is_missing], dtype=object).value_counts()
            # Sort by value first so frequency ties are cut deterministically.
            counts = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
            vocabularies.append([str(k) for k in counts.index[:MAX_VOCABULARY]])
        return cls(spec, medians, means, stds, vocabularies)

    def transform(self, df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        missing = _missing_columns(df, self.spec.columns)
        if missing:
            raise ValueError(f"feature column {missing[0]!r} is missing (all missing: {missing})")
        n = len(df)
        numeric = np.empty((n, len(self.spec.numeric)), dtype=np.float64)
        for j, column in enumerate(self.spec.numeric):
            numeric[:, j] = _numeric_values(df, column)
        numeric = np.where(np.isnan(numeric), self.medians, numeric)
        numeric = (numeric - self.means) / self.stds
        categorical = np.zeros((n, len(self.spec.categorical)), dtype=np.int64)
        for j, column in enumerate(self.spec.categorical):
            keys, is_missing = category_strings(df[column])
            codes = self._indexes[j].get_indexer(keys) + 1  # unknown (-1) -> 0
            codes[is_missing] = 0
            categorical[:, j] = codes
        return torch.from_numpy(numeric.astype(np.float32)), torch.from_numpy(categorical)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "medians": self.medians.tolist(),
            "means": self.means.tolist(),
            "stds": self.stds.tolist(),
            "vocabularies": [list(v) for v in self.vocabularies],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        return cls(FeatureSpec.from_dict(d["spec"]), d["medians"], d["means"], d["stds"], d["vocabularies"])


def embedding_dim(cardinality: int, max_embedding_dim: int) -> int:
    return min(max_embedding_dim, (cardinality + 1) // 2 + 1)


class TabularNet(nn.Module):
    """Embeddings + MLP with a single output: logit (binary) or standardized value (regression)."""

    def __init__(
        self,
        n_numeric: int,
        cardinalities: Sequence[int],
        hidden_units: Sequence[int],
        dropout: float,
        max_embedding_dim: int,
    ) -> None:
        super().__init__()
        self.arch: dict[str, Any] = {
            "n_numeric": int(n_numeric),
            "cardinalities": [int(c) for c in cardinalities],
            "hidden_units": [int(h) for h in hidden_units],
            "dropout": float(dropout),
            "max_embedding_dim": int(max_embedding_dim),
        }
        # Row 0 of every table is the unknown/missing bucket.
        tables = [nn.Embedding(c + 1, embedding_dim(c, max_embedding_dim)) for c in cardinalities]
        for table in tables:
            nn.init.normal_(table.weight, std=0.1)  # N(0, 1) default would swamp the numeric inputs
        self.embeddings = nn.ModuleList(tables)
        width = n_numeric + sum(t.embedding_dim for t in tables)
        layers: list[nn.Module] = []
        for units in hidden_units:
            layers += [nn.Linear(width, units), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = units
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> TabularNet:
        return cls(
            arch["n_numeric"],
            arch["cardinalities"],
            arch["hidden_units"],
            arch["dropout"],
            arch["max_embedding_dim"],
        )

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        parts = [x_num] + [emb(x_cat[:, j]) for j, emb in enumerate(self.embeddings)]
        x = torch.cat(parts, dim=1) if len(parts) > 1 else x_num
        return self.head(self.mlp(x)).squeeze(-1)


class TabularModel:
    """Everything needed to score a frame, so the trained, saved and served unit is one object."""

    def __init__(
        self,
        spec: FeatureSpec,
        params: TrainParams,
        preprocessor: Preprocessor,
        net: TabularNet,
        target_mean: float = 0.0,
        target_std: float = 1.0,
        device: str = "cpu",
    ) -> None:
        self.spec = spec
        self.params = params
        self.preprocessor = preprocessor
        self.net = net
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)
        self.device = resolve_device(device)
        self.net.to(self.device).eval()

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def to(self, device: str) -> TabularModel:
        self.device = resolve_device(device)
        self.net.to(self.device)
        return self

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        x_num, x_cat = self.preprocessor.transform(df)
        self.net.eval()
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(df), _PREDICT_CHUNK):
                stop = start + _PREDICT_CHUNK
                out = self.net(x_num[start:stop].to(self.device), x_cat[start:stop].to(self.device))
                outputs.append(out.double().cpu().numpy())
        raw = np.concatenate(outputs) if outputs else np.empty(0, dtype=np.float64)
        if self.spec.task == "binary":
            return 1.0 / (1.0 + np.exp(-raw))
        return raw * self.target_std + self.target_mean

    def to_bytes(self) -> bytes:
        payload = {
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "params": self.params.to_dict(),
            "preprocessor": self.preprocessor.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "target": {"mean": self.target_mean, "std": self.target_std},
            "arch": dict(self.net.arch),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, device: str = "cpu") -> TabularModel:
        payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        version = payload.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported model format_version {version!r} (expected {FORMAT_VERSION})")
        net = TabularNet.from_arch(payload["arch"])
        net.load_state_dict(payload["state_dict"])
        return cls(
            spec=FeatureSpec.from_dict(payload["spec"]),
            params=TrainParams.from_dict(payload["params"]),
            preprocessor=Preprocessor.from_dict(payload["preprocessor"]),
            net=net,
            target_mean=payload["target"]["mean"],
            target_std=payload["target"]["std"],
            device=device,
        )


@dataclass
class FitResult:
    model: TabularModel
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    train_rows: int
    val_rows: int
    seconds: float
    time_quota_hit: bool = False


def _labels(train: pd.DataFrame, label: str, task: Task) -> np.ndarray:
    if label not in train.columns:
        raise ValueError(f"label column {label!r} is missing")
    try:
        y = train[label].to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"label column {label!r} is not numeric: {exc}") from exc
    n_nan = int(np.isnan(y).sum())
    if n_nan:
        raise ValueError(f"label column {label!r} has {n_nan} NaN value(s)")
    if not np.isfinite(y).all():
        raise ValueError(f"label column {label!r} has infinite values")
    if task == "binary" and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"binary label column {label!r} must contain only 0/1 values")
    return y


def _validation_split(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if n < 2 or val_fraction <= 0:
        return np.arange(n), np.arange(0)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _checked_labels(train: pd.DataFrame, label: str, spec: FeatureSpec) -> np.ndarray:
    """The training frame's labels, after the checks every fit makes first (one message per mistake)."""
    if len(train) == 0:
        raise ValueError("training frame is empty")
    if label in spec.columns:
        raise ValueError(f"label column {label!r} is also listed as a feature")
    missing = _missing_columns(train, spec.columns)
    if missing:
        raise ValueError(f"feature column {missing[0]!r} is missing (all missing: {missing})")
    return _labels(train, label, spec.task)


def fit_tabular(train: pd.DataFrame, label: str, spec: FeatureSpec, params: TrainParams) -> FitResult:
    """Train one model with early stopping and return it with the best epoch's weights.

    With val_fraction == 0 or a single row, early stopping monitors the training loss instead.
    A non-finite validation loss stops training (a diverged model is never kept); if that happens
    in epoch 1 the prior-only initial weights are returned with best_epoch == 0.
    """
    start_time = time.perf_counter()
    y = _checked_labels(train, label, spec)

    device = resolve_device(params.device)
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    tr_pos, va_pos = _validation_split(len(train), params.val_fraction, rng)
    # Fit on the training part only: categories seen only in validation would otherwise get
    # embeddings that are never trained, which is worse than the shared unknown bucket.
    preprocessor = Preprocessor.fit(train.iloc[tr_pos], spec)
    x_num_all, x_cat_all = preprocessor.transform(train)

    target_mean, target_std = 0.0, 1.0
    if spec.task == "regression":
        target_mean = float(y[tr_pos].mean())
        std = float(y[tr_pos].std())
        target_std = std if std > 0 else 1.0
    y_all = torch.from_numpy(((y - target_mean) / target_std).astype(np.float32))

    tr_idx = torch.from_numpy(tr_pos)
    va_idx = torch.from_numpy(va_pos) if len(va_pos) else tr_idx
    xn_tr, xc_tr, y_tr = (t[tr_idx].to(device) for t in (x_num_all, x_cat_all, y_all))
    xn_va, xc_va, y_va = (t[va_idx].to(device) for t in (x_num_all, x_cat_all, y_all))

    net = TabularNet(
        len(spec.numeric),
        preprocessor.cardinalities,
        params.hidden_units,
        params.dropout,
        params.max_embedding_dim,
    ).to(device)
    with torch.no_grad():
        # Start from the prior so early epochs learn signal, not the base rate / mean.
        if spec.task == "binary":
            prior = float(np.clip(y[tr_pos].mean(), 1e-4, 1 - 1e-4))
            net.head.bias.fill_(math.log(prior / (1 - prior)))
        else:
            net.head.bias.zero_()
    loss_fn: nn.Module = nn.BCEWithLogitsLoss() if spec.task == "binary" else nn.MSELoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    loop = _train_loop(net, optimizer, loss_fn, (xn_tr, xc_tr, y_tr), (xn_va, xc_va, y_va),
                       max_epochs=params.max_epochs, patience=params.patience, batch_size=params.batch_size,
                       seed=params.seed, device=device, initial_best=math.inf, max_seconds=params.max_seconds)
    best_loss, best_epoch, epochs_run, best_state = loop
    net.load_state_dict(best_state)
    model = TabularModel(spec, params, preprocessor, net, target_mean, target_std, device)
    return FitResult(
        model=model,
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        best_val_loss=best_loss,
        train_rows=len(tr_pos),
        val_rows=len(va_pos),
        seconds=time.perf_counter() - start_time,
        time_quota_hit=params.max_seconds is not None and epochs_run < params.max_epochs
        and time.perf_counter() - start_time >= params.max_seconds,
    )


def _train_loop(net: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                val: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, max_epochs: int, patience: int,
                batch_size: int, seed: int, device: str, initial_best: float,
                max_seconds: float | None = None) -> tuple[float, int, int, dict[str, torch.Tensor]]:
    """Mini-batch epochs with early stopping on validation loss; returns the best epoch's state.

    ``initial_best`` is the loss the starting weights must beat (inf for a fresh model, the
    base model's loss when fine-tuning, so a tuned model is never worse than its base on val).
    A non-finite validation loss stops training: a diverged model is never kept.
    """
    xn_tr, xc_tr, y_tr = train
    xn_va, xc_va, y_va = val
    started = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(seed)
    n_tr = len(y_tr)
    best_loss, best_epoch, epochs_run = initial_best, 0, 0
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for epoch in range(1, max_epochs + 1):
        if max_seconds is not None and epoch > 1 and time.perf_counter() - started >= max_seconds:
            break  # time quota: keep the best epoch so far
        epochs_run = epoch
        net.train()
        if n_tr <= batch_size:  # full batch: shuffling would not change the gradient
            batches: Iterable[tuple[torch.Tensor, ...]] = [(xn_tr, xc_tr, y_tr)]
        else:
            perm = torch.randperm(n_tr, generator=generator, device=device)
            batches = ((xn_tr[i], xc_tr[i], y_tr[i]) for i in torch.split(perm, batch_size))
        for xn, xc, yb in batches:
            loss = loss_fn(net(xn, xc), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(net(xn_va, xc_va), y_va))
        if not math.isfinite(val_loss):
            break
        if val_loss < best_loss - 1e-7:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    return best_loss, best_epoch, epochs_run, best_state


def frozen_parameters(net: nn.Module, freeze: Sequence[str]) -> list[str]:
    """Names of the parameters matched by the ``freeze`` prefixes (e.g. "embeddings", "mlp.0").

    An unknown prefix is an error: a typo would otherwise silently fine-tune everything.
    """
    names = [n for n, _ in net.named_parameters()]
    unknown = [p for p in freeze if not any(n == p or n.startswith(p + ".") for n in names)]
    if unknown:
        raise ValueError(f"freeze prefix(es) {unknown} match no parameter; parameters are {names}")
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in freeze)]


def fine_tune(base: TabularModel, train: pd.DataFrame, label: str, *, freeze: Sequence[str],
              learning_rate: float, max_epochs: int, patience: int, batch_size: int, val_fraction: float,
              seed: int, weight_decay: float = 0.0, max_seconds: float | None = None) -> FitResult:
    """Continue training a copy of ``base`` on one tenant's rows.

    The base preprocessor (vocabularies, scaling, target scale) is kept, so the tuned model reads
    features exactly like its base; frozen layers keep the knowledge shared across tenants.
    """
    import copy

    start_time = time.perf_counter()
    if len(train) == 0:
        raise ValueError("fine-tuning frame is empty")
    spec = base.spec
    y = _labels(train, label, spec.task)
    device = base.device
    torch.manual_seed(seed)
    tr_pos, va_pos = _validation_split(len(train), val_fraction, np.random.default_rng(seed))
    x_num_all, x_cat_all = base.preprocessor.transform(train)
    y_all = torch.from_numpy(((y - base.target_mean) / base.target_std).astype(np.float32))
    tr_idx = torch.from_numpy(tr_pos)
    va_idx = torch.from_numpy(va_pos) if len(va_pos) else tr_idx
    tr = tuple(t[tr_idx].to(device) for t in (x_num_all, x_cat_all, y_all))
    va = tuple(t[va_idx].to(device) for t in (x_num_all, x_cat_all, y_all))

    net = copy.deepcopy(base.net).to(device)
    frozen = set(frozen_parameters(net, freeze))
    trainable = [p for n, p in net.named_parameters() if n not in frozen]
    for n, p in net.named_parameters():
        p.requires_grad_(n not in frozen)
    if not trainable:
        raise ValueError(f"freeze={list(freeze)} freezes every parameter: nothing left to fine-tune")
    loss_fn: nn.Module = nn.BCEWithLogitsLoss() if spec.task == "binary" else nn.MSELoss()
    net.eval()
    with torch.no_grad():
        base_loss = float(loss_fn(net(va[0], va[1]), va[2]))
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    best_loss, best_epoch, epochs_run, best_state = _train_loop(
        net, optimizer, loss_fn, tr, va, max_epochs=max_epochs, patience=patience,  # type: ignore[arg-type]
        batch_size=batch_size, seed=seed, device=device,
        initial_best=base_loss if math.isfinite(base_loss) else math.inf, max_seconds=max_seconds)
    net.load_state_dict(best_state)
    for p in net.parameters():
        p.requires_grad_(True)
    model = TabularModel(spec, base.params, base.preprocessor, net, base.target_mean, base.target_std, device)
    elapsed = time.perf_counter() - start_time
    return FitResult(model=model, epochs_run=epochs_run, best_epoch=best_epoch, best_val_loss=best_loss,
                     train_rows=len(tr_pos), val_rows=len(va_pos), seconds=elapsed,
                     time_quota_hit=max_seconds is not None and epochs_run < max_epochs and elapsed >= max_seconds)
