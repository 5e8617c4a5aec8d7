"""The Databricks bundle in workflows/: loading, offline validation, and the local runner's semantics.

No Spark here: the runner tests use job runs that fail before any Spark work (an unknown dataset is
refused while the config loads) and a tiny synthetic bundle whose tasks only exit with a code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from localbundle import BundleError, bundle_schema_available, load_bundle, run_job, validate_bundle
from localbundle.cli import main as workflow_main
from localbundle.runner import override_args, substitute, topological_order
from localbundle.validation import entry_step, find_cycle, quartz_cron_problems

from tenantml.apps.jobs import build_parser
from tenantml.steps.runner import pipeline_steps

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "workflows"
JOB_FILE = Path("workflows/resources/nightly.job.yml")


@pytest.fixture()
def repo_copy(tmp_path: Path) -> Path:
    """What the bundle needs of the repository: workflows/, jobs/, conf/ and pyproject.toml (the wheel)."""
    for d in ("workflows", "jobs", "conf"):
        shutil.copytree(REPO / d, tmp_path / d)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _edit(root: Path, rel: Path | str, change: Callable[[dict[str, Any]], None]) -> None:
    path = root / rel
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _task(doc: dict[str, Any], key: str) -> dict[str, Any]:
    tasks: list[dict[str, Any]] = doc["resources"]["jobs"]["nightly"]["tasks"]
    return next(t for t in tasks if t["task_key"] == key)


def _messages(root: Path) -> list[str]:
    return [str(i) for i in validate_bundle(root / "workflows")]


# --------------------------------------------------------------------------- the real bundle


def test_real_bundle_is_valid_for_every_target() -> None:
    assert bundle_schema_available(), "databricks-bundles (dev extra) provides the bundle schema check"
    assert [str(i) for i in validate_bundle(BUNDLE)] == []


def test_targets_resolve_variables_modes_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = load_bundle(BUNDLE)
    prod = load_bundle(BUNDLE, "prod")
    assert (dev.target, dev.mode, dev.run_as) == ("dev", "development", None)
    assert prod.mode == "production"
    assert prod.run_as == {"service_principal_name": "lookup:service_principal:tenantml-prod"}
    ingest = {b.target: b.job("nightly").task("ingest") for b in (dev, prod)}
    for target, task in ingest.items():
        args = vars(build_parser("ingest").parse_args(task.parameters))
        args = {"--" + k.replace("_", "-"): v for k, v in args.items()}
        assert args["--on-partial"] == "continue" and args["--resume-failed"] is True
        assert args["--env"] == target
        assert args["--conf-dir"] == str(REPO / "conf")  # ${workspace.file_path} is the sync root locally
        assert args["--data-dir"] == f"/Volumes/{target}/tenantml/files/tenantml"
        assert args["--run-id"] == "{{job.parameters.run_id}}"
        assert task.python_file == REPO / "jobs" / "ingest.py"
    gpu = {b.target: b.job("nightly").job_clusters["gpu"]["new_cluster"] for b in (dev, prod)}
    assert gpu["dev"]["num_workers"] == 1 and gpu["prod"]["num_workers"] == 4  # ints, not strings
    assert "gpu-ml" in gpu["prod"]["spark_version"]
    monkeypatch.setenv("BUNDLE_VAR_dataset", "mlc_churn")
    assert load_bundle(BUNDLE).job("nightly").name == "tenantml-nightly-mlc_churn"
    assert load_bundle(BUNDLE, variables={"dataset": "orders"}).job("nightly").parameters["dataset"] == "orders"
    with pytest.raises(BundleError, match="declares no variable 'nope'"):
        load_bundle(BUNDLE, variables={"nope": "1"})
    with pytest.raises(BundleError, match="unknown target 'staging'"):
        load_bundle(BUNDLE, "staging")


def test_nightly_graph_runs_every_step_through_its_job_file() -> None:
    job = load_bundle(BUNDLE).job("nightly")
    order = [t.key for t in topological_order(job)]
    assert order == ["ingest", "ingest_scoring", "validate", "validate_scoring", "monitor", "train_shared", "train",
                     "train_tuned", "promote", "score", "publish"]
    deps = {t.key: set(t.depends_on) for t in job.tasks}
    assert deps["validate_scoring"] == {"ingest_scoring", "validate"} and deps["monitor"] == {"validate_scoring"}
    assert deps["train"] == {"monitor"} and deps["train_shared"] == {"monitor"}
    assert deps["train_tuned"] == {"train_shared"} and deps["promote"] == {"train", "train_tuned"}
    assert job.task("train_shared").job_cluster_key == "gpu"
    assert {t.job_cluster_key for t in job.all_tasks() if t.key != "train_shared"} <= {"cpu", None}
    score = job.task("score")
    assert score.for_each is not None and score.for_each.inputs == "{{job.parameters.tenant_batches}}"
    assert "{{input}}" in score.for_each.task.parameters
    assert set(job.parameters) >= {"dataset", "run_id", "tenants"} and job.schedule is not None
    steps = {entry_step(t.python_file)[0] for t in job.all_tasks() if t.python_file is not None}
    assert steps == set(pipeline_steps())  # a step added to the pipeline must be added to the workflow
    for step in pipeline_steps():
        assert entry_step(REPO / "jobs" / f"{step}.py") == (step, None)


# --------------------------------------------------------------------------- broken copies


def _nightly(change: Callable[[dict[str, Any]], None]) -> tuple[Path, Callable[[dict[str, Any]], None]]:
    return JOB_FILE, change


def _root(change: Callable[[dict[str, Any]], None]) -> tuple[Path, Callable[[dict[str, Any]], None]]:
    return Path("workflows/databricks.yml"), change


def _set(key: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: _task(doc, key).__setitem__(field, value)


def _params(key: str, change: Callable[[list[str]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda doc: change(_task(doc, key)["spark_python_task"]["parameters"])


def _replace(old: str, new: str) -> Callable[[list[str]], None]:
    return lambda ps: ps.__setitem__(ps.index(old), new)


BROKEN: dict[str, tuple[tuple[Path, Callable[[dict[str, Any]], None]], str]] = {
    "missing depends_on target": (
        _nightly(_set("promote", "depends_on", [{"task_key": "train_tenant"}, {"task_key": "train_tuned"}])),
        "task 'promote' depends on 'train_tenant', which is not a task of this job"),
    "cycle": (_nightly(_set("ingest", "depends_on", [{"task_key": "validate"}])),
              "depends_on has a cycle: ingest -> validate -> ingest"),
    "unknown parameter": (_nightly(_params("train", lambda ps: ps.extend(["--max-epochs", "3"]))),
                          "rejected by the job parser of 'train': tenantml-job-train: error: unrecognized "
                          "arguments: --max-epochs 3"),
    "missing python file": (
        _nightly(lambda d: _task(d, "train_tuned")["spark_python_task"].__setitem__(
            "python_file", "../../jobs/train_tune.py")),
        "task 'train_tuned': python_file jobs/train_tune.py does not exist"),
    "undefined job cluster": (_nightly(_set("train", "job_cluster_key", "cpu_large")),
                              "task 'train' uses job_cluster_key 'cpu_large', which is not defined in "
                              "job_clusters (cpu, gpu)"),
    "undeclared job parameter": (
        _nightly(_params("ingest", _replace("{{job.parameters.dataset}}", "{{job.parameters.datasets}}"))),
        "names job parameter 'datasets', which the job does not declare"),
    "input outside for_each": (
        _nightly(_params("publish", _replace("{{job.parameters.tenants}}", "{{input}}"))),
        "task 'publish': parameter '{{input}}': {{input}} is only defined inside a for_each_task"),
    "invalid cron": (
        _nightly(lambda d: d["resources"]["jobs"]["nightly"]["schedule"].__setitem__(
            "quartz_cron_expression", "0 2 * * *")),
        "schedule '0 2 * * *': has 5 fields; Quartz cron has 6 or 7"),
    "key unknown to the bundle schema": (
        _nightly(lambda d: _task(d, "validate").__setitem__("depend_on", _task(d, "validate").pop("depends_on"))),
        "task 'validate' does not match the bundle schema: Unexpected field 'depend_on' for class Task"),
    "task without a key": (_nightly(lambda d: _task(d, "promote").pop("task_key")),
                           "nightly.job.yml: job 'nightly' tasks[8]: 'task_key' is required"),
    "duplicate task key": (_nightly(_set("train_tuned", "task_key", "train")),
                           "task key 'train' is used 2 times; task keys must be unique"),
    "no timeout": (_nightly(lambda d: _task(d, "validate").pop("timeout_seconds")),
                   "task 'validate': timeout_seconds is required"),
    "no wheel": (_nightly(lambda d: _task(d, "promote").pop("libraries")),
                 "task 'promote': installs no whl library"),
    "batches not a JSON array": (
        _nightly(lambda d: d["resources"]["jobs"]["nightly"]["parameters"][3].__setitem__("default", "t000,t001")),
        "the default of job parameter 'tenant_batches' must be a JSON array, is 't000,t001'"),
    "shared training off the GPU cluster": (
        _nightly(_set("train_shared", "job_cluster_key", "cpu")),
        "(target prod): conf/prod trains the shared model on GPUs (training.shared.use_gpu: auto) but job "
        "cluster 'cpu' runs '18.0.x-cpu-ml-scala2.13', not a GPU runtime"),
    "unknown bundle variable": (_nightly(_params("ingest", _replace("${var.env}", "${var.environment}"))),
                                "unknown reference ${var.environment}"),
    "unknown dataset": (_root(lambda d: d["variables"]["dataset"].__setitem__("default", "nope")),
                        "unknown dataset 'nope' (datasets in config: demo, flights, mlc_churn)"),
    "volume in another catalog": (_root(lambda d: d["targets"]["prod"]["variables"].__setitem__("catalog", "dev")),
                                  "--data-dir /Volumes/dev/tenantml/files/tenantml is in dev.tenantml but "
                                  "conf/prod writes tables to prod.tenantml"),
    "prod without run_as": (_root(lambda d: d["targets"]["prod"].pop("run_as")),
                            "a production target needs 'run_as'"),
    "dev not in development mode": (_root(lambda d: d["targets"]["dev"].__setitem__("mode", "production")),
                                    "target 'dev' must have 'mode: development', has 'production'"),
    "variable without a value": (_root(lambda d: d["variables"]["volume"].pop("default")),
                                 "variable 'volume' has no value for target 'dev'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_copy_fails_with_a_clear_message(repo_copy: Path, case: str) -> None:
    (rel, change), expected = BROKEN[case]
    _edit(repo_copy, rel, change)
    messages = _messages(repo_copy)
    assert any(expected in m for m in messages), messages


def test_job_file_must_be_a_known_step_entry(repo_copy: Path) -> None:
    (repo_copy / "jobs" / "report.py").write_text("print('not a job')\n")
    (repo_copy / "jobs" / "bogus.py").write_text("from tenantml.apps.jobs import job_main\njob_main('bogus', [])\n")
    _edit(repo_copy, JOB_FILE, lambda d: _task(d, "promote")["spark_python_task"].__setitem__(
        "python_file", "../../jobs/report.py"))
    _edit(repo_copy, JOB_FILE, lambda d: _task(d, "score")["for_each_task"]["task"]["spark_python_task"]
          .__setitem__("python_file", "../../jobs/bogus.py"))
    messages = _messages(repo_copy)
    assert any("task 'promote': python_file jobs/report.py is not a job entry point" in m for m in messages)
    assert any("task 'score' > 'score_batch': python_file jobs/bogus.py runs step 'bogus', which "
               "the step registry does not have" in m for m in messages), messages


def test_find_cycle_and_cron() -> None:
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    for good in ("0 0 2 * * ?", "0 15 10 ? * MON-FRI", "0 0/5 14,18 * * ?", "0 0 12 L * ?",
                 "0 0 1 ? * 6#3 2027", "0 30 3 15W JAN-MAR ?"):
        assert quartz_cron_problems(good) == [], good
    assert "has 5 fields" in quartz_cron_problems("0 2 * * *")[0]
    assert quartz_cron_problems("0 0 2 * * *") == ["exactly one of day-of-month and day-of-week must be '?'"]
    assert "hours field '25'" in quartz_cron_problems("0 0 25 * * ?")[0]
    assert "day-of-week field 'FOO'" in quartz_cron_problems("0 0 1 ? * FOO")[0]
    assert "minutes field '0/0'" in quartz_cron_problems("0 0/0 1 * * ?")[0]


def test_argument_overrides_and_references() -> None:
    argv = ["--env", "prod", "--data-dir=/Volumes/p/s/v", "--dataset", "demo"]
    assert override_args(argv, {"--env": "local", "--data-dir": None, "--conf-dir": "c"}) == [
        "--dataset", "demo", "--env", "local", "--conf-dir", "c"]
    assert substitute("{{job.parameters.a}}-{{ input }}", {"job.parameters.a": "x", "input": "y"}) == "x-y"
    with pytest.raises(BundleError, match=r"unknown or unavailable reference \{\{job.parameters.b\}\}"):
        substitute("{{job.parameters.b}}", {"job.parameters.a": "x"}, "task 't'")


# --------------------------------------------------------------------------- the runner, failing fast


def test_failed_task_stops_its_downstream_tasks_after_its_retries(tmp_path: Path) -> None:
    waits: list[float] = []
    run = run_job(load_bundle(BUNDLE, "prod"), "nightly", params={"dataset": "nope"}, sleep=waits.append,
                  data_dir=str(tmp_path))
    status = {t.task_key: t.status for t in run.tasks}
    assert status == {"ingest": "failed", "ingest_scoring": "failed", **{k: "upstream_failed" for k in (
        "validate", "validate_scoring", "monitor", "train_shared", "train", "train_tuned", "promote", "score",
        "publish")}}
    ingest = run.task("ingest")
    assert (ingest.attempts, ingest.exit_code) == (3, 2) and waits == [60.0] * 4  # max_retries: 2, both ingests
    assert "unknown dataset 'nope'" in ingest.message
    assert run.task("validate").message == "run_if ALL_SUCCESS not met: upstream ingest failed"
    assert (run.status, run.exit_code) == ("failed", 1)
    # Locally: --env local whatever the target, --data-dir ours, --conf-dir the repository's conf/.
    args = {"--" + k.replace("_", "-"): v for k, v in vars(build_parser("ingest").parse_args(ingest.argv)).items()}
    assert args["--env"] == "local" and args["--data-dir"] == str(tmp_path)
    assert args["--conf-dir"] == str(REPO / "conf") and args["--run-id"] == run.run_id
    assert args["--dataset"] == "nope" and args["--tenants"] == ""


def test_independent_branch_runs_and_for_each_runs_every_input(tmp_path: Path) -> None:
    waits: list[float] = []
    bundle = load_bundle(BUNDLE)
    run = run_job(bundle, "nightly", params={"dataset": "nope", "tenant_batches": '["t000,t001", "t002"]'},
                  only=["train_shared", "train", "train_tuned", "promote", "score"], sleep=waits.append,
                  data_dir=str(tmp_path), run_id="wf-test-1")
    status = {t.task_key: t.status for t in run.tasks}
    assert status == {"ingest": "excluded", "ingest_scoring": "excluded", "validate": "excluded",
                      "validate_scoring": "excluded", "monitor": "excluded", "train_shared": "failed", "train": "failed",
                      "train_tuned": "upstream_failed", "promote": "upstream_failed", "score": "upstream_failed",
                      "publish": "excluded"}
    assert run.task("train").attempts == 2  # it ran although its sibling train_shared had failed
    run = run_job(bundle, "nightly", params={"dataset": "nope", "tenant_batches": '["t000,t001", "t002"]'},
                  only=["score"], sleep=waits.append, data_dir=str(tmp_path), run_id="wf-test-2")
    score = run.task("score")
    assert score.status == "failed" and score.message.startswith("2 of 2 iterations failed")
    assert [it.task_key for it in score.iterations] == ["score[0]", "score[1]"]
    assert [it.argv[it.argv.index("--tenants") + 1] for it in score.iterations] == ["t000,t001", "t002"]
    assert [it.attempts for it in score.iterations] == [2, 2]
    with pytest.raises(BundleError, match="has no parameter tenant_list"):
        run_job(bundle, "nightly", params={"tenant_list": "t000"})
    with pytest.raises(BundleError, match="has no task scoring"):
        run_job(bundle, "nightly", only=["scoring"])


def test_process_isolation_runs_the_job_file_as_a_child(repo_copy: Path, tmp_path: Path) -> None:
    _edit(repo_copy, JOB_FILE, _set("ingest", "max_retries", 0))
    run = run_job(load_bundle(repo_copy / "workflows"), "nightly", params={"dataset": "nope"}, only=["ingest"],
                  isolation="process", data_dir=str(tmp_path))
    ingest = run.task("ingest")
    assert (ingest.status, ingest.attempts, ingest.exit_code) == ("failed", 1, 2)
    assert ingest.message.startswith("tenantml ingest: error: unknown dataset 'nope'")


def _synthetic_bundle(root: Path) -> Path:
    """A bundle whose tasks only exit with the code they are given and note that they ran."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "task.py").write_text(
        "import pathlib, sys\n"
        "pathlib.Path(sys.argv[1]).joinpath(sys.argv[2]).write_text(' '.join(sys.argv[3:]))\n"
        "sys.exit(int(sys.argv[3]))\n")

    def task(key: str, code: int, deps: tuple[str, ...] = (), run_if: str | None = None) -> dict[str, Any]:
        t: dict[str, Any] = {"task_key": key, "spark_python_task": {
            "python_file": "../bin/task.py",
            "parameters": [str(root), key, str(code), "{{job.parameters.p}}", "{{task.name}}"]}}
        if deps:
            t["depends_on"] = [{"task_key": d} for d in deps]
        if run_if:
            t["run_if"] = run_if
        return t

    doc = {"bundle": {"name": "synthetic"},
           "targets": {"dev": {"mode": "development", "default": True}, "prod": {"mode": "production"}},
           "resources": {"jobs": {"j": {"name": "j", "parameters": [{"name": "p", "default": "d"}], "tasks": [
               task("a", 1), task("b", 0, ("a",), "ALL_DONE"), task("c", 0, ("a",)),
               task("d", 0, ("a", "b"), "AT_LEAST_ONE_FAILED"), task("e", 0, ("c",), "NONE_FAILED"),
               task("f", 0, ("b",))]}}}}
    (root / "wf").mkdir()
    (root / "wf" / "databricks.yml").write_text(yaml.safe_dump(doc))
    return root / "wf"


