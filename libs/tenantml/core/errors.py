"""One exception hierarchy; every message names the tenant, table, column or config key at fault."""

from __future__ import annotations

# Exit codes shared by the CLI, jobs and workflow tasks.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class TenantMLError(Exception):
    """Base class: the CLI prints the message as one line and exits with ``exit_code``."""

    exit_code = EXIT_FAILURE


class ConfigError(TenantMLError):
    """A config file or key is missing, unknown or invalid."""

    exit_code = EXIT_USAGE


class InvalidTenantIdError(TenantMLError):
    """A tenant id would be unsafe in a path, a predicate or a model name."""

    exit_code = EXIT_USAGE


class InvalidRunIdError(TenantMLError):
    """A run id would be unsafe in a path or a predicate."""

    exit_code = EXIT_USAGE


class UnknownTenantError(TenantMLError):
    """A tenant was asked for that the dataset or the tenants table does not hold."""

    exit_code = EXIT_USAGE


class SourceError(TenantMLError):
    """The source files or table are missing, unreadable, or lack declared columns."""


class SourceNotFoundError(SourceError):
    """The source path given (config or --source) does not exist: a usage error."""

    exit_code = EXIT_USAGE


class TableNotFoundError(TenantMLError):
    """A step needs a table that an earlier step has not written yet."""


class ModelNotFoundError(TenantMLError):
    """A tenant has no registered champion to score with."""


class EntitlementError(TenantMLError):
    """A tenant's rows would be scored by a model it is not entitled to."""


class TrainingError(TenantMLError):
    """Training could not run at all (as opposed to one tenant failing)."""


class TenantIsolationError(TenantMLError):
    """Code acting for one tenant tried to reach another tenant's rows, models, runs or files."""

    exit_code = EXIT_USAGE


class RunNotFoundError(TenantMLError):
    """A run id was asked for that `run_log` holds no rows of."""

    exit_code = EXIT_USAGE


class NotebookError(TenantMLError):
    """A notebook could not be read, or one of its cells raised (the message names the cell)."""

    def __init__(self, message: str, *, cell: int | None = None) -> None:
        super().__init__(message)
        self.cell = cell  # 1-based index of the failing cell; None when the notebook itself is at fault


class ConcurrentWriteError(TenantMLError):
    """A Delta commit still lost to concurrent writers of the same table after every retry (exit 1).

    Nothing of the losing write is visible: a Delta commit is all or nothing. Another run (another
    process, job or cluster) is writing the same rows; rerunning the step once it has finished
    converges, as every write is idempotent."""
