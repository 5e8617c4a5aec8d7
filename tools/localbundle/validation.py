"""Offline validation of the bundle: everything that can be checked without a Databricks workspace.

Why: ``databricks bundle validate`` needs a workspace and credentials and knows nothing about this
project, so a typo in a task key, a parameter the job parser rejects or a job file that was renamed
would only show up at 2 a.m. on the cluster. This checks, for every target:

- the bundle: ``bundle.name``; targets ``dev`` (``mode: development``, the default target) and ``prod``
  (``mode: production`` with a ``run_as`` identity); every variable resolvable; artifacts buildable;
- each job against the bundle schema, when the ``databricks-bundles`` package (the Python form of the
  Databricks CLI's bundle schema: unknown keys, wrong types and enum values) is installed;
- the task graph: unique task keys, ``depends_on`` naming existing tasks, no cycle, every
  ``job_cluster_key`` defined, a timeout on every task, bounded retries;
- each task's entry point: ``python_file`` exists, is synced, and is a thin ``tenantml.apps.jobs.job_main``
  entry for a known step; each task installs the project wheel;
- each task's parameters, after substitution, parsed by the real job parser
  (:func:`tenantml.apps.jobs.build_parser`), and the config they name: ``--conf-dir``/``--env`` load,
  ``--dataset`` exists there, the ``--data-dir`` volume lies in the catalog and schema that
  ``conf/<env>`` writes tables to; shared training runs on a GPU runtime where its config uses GPUs;
- ``{{...}}`` references: declared job parameters, ``{{input}}`` only inside a ``for_each_task``,
  ``for_each_task.inputs`` a JSON array; the schedule a valid Quartz cron expression.

What needs a workspace (node types, runtime versions, the service principal, permissions) is left to
``databricks bundle validate``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localbundle.bundle import (
    SUPPORTED_TASK_TYPES,
    Bundle,
    BundleError,
    Job,
    Task,
    load_bundle,
    read_bundle_files,
)
from localbundle.runner import dynamic_references, job_references, parse_inputs, substitute
from tenantml.core.errors import TenantMLError

REQUIRED_TARGETS = {"dev": "development", "prod": "production"}
# What `{{job.run_id}}` looks like on Databricks: the run id every task of a run logs under.
SAMPLE_RUN_ID = "912345678901234"
_STATIC_REFS = ("job.run_id", "job.id", "job.name", "task.name")
_PARAM_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,255}$")


@dataclass(frozen=True)
class Issue:
    """One problem: where it is (file, job, task, target) and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def bundle_schema_available() -> bool:
    """Whether the ``databricks-bundles`` package (the bundle schema as Python types) is installed."""
    try:
        from databricks.bundles.jobs import Job as _SchemaJob  # noqa: F401
    except ImportError:
        return False
    return True


def validate_bundle(path: str | Path = "workflows", variables: Mapping[str, str] | None = None) -> list[Issue]:
    """Every problem found in the bundle at ``path``, for every target; empty when it is valid."""
    try:
        root_file, raw, _ = read_bundle_files(path)
    except BundleError as exc:
        return [Issue(str(path), p) for p in exc.problems]
    issues = _root_issues(root_file, raw)
    targets = raw.get("targets") or {}
    unloadable: dict[str, list[str]] = {}  # problem -> the targets it stops from loading
    for target in targets if isinstance(targets, Mapping) else []:
        try:
            bundle = load_bundle(path, target, variables)
        except BundleError as exc:
            for p in exc.problems:
                unloadable.setdefault(p, []).append(str(target))
            continue
        issues += _bundle_issues(bundle)
    issues += [Issue(f"{root_file.name} (target {', '.join(ts)})", p) for p, ts in unloadable.items()]
    return list(dict.fromkeys(issues))


def _root_issues(root_file: Path, raw: Mapping[str, Any]) -> list[Issue]:
    where = root_file.name
    issues: list[Issue] = []
    bundle = raw.get("bundle")
    if not isinstance(bundle, Mapping) or not bundle.get("name"):
        issues.append(Issue(where, "'bundle.name' is required"))
    targets = raw.get("targets")
    if not isinstance(targets, Mapping) or not targets:
        return [*issues, Issue(where, "'targets' is required (dev and prod)")]
    for name, mode in REQUIRED_TARGETS.items():
        t = targets.get(name)
        if not isinstance(t, Mapping):
            issues.append(Issue(where, f"target {name!r} is missing"))
        elif t.get("mode") != mode:
            issues.append(Issue(where, f"target {name!r} must have 'mode: {mode}', has {t.get('mode')!r}"))
    defaults = [n for n, t in targets.items() if isinstance(t, Mapping) and t.get("default") is True]
    if defaults != ["dev"]:
        issues.append(Issue(where, f"exactly the 'dev' target must be 'default: true', found {defaults or 'none'}"))
    return issues


