"""Every CLI command, given a hostile value (tenant id, run id, dataset, path, config value), ends in
one line on stderr and exit 2: no traceback, and no Spark session started."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tenantml.apps import cli
from tenantml.steps.base import registry

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
BAD_TENANT, BAD_RUN, BAD_DATASET = "../../x", "../../x", "x'; DROP TABLE tenants; --"


def _cases() -> list[tuple[str, list[str]]]:
    cases: list[tuple[str, list[str]]] = []
    for step in registry().values():
        cases += [(f"{step.command} tenant", [step.command, "--tenants", f"t000,{BAD_TENANT}"]),
                  (f"{step.command} dataset", [step.command, "--dataset", BAD_DATASET]),
                  (f"{step.command} unknown dataset", [step.command, "--dataset", "nosuch"]),
                  (f"{step.command} run id", [step.command, "--run-id", BAD_RUN])]
        if step.resumable:
            cases.append((f"{step.command} resume without run", [step.command, "--resume"]))
    cases += [
        ("ingest source", ["ingest", "--source", "/nonexistent/tenantml/source"]),
        ("pipeline from", ["pipeline", "--from", "bogus"]),
        ("pipeline tenant", ["pipeline", "--tenants", BAD_TENANT]),
        ("pipeline source late", ["pipeline", "--from", "score", "--source", "/tmp"]),
        ("demo count", ["demo", "--tenants-count", "-3"]),
        ("demo rows", ["demo", "--largest", "lots"]),
        ("sample", ["sample", "nosuch"]),
        ("tenants delete", ["tenants", "delete", BAD_TENANT]),
        ("tenants delete without id", ["tenants", "delete"]),
        ("tenant-set id", ["tenant-set", BAD_TENANT, "--strategy", "tenant"]),
        ("tenant-set strategy", ["tenant-set", "t000", "--strategy", "bogus"]),
        ("decisions tenant", ["decisions", "--tenants", BAD_TENANT]),
        ("models dataset", ["models", "--dataset", BAD_DATASET]),
        ("runs run id", ["runs", "--run-id", BAD_RUN]),
        ("report run id", ["report", "--run-id", BAD_RUN]),
        ("governance catalog", ["governance", "--catalog", "x; DROP", "--schema", "s"]),
        ("serve-sql host", ["serve-sql", "--host", "0.0.0.0"]),
        ("serve-sql port", ["serve-sql", "--port", "99999"]),
        ("serve-sql database", ["serve-sql", "--database", "x;y"]),
        ("env", ["runs", "--env", "../x"]),
        ("conf dir", ["runs", "--conf-dir", "/nonexistent/conf"]),
        ("unknown command", ["bogus"]),
    ]
    return cases


@pytest.fixture()
def no_spark(monkeypatch: pytest.MonkeyPatch) -> None:
    """Usage errors come before any work: starting a session here fails the test."""
    import tenantml.io.spark as spark_mod

    def refuse(**_: Any) -> None:
        raise AssertionError("a Spark session was started before the bad value was refused")

    monkeypatch.setattr(spark_mod, "get_or_build_spark", refuse)


def _check(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = cli.run(argv)
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (argv, code, err[-1500:])
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, (argv, err[-1500:])
    return lines[0]


@pytest.mark.parametrize(("case", "argv"), _cases(), ids=[c for c, _ in _cases()])
def test_hostile_value_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_spark: None,
                                             case: str, argv: list[str]) -> None:
    extra = [] if {"--conf-dir", "--data-dir"} & set(argv) else ["--conf-dir", str(REPO_CONF),
                                                                  "--data-dir", str(tmp_path / "d")]
    if argv[0] in ("bogus",):
        extra = []
    line = _check(capsys, [*argv, *extra])
    for value in (BAD_TENANT, BAD_DATASET):
        if value in argv:
            assert repr(value) in line or value in line, line


def test_hostile_data_dir_and_config_value(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_spark: None) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _check(capsys, ["runs", "--conf-dir", str(REPO_CONF), "--data-dir", str(blocker)])
    assert "not a folder" in line
    line = _check(capsys, ["runs", "--conf-dir", str(REPO_CONF), "--data-dir", str(blocker / "sub")])
    assert "is a file" in line
    conf = tmp_path / "conf"
    shutil.copytree(REPO_CONF, conf)
    (conf / "local" / "bad.yml").write_text("training: {min_rows: -1}\nspark: {master: 7, shuffle_partitions: x}\n")
    line = _check(capsys, ["train", "--conf-dir", str(conf), "--data-dir", str(tmp_path / "d")])
    assert "bad.yml: key 'training.min_rows'" in line and "spark.shuffle_partitions" in line
