"""The CLI's tables when stdout is not a terminal (piped, a CI log): rich would lay them out for 80
columns and wrap every cell; no value may be split across lines. On a terminal its width is used."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pandas as pd
import pytest

from tenantml.apps import cli
from tenantml.steps.base import StepResult, TenantOutcome

REASON = ("tuned beat the tenant candidate by 0.0213 auc on the holdout of 412 rows, above the promotion "
          "margin of 0.005; the champion before it was the tenant model version 3")
LONG_TENANT = "customer-with-an-uncommonly-long-tenant-identifier-0001"
MODEL = "demo__customer-with-an-uncommonly-long-tenant-identifier-0001/17"


def _frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"tenant_id": LONG_TENANT, "tenant": 0.8812, "tuned": 0.9025, "shared": 0.8712, "champion_before": 0.87,
         "decision": "promoted", "serving": "tuned", "metric": "auc", "reason": REASON},
        {"tenant_id": "t001", "tenant": None, "tuned": 0.71, "shared": 0.7, "champion_before": None,
         "decision": "kept", "serving": MODEL, "metric": "auc", "reason": "no candidate beat the champion"}])


def _whole(values: list[str], out: str) -> list[str]:
    """The values that no single line of ``out`` holds in full."""
    return [v for v in values if not any(v in line for line in out.splitlines())]


@pytest.mark.parametrize("columns", [None, "80"])
def test_a_table_piped_keeps_every_value_on_one_line(columns: str | None, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_decisions_frame", lambda args, ctx: _frame())
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:  # a CI runner's fixed width is not a terminal to fit either
        monkeypatch.setenv("COLUMNS", columns)
    capsys.readouterr()
    assert cli._table_command(argparse.Namespace(command="decisions", json=False), ctx=None) == 0
    out = capsys.readouterr().out
    assert not _whole([REASON, LONG_TENANT, MODEL, "no candidate beat the champion", "champion_before"], out), out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 2, out  # one line per tenant: no cell wrapped
    assert "0.8812" in rows[0] and "0.9025" in rows[0]


def test_json_is_unchanged(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_decisions_frame", lambda args, ctx: _frame())
    capsys.readouterr()
    assert cli._table_command(argparse.Namespace(command="decisions", json=True), ctx=None) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["tenant_id"] for r in records] == [LONG_TENANT, "t001"] and records[0]["reason"] == REASON


def test_the_summary_piped_keeps_errors_and_rows_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    error = "RuntimeError: " + "the tenant's training diverged after epoch 3 with a loss of nan; " * 3
    results = [StepResult(step="train", dataset="demo", run_id="20260101T000000Z-abcdef",
                          tenants=[TenantOutcome(LONG_TENANT, "failed", rows_in=900, error=error.strip()),
                                   TenantOutcome("t001", "ok", rows_in=20_000, rows_out=20_000)],
                          tables_written=[f"/a/rather/long/warehouse/path/number/{i}/model_store" for i in range(4)],
                          seconds=12.0)]
    capsys.readouterr()
    assert cli._print_results(results, as_json=False) == 3
    out = capsys.readouterr().out
    assert not _whole([f"tenant {LONG_TENANT}: failed: {error.strip()}", "/a/rather/long/warehouse/path/number/3",
                       "20260101T000000Z-abcdef"], out), out
    assert len([line for line in out.splitlines() if line.startswith("│")]) == 1, out


def test_on_a_terminal_its_width_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    pty = pytest.importorskip("pty")
    import fcntl
    import os
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 101, 0, 0))
    terminal: Any = os.fdopen(follower, "w")
    try:
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.delenv("COLUMNS", raising=False)
        assert cli._stdout_console().width == 101
    finally:
        terminal.close()
        os.close(leader)


def test_tenants_takes_a_dataset_and_all_columns() -> None:
    args = cli._parser().parse_args(["tenants", "--dataset", "demo", "--all-columns"])
    assert (args.action, args.dataset, args.all_columns) == ("list", "demo", True)
    args = cli._parser().parse_args(["tenants"])
    assert (args.dataset, args.all_columns) == (None, False)