def _bundle_issues(b: Bundle) -> list[Issue]:
    issues: list[Issue] = []
    where = f"{b.root_file.name} (target {b.target})"
    if b.mode == "production":
        run_as = b.run_as or {}
        ids = [k for k in ("service_principal_name", "user_name") if run_as.get(k)]
        if len(ids) != 1:
            issues.append(Issue(where, "a production target needs 'run_as' with exactly one non-empty "
                                       "service_principal_name or user_name"))
    artifacts = b.config.get("artifacts") or {}
    for name, art in artifacts.items() if isinstance(artifacts, Mapping) else []:
        if not isinstance(art, Mapping) or art.get("type") != "whl":
            issues.append(Issue(where, f"artifact {name!r}: only 'type: whl' artifacts are used here"))
            continue
        root = Path(str(art.get("path", b.root)))
        if not (root / "pyproject.toml").is_file() and not (root / "setup.py").is_file():
            issues.append(Issue(where, f"artifact {name!r}: {root} has no pyproject.toml or setup.py to build"))
    root = b.root_path
    if b.mode == "production" and (not root or root.startswith(("/Workspace/Shared", "/Shared"))):
        issues.append(Issue(where, f"workspace.root_path {root or '(default)'} is writable by every workspace user: "
                                   "deploy production under the service principal's own folder "
                                   "(/Workspace/Users/${workspace.current_user.userName}/...)"))
    if not b.jobs:
        issues.append(Issue(where, "the bundle defines no job"))
    for job in b.jobs.values():
        issues += _job_issues(b, job)
        issues += [Issue(f"{b.display(job.source)}: job {job.key!r}", m) for m in _deployment_problems(b, job)]
    return issues


# The settings `tenantml.io.spark.build_local_spark` gives every local session that a cluster must
# carry too (the FAIR pools of the tenant tiers, Arrow batches for the Python workers).
CLUSTER_SPARK_CONF = ("spark.scheduler.mode", "spark.scheduler.allocation.file",
                      "spark.sql.execution.arrow.pyspark.enabled", "spark.sql.execution.arrow.maxRecordsPerBatch",
                      "spark.sql.shuffle.partitions")
# The pins the wheel declares: the runtime must ship Spark >= 4.1 and MLflow >= 3.5 (Runtime 18 ML:
# Spark 4.1.0, MLflow 3.8.1).
MIN_RUNTIME = 18


def _deployment_problems(b: Bundle, job: Job) -> list[str]:
    """What a real deployment needs that a local run would not notice."""
    problems: list[str] = []
    if b.mode == "development" and job.schedule is not None and job.schedule.get("pause_status", "UNPAUSED") != "PAUSED":
        problems.append("schedule.pause_status must be PAUSED in a development target (development mode pauses "
                        "only an empty status; an explicit UNPAUSED runs the dev job every night)")
    for cluster_key, cluster in job.job_clusters.items():
        spec = cluster.get("new_cluster") if isinstance(cluster, Mapping) else None
        if not isinstance(spec, Mapping):
            continue
        conf = spec.get("spark_conf") or {}
        missing = [k for k in CLUSTER_SPARK_CONF if k not in conf]
        if missing:
            problems.append(f"job cluster {cluster_key!r}: spark_conf lacks {missing} (what every local session sets)")
        version = str(spec.get("spark_version", ""))
        major = re.match(r"(\d+)\.", version)
        if major is None or int(major.group(1)) < MIN_RUNTIME or "-ml-" not in version:
            problems.append(f"job cluster {cluster_key!r}: spark_version {version!r} must be a Runtime ML "
                            f">= {MIN_RUNTIME} (Spark 4.1 and MLflow >= 3.5, as the wheel requires)")
    for task in [t for t in job.all_tasks() if t.python_file is not None]:
        args = list(task.parameters)
        if "--on-partial" not in args or args[args.index("--on-partial") + 1:][:1] != ["continue"]:
            problems.append(f"task {task.key!r}: pass --on-partial continue, or one tenant's failure (exit 3) skips "
                            f"every downstream task for every tenant")
        if task.max_retries and "--resume-failed" not in args:
            problems.append(f"task {task.key!r}: retried without --resume-failed, a retry reruns every tenant")
    return problems


