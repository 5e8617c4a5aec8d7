"""The step contract: what a step declares, what it is handed, and what it returns.

A step is one file under `tenantml/steps/` whose `run(scope)` function carries a `@step(...)`
declaration: its name, the steps it runs after, the tables it reads and writes, how the runner
finds the tenants it may act for, whether its compute is measured per tenant, and its extra
options. The runner (`steps/runner.py`), not the step, resolves eligibility, opens the tenant
scope, times the step, writes `run_log` and the cost ledger, and handles `--resume` and `--from`.
A step declared `skip_unchanged` is skipped (one run-log row naming the run whose result stands)
when none of the Delta tables it reads or writes, nor the config, tenants or options, changed since
its last run without a failure: a quiet night then costs a version lookup per table, not a step.
The CLI, `jobs/`, the run report, the cost ledger and the bundle's task list all read this one
registry (or are checked against it in a test), so a new step is one new file plus its module name
in `STEP_MODULES`.
"""

from __future__ import annotations

import graphlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from tenantml.core.errors import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, ConfigError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from tenantml.config import DatasetSpec
    from tenantml.core.ids import TenantId
    from tenantml.core.policy import TenantPolicy
    from tenantml.io.context import JobContext
    from tenantml.io.scope import TenantScope
    from tenantml.io.tables import TableRef

TenantStatus = Literal["ok", "skipped", "blocked", "failed"]
ExcludedStatus = Literal["skipped", "blocked"]
# How the runner finds the tenants a step may act for:
#   silver     tenants with validated rows (pinned silver version), minus blocked, paused, over budget
#   inference  tenants with validated rows to score, minus blocked for scoring, paused, over budget
#   own        the step resolves them from its own input (ingest: the source; validate: bronze)
Eligibility = Literal["silver", "inference", "own"]

# The step modules, in no particular order (the order comes from each step's `after`).
STEP_MODULES = ("ingest", "ingest_scoring", "validate", "validate_scoring", "monitor", "train_shared", "train",
                "train_tuned", "promote", "score", "publish")


@dataclass
class TenantOutcome:
    tenant_id: str | None
    status: TenantStatus
    rows_in: int = 0
    rows_out: int = 0
    rows_quarantined: int = 0
    seconds: float = 0.0
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    step: str
    dataset: str
    run_id: str
    tenants: list[TenantOutcome] = field(default_factory=list)
    tables_written: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> Literal["ok", "partial", "failed"]:
        failed = sum(t.status == "failed" for t in self.tenants)
        if failed == 0:
            return "ok"
        return "partial" if failed < len(self.tenants) else "failed"

    @property
    def exit_code(self) -> int:
        return {"ok": EXIT_OK, "partial": EXIT_PARTIAL, "failed": EXIT_FAILURE}[self.status]

    def count(self, status: TenantStatus) -> int:
        return sum(t.status == status for t in self.tenants)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "dataset": self.dataset,
            "run_id": self.run_id,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "tenants_processed": len(self.tenants),
            "tenants_ok": self.count("ok"),
            "tenants_skipped": self.count("skipped"),
            "tenants_blocked": self.count("blocked"),
            "tenants_failed": self.count("failed"),
            "rows_in": sum(t.rows_in for t in self.tenants),
            "rows_out": sum(t.rows_out for t in self.tenants),
            "rows_quarantined": sum(t.rows_quarantined for t in self.tenants),
            "tables_written": self.tables_written,
            "mlflow_run_id": self.mlflow_run_id,
            **self.summary,
            "failures": {str(t.tenant_id): t.error for t in self.tenants if t.status == "failed"},
        }


@dataclass
class StepOutput:
    """What a step's `run` returns; the runner adds the excluded tenants, the timing and the run id."""

    outcomes: list[TenantOutcome] = field(default_factory=list)
    tables_written: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """An extra option of a step, as a CLI flag and a keyword in `StepScope.options`."""

    flag: str                   # "--source"
    dest: str                   # "source_path"
    help: str
    type: Callable[[str], Any] = str
    switch: bool = False        # a flag without a value (True when given)
    forces_run: bool = False    # given, the step runs even when its inputs are unchanged (`--rescore`)


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    after: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    eligibility: Eligibility
    run: Callable[[StepScope], StepOutput]
    measured: bool = False      # compute seconds measured inside the tasks, per tenant
    resumable: bool = True      # `--resume --run-id R` reruns the tenants that failed it in R
    options: tuple[Option, ...] = ()
    in_pipeline: bool = True    # part of `tenantml pipeline` (False: run on its own, e.g. ad hoc)
    gated: bool = False         # acts only for the tenants the run's retraining decisions name
    skip_unchanged: bool = False  # skipped when no table it reads or writes changed since it last ran

    @property
    def command(self) -> str:
        """The CLI subcommand (`train_tuned` -> `train-tuned`)."""
        return self.name.replace("_", "-")


_REGISTRY: dict[str, Step] = {}


def step(*, name: str, help: str, after: Sequence[str] = (), reads: Sequence[str] = (),
         writes: Sequence[str] = (), eligibility: Eligibility = "silver", measured: bool = False,
         resumable: bool = True, options: Sequence[Option] = (),
         in_pipeline: bool = True, gated: bool = False,
         skip_unchanged: bool = False) -> Callable[[Callable[[StepScope], StepOutput]], Callable[[StepScope], StepOutput]]:
    """Declare and register a step; the decorated function is its `run(scope)`."""

    def register(fn: Callable[[StepScope], StepOutput]) -> Callable[[StepScope], StepOutput]:
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise ValueError(f"step {name!r} is registered twice")
        _REGISTRY[name] = Step(name=name, help=help, after=tuple(after), reads=tuple(reads), writes=tuple(writes),
                               eligibility=eligibility, run=fn, measured=measured, resumable=resumable,
                               options=tuple(options), in_pipeline=in_pipeline, gated=gated,
                               skip_unchanged=skip_unchanged)
        return fn

    return register


