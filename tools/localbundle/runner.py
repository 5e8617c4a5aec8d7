"""Run a bundle job locally, task by task, the way a Databricks job run would.

Why: the nightly job is only worth scheduling if the same task graph, with the same parameters and
entry points, demonstrably works; this runs it on the embedded default (local Spark, Delta, MLflow
on SQLite) before anything is deployed, and lets a developer rerun a workflow without a workspace.

What it keeps from a Databricks job run:

- one job run id (``{{job.run_id}}``), so every task logs under the same tenantml run id;
- job parameters: the defaults, overridden per run (``--param k=v``) as ``bundle run --params`` does;
  ``{{job.parameters.x}}``, ``{{job.run_id}}``, ``{{job.id}}``, ``{{job.name}}``, ``{{task.name}}``
  and, in a ``for_each_task``, ``{{input}}`` / ``{{input.<key>}}`` are substituted;
- ``depends_on`` and ``run_if``: tasks run in dependency order (file order among ready tasks); a task
  whose condition fails is ``upstream_failed`` (or ``skipped``) and does not run; any failed task
  fails the run;
- ``max_retries`` / ``min_retry_interval_millis``: a failed attempt is retried after the interval;
- ``for_each_task``: the nested task runs once per input; every iteration runs, and the task fails
  if one of them failed.

What it does not: tasks run one at a time (``concurrency`` and independent branches are sequential),
clusters and libraries are this Python environment, and ``timeout_seconds`` is enforced only with
``isolation="process"``. Each ``spark_python_task`` runs its ``python_file`` as ``__main__``:
in-process by default (``isolation="inline"``: the tasks share one local SparkSession, as the tasks
of a job share their job cluster), or as a child process (``isolation="process"``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

from localbundle.bundle import Bundle, BundleError, Job, Task
from tenantml.core.errors import EXIT_FAILURE, EXIT_OK
from tenantml.core.progress import NullProgress, Progress

Isolation = Literal["inline", "process"]
TaskStatus = Literal["success", "failed", "upstream_failed", "skipped", "excluded"]
_DYN_RE = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")
_FAILED = ("failed", "upstream_failed")
LOCAL_JOB_ID = "local"


@dataclass
class TaskRun:
    """The outcome of one task (or one iteration of a for_each task)."""

    task_key: str
    status: TaskStatus
    attempts: int = 0
    exit_code: int | None = None
    seconds: float = 0.0
    message: str = ""
    argv: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    iterations: list[TaskRun] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobRun:
    """A local job run: every task's outcome in the order they were decided."""

    job_key: str
    target: str
    run_id: str
    parameters: dict[str, str]
    tasks: list[TaskRun] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "failed" if any(t.status in _FAILED for t in self.tasks) else "success"

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.status == "success" else EXIT_FAILURE

    def task(self, key: str) -> TaskRun:
        for t in self.tasks:
            if t.task_key == key:
                return t
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job_key, "target": self.target, "run_id": self.run_id, "status": self.status,
                "exit_code": self.exit_code, "seconds": round(self.seconds, 3), "parameters": self.parameters,
                "tasks": [t.to_dict() for t in self.tasks]}


# --------------------------------------------------------------------------- references


def dynamic_references(value: str) -> list[str]:
    """The names inside ``{{...}}`` in ``value``."""
    return _DYN_RE.findall(value)


