"""Databricks Asset Bundle configuration, read the way the Databricks CLI reads it, without a workspace.

The bundle in ``workflows/`` is the one description of the scheduled pipeline; the local runner and
the offline validation both read it through this module so that what runs locally is what deploys:

- the root ``databricks.yml`` plus every file its ``include`` globs match;
- relative paths (``python_file``, ``whl`` libraries, artifact and sync paths) resolved against the
  file that wrote them, as the CLI does;
- one target selected (``-t``, else the one marked ``default: true``) and merged over the root:
  its ``variables`` override the defaults, its ``workspace`` / ``run_as`` / ``resources`` / ...
  replace or merge key by key (``tasks`` by ``task_key``, ``job_clusters`` by ``job_cluster_key``);
- ``${var.x}``, ``${bundle.*}`` and ``${workspace.*}`` substituted. ``${workspace.file_path}`` is the
  workspace copy of the synced files; locally it is the sync root (the common folder of the bundle
  root and ``sync.paths``), so ``${workspace.file_path}/conf`` is the repository's ``conf/``.

``{{job.parameters.x}}`` and the other dynamic value references are left in place: they are
resolved per run (:mod:`localbundle.runner`) and checked by :mod:`localbundle.validation`.
"""

from __future__ import annotations

import copy
import getpass
import glob
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tenantml.core.errors import ConfigError

ROOT_FILES = ("databricks.yml", "databricks.yaml")
# Task types of the Jobs API; the local runner executes the first two.
SUPPORTED_TASK_TYPES = ("spark_python_task", "for_each_task")
TASK_TYPES = (*SUPPORTED_TASK_TYPES, "python_wheel_task", "notebook_task", "run_job_task", "sql_task",
              "pipeline_task", "spark_jar_task", "spark_submit_task", "dbt_task", "condition_task",
              "clean_rooms_notebook_task", "dashboard_task", "power_bi_task", "gen_ai_compute_task")
RUN_IF = ("ALL_SUCCESS", "AT_LEAST_ONE_SUCCESS", "NONE_FAILED", "ALL_DONE", "AT_LEAST_ONE_FAILED",
          "ALL_FAILED")
_VAR_RE = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")
# Keys of a target that are not merged over the root configuration.
_TARGET_ONLY = ("mode", "default", "variables", "compute_id", "cluster_id", "git")