def registry() -> Mapping[str, Step]:
    """Every step, by name (importing the step modules registers them)."""
    for module in STEP_MODULES:
        importlib.import_module(f"tenantml.steps.{module}")
    unknown = {d for s in _REGISTRY.values() for d in s.after} - set(_REGISTRY)
    if unknown:
        raise ValueError(f"steps run after unknown step(s) {sorted(unknown)}")
    return dict(_REGISTRY)


def pipeline_order(steps: Mapping[str, Step] | None = None) -> tuple[str, ...]:
    """The pipeline's steps in dependency order; among the steps ready, the first in `STEP_MODULES`
    runs next, so the order is the same in every process."""
    reg = registry() if steps is None else steps
    rank = {name: i for i, name in enumerate(STEP_MODULES)}
    members = {n: s for n, s in reg.items() if s.in_pipeline}
    sorter = graphlib.TopologicalSorter({n: [d for d in s.after if d in members] for n, s in members.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        raise ValueError(f"the steps' `after` declarations form a cycle: {exc.args[1]}") from None
    order: list[str] = []
    ready: set[str] = set()
    while sorter.is_active():
        ready.update(sorter.get_ready())
        name = min(ready, key=lambda n: (rank.get(n, len(rank)), n))  # the first ready step declared
        ready.remove(name)
        order.append(name)
        sorter.done(name)
    return tuple(order)


def get_step(name: str) -> Step:
    reg = registry()
    if name not in reg:
        raise ConfigError(f"unknown step {name!r} (steps: {', '.join(pipeline_order(reg))})")
    return reg[name]


@dataclass
class Excluded:
    """Tenants the runner left out of a step, with why (they get their outcome without running)."""

    status: ExcludedStatus
    reason: str
    rows: int = 0


@dataclass
class StepScope:
    """What the runner hands a step: the dataset, the tenants it may act for and their data.

    Tenant data is reached only through `tenants` (a :class:`TenantScope`): `silver` (the pinned
    snapshot, eligible tenants only), `read`/`write`, `load_models`.
    """

    ctx: JobContext
    step: Step
    dataset: str
    spec: DatasetSpec
    tenants: TenantScope
    rows: dict[str, int]                       # eligible tenant -> rows in the step's input
    requested: list[TenantId] | None = None    # --tenants, when given
    options: dict[str, Any] = field(default_factory=dict)
    input_ref: TableRef | None = None
    input_version: int | None = None
    excluded: dict[str, Excluded] = field(default_factory=dict)
    _input: DataFrame | None = None

    @property
    def run_id(self) -> str:
        return self.ctx.run_id

    @property
    def eligible(self) -> list[str]:
        return list(self.tenants.tenants)

    @property
    def input(self) -> DataFrame:
        """The step's input rows (silver, or the scoring batch), eligible tenants only, one version."""
        if self._input is None:
            if self.input_ref is None:
                raise RuntimeError(f"step {self.step.name} has no input table")
            self._input = self.tenants.read(self.input_ref, version=self.input_version)
        return self._input

    @cached_property
    def policies(self) -> dict[str, TenantPolicy]:
        from tenantml.io.tenants import tenant_policies

        return tenant_policies(self.ctx.spark, self.ctx.tables.tenants, self.eligible, self.ctx.config.tenants)

    def acting_for(self, tenants: Sequence[str]) -> TenantScope:
        """Steps that find their tenants in their own input (ingest: the source, validate: bronze,
        publish: predictions) open their scope here, over those tenants (within --tenants)."""
        if self.step.eligibility != "own":
            raise RuntimeError(f"step {self.step.name}: its tenants are resolved by the runner")
        ids = list(tenants)
        if self.requested:
            outside = sorted(set(ids) - set(self.requested))
            if outside:
                raise RuntimeError(f"step {self.step.name}: tenant(s) {outside[:5]} are outside --tenants")
        self.tenants = self.ctx.scope(ids, self.step.name)
        return self.tenants

    def phase(self, message: str) -> None:
        self.ctx.progress.phase(f"{self.step.name} {self.dataset}: {message}")

    def skipped(self, tenant: str, reason: str, **detail: Any) -> TenantOutcome:
        return TenantOutcome(tenant_id=tenant, status="skipped", rows_in=self.rows.get(tenant, 0),
                             detail={"reason": reason, **detail})

    def failed(self, tenant: str, error: str, **detail: Any) -> TenantOutcome:
        return TenantOutcome(tenant_id=tenant, status="failed", rows_in=self.rows.get(tenant, 0), error=error,
                             detail=detail)


def held_already(scope: StepScope, table: str, batch_id: str, held: dict[str | None, int]) -> StepOutput:
    """An ingest whose batch ``table`` holds already (a complete earlier ingest of the same files)
    reads and writes nothing: one step-level row says so, not a row per tenant, so that a quiet
    night's ingest costs a lookup and one run-log row whatever the number of tenants."""
    mine = {t: n for t, n in held.items() if not scope.requested or t in scope.requested}
    why = f"batch {batch_id} is in {table} already: nothing to ingest"
    scope.phase(why)
    return StepOutput(outcomes=[TenantOutcome(tenant_id=None, status="skipped", detail={
        "batch_id": batch_id, "unchanged": True, "reason": why})],
        summary={"batch_id": batch_id, "unchanged": True, "rows_ingested": 0, "reason": why,
                 "tenants_held": len(mine), "rows_held": sum(mine.values())})
