"""``tenantml workflow run|validate``: the bundle's jobs from the command line, without a workspace.

Kept out of ``tenantml/cli.py`` (which only registers and dispatches) so the workflow commands can
change without touching the step commands.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from localbundle.bundle import BundleError, load_bundle
from localbundle.runner import JobRun, TaskRun, run_job
from localbundle.validation import bundle_schema_available, validate_bundle
from tenantml.core.errors import EXIT_OK, EXIT_USAGE, TenantMLError
from tenantml.core.progress import NullProgress, Progress


def add_workflow_commands(sub: Any) -> None:
    """Register ``run`` and ``validate`` on a parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bundle", default=os.environ.get("TENANTML_BUNDLE_DIR", "workflows"),
                        help="bundle folder holding databricks.yml (default: ./workflows)")
    common.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="set a bundle variable, as `databricks bundle --var` does (repeatable)")
    common.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress output")

    wsub = sub
    run = wsub.add_parser("run", parents=[common],
                          help="run a bundle job's tasks in dependency order on the embedded default")
    run.add_argument("job_key", help="resources.jobs key, e.g. nightly")
    run.add_argument("-t", "--target", default=None, help="bundle target (default: the bundle's default)")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="job parameter for this run, e.g. --param tenants=t000,t001 (repeatable)")
    run.add_argument("--only", default=None, help="comma-separated task keys to run; the others are excluded")
    run.add_argument("--env", default="local",
                     help="config environment every task uses (default: local, whatever the target)")
    run.add_argument("--data-dir", default=None,
                     help="project data directory for every task (default: TENANTML_DATA_DIR or project.data_dir)")
    run.add_argument("--conf-dir", default=None, help="config folder (default: the bundle's, i.e. the repo's conf/)")
    run.add_argument("--isolation", choices=["inline", "process"], default="inline",
                     help="run each task in this process (one shared Spark) or as a child process")
    run.add_argument("--run-id", default=None, help="the job run id ({{job.run_id}}; default: a new one)")
    wsub.add_parser("validate", parents=[common], help="check the bundle offline: graph, entry points, "
                                                       "parameters, config, schedule")


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, eq, value = v.partition("=")
        if not eq or not name:
            raise BundleError(f"{flag} {v!r}: expected NAME=VALUE")
        out[name] = value
    return out


def workflow_command(args: argparse.Namespace, progress: Progress | None = None) -> int:
    """Run ``workflow <run|validate>``; returns the exit code."""
    variables = _pairs(args.var, "--var")
    if args.workflow_command == "validate":
        return _validate(args, variables)
    from tenantml.core.ids import validate_run_id

    bundle = load_bundle(args.bundle, args.target, variables)
    if args.run_id:
        try:
            validate_run_id(args.run_id, where="--run-id")
        except TenantMLError as exc:
            raise BundleError(str(exc)) from None
    only = [k.strip() for k in args.only.split(",") if k.strip()] if args.only else None
    run = run_job(bundle, args.job_key, params=_pairs(args.param, "--param"), env=args.env or None,
                  data_dir=args.data_dir, conf_dir=args.conf_dir, isolation=args.isolation, only=only,
                  progress=progress or NullProgress(), run_id=args.run_id)
    if args.json:
        print(json.dumps(run.to_dict(), indent=2, default=str))
    else:
        print_summary(run)
    return run.exit_code


def _validate(args: argparse.Namespace, variables: dict[str, str]) -> int:
    issues = validate_bundle(args.bundle, variables)
    schema = bundle_schema_available()
    if args.json:
        print(json.dumps({"status": "ok" if not issues else "invalid", "schema_checked": schema,
                          "issues": [str(i) for i in issues]}, indent=2))
    else:
        for issue in issues:
            print(issue)
        if not schema:
            print("note: the bundle schema check was skipped (pip install databricks-bundles)")
        print(f"{args.bundle}: {'valid' if not issues else f'{len(issues)} problem(s)'}")
    return EXIT_OK if not issues else EXIT_USAGE


def _detail(t: TaskRun) -> str:
    if t.message:
        return t.message
    parts = []
    for s in t.steps:
        counts = ", ".join(f"{s[f'tenants_{k}']} {k}" for k in ("ok", "skipped", "blocked", "failed")
                           if s.get(f"tenants_{k}"))
        extra = ", ".join(f"{k}={s[k]}" for k in ("models_trained", "rows_scored") if s.get(k))
        parts.append(f"{s['step']} {s['status']}: " + "; ".join(p for p in (counts, extra) if p))
    return " | ".join(parts)


def print_summary(run: JobRun) -> None:
    """One row per task (and per for_each iteration): status, attempts, exit code, seconds, detail."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"workflow {run.job_key} ({run.target}) run {run.run_id}: {run.status}")
    for col in ("task", "status", "attempts", "exit", "s", "detail"):
        table.add_column(col, justify="right" if col in ("attempts", "exit", "s") else "left")
    colours = {"success": "green", "failed": "red", "upstream_failed": "yellow"}

    def row(t: TaskRun, indent: str = "") -> None:
        status = f"[{colours[t.status]}]{t.status}[/]" if t.status in colours else t.status
        table.add_row(indent + t.task_key, status, str(t.attempts or ""),
                      "" if t.exit_code is None else str(t.exit_code), f"{t.seconds:.0f}" if t.attempts else "",
                      _detail(t))

    for t in run.tasks:
        row(t)
        for it in t.iterations:
            row(it, "  ")
    Console().print(table)
    if run.exit_code != EXIT_OK:
        failed = [t.task_key for t in run.tasks if t.status == "failed"]
        Console(stderr=True).print(f"[red]workflow {run.job_key} failed[/]: {', '.join(failed)}")


def main(argv: Sequence[str] | None = None) -> int:
    """The tool's command line: `workflow.py run JOB ...` or `workflow.py validate`."""
    import logging
    import sys

    parser = argparse.ArgumentParser(prog="workflow.py", description="run or validate the Databricks "
                                                                     "bundle in workflows/ locally")
    sub = parser.add_subparsers(dest="workflow_command", required=True)
    add_workflow_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("TENANTML_LOG_LEVEL", "WARNING"))
    from tenantml.apps.cli import RichProgress

    try:
        return workflow_command(args, RichProgress(enabled=not args.quiet))
    except TenantMLError as exc:
        print(f"workflow: error: {exc}", file=sys.stderr)
        return exc.exit_code


__all__ = ["add_workflow_commands", "main", "print_summary", "workflow_command"]