class BundleError(ConfigError):
    """The bundle cannot be read or resolved; ``problems`` lists every problem found (exit code 2)."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class ForEach:
    """A ``for_each_task``: ``task`` runs once per element of the JSON array ``inputs``."""

    inputs: str
    concurrency: int
    task: Task


@dataclass(frozen=True)
class Task:
    """One task of a job, paths made local and ``${...}`` substituted."""

    key: str
    kind: str
    depends_on: tuple[str, ...] = ()
    run_if: str = "ALL_SUCCESS"
    job_cluster_key: str | None = None
    python_file: Path | None = None
    parameters: tuple[str, ...] = ()
    max_retries: int = 0
    min_retry_interval_millis: int = 0
    timeout_seconds: int = 0
    for_each: ForEach | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Job:
    """``resources.jobs.<key>``: its tasks in file order, parameters with their defaults, clusters."""

    key: str
    name: str
    source: Path
    tasks: tuple[Task, ...]
    parameters: Mapping[str, str]
    job_clusters: Mapping[str, Mapping[str, Any]]
    schedule: Mapping[str, Any] | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    def task(self, key: str) -> Task:
        for t in self.tasks:
            if t.key == key:
                return t
        raise BundleError(f"job {self.key!r} has no task {key!r} (tasks: {', '.join(self.task_keys())})")

    def task_keys(self) -> list[str]:
        return [t.key for t in self.tasks]

    def all_tasks(self) -> Iterator[Task]:
        """Every task, the tasks nested in ``for_each_task`` included."""
        for t in self.tasks:
            yield t
            if t.for_each is not None:
                yield t.for_each.task


@dataclass(frozen=True)
class Bundle:
    """A bundle resolved for one target."""

    name: str
    root: Path
    root_file: Path
    sync_root: Path
    target: str
    mode: str | None
    run_as: Mapping[str, Any] | None
    variables: Mapping[str, Any]
    jobs: Mapping[str, Job]
    config: Mapping[str, Any] = field(repr=False)
    targets: Mapping[str, Mapping[str, Any]] = field(repr=False)
    files: tuple[Path, ...] = ()
    root_path: str = ""           # workspace.root_path as resolved for this target

    def job(self, key: str) -> Job:
        if key not in self.jobs:
            raise BundleError(f"bundle {self.name!r} has no job {key!r} (jobs: {', '.join(self.jobs) or 'none'})")
        return self.jobs[key]

    def display(self, path: Path | str) -> str:
        """A path relative to the sync root (the repository), for messages."""
        try:
            return str(Path(path).resolve().relative_to(self.sync_root))
        except ValueError:
            return str(path)


# --------------------------------------------------------------------------- reading


def find_root_file(path: str | Path) -> Path:
    """``path`` is the bundle folder (holding databricks.yml) or the root file itself."""
    p = Path(path)
    if p.is_file():
        return p.resolve()
    for name in ROOT_FILES:
        if (p / name).is_file():
            return (p / name).resolve()
    raise BundleError(f"no bundle at {p}: expected {' or '.join(str(p / n) for n in ROOT_FILES)}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BundleError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise BundleError(f"{path}: the top level must be a mapping")
    return doc


def read_bundle_files(path: str | Path) -> tuple[Path, dict[str, Any], list[Path]]:
    """The root file, its configuration merged with every included file, and the files read.

    Relative paths are made absolute against the file that holds them; a resource defined in two
    files is an error, as it is for the Databricks CLI.
    """
    root_file = find_root_file(path)
    root_dir = root_file.parent
    root = read_yaml(root_file)
    _localize(root, root_file.parent)
    files = [root_file]
    includes = root.get("include") or []
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise BundleError(f"{root_file}: 'include' must be a list of file globs")
    origins: dict[tuple[str, str], Path] = {}
    _record_resources(root, root_file, origins)
    for pattern in includes:
        matches = sorted(Path(m).resolve() for m in glob.glob(str(root_dir / pattern), recursive=True))
        if not matches:
            raise BundleError(f"{root_file}: include {pattern!r} matches no file")
        for inc in matches:
            if inc in files:
                continue
            doc = read_yaml(inc)
            _localize(doc, inc.parent)
            _record_resources(doc, inc, origins)
            _merge_include(root, doc, inc)
            files.append(inc)
    root["__origins__"] = {f"{kind}.{key}": str(src) for (kind, key), src in origins.items()}
    return root_file, root, files


def _record_resources(doc: Mapping[str, Any], source: Path, origins: dict[tuple[str, str], Path]) -> None:
    resources = doc.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise BundleError(f"{source}: 'resources' must be a mapping")
    for kind, items in resources.items():
        if not isinstance(items, Mapping):
            raise BundleError(f"{source}: 'resources.{kind}' must be a mapping of resource keys")
        for key in items:
            if (kind, key) in origins:
                raise BundleError(f"{source}: resources.{kind}.{key} is already defined in {origins[kind, key]}")
            origins[kind, key] = source


def _merge_include(root: dict[str, Any], doc: Mapping[str, Any], source: Path) -> None:
    for key, value in doc.items():
        if key in ("bundle", "include"):
            raise BundleError(f"{source}: '{key}' may only be set in the root databricks.yml")
        if isinstance(value, Mapping) and isinstance(root.get(key), dict):
            _deep_merge(root[key], value)
        else:
            root[key] = copy.deepcopy(value)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any], keyed_lists: bool = False) -> None:
    """Mappings merge key by key; with ``keyed_lists``, lists of tasks / job clusters merge by key."""
    for key, value in top.items():
        old = base.get(key)
        if isinstance(value, Mapping) and isinstance(old, dict):
            _deep_merge(old, value, keyed_lists)
        elif keyed_lists and key in ("tasks", "job_clusters") and isinstance(value, list) \
                and isinstance(old, list):
            base[key] = _merge_keyed(old, value, "task_key" if key == "tasks" else "job_cluster_key")
        else:
            base[key] = copy.deepcopy(value)


def _merge_keyed(old: list[Any], new: list[Any], id_key: str) -> list[Any]:
    out = [copy.deepcopy(o) for o in old]
    index = {o.get(id_key): i for i, o in enumerate(out) if isinstance(o, dict)}
    for item in new:
        if isinstance(item, Mapping) and item.get(id_key) in index:
            _deep_merge(out[index[item[id_key]]], item, keyed_lists=True)
        else:
            out.append(copy.deepcopy(item))
    return out


def _localize_path(value: Any, base: Path) -> Any:
    if not isinstance(value, str) or not value or "${" in value or "://" in value or value.startswith(
            ("/Workspace", "/Volumes", "/dbfs", "dbfs:")):
        return value
    p = Path(value)
    return str(p if p.is_absolute() else (base / p).resolve())


def _localize_task(task: Any, base: Path) -> None:
    if not isinstance(task, dict):
        return
    spt = task.get("spark_python_task")
    if isinstance(spt, dict) and spt.get("source", "WORKSPACE") != "GIT":
        spt["python_file"] = _localize_path(spt.get("python_file"), base)
    nbt = task.get("notebook_task")
    if isinstance(nbt, dict):
        nbt["notebook_path"] = _localize_path(nbt.get("notebook_path"), base)
    libs = task.get("libraries")
    if isinstance(libs, list):
        for lib in libs:
            if isinstance(lib, dict):
                for kind in ("whl", "jar", "requirements"):
                    if kind in lib:
                        lib[kind] = _localize_path(lib[kind], base)
    fe = task.get("for_each_task")
    if isinstance(fe, dict):
        _localize_task(fe.get("task"), base)


def _localize(doc: dict[str, Any], base: Path) -> None:
    """Relative paths in one file become absolute, against that file's folder (as the CLI does).

    Idempotent, so a YAML anchor shared by several tasks of the file may be visited more than once.
    """
    for section in _sections_with_paths(doc):
        resources = section.get("resources")
        jobs = resources.get("jobs") if isinstance(resources, dict) else None
        if isinstance(jobs, dict):
            for job in jobs.values():
                if isinstance(job, dict) and isinstance(job.get("tasks"), list):
                    for task in job["tasks"]:
                        _localize_task(task, base)
        artifacts = section.get("artifacts")
        if isinstance(artifacts, dict):
            for art in artifacts.values():
                if isinstance(art, dict) and "path" in art:
                    art["path"] = _localize_path(art["path"], base)
        sync = section.get("sync")
        if isinstance(sync, dict) and isinstance(sync.get("paths"), list):
            sync["paths"] = [_localize_path(p, base) for p in sync["paths"]]


def _sections_with_paths(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield doc
    targets = doc.get("targets")
    if isinstance(targets, dict):
        for t in targets.values():
            if isinstance(t, dict):
                yield t


# --------------------------------------------------------------------------- resolving


def default_target(config: Mapping[str, Any]) -> str:
    targets = config.get("targets") or {}
    defaults = [name for name, t in targets.items() if isinstance(t, Mapping) and t.get("default") is True]
    if len(defaults) == 1:
        return str(defaults[0])
    if not targets:
        raise BundleError("the bundle defines no targets")
    if len(targets) == 1:
        return str(next(iter(targets)))
    raise BundleError("no target given and the bundle does not mark exactly one target 'default: true' "
                      f"(targets: {', '.join(targets)})")


def resolve_variables(config: Mapping[str, Any], target: str,
                      overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Variable values for ``target``: --var, then BUNDLE_VAR_<name>, then the target, then the default.

    A ``lookup`` (resolved by the workspace at deploy time) cannot be resolved offline: its value is
    the text ``lookup:<kind>:<name>``.
    """
    defs = config.get("variables") or {}
    if not isinstance(defs, Mapping):
        raise BundleError("'variables' must be a mapping of variable definitions")
    target_cfg = (config.get("targets") or {}).get(target) or {}
    target_vars = target_cfg.get("variables") or {}
    problems = [f"target {target!r} sets variable {name!r}, which is not declared in 'variables'"
                for name in target_vars if name not in defs]
    for name in overrides or {}:
        if name not in defs:
            problems.append(f"--var {name}: the bundle declares no variable {name!r}")
    values: dict[str, Any] = {}
    for name, spec in defs.items():
        spec = spec if isinstance(spec, Mapping) else {"default": spec}
        env_name = f"BUNDLE_VAR_{name}"
        if overrides and name in overrides:
            values[name] = overrides[name]
        elif env_name in os.environ:
            values[name] = os.environ[env_name]
        elif name in target_vars:
            values[name] = _variable_value(target_vars[name], f"targets.{target}.variables.{name}")
        elif "default" in spec:
            values[name] = spec["default"]
        elif "lookup" in spec:
            values[name] = _variable_value({"lookup": spec["lookup"]}, f"variables.{name}")
        else:
            problems.append(f"variable {name!r} has no value for target {target!r}: give it a default, set "
                            f"it in the target, pass --var {name}=... or set {env_name}")
    if problems:
        raise BundleError(problems)
    return values


