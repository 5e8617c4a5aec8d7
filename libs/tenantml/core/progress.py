"""Progress reporting seam: the library reports, the CLI renders (rich), tests stay silent."""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger("tenantml.core.progress")


class Progress(Protocol):
    def phase(self, message: str) -> None:
        """A new phase of a long step started."""

    def start(self, label: str, total: int) -> None:
        """A counted task begins (e.g. registering 200 models)."""

    def advance(self, n: int = 1) -> None: ...

    def update(self, completed: int, total: int) -> None:
        """Set absolute progress of the counted task (e.g. Spark tasks finished)."""

    def done(self) -> None: ...


class NullProgress:
    """Logs phases at INFO; used by jobs, notebooks and tests."""

    def phase(self, message: str) -> None:
        log.info(message)

    def start(self, label: str, total: int) -> None:
        log.info("%s (%d)", label, total)

    def advance(self, n: int = 1) -> None:
        return None

    def update(self, completed: int, total: int) -> None:
        return None

    def done(self) -> None:
        return None