# --------------------------------------------------------------------------- jobs


def _job_issues(b: Bundle, job: Job) -> list[Issue]:
    where = f"{b.display(job.source)}: job {job.key!r}"
    issues = [Issue(where, m) for m in _schema_problems(job)]
    issues += [Issue(where, m) for m in _graph_problems(job)]
    for name in job.parameters:
        if not _PARAM_NAME_RE.fullmatch(name):
            issues.append(Issue(where, f"parameter name {name!r} may only use letters, digits, '_', '-', '.'"))
    if job.schedule is not None:
        cron = job.schedule.get("quartz_cron_expression")
        if not isinstance(cron, str):
            issues.append(Issue(where, "schedule.quartz_cron_expression is required"))
        else:
            issues += [Issue(where, f"schedule {cron!r}: {m}") for m in quartz_cron_problems(cron)]
        if not job.schedule.get("timezone_id"):
            issues.append(Issue(where, "schedule.timezone_id is required (e.g. UTC)"))
        if job.schedule.get("pause_status", "UNPAUSED") not in ("PAUSED", "UNPAUSED"):
            issues.append(Issue(where, "schedule.pause_status must be PAUSED or UNPAUSED"))
    for cluster_key, cluster in job.job_clusters.items():
        spec = cluster.get("new_cluster")
        if not isinstance(spec, Mapping):
            issues.append(Issue(where, f"job cluster {cluster_key!r} needs 'new_cluster'"))
            continue
        for key in ("spark_version",):
            if not spec.get(key):
                issues.append(Issue(where, f"job cluster {cluster_key!r}: new_cluster.{key} is required"))
        if not spec.get("node_type_id") and not spec.get("instance_pool_id"):
            issues.append(Issue(where, f"job cluster {cluster_key!r}: new_cluster needs node_type_id or "
                                       "instance_pool_id"))
        if "num_workers" not in spec and "autoscale" not in spec:
            issues.append(Issue(where, f"job cluster {cluster_key!r}: new_cluster needs num_workers or autoscale"))
    for task in job.tasks:
        issues += _task_issues(b, job, task, nested=False)
        if task.for_each is not None:
            issues += _task_issues(b, job, task.for_each.task, nested=True, parent=task)
    return issues


def _schema_problems(job: Job) -> list[str]:
    """The job against the bundle schema (``databricks-bundles``), task by task for precise messages."""
    try:
        from databricks.bundles.jobs import Job as SchemaJob
        from databricks.bundles.jobs import Task as SchemaTask
    except ImportError:
        return []
    problems = []
    rest = {k: copy.deepcopy(v) for k, v in job.raw.items() if k != "tasks"}
    try:
        SchemaJob.from_dict(rest)  # type: ignore[arg-type]
    except (ValueError, TypeError, KeyError) as exc:
        problems.append(f"does not match the bundle schema: {exc}")
    for i, raw in enumerate(job.raw.get("tasks") or []):
        label = raw.get("task_key", f"tasks[{i}]") if isinstance(raw, Mapping) else f"tasks[{i}]"
        try:
            SchemaTask.from_dict(copy.deepcopy(raw))
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"task {label!r} does not match the bundle schema: {exc}")
    return problems