def _variable_value(value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        return value
    if "default" in value:
        return value["default"]
    if "lookup" in value and isinstance(value["lookup"], Mapping) and len(value["lookup"]) == 1:
        kind, name = next(iter(value["lookup"].items()))
        return f"lookup:{kind}:{name}"
    raise BundleError(f"{where}: expected a value, {{default: ...}} or {{lookup: {{<kind>: <name>}}}}")


def sync_root(root_dir: Path, config: Mapping[str, Any]) -> Path:
    """Where the synced files are rooted: the common folder of the bundle root and ``sync.paths``."""
    paths = [str(root_dir)]
    sync = config.get("sync") or {}
    for p in (sync.get("paths") or []) if isinstance(sync, Mapping) else []:
        if isinstance(p, str) and "${" not in p:
            paths.append(str(Path(p).resolve()))
    return Path(os.path.commonpath(paths))


def interpolate(value: Any, context: Mapping[str, Any], where: str = "", problems: list[str] | None = None) -> Any:
    """Substitute ``${name}`` references; a string that is one whole reference keeps the value's type."""
    problems = problems if problems is not None else []
    if isinstance(value, Mapping):
        return {k: interpolate(v, context, f"{where}.{k}" if where else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, context, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _VAR_RE.fullmatch(value)
    if whole:
        name = whole.group(1)
        if name in context:
            return context[name]
        problems.append(f"{where}: unknown reference ${{{name}}}")
        return value

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in context:
            return str(context[name])
        problems.append(f"{where}: unknown reference ${{{name}}}")
        return m.group(0)

    return _VAR_RE.sub(sub, value)


def load_bundle(path: str | Path = "workflows", target: str | None = None,
                variables: Mapping[str, str] | None = None) -> Bundle:
    """Read the bundle at ``path`` and resolve it for ``target`` (default: the bundle's default target)."""
    root_file, config, files = read_bundle_files(path)
    origins: dict[str, str] = config.pop("__origins__")
    bundle_cfg = config.get("bundle") or {}
    name = bundle_cfg.get("name") if isinstance(bundle_cfg, Mapping) else None
    if not isinstance(name, str) or not name:
        raise BundleError(f"{root_file}: 'bundle.name' is required")
    targets = config.get("targets") or {}
    if not isinstance(targets, Mapping) or not all(isinstance(t, Mapping) or t is None for t in targets.values()):
        raise BundleError(f"{root_file}: 'targets' must be a mapping of target names to settings")
    target = target or default_target(config)
    if target not in targets:
        raise BundleError(f"{root_file}: unknown target {target!r} (targets: {', '.join(targets) or 'none'})")
    target_cfg: Mapping[str, Any] = targets[target] or {}
    values = resolve_variables(config, target, variables)

    merged = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("targets", "variables", "include")}
    for key, value in target_cfg.items():
        if key in _TARGET_ONLY:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            _deep_merge(merged[key], value, keyed_lists=True)
        else:
            merged[key] = copy.deepcopy(value)

    root_dir = root_file.parent
    files_root = sync_root(root_dir, merged)
    user = getpass.getuser()
    context: dict[str, Any] = {"bundle.name": name, "bundle.target": target,
                               "workspace.current_user.userName": user,
                               "workspace.current_user.short_name": re.sub(r"[^A-Za-z0-9_]", "_", user),
                               "workspace.file_path": str(files_root)}
    problems: list[str] = []
    # Variables may refer to each other and to bundle/workspace values: resolve them first.
    var_ctx = dict(context)
    for _ in range(10):
        var_ctx.update({f"var.{k}": v for k, v in values.items()})
        resolved = {k: interpolate(v, var_ctx, f"variables.{k}", []) for k, v in values.items()}
        if resolved == values:
            break
        values = resolved
    interpolate(values, var_ctx, "variables", problems)  # what is still unresolved is unknown
    context.update({f"var.{k}": v for k, v in values.items()})
    workspace = merged.get("workspace") or {}
    root_path = workspace.get("root_path") if isinstance(workspace, Mapping) else None
    context["workspace.root_path"] = interpolate(
        root_path or f"/Workspace/Users/{user}/.bundle/{name}/{target}", context, "workspace.root_path", problems)
    context["workspace.artifact_path"] = f"{context['workspace.root_path']}/artifacts"
    merged = interpolate(merged, context, "", problems)
    if problems:
        raise BundleError([f"target {target!r}: {p}" for p in dict.fromkeys(problems)])

    jobs_cfg = (merged.get("resources") or {}).get("jobs") or {}
    jobs: dict[str, Job] = {}
    for key, raw in jobs_cfg.items():
        source = Path(origins.get(f"jobs.{key}", str(root_file)))
        jobs[key] = build_job(key, raw, source, problems)
    if problems:
        raise BundleError(problems)
    mode = target_cfg.get("mode")
    run_as = merged.get("run_as")
    return Bundle(name=name, root=root_dir, root_file=root_file, sync_root=files_root, target=target,
                  mode=str(mode) if mode is not None else None,
                  run_as=run_as if isinstance(run_as, Mapping) else None, variables=values, jobs=jobs,
                  config=merged, targets={k: dict(v or {}) for k, v in targets.items()}, files=tuple(files),
                  root_path=str(context["workspace.root_path"]))


# --------------------------------------------------------------------------- model


def build_job(key: str, raw: Any, source: Path, problems: list[str]) -> Job:
    """The typed view of one job; structural problems (missing or mistyped keys) go to ``problems``."""
    where = f"{source.name}: job {key!r}"
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be a mapping")
        return Job(key, key, source, (), {}, {}, None, {})
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{where}: 'name' is required")
    params: dict[str, str] = {}
    for i, p in enumerate(_list(raw.get("parameters"), f"{where}: parameters", problems)):
        if not isinstance(p, Mapping) or not isinstance(p.get("name"), str):
            problems.append(f"{where}: parameters[{i}] needs a 'name'")
            continue
        if "default" not in p:
            problems.append(f"{where}: parameter {p['name']!r} needs a 'default' (job parameters always have one)")
        if p["name"] in params:
            problems.append(f"{where}: parameter {p['name']!r} is declared twice")
        params[p["name"]] = "" if p.get("default") is None else str(p.get("default"))
    clusters: dict[str, Mapping[str, Any]] = {}
    for i, c in enumerate(_list(raw.get("job_clusters"), f"{where}: job_clusters", problems)):
        ck = c.get("job_cluster_key") if isinstance(c, Mapping) else None
        if not isinstance(ck, str) or not ck:
            problems.append(f"{where}: job_clusters[{i}] needs a 'job_cluster_key'")
            continue
        if ck in clusters:
            problems.append(f"{where}: job cluster {ck!r} is defined twice")
        clusters[ck] = c
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        problems.append(f"{where}: 'tasks' must be a non-empty list")
        tasks_raw = []
    tasks = [t for i, r in enumerate(tasks_raw) if (t := build_task(r, where, f"tasks[{i}]", problems))]
    schedule = raw.get("schedule")
    if schedule is not None and not isinstance(schedule, Mapping):
        problems.append(f"{where}: 'schedule' must be a mapping")
        schedule = None
    return Job(key=key, name=str(name or key), source=source, tasks=tuple(tasks), parameters=params,
               job_clusters=clusters, schedule=schedule, raw=raw)


def build_task(raw: Any, job_where: str, label: str, problems: list[str], parent: str | None = None) -> Task | None:
    """``label`` names the task until its key is known (``tasks[3]``); ``parent`` is a for_each's key."""
    nested = parent is not None
    if not isinstance(raw, Mapping):
        problems.append(f"{job_where} {label}: a task must be a mapping")
        return None
    key = raw.get("task_key")
    if not isinstance(key, str) or not key:
        problems.append(f"{job_where} {label}: 'task_key' is required")
        return None
    where = f"{job_where} task {parent!r} > {key!r}" if nested else f"{job_where} task {key!r}"
    kinds = [k for k in TASK_TYPES if k in raw]
    if len(kinds) != 1:
        problems.append(f"{where}: needs exactly one task type ({', '.join(SUPPORTED_TASK_TYPES)}), has "
                        f"{', '.join(kinds) or 'none'}")
        return None
    kind = kinds[0]
    deps: list[str] = []
    for d in _list(raw.get("depends_on"), f"{where}: depends_on", problems):
        if isinstance(d, Mapping) and isinstance(d.get("task_key"), str):
            deps.append(d["task_key"])
        else:
            problems.append(f"{where}: depends_on entries are {{task_key: <key>}}, got {d!r}")
    run_if = raw.get("run_if", "ALL_SUCCESS")
    if run_if not in RUN_IF:
        problems.append(f"{where}: run_if {run_if!r} is not one of {', '.join(RUN_IF)}")
    body = raw[kind]
    if not isinstance(body, Mapping):
        problems.append(f"{where}: '{kind}' must be a mapping")
        return None
    python_file: Path | None = None
    params: tuple[str, ...] = ()
    for_each: ForEach | None = None
    if kind == "spark_python_task":
        pf = body.get("python_file")
        if not isinstance(pf, str) or not pf:
            problems.append(f"{where}: spark_python_task.python_file is required")
        else:
            python_file = Path(pf)
        plist = _list(body.get("parameters"), f"{where}: spark_python_task.parameters", problems)
        if not all(isinstance(p, str | int | float) for p in plist):
            problems.append(f"{where}: spark_python_task.parameters must be a list of strings")
        params = tuple(str(p) for p in plist)
    elif kind == "for_each_task":
        if nested:
            problems.append(f"{where}: a for_each_task cannot be nested in another")
            return None
        inputs = body.get("inputs")
        if isinstance(inputs, list):  # the CLI accepts a YAML list and sends it as JSON
            inputs = json.dumps(inputs)
        if not isinstance(inputs, str) or not inputs:
            problems.append(f"{where}: for_each_task.inputs is required (a JSON array or a reference to one)")
        inner = build_task(body.get("task"), where, "for_each_task.task", problems, parent=key) \
            if body.get("task") is not None else None
        if body.get("task") is None:
            problems.append(f"{where}: for_each_task.task is required")
        concurrency = _int(body.get("concurrency", 1), f"{where}: for_each_task.concurrency", problems)
        if inner is not None and isinstance(inputs, str):
            for_each = ForEach(inputs=inputs, concurrency=concurrency, task=inner)
    return Task(key=key, kind=kind, depends_on=tuple(deps), run_if=str(run_if),
                job_cluster_key=raw.get("job_cluster_key"), python_file=python_file, parameters=params,
                max_retries=_int(raw.get("max_retries", 0), f"{where}: max_retries", problems),
                min_retry_interval_millis=_int(raw.get("min_retry_interval_millis", 0),
                                               f"{where}: min_retry_interval_millis", problems),
                timeout_seconds=_int(raw.get("timeout_seconds", 0), f"{where}: timeout_seconds", problems),
                for_each=for_each, raw=raw)


def _list(value: Any, where: str, problems: list[str]) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"{where} must be a list")
        return []
    return value


def _int(value: Any, where: str, problems: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        problems.append(f"{where} must be an integer, got {value!r}")
        return 0
    try:
        return int(value)
    except ValueError:
        problems.append(f"{where} must be an integer, got {value!r}")
        return 0
