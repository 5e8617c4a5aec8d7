"""Entry point shared by the files in jobs/ and by Databricks workflow tasks.

A job is one step: parse the standard arguments, build the context, run, exit with the step's code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from tenantml.core.errors import EXIT_PARTIAL, TenantMLError


def build_parser(step: str) -> argparse.ArgumentParser:
    """The arguments every job accepts; workflow validation parses task parameters with this parser."""
    p = argparse.ArgumentParser(prog=f"tenantml-job-{step}")
    p.add_argument("--conf-dir", default="conf")
    p.add_argument("--env", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--tenants", default="", help="comma-separated tenant ids; empty for all")
    p.add_argument("--run-id", default=None, help="shared by every task of one workflow run")
    p.add_argument("--on-partial", choices=["fail", "continue"], default="fail",
                   help="continue: a step where only some tenants failed exits 0 (their failures are in "
                        "run_log and downstream steps of the run skip them); the tasks of a workflow use it")
    p.add_argument("--resume-failed", action="store_true",
                   help="when this run already ran the step (a task retry), rerun only its failed tenants")
    return p


def job_main(step: str, argv: Sequence[str] | None = None) -> int:
    from tenantml.apps.report import run_pipeline_reported
    from tenantml.core.ids import validate_run_id, validate_tenant_ids
    from tenantml.io.context import JobContext
    from tenantml.steps.runner import run_step

    args = build_parser(step).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ctx = JobContext.create(conf_dir=args.conf_dir, env=args.env, data_dir=args.data_dir,
                                run_id=validate_run_id(args.run_id) if args.run_id else None)
        tenants = validate_tenant_ids([t for t in args.tenants.split(",") if t.strip()]) or None
        if step == "pipeline":
            results = run_pipeline_reported(ctx, dataset=args.dataset, tenants=tenants)
        else:
            results = [run_step(ctx, step, dataset=args.dataset, tenants=tenants,
                                resume="auto" if args.resume_failed else None)]
    except TenantMLError as exc:
        print(f"tenantml {step}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for r in results:
        print(json.dumps(r.to_dict(), default=str))
    code = max((r.exit_code for r in results), default=0)
    if code == EXIT_PARTIAL and args.on_partial == "continue":
        failed = sorted({str(t.tenant_id) for r in results for t in r.tenants if t.status == "failed"})
        print(f"tenantml {step}: {len(failed)} tenant(s) failed and are skipped downstream: "
              f"{', '.join(failed[:20])}", file=sys.stderr)
        return 0
    return code