def _graph_problems(job: Job) -> list[str]:
    problems = []
    seen: dict[str, int] = {}
    for t in job.all_tasks():
        seen[t.key] = seen.get(t.key, 0) + 1
    problems += [f"task key {k!r} is used {n} times; task keys must be unique" for k, n in seen.items() if n > 1]
    keys = set(job.task_keys())
    for t in job.tasks:
        for d in t.depends_on:
            if d == t.key:
                problems.append(f"task {t.key!r} depends on itself")
            elif d not in keys:
                problems.append(f"task {t.key!r} depends on {d!r}, which is not a task of this job "
                                f"(tasks: {', '.join(job.task_keys())})")
    cycle = find_cycle({t.key: [d for d in t.depends_on if d in keys and d != t.key] for t in job.tasks})
    if cycle:
        problems.append(f"depends_on has a cycle: {' -> '.join(cycle)}")
    for t in job.all_tasks():
        if t.job_cluster_key is not None and t.job_cluster_key not in job.job_clusters:
            problems.append(f"task {t.key!r} uses job_cluster_key {t.job_cluster_key!r}, which is not defined "
                            f"in job_clusters ({', '.join(job.job_clusters) or 'none'})")
    return problems


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A dependency cycle as a path that ends where it starts (graphlib's), or None."""
    import graphlib

    try:
        graphlib.TopologicalSorter({k: list(v) for k, v in graph.items()}).prepare()
    except graphlib.CycleError as exc:
        cycle = list(exc.args[1])  # graphlib lists it against the edges: dependent last
        return list(reversed(cycle))
    return None


def _task_issues(b: Bundle, job: Job, task: Task, nested: bool, parent: Task | None = None) -> list[Issue]:
    label = f"{parent.key!r} > {task.key!r}" if parent is not None else repr(task.key)
    where = f"{b.display(job.source)}: job {job.key!r} task {label}"
    issues: list[Issue] = []

    def add(message: str) -> None:
        issues.append(Issue(where, message))

    if task.kind not in SUPPORTED_TASK_TYPES:
        add(f"{task.kind} is not used in this project: tasks run the jobs/<step>.py entry points "
            "(spark_python_task), fanned out with for_each_task")
        return issues
    if not nested and task.timeout_seconds <= 0:
        add("timeout_seconds is required (a hung task must not hold the job and its cluster)")
    if task.max_retries < 0:
        add("max_retries must be 0 or more (-1 would retry a failing task until the job times out)")
    if nested and task.depends_on:
        add("the task of a for_each_task cannot have depends_on")
    if task.kind == "for_each_task":
        if task.for_each is not None:
            issues += [Issue(where, m) for m in _for_each_problems(job, task)]
        return issues
    if task.job_cluster_key is None and not {"existing_cluster_id", "new_cluster"} & set(task.raw):
        add("needs compute: job_cluster_key (or existing_cluster_id / new_cluster)")
    issues += [Issue(where, m) for m in _library_problems(b, task)]
    if task.python_file is None:
        return issues
    step, problem = entry_step(task.python_file)
    if problem:
        add(f"python_file {b.display(task.python_file)} {problem}")
        return issues
    if b.sync_root not in task.python_file.resolve().parents:
        add(f"python_file {task.python_file} is outside the synced files ({b.sync_root}): add its folder "
            "to sync.paths so that deploy uploads it")
    assert step is not None
    bad_refs = [f"parameter {p!r}: {problem}" for p in task.parameters for name in dynamic_references(p)
                if (problem := _reference_problem(job, name, nested))]
    if bad_refs:  # the parameters cannot be substituted, so they cannot be parsed
        return [*issues, *(Issue(where, m) for m in bad_refs)]
    refs = job_references(job, SAMPLE_RUN_ID, job.parameters)
    samples: list[dict[str, str]] = [{}]
    if nested and parent is not None and parent.for_each is not None:
        from localbundle.runner import input_references

        try:
            items = parse_inputs(substitute(parent.for_each.inputs, refs, where), where)
        except BundleError:
            items = []  # reported on the for_each task
        samples = [input_references(it) for it in items] or [input_references("")]
    for extra in samples:
        argv = [substitute(p, {**refs, "task.name": task.key, **extra}, where) for p in task.parameters]
        ns, error = parse_job_args(step, argv)
        if error:
            add(f"parameters {argv} are rejected by the job parser of {step!r}: {error}")
            break
        assert ns is not None
        issues += [Issue(f"{where} (target {b.target})", m) for m in _args_problems(b, job, task, step, ns)]
    return issues


def _reference_problem(job: Job, name: str, nested: bool) -> str | None:
    if name.startswith("job.parameters."):
        param = name.removeprefix("job.parameters.")
        if param not in job.parameters:
            return (f"{{{{{name}}}}} names job parameter {param!r}, which the job does not declare "
                    f"(parameters: {', '.join(job.parameters) or 'none'})")
        return None
    if name == "input" or name.startswith("input."):
        return None if nested else f"{{{{{name}}}}} is only defined inside a for_each_task"
    if name in _STATIC_REFS:
        return None
    return f"{{{{{name}}}}} is not a dynamic value reference that tasks here use ({', '.join(_STATIC_REFS)}, " \
           "job.parameters.<name>, input)"


def _for_each_problems(job: Job, task: Task) -> list[str]:
    assert task.for_each is not None
    fe = task.for_each
    problems = []
    if not 1 <= fe.concurrency <= 100:
        problems.append(f"for_each_task.concurrency must be 1..100, is {fe.concurrency}")
    refs = dynamic_references(fe.inputs)
    if refs:
        if len(refs) != 1 or fe.inputs.strip() != f"{{{{{refs[0]}}}}}" or not refs[0].startswith("job.parameters."):
            return [*problems, f"for_each_task.inputs {fe.inputs!r} must be a JSON array or one "
                               "{{job.parameters.<name>}} reference"]
        param = refs[0].removeprefix("job.parameters.")
        if param not in job.parameters:
            return [*problems, f"for_each_task.inputs names job parameter {param!r}, which the job does not declare"]
        value, label = job.parameters[param], f"the default of job parameter {param!r}"
    else:
        value, label = fe.inputs, "for_each_task.inputs"
    try:
        items = json.loads(value)
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list):
        problems.append(f"{label} must be a JSON array, is {value!r}")
    return problems