def substitute(value: str, refs: Mapping[str, str], where: str = "") -> str:
    """Replace ``{{name}}`` references; an unknown one is an error naming it and ``where``."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in refs:
            known = ", ".join(sorted(refs))
            raise BundleError(f"{where}: unknown or unavailable reference {{{{{name}}}}} (known here: {known})")
        return refs[name]

    return _DYN_RE.sub(sub, value)


def job_references(job: Job, run_id: str, params: Mapping[str, str]) -> dict[str, str]:
    """Every ``{{...}}`` value a task of this run may use, ``{{input}}`` aside."""
    base = {"job.run_id": run_id, "job.id": LOCAL_JOB_ID, "job.name": job.name}
    refs = dict(base)
    for name, value in params.items():
        refs[f"job.parameters.{name}"] = substitute(value, base, f"job {job.key!r} parameter {name!r}")
    return refs


def input_references(item: Any) -> dict[str, str]:
    """``{{input}}`` is the element (JSON for a non-string); ``{{input.k}}`` a key of an object element."""
    refs = {"input": item if isinstance(item, str) else json.dumps(item)}
    if isinstance(item, Mapping):
        for k, v in item.items():
            refs[f"input.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return refs


def parse_inputs(value: str, where: str) -> list[Any]:
    try:
        items = json.loads(value)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{where}: for_each_task.inputs {value!r} is not a JSON array: {exc}") from None
    if not isinstance(items, list):
        raise BundleError(f"{where}: for_each_task.inputs {value!r} is not a JSON array")
    return items


def override_args(argv: Sequence[str], overrides: Mapping[str, str | None]) -> list[str]:
    """Replace the value of each ``--flag`` (added when absent); a ``None`` value removes the flag."""
    out = list(argv)
    for flag, value in overrides.items():
        kept: list[str] = []
        i = 0
        while i < len(out):
            if out[i] == flag:
                i += 2
                continue
            if out[i].startswith(flag + "="):
                i += 1
                continue
            kept.append(out[i])
            i += 1
        out = kept if value is None else [*kept, flag, value]
    return out


def topological_order(job: Job) -> list[Task]:
    """Tasks in dependency order, file order among those ready; a cycle or a missing task is an error."""
    import graphlib

    keys = job.task_keys()
    missing = [f"{t.key} -> {d}" for t in job.tasks for d in t.depends_on if d not in keys]
    if missing:
        raise BundleError(f"job {job.key!r}: depends_on names tasks that do not exist: {', '.join(missing)}")
    position = {t.key: i for i, t in enumerate(job.tasks)}
    sorter = graphlib.TopologicalSorter({t.key: list(t.depends_on) for t in job.tasks})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        raise BundleError(f"job {job.key!r}: depends_on has a cycle among {', '.join(exc.args[1])}") from None
    by_key = {t.key: t for t in job.tasks}
    order: list[Task] = []
    ready: set[str] = set()
    while sorter.is_active():
        ready.update(sorter.get_ready())
        key = min(ready, key=position.__getitem__)  # the first ready task in file order
        ready.remove(key)
        order.append(by_key[key])
        sorter.done(key)
    return order


def _condition_met(run_if: str, deps: Sequence[TaskRun]) -> bool:
    states = [d.status for d in deps if d.status != "excluded"]
    if not states:
        return True
    ok = [s == "success" for s in states]
    bad = [s in _FAILED for s in states]
    return {"ALL_SUCCESS": all(ok), "AT_LEAST_ONE_SUCCESS": any(ok), "NONE_FAILED": not any(bad),
            "ALL_DONE": True, "AT_LEAST_ONE_FAILED": any(bad), "ALL_FAILED": all(bad)}[run_if]


# --------------------------------------------------------------------------- running


class _Tee(io.TextIOBase):
    """Writes through to the real stream and keeps a copy (the error line goes into the summary)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, s: str) -> int:
        self.copy.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def _step_results(stdout: str) -> tuple[list[dict[str, Any]], str]:
    """The StepResult JSON lines a job prints, and the rest of its output."""
    steps, other = [], []
    for line in stdout.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "step" in obj and "run_id" in obj:
            steps.append(obj)
        elif line.strip():
            other.append(line)
    return steps, "\n".join(other)


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "Error" in ln:
            return ln[:500]
    return lines[-1][:500] if lines else ""


@dataclass
class _Attempt:
    exit_code: int
    stdout: str
    message: str


def _run_inline(task: Task, argv: list[str]) -> _Attempt:
    assert task.python_file is not None
    saved_argv = sys.argv
    out = io.StringIO()
    err = _Tee(sys.stderr)
    sys.argv = [str(task.python_file), *argv]
    message = ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(task.python_file), run_name="__main__")
        code = EXIT_OK
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except Exception as exc:  # a task that raises fails, as its process would on Databricks
        code = EXIT_FAILURE
        message = f"{type(exc).__name__}: {exc}"
    finally:
        sys.argv = saved_argv
    return _Attempt(code, out.getvalue(), message or (_last_error(err.copy.getvalue()) if code else ""))


