"""Progress reporting seam: the library reports, the CLI renders (rich), tests stay silent."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger("tenantml.progress")


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


class SparkTaskProgress:
    """Reports a Spark job's finished/total tasks while it runs (training is one long job).

    A daemon thread polls the status tracker: no listener is registered, nothing changes in the job.
    """

    def __init__(self, spark: object, progress: Progress, label: str, interval: float = 0.5) -> None:
        self._sc = spark.sparkContext  # type: ignore[attr-defined]
        self._progress = progress
        self._label = label
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="tenantml-progress", daemon=True)

    def _poll(self) -> None:
        tracker = self._sc.statusTracker()
        shown = (-1, -1)
        started = False
        while not self._stop.wait(self._interval):
            done = total = 0
            for sid in tracker.getActiveStageIds():
                info = tracker.getStageInfo(sid)
                if info is not None:
                    done += info.numCompletedTasks
                    total += info.numTasks
            if total and (done, total) != shown:
                if not started:
                    self._progress.start(self._label, total)
                    started = True
                self._progress.update(done, total)
                shown = (done, total)
        if started:
            self._progress.done()

    def __enter__(self) -> SparkTaskProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