def _library_problems(b: Bundle, task: Task) -> list[str]:
    libs = task.raw.get("libraries") or []
    wheels = [lib["whl"] for lib in libs if isinstance(lib, Mapping) and isinstance(lib.get("whl"), str)]
    if not wheels:
        return ["installs no whl library: the cluster would not have tenantml (add the artifact's wheel to "
                "'libraries')"]
    artifacts = b.config.get("artifacts") or {}
    roots = [Path(str(a["path"])) for a in artifacts.values() if isinstance(a, Mapping) and a.get("path")]
    problems = []
    for whl in wheels:
        p = Path(whl)
        if p.is_absolute() and not any(r == p.parent or r in p.parents for r in roots):
            problems.append(f"library {whl} is not built by any artifact of the bundle")
    return problems


def entry_step(python_file: Path) -> tuple[str | None, str | None]:
    """The step a jobs/<step>.py file runs, from its ``job_main("<step>", ...)`` call; or a problem."""
    from tenantml.steps.base import pipeline_order, registry

    steps = tuple(registry())

    if not python_file.is_file():
        return None, "does not exist"
    try:
        tree = ast.parse(python_file.read_text(), filename=str(python_file))
    except SyntaxError as exc:
        return None, f"is not valid Python: {exc}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
            if name == "job_main" and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                step = node.args[0].value
                if step not in (*steps, "pipeline"):
                    return None, (f"runs step {step!r}, which the step registry does not have "
                                  f"({', '.join(pipeline_order())}, pipeline)")
                return step, None
    return None, "is not a job entry point: it does not call tenantml.apps.jobs.job_main(\"<step>\", argv)"