def _run_process(task: Task, argv: list[str], cwd: str) -> _Attempt:
    assert task.python_file is not None
    timeout = task.timeout_seconds or None
    try:
        proc = subprocess.run([sys.executable, str(task.python_file), *argv], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        sys.stderr.write(err)
        return _Attempt(EXIT_FAILURE, "", f"timed out after {task.timeout_seconds}s")
    sys.stderr.write(proc.stderr)
    return _Attempt(proc.returncode, proc.stdout, _last_error(proc.stderr) if proc.returncode else "")


class JobRunner:
    """Runs one job of a resolved bundle; see the module docstring for the semantics."""

    def __init__(self, bundle: Bundle, job_key: str, *, params: Mapping[str, str] | None = None,
                 arg_overrides: Mapping[str, str | None] | None = None, isolation: Isolation = "inline",
                 only: Sequence[str] | None = None, progress: Progress | None = None,
                 sleep: Callable[[float], None] = time.sleep, run_id: str | None = None) -> None:
        from tenantml.io.context import new_run_id

        self.bundle = bundle
        self.job = bundle.job(job_key)
        unknown = sorted(set(params or {}) - set(self.job.parameters))
        if unknown:
            raise BundleError(f"job {job_key!r} has no parameter {', '.join(unknown)} "
                              f"(parameters: {', '.join(self.job.parameters) or 'none'})")
        self.params = {**self.job.parameters, **(params or {})}
        self.overrides = dict(arg_overrides or {})
        if isolation not in ("inline", "process"):
            raise BundleError(f"isolation must be 'inline' or 'process', not {isolation!r}")
        self.isolation = isolation
        keys = self.job.task_keys()
        bad = [k for k in only or () if k not in keys]
        if bad:
            raise BundleError(f"job {job_key!r} has no task {', '.join(bad)} (tasks: {', '.join(keys)})")
        self.only = set(only) if only else None
        self.progress = progress or NullProgress()
        self.sleep = sleep
        self.run_id = run_id or new_run_id()
        self.order = topological_order(self.job)
        self.refs = job_references(self.job, self.run_id, self.params)
        # Every reference must resolve before the first task starts: no half-run job for a typo.
        for task in self.job.all_tasks():
            self._argv(task, {"input": ""} if self._nested(task) else {}, dry=True)

    def _nested(self, task: Task) -> bool:
        return any(t.for_each is not None and t.for_each.task is task for t in self.job.tasks)

    def _argv(self, task: Task, extra: Mapping[str, str], dry: bool = False) -> list[str]:
        refs = {**self.refs, "task.name": task.key, **extra}
        if dry and self._nested(task):  # an object element's keys are known only at run time
            refs.update({name: "" for p in task.parameters for name in dynamic_references(p)
                         if name.startswith("input.")})
        argv = [substitute(p, refs, f"job {self.job.key!r} task {task.key!r}") for p in task.parameters]
        return override_args(argv, self.overrides)

    def run(self) -> JobRun:
        started = time.perf_counter()
        run = JobRun(job_key=self.job.key, target=self.bundle.target, run_id=self.run_id,
                     parameters=dict(self.params))
        by_key: dict[str, TaskRun] = {}
        self.progress.phase(f"job {self.job.key} ({self.bundle.target}): run {self.run_id}, "
                            f"{len(self.order)} tasks")
        for task in self.order:
            deps = [by_key[d] for d in task.depends_on]
            if self.only is not None and task.key not in self.only:
                result = TaskRun(task.key, "excluded", message="not selected (--only)")
            elif not _condition_met(task.run_if, deps):
                failed = [d.task_key for d in deps if d.status in _FAILED]
                result = TaskRun(task.key, "upstream_failed" if failed else "skipped",
                                 message=f"run_if {task.run_if} not met"
                                 + (f": upstream {', '.join(failed)} failed" if failed else ""))
            else:
                result = self._run_task(task)
            by_key[task.key] = result
            run.tasks.append(result)
            if result.status in ("upstream_failed", "skipped"):  # a task that ran reported itself
                self.progress.phase(f"task {task.key}: {result.status}: {result.message}")
        run.seconds = time.perf_counter() - started
        self.progress.phase(f"job {self.job.key}: {run.status} in {run.seconds:.0f}s")
        return run

    def _run_task(self, task: Task) -> TaskRun:
        if task.for_each is not None:
            return self._run_for_each(task)
        return self._attempts(task, task.key, {})

    def _run_for_each(self, task: Task) -> TaskRun:
        assert task.for_each is not None
        started = time.perf_counter()
        where = f"job {self.job.key!r} task {task.key!r}"
        try:
            items = parse_inputs(substitute(task.for_each.inputs, {**self.refs, "task.name": task.key}, where),
                                 where)
        except BundleError as exc:
            return TaskRun(task.key, "failed", exit_code=EXIT_FAILURE, message=str(exc))
        result = TaskRun(task.key, "success", attempts=1)
        for i, item in enumerate(items):
            result.iterations.append(self._attempts(task.for_each.task, f"{task.key}[{i}]", input_references(item)))
        failed = [it for it in result.iterations if it.status == "failed"]
        if failed:
            result.status = "failed"
            result.message = f"{len(failed)} of {len(items)} iterations failed: {failed[0].message}"
        result.exit_code = max((it.exit_code or 0 for it in result.iterations), default=EXIT_OK)
        result.seconds = time.perf_counter() - started
        return result

    def _attempts(self, task: Task, label: str, extra: Mapping[str, str]) -> TaskRun:
        if task.kind != "spark_python_task" or task.python_file is None:
            return TaskRun(label, "failed", exit_code=EXIT_FAILURE,
                           message=f"{task.kind} tasks cannot run locally (only spark_python_task)")
        started = time.perf_counter()
        try:
            argv = self._argv(task, extra)
        except BundleError as exc:
            return TaskRun(label, "failed", exit_code=EXIT_FAILURE, message=str(exc))
        result = TaskRun(label, "failed", argv=argv)
        if not task.python_file.is_file():
            result.exit_code, result.message = EXIT_FAILURE, f"python_file {task.python_file} does not exist"
            return result
        max_attempts = 1 + max(task.max_retries, 0)
        for attempt in range(1, max_attempts + 1):
            self.progress.phase(f"task {label}: attempt {attempt}/{max_attempts}: "
                                f"{self.bundle.display(task.python_file)} {shlex.join(argv)}")
            outcome = (_run_inline(task, argv) if self.isolation == "inline"
                       else _run_process(task, argv, str(self.bundle.sync_root)))
            steps, other = _step_results(outcome.stdout)
            if other:
                sys.stderr.write(other + "\n")
            result.attempts, result.exit_code, result.steps = attempt, outcome.exit_code, steps
            result.message = outcome.message if outcome.exit_code else ""
            if outcome.exit_code == EXIT_OK:
                result.status = "success"
                break
            if attempt < max_attempts:
                wait = task.min_retry_interval_millis / 1000
                self.progress.phase(f"task {label}: exit {outcome.exit_code}; retrying in {wait:.0f}s")
                self.sleep(wait)
        result.seconds = time.perf_counter() - started
        self.progress.phase(f"task {label}: {result.status} (exit {result.exit_code}, {result.seconds:.0f}s)")
        return result


def run_job(bundle: Bundle, job_key: str, *, params: Mapping[str, str] | None = None,
            env: str | None = "local", data_dir: str | None = None, conf_dir: str | None = None,
            isolation: Isolation = "inline", only: Sequence[str] | None = None,
            progress: Progress | None = None, sleep: Callable[[float], None] = time.sleep,
            run_id: str | None = None) -> JobRun:
    """Run ``job_key`` of ``bundle`` on this machine and return every task's outcome.

    The tasks' ``--env`` becomes ``env`` (default ``local``: the embedded default, whatever the
    target; ``None`` keeps the target's). ``--data-dir`` becomes ``data_dir``, or is dropped when it
    is ``None`` (the bundle's is a workspace volume), so the job falls back to TENANTML_DATA_DIR or
    ``project.data_dir``. ``conf_dir`` replaces ``--conf-dir`` when given; the bundle's own already
    points at the repository's ``conf/``.
    """
    overrides: dict[str, str | None] = {"--data-dir": data_dir}
    if env is not None:
        overrides["--env"] = env
    if conf_dir is not None:
        overrides["--conf-dir"] = conf_dir
    return JobRunner(bundle, job_key, params=params, arg_overrides=overrides, isolation=isolation, only=only,
                     progress=progress, sleep=sleep, run_id=run_id).run()
