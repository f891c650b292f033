"""The dsm command on a real etcd for operating instances: --id (idempotent, also per --jsonl line
and under concurrent submitters), status --follow, Ctrl-C on run --etcd, cancel --reason, redrive."""

from __future__ import annotations

import getpass
import json
import re
import signal
import socket
import time

import pytest
from clitools import dsm, spawn
from helpers import until

from dsm.worker.defaults import DEFAULT_CONCURRENCY

pytestmark = pytest.mark.etcd

ORDER = "definitions/order.yaml"


@pytest.fixture
def at(etcd_url, namespace):
    return ("--etcd", etcd_url, "--namespace", namespace)


def listed(at):
    result = dsm("list", "--json", *at)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_submit_with_an_id_is_idempotent_and_refuses_another_payload(at):
    first = dsm("submit", ORDER, "--id", "order-1", "--payload", '{"total": 5}', *at)
    again = dsm("submit", ORDER, "--id", "order-1", "--payload", '{"total": 5}', *at)
    assert (first.returncode, first.stdout, again.returncode, again.stdout) == (0, "order-1\n", 0, "order-1\n")
    other = dsm("submit", ORDER, "--id", "order-1", "--payload", '{"total": 6}', *at)
    assert other.returncode == 2 and other.stdout == ""
    assert "instance order-1 exists with another payload" in other.stderr
    bad = dsm("submit", ORDER, "--id", "no/slashes", *at)
    assert bad.returncode == 2 and "invalid instance id" in bad.stderr
    both = dsm("submit", ORDER, "--id", "x", "--jsonl", "-", *at, input="{}\n")
    assert both.returncode == 2 and "--id" in both.stderr
    assert [r["id"] for r in listed(at)] == ["order-1"]


def test_jsonl_lines_name_their_instances_and_a_resubmitted_file_creates_nothing_new(at, tmp_path):
    lines = tmp_path / "orders.jsonl"
    lines.write_text('{"id": "j1", "total": 1}\n'
                     '{"id": "j2", "payload": {"id": 77, "total": 2}}\n'
                     '{"id": "j3"}\n')
    first = dsm("submit", ORDER, "--jsonl", str(lines), *at)
    again = dsm("submit", ORDER, "--jsonl", str(lines), *at)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout.split() == again.stdout.split() == ["j1", "j2", "j3"]
    payloads = {r["id"]: json.loads(dsm("status", r["id"], "--json", *at).stdout)["payload"] for r in listed(at)}
    assert payloads == {"j1": {"total": 1}, "j2": {"id": 77, "total": 2}, "j3": {}}
    lines.write_text('{"id": 77, "total": 1}\n')
    wrong = dsm("submit", ORDER, "--jsonl", str(lines), *at)
    assert wrong.returncode == 2 and f"{lines}:1: invalid instance id 77" in wrong.stderr


def test_concurrent_submitters_of_one_id_all_get_the_one_instance(at):
    procs = [spawn("submit", ORDER, "--id", "shared", "--payload", '{"total": 3}', *at) for _ in range(4)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [(out, code) for out, _, code in results] == [("shared\n", 0)] * 4, results
    assert [r["id"] for r in listed(at)] == ["shared"]


def test_run_with_an_id_that_exists_waits_for_that_instance(at):
    first = dsm("run", ORDER, "--id", "r1", "--payload", '{"total": 5}', "--json", *at)
    assert first.returncode == 0, first.stderr
    again = dsm("run", ORDER, "--id", "r1", "--payload", '{"total": 5}', "--json", *at)
    assert again.returncode == 0 and "instance r1 exists" in again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)
    other = dsm("run", ORDER, "--id", "r1", "--payload", '{"total": 500}', *at)
    assert other.returncode == 2 and "exists with another payload" in other.stderr


STEPS = """
machine: steps
start: a
states:
  a:
    tick: followmod:step
    next: b
  b:
    tick: followmod:step
    next: done
  done:
    terminal: true
"""
STEPS_PY = """
import os, time

def step(payload, ctx):
    if ctx.state == "b":
        deadline = time.monotonic() + 60
        while not os.path.exists(payload["gate"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        if payload.get("fail"):
            raise RuntimeError("b gave up")
"""


def read_line(stream, want, deadline=60.0):
    end = time.monotonic() + deadline
    lines = []
    while time.monotonic() < end:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if want in line:
            return lines
    raise AssertionError(f"{want!r} not seen in {lines}")


