"""The step list exists once (the registry); every entry point agrees with it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tenantml.core.errors import ConfigError
from tenantml.steps.base import STEP_MODULES, Step, StepOutput, pipeline_order, registry
from tenantml.steps.runner import pipeline_steps

REPO = Path(__file__).resolve().parents[2]


def test_registry_holds_every_step_module_once_in_dependency_order() -> None:
    reg = registry()
    assert set(reg) == set(STEP_MODULES)
    order = pipeline_order()
    assert order == ("ingest", "ingest_scoring", "validate", "validate_scoring", "monitor", "train_shared", "train",
                     "train_tuned", "promote", "score", "publish")
    for i, name in enumerate(order):  # every step runs after the steps it declares
        assert set(reg[name].after) <= set(order[:i]), name
    assert {n for n, s in reg.items() if s.measured} == {"train", "train_tuned", "score"}
    assert {n for n, s in reg.items() if s.gated} == {"train", "train_tuned", "promote"}


def test_jobs_folder_has_one_entry_per_step_and_nothing_else() -> None:
    found = {}
    for path in sorted((REPO / "jobs").glob("*.py")):
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "job_main"]
        assert len(calls) == 1, path
        found[path.stem] = calls[0].args[0].value  # type: ignore[attr-defined]
    assert found == {**{n: n for n in registry()}, "pipeline": "pipeline"}


def test_cli_has_a_subcommand_per_step_with_its_options() -> None:
    from tenantml.apps.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, step in registry().items():
        cmd = sub.choices[step.command]  # type: ignore[index]
        dests = {a.dest for a in cmd._actions}
        assert {o.dest for o in step.options} <= dests, name
        assert ("resume" in dests) == step.resumable, name
    pipe = sub.choices["pipeline"]  # type: ignore[index]
    start = next(a for a in pipe._actions if a.dest == "from_step")
    assert list(start.choices) == [registry()[n].command for n in pipeline_order()]


def test_nightly_bundle_tasks_follow_the_registry() -> None:
    """Each task runs a registered step, and depends (transitively) on the tasks of the steps
    that step runs after."""
    from localbundle import load_bundle
    from localbundle.validation import entry_step

    job = load_bundle(REPO / "workflows", "prod").jobs["nightly"]
    reg = registry()
    step_of: dict[str, str] = {}
    for task in job.all_tasks():
        if task.python_file is None:
            continue
        step, problem = entry_step(task.python_file)
        assert step is not None, (task.key, problem)
        step_of[task.key] = step
    deps = {t.key: set(t.depends_on) for t in job.tasks}
    for t in job.tasks:  # a for_each task runs its nested task's step
        if t.for_each is not None:
            step_of[t.key] = step_of[t.for_each.task.key]

    def upstream(key: str) -> set[str]:
        out: set[str] = set()
        for d in deps.get(key, ()):
            out |= {d} | upstream(d)
        return out

    assert set(step_of.values()) >= set(pipeline_order()), "every pipeline step is a task of the nightly job"
    for key in deps:
        step = reg[step_of[key]]
        before = {step_of[k] for k in upstream(key)}
        assert set(step.after) <= before, (key, step.after, before)


def test_report_orders_steps_by_the_registry() -> None:
    from tenantml.apps.report import RunReport, _steps_section

    rows = [{"step": s, "tenant_id": "t1", "status": "ok", "rows_in": 1, "rows_out": 1, "rows_quarantined": 0}
            for s in reversed(pipeline_order())]
    html = _steps_section(RunReport(run_id="r", dataset="d", generated_at=None, run_log=rows))  # type: ignore[arg-type]
    positions = [html.index(f"<td>{s}</td>") for s in pipeline_order()]
    assert positions == sorted(positions)


def test_pipeline_steps_slices_and_rejects_unknown_steps() -> None:
    assert pipeline_steps(start="promote") == ("promote", "score", "publish")
    assert pipeline_steps(stop="validate") == ("ingest", "ingest_scoring", "validate")
    with pytest.raises(ConfigError, match="--from 'trian': not a pipeline step"):
        pipeline_steps(start="trian")


def test_a_cycle_in_after_is_reported() -> None:
    def noop(scope: object) -> StepOutput:
        return StepOutput()

    a = Step(name="a", help="", after=("b",), reads=(), writes=(), eligibility="own", run=noop)  # type: ignore[arg-type]
    b = Step(name="b", help="", after=("a",), reads=(), writes=(), eligibility="own", run=noop)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cycle"):
        pipeline_order({"a": a, "b": b})