def test_run_if_conditions(tmp_path: Path) -> None:
    run = run_job(load_bundle(_synthetic_bundle(tmp_path)), "j", params={"p": "x"}, env=None)
    status = {t.task_key: t.status for t in run.tasks}
    assert status == {"a": "failed", "b": "success", "c": "upstream_failed", "d": "success",
                      "e": "upstream_failed", "f": "success"}
    assert (tmp_path / "b").read_text() == "0 x b"  # job parameter and {{task.name}} substituted
    assert not (tmp_path / "c").exists() and run.exit_code == 1


# --------------------------------------------------------------------------- the CLI


def test_cli_validate_and_run(repo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(repo_copy, JOB_FILE, _set("ingest", "max_retries", 0))
    bundle = str(repo_copy / "workflows")
    code = workflow_main(["run", "nightly", "--bundle", bundle, "--param", "dataset=nope", "--only",
                    "ingest,validate", "--data-dir", str(tmp_path), "--json", "--quiet", "--run-id", "cli-1"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["status"] == "failed" and out["run_id"] == "cli-1"
    assert {t["task_key"]: t["status"] for t in out["tasks"]} == {
        "ingest": "failed", "ingest_scoring": "excluded", "validate": "upstream_failed",
        "validate_scoring": "excluded", "monitor": "excluded", "train_shared": "excluded", "train": "excluded",
        "train_tuned": "excluded", "promote": "excluded", "score": "excluded", "publish": "excluded"}
    assert workflow_main(["run", "nightly", "--bundle", bundle, "--param", "datasetnope", "--quiet"]) == 2
    assert "--param 'datasetnope': expected NAME=VALUE" in capsys.readouterr().err

    _edit(repo_copy, JOB_FILE, _set("promote", "depends_on", [{"task_key": "trian"}]))
    code = workflow_main(["validate", "--bundle", bundle, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and report["status"] == "invalid" and report["schema_checked"] is True
    assert any("task 'promote' depends on 'trian'" in i for i in report["issues"])