@pytest.mark.parametrize("fail", [False, True])
def test_status_follow_prints_transitions_as_they_commit_and_exits_as_run_does(at, write, tmp_path, fail):
    path = str(write("steps.yaml", STEPS, followmod=STEPS_PY))
    gate = tmp_path / "gate"
    payload = json.dumps({"gate": str(gate), "fail": fail})
    assert dsm("submit", path, "--id", "f1", "--payload", payload, *at).returncode == 0
    follow = spawn("status", "f1", "--follow", *at)
    worker = spawn("worker", path, "--isolation", "thread", *at)
    try:
        seen = read_line(follow.stdout, "a -> b")  # while b still runs: printed as it committed
        assert follow.poll() is None and re.match(r"^\s+1 \S+ a -> b attempt 1 by \S+", seen[-1])
        gate.touch()
        out, errors = follow.communicate(timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
        if follow.poll() is None:
            follow.kill()
    if fail:
        assert follow.returncode == 1 and "instance f1 failed" in errors and "b gave up" in errors
        assert out == ""
    else:
        assert follow.returncode == 0 and re.match(r"^\s+2 \S+ b -> done attempt 1", out)
        assert "instance f1 succeeded at done (2 transitions)" in errors
    again = dsm("status", "f1", "--follow", "--json", *at)  # an ended instance: its history, at once
    assert again.returncode == (1 if fail else 0)
    assert [json.loads(line)["state"] for line in again.stdout.splitlines()] == (["a"] if fail else ["a", "b"])


def test_ctrl_c_on_run_with_etcd_says_the_instance_goes_on(at, write, tmp_path):
    path = str(write("steps.yaml", STEPS, followmod=STEPS_PY))
    proc = spawn("run", path, "--workers", "0", "--payload", json.dumps({"gate": str(tmp_path / "never")}), *at)
    try:
        line = read_line(proc.stderr, "submitted")[-1]
        iid = re.search(r"instance (\S+) submitted", line).group(1)
        proc.send_signal(signal.SIGINT)
        _, errors = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert f"instance {iid} goes on" in errors
    assert f"'dsm status {iid} --follow'" in errors and f"'dsm cancel {iid}'" in errors
    assert json.loads(dsm("status", iid, "--json", *at).stdout)["status"] == "running"


def test_cancel_with_a_reason_records_who_when_and_why(at):
    assert dsm("submit", ORDER, "--id", "c1", *at).returncode == 0
    result = dsm("cancel", "c1", "--reason", "customer called back", *at)
    assert result.returncode == 0 and "cancelled" in result.stderr
    record = json.loads(dsm("status", "c1", "--json", *at).stdout)
    cancel = record["cancel"]
    assert cancel["reason"] == "customer called back"
    assert cancel["by"] == f"{getpass.getuser()}@{socket.gethostname()}"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", cancel["at"]) and cancel["at"] == record["finished_at"]
    shown = dsm("status", "c1", *at).stdout
    assert re.search(r"^cancelled:\s+by \S+@\S+ at \S+: customer called back$", shown, re.M)


GATED = """
machine: gated
start: a
states:
  a:
    tick: gatedmod:step
    next: b
  b:
    tick: gatedmod:step
    on: {go: done, stop: refused}
  done:
    terminal: true
  refused:
    terminal: true
    status: failed
"""
GATED_PY = """
import os

def step(payload, ctx):
    payload.setdefault("ran", []).append(ctx.state)
    if ctx.state == "b":
        if not os.path.exists(payload["gate"]):
            raise ConnectionError("the gate is closed")
        return payload.get("verdict", "go")
"""


def test_redrive_continues_a_failed_instance_and_refuses_what_cannot_be_redriven(at, write, tmp_path):
    path = str(write("gated.yaml", GATED, gatedmod=GATED_PY))
    gate = tmp_path / "gate"
    payload = json.dumps({"gate": str(gate)})
    failed = dsm("run", path, "--id", "g1", "--payload", payload, *at)
    assert failed.returncode == 1 and "ConnectionError" in failed.stderr
    gate.touch()
    redriven = dsm("redrive", "g1", *at)
    assert redriven.returncode == 0, redriven.stderr
    assert "instance g1 redriven (redrive 1): continues at b" in redriven.stderr
    done = dsm("run", path, "--id", "g1", "--payload", payload, "--json", *at)  # the same start: waits for it
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "succeeded" and record["redrives"] == 1 and record["error"] is None
    assert record["payload"]["ran"] == ["a", "b"]
    again = dsm("redrive", "g1", *at)
    assert again.returncode == 2 and "succeeded" in again.stderr
    by_design = dsm("run", path, "--id", "g2", "--payload", json.dumps({"gate": str(gate), "verdict": "stop"}), *at)
    assert by_design.returncode == 1
    refused = dsm("redrive", "g2", *at)
    assert refused.returncode == 2 and "failure terminal state 'refused'" in refused.stderr
    unknown = dsm("redrive", "nope", *at)
    assert unknown.returncode == 2 and "no instance 'nope'" in unknown.stderr


def test_workers_list_themselves_and_skip_quietly_what_they_cannot_run(at, tmp_path):
    beats = ("--lease-ttl", "3")  # an entry rewritten every second
    procs = [spawn("worker", "definitions/order.yaml", "--isolation", "thread", *beats, *at),
             spawn("worker", "definitions/poll.yaml", "--isolation", "thread", *beats, *at)]

    def listed() -> list:
        return json.loads(dsm("workers", "--json", *at).stdout)

    def both_refused() -> dict | None:
        refused = {w["pid"]: w["updated_at"] for w in listed() if "document" in {d["machine"] for d in w["refused"]}}
        return refused if len(refused) == 2 else None

    try:
        workers = until(lambda: len(found := listed()) == 2 and found, "two workers listed", timeout=60)
        assert sorted(w["pid"] for w in workers) == sorted(p.pid for p in procs)
        for w in workers:
            assert {"id", "host", "pid", "definitions", "concurrency", "in_flight"} <= set(w)
            assert w["host"] == socket.gethostname() and w["concurrency"] == DEFAULT_CONCURRENCY and w["in_flight"] == 0
        assert sorted(d["machine"] for w in workers for d in w["definitions"]) == ["order", "poll"]
        table = dsm("workers", *at).stdout.splitlines()
        assert table[0].split()[:3] == ["ID", "HOST", "PID"] and len(table) == 3

        lines = tmp_path / "docs.jsonl"
        lines.write_text('{"text": "helo", "images": 1}\n' * 20)
        docs = dsm("submit", "definitions/document.yaml", "--jsonl", str(lines), *at).stdout.split()
        shown = dsm("status", docs[0], *at)
        assert re.search(r"^workers:\s+no live worker serves its definition \(document sha256:", shown.stdout, re.M)
        as_json = dsm("status", docs[0], "--json", *at)
        assert json.loads(as_json.stdout)["status"] == "running" and "no live worker serves" in as_json.stderr
        order = dsm("run", ORDER, "--workers", "0", "--payload", '{"total": 5}', "--timeout", "60s", *at)
        assert order.returncode == 0, order.stderr  # the worker that can run orders still does
        # Each worker met the documents and refused them, then beat at least once more: one in a busy
        # loop over them would have logged line after line meanwhile.
        refused = until(both_refused, "both workers refused the documents", timeout=60)
        until(lambda: all(w["updated_at"] != refused[w["pid"]] for w in listed()), "a beat of each since", timeout=60)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=60)[1] for p in procs]
    for errors in outputs:
        warned = [line.split("cannot run definition ")[1].split()[0] for line in errors.splitlines()
                  if "cannot run definition" in line]
        # one warning per definition at most (a worker may meet the other's work before it is claimed)
        assert len(warned) == len(set(warned)) and len(errors.splitlines()) < 10, errors[-2000:]
    assert sum("cannot run definition" in e for e in outputs) == 2
    gone = dsm("workers", "--json", *at)
    assert json.loads(gone.stdout) == []
    none = dsm("status", docs[0], *at)
    assert re.search(r"^workers:\s+none live in namespace", none.stdout, re.M)


def test_status_follow_says_when_a_retry_is_scheduled(at, write):
    path = str(write("later.yaml", """
        machine: later
        start: s
        states:
          s:
            tick: latermod:call
            retry: {max_attempts: 3, backoff: 1h}
            next: done
          done:
            terminal: true
        """, latermod="def call(payload, ctx):\n    raise TimeoutError('upstream slow')\n"))
    assert dsm("submit", path, "--id", "l1", *at).returncode == 0
    follow = spawn("status", "l1", "--follow", *at)
    worker = spawn("worker", path, "--isolation", "thread", *at)
    try:
        seen = read_line(follow.stdout, "waiting:")
        assert re.match(r"^\s+waiting: s: retry, attempt 2 at \S+, after TimeoutError: upstream slow$", seen[-1])
        assert follow.poll() is None  # the instance goes on: so does --follow
        assert dsm("cancel", "l1", *at).returncode == 0
        follow.communicate(timeout=60)
        assert follow.returncode == 1
    finally:
        for proc in (worker, follow):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=60)
