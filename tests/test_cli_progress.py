"""`dsm run`'s progress on stderr: one plain line a transition on a pipe, nothing with -q, and on a
terminal a live status line that transitions fold into when they come faster than a person reads."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from clitools import ROOT, dsm, dsm_command, dsm_env

from dsm.cli.progress import Budget

LOOP = "bench/loop.yaml"
CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # a terminal's control sequences (colour, cursor, erase)


def loop(turns: int) -> str:
    return json.dumps({"n": 0, "until": turns})


def test_quiet_run_of_a_long_loop_prints_nothing():
    result = dsm("run", LOOP, "--payload", loop(500), "-q", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout)["transitions"] == 500


@pytest.mark.parametrize("buffered", [True, False], ids=["block-buffered", "unbuffered"])
def test_a_pipe_gets_one_plain_line_per_transition(buffered):
    env = dsm_env()
    if buffered:  # as a shell has it: dsm writes stderr in blocks while lines come fast
        env.pop("PYTHONUNBUFFERED")
    result = subprocess.run([*dsm_command(), "run", LOOP, "--payload", loop(60), "--json"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    iid = json.loads(result.stdout)["id"]
    lines = result.stderr.splitlines()
    assert lines[0] == f"instance {iid} started"
    assert lines[1:61] == [f"{n:>4}  count -> count" for n in range(1, 60)] + ["  60  count -> done"]
    assert re.fullmatch(rf"instance {iid} succeeded at done \(60 transitions, \d+\.\d\ds\)", lines[61])
    assert lines[62:] == ['payload: {"n": 60, "until": 60}']
    assert "\x1b" not in result.stderr and "\r" not in result.stderr  # no colour, no cursor moves


def test_a_terminal_gets_a_live_line_not_a_line_per_transition(tmp_path):
    turns = 3000
    leader, follower = os.openpty()
    env = dsm_env(TERM="xterm-256color", COLUMNS="120", LINES="40")
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    record_file = tmp_path / "record.json"  # (a pipe nobody reads while the terminal is read would fill)
    with record_file.open("w") as stdout:
        proc = subprocess.Popen([*dsm_command(), "run", LOOP, "--payload", loop(turns), "--json"], stdout=stdout,
                                stderr=follower, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    os.close(follower)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every end of the terminal's follower side is closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, seen.decode(errors="replace")[-2000:]
    record = json.loads(record_file.read_text())
    assert record["transitions"] == turns
    text = seen.decode(errors="replace")
    assert "\r" in text  # the status line is redrawn in place
    pieces = [p.strip() for p in re.split(r"[\r\n]", CSI.sub("", text))]
    lines = [p for p in pieces if re.fullmatch(r"\d+\s+count -> (count|done)", p)]
    # the first transitions come as lines; the rest fold into the status line (the lines are paced
    # at ten a second after the first twenty, so all 3000 could only come as lines over 5 minutes)
    assert lines[:1] == ["1  count -> count"] and len(lines) < turns // 2
    assert any(re.fullmatch(rf"instance {record['id']} succeeded at done \({turns} transitions, \d+\.\d\ds\)", p)
               for p in pieces)
    assert any(re.search(r"\d+ transitions, \d+\.\ds; active: count", p) for p in pieces)


def test_a_budget_takes_a_burst_then_a_rate():
    budget = Budget(rate=10, burst=3)
    assert [budget.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.take(0.05) is False  # half a line earned
    assert budget.take(0.1) is True  # one line a tenth of a second
    assert budget.take(0.1) is False
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]  # no more than the burst saved up