def parse_job_args(step: str, argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """Parse ``argv`` with the job's own parser; the parser's error message when it refuses them."""
    from tenantml.apps.jobs import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser(step).parse_args(argv), None
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        return None, (lines[-1] if lines else "invalid arguments")


def _config(conf_dir: str, env: str) -> Any:
    from tenantml.config import load_config

    return load_config(conf_dir, env)


def _args_problems(b: Bundle, job: Job, task: Task, step: str, ns: argparse.Namespace) -> list[str]:
    """What the parsed arguments say, checked against the project's config for this target."""
    from tenantml.core.ids import validate_run_id, validate_tenant_ids

    problems = []
    if ns.run_id:
        try:
            validate_run_id(ns.run_id, where="--run-id")
        except TenantMLError as exc:
            problems.append(str(exc))
    else:
        problems.append("no --run-id: the tasks of one job run must share {{job.parameters.run_id}}")
    tenants = [t for t in (ns.tenants or "").split(",") if t.strip()]
    if tenants:
        try:
            validate_tenant_ids(tenants, where="--tenants")
        except TenantMLError as exc:
            problems.append(str(exc))
    if not ns.env:
        return [*problems, "no --env: on Databricks the task would load the 'local' config"]
    if not ns.data_dir:
        problems.append("no --data-dir: on Databricks the data directory would be the cluster's local disk")
    conf_dir = Path(ns.conf_dir)
    if not conf_dir.is_absolute():
        return [*problems, f"--conf-dir {ns.conf_dir!r} is relative: the task's working directory on "
                           "Databricks is not the repository; use ${workspace.file_path}/conf"]
    try:
        config = _config(str(conf_dir), ns.env)
        config.dataset(ns.dataset)
    except TenantMLError as exc:
        return [*problems, f"--conf-dir {b.display(conf_dir)} --env {ns.env}: {exc}"]
    volume = re.fullmatch(r"/Volumes/([^/]+)/([^/]+)/.+", ns.data_dir or "")
    tables = config.tables
    if volume and (volume.group(1), volume.group(2)) != (tables.catalog, tables.schema_):
        problems.append(f"--data-dir {ns.data_dir} is in {volume.group(1)}.{volume.group(2)} but conf/{ns.env} "
                        f"writes tables to {tables.catalog}.{tables.schema_}")
    shared = config.training.shared
    if step == "train_shared" and shared.use_gpu is not False:
        cluster = job.job_clusters.get(task.job_cluster_key or "", {}).get("new_cluster") or {}
        if "gpu" not in str(cluster.get("spark_version", "")):
            problems.append(f"conf/{ns.env} trains the shared model on GPUs (training.shared.use_gpu: "
                            f"{shared.use_gpu}) but job cluster {task.job_cluster_key!r} runs "
                            f"{cluster.get('spark_version')!r}, not a GPU runtime")
        workers = cluster.get("num_workers")
        if not shared.local_mode and isinstance(workers, int) and workers < shared.num_processes:
            problems.append(f"conf/{ns.env} runs {shared.num_processes} shared-training processes, one per "
                            f"worker GPU, but job cluster {task.job_cluster_key!r} has {workers} workers")
    return problems


# --------------------------------------------------------------------------- cron

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_CRON_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("seconds", 0, 59, ()), ("minutes", 0, 59, ()), ("hours", 0, 23, ()), ("day-of-month", 1, 31, ()),
    ("month", 1, 12, _MONTHS), ("day-of-week", 1, 7, _DAYS), ("year", 1970, 2099, ()))


def quartz_cron_problems(expr: str) -> list[str]:
    """A basic check of Quartz cron syntax (what Databricks schedules use); empty when it looks valid."""
    parts = expr.split()
    if len(parts) not in (6, 7):
        return [f"has {len(parts)} fields; Quartz cron has 6 or 7 "
                "(seconds minutes hours day-of-month month day-of-week [year])"]
    problems = []
    for (name, lo, hi, names), part in zip(_CRON_FIELDS, parts, strict=False):
        if not all(_cron_item_ok(item, name, lo, hi, names) for item in part.split(",")):
            problems.append(f"{name} field {part!r} is not valid ({lo}-{hi}"
                            + (f" or {names[0]}-{names[-1]}" if names else "") + ", *, ranges a-b, steps /n)")
    if (parts[3] == "?") == (parts[5] == "?"):
        problems.append("exactly one of day-of-month and day-of-week must be '?'")
    return problems


def _cron_value(text: str, lo: int, hi: int, names: tuple[str, ...]) -> bool:
    if text.isdigit():
        return lo <= int(text) <= hi
    return text.upper() in names


def _cron_item_ok(item: str, name: str, lo: int, hi: int, names: tuple[str, ...]) -> bool:
    if item == "*":
        return True
    if item == "?":
        return name in ("day-of-month", "day-of-week")
    if name == "day-of-month" and (m := re.fullmatch(r"L(?:-(\d{1,2}))?|LW|(\d{1,2})W", item)):
        return all(int(g) <= 30 if i == 0 else lo <= int(g) <= hi for i, g in enumerate(m.groups()) if g)
    if name == "day-of-week" and (m := re.fullmatch(r"([A-Za-z]{3}|\d)(?:L|#([1-5]))|L", item)):
        return m.group(1) is None or _cron_value(m.group(1), lo, hi, names)
    base, slash, step = item.partition("/")
    if slash and not (step.isdigit() and int(step) > 0):
        return False
    if base == "*" and slash:
        return True
    first, dash, last = base.partition("-")
    return _cron_value(first, lo, hi, names) and (not dash or _cron_value(last, lo, hi, names))
