"""Table names and locations in one place: local path-based Delta, or `catalog.schema.table`."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from tenantml.config import TablesConfig

_TABLE_RE = re.compile(r"^[a-z][a-z0-9_]{0,127}$")


@dataclass(frozen=True)
class TableRef:
    """A Delta table: by path on the embedded default, by full name in a catalog."""

    name: str
    path: str | None = None
    fqn: str | None = None
    # Liquid clustering columns, set when the table is created (`io.delta`), in place of the
    # writer's partitioning: for tables that gain a few rows per tenant per run, where a partition
    # per tenant would add one small file per tenant to every commit and every scan.
    cluster_by: tuple[str, ...] = ()

    @property
    def display(self) -> str:
        return self.fqn or self.path or self.name


class Tables:
    """Resolves logical table names; every step asks here instead of spelling a location."""

    def __init__(self, cfg: TablesConfig, warehouse: Path) -> None:
        self._cfg = cfg
        self._warehouse = Path(cfg.location) if cfg.location else warehouse

    @property
    def warehouse(self) -> Path:
        return self._warehouse

    def ref(self, name: str) -> TableRef:
        if not _TABLE_RE.fullmatch(name):
            raise ValueError(f"invalid table name {name!r}")
        if self._cfg.catalog and self._cfg.schema_:
            return TableRef(name=name, fqn=f"{self._cfg.catalog}.{self._cfg.schema_}.{name}")
        return TableRef(name=name, path=str(self._warehouse / name))

    # Platform tables, shared by every dataset.
    @property
    def tenants(self) -> TableRef:
        return self.ref("tenants")

    @property
    def run_log(self) -> TableRef:
        return self.ref("run_log")

    @property
    def model_store(self) -> TableRef:
        return self.ref("model_store")

    @property
    def cost_ledger(self) -> TableRef:
        return self.ref("cost_ledger")

    @property
    def model_lineage(self) -> TableRef:
        """Whose rows every model version learned from (`io.lineage`)."""
        return self.ref("model_lineage")

    @property
    def promotions(self) -> TableRef:
        """Every champion/challenger decision: who, against whom, metrics, why."""
        return self.ref("promotions")

    # Per-dataset tables.
    def bronze(self, dataset: str) -> TableRef:
        return self.ref(f"bronze_{dataset.lower()}")

    def inference(self, dataset: str) -> TableRef:
        """Rows to score (no label), ingested as batches like bronze. A batch of a few rows per
        tenant every night: clustered by tenant (`bench/bench_table_layout.py`)."""
        return replace(self.ref(f"inference_{dataset.lower()}"), cluster_by=("tenant_id",))

    def scoring(self, dataset: str) -> TableRef:
        """Validated rows to score, typed like silver without the label, one row per (tenant, key, batch).
        Clustered by tenant, like the rows it is validated from."""
        return replace(self.ref(f"scoring_{dataset.lower()}"), cluster_by=("tenant_id",))

    def latest_predictions(self, dataset: str) -> TableRef:
        """Each entity's latest prediction (one row per tenant and entity key), for BI. Clustered by
        tenant: rewritten for the tenants of every scoring run."""
        return replace(self.ref(f"latest_predictions_{dataset.lower()}"), cluster_by=("tenant_id",))

    def monitoring(self, dataset: str) -> TableRef:
        """Per tenant and scoring batch: feature and prediction drift, row counts, realised metrics.
        A few rows per tenant per batch: clustered by tenant, not partitioned."""
        return replace(self.ref(f"monitoring_{dataset.lower()}"), cluster_by=("tenant_id",))

    def retraining(self, dataset: str) -> TableRef:
        """Per run and tenant: whether the tenant is retrained and why. One row per tenant per run:
        clustered by tenant, not partitioned."""
        return replace(self.ref(f"retraining_{dataset.lower()}"), cluster_by=("tenant_id",))

    def silver(self, dataset: str) -> TableRef:
        return self.ref(f"silver_{dataset.lower()}")

    def quarantine(self, dataset: str) -> TableRef:
        return self.ref(f"quarantine_{dataset.lower()}")

    def quality(self, dataset: str) -> TableRef:
        return self.ref(f"quality_{dataset.lower()}")

    def predictions(self, dataset: str) -> TableRef:
        """Every scoring batch's predictions, kept as history: a batch per tenant per night, so
        clustered by tenant rather than a partition (and a file) per tenant per batch."""
        return replace(self.ref(f"predictions_{dataset.lower()}"), cluster_by=("tenant_id",))

    def shared_trainset(self, dataset: str) -> TableRef:
        """De-identified rows of consenting tenants, sharded for data-parallel training."""
        return self.ref(f"shared_train_{dataset.lower()}")

    # Gold tables for BI (a star schema written by `publish`; see docs/data-contracts.md).
    @property
    def gold_tenant_dim(self) -> TableRef:
        """One row per tenant, shared by every dataset's facts."""
        return self.ref("gold_tenant_dim")

    @property
    def gold_date_dim(self) -> TableRef:
        """Calendar days covering every scoring date, shared by every dataset's facts."""
        return self.ref("gold_date_dim")

    def gold_model_dim(self, dataset: str) -> TableRef:
        return self.ref(f"gold_{dataset.lower()}_model_dim")

    def gold_prediction_fact(self, dataset: str) -> TableRef:
        return self.ref(f"gold_{dataset.lower()}_prediction_fact")
