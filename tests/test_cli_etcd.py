"""The dsm command against a real etcd: list, status, submit, closed pipes and connection errors."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess

import pytest
from clitools import ROOT, dsm, dsm_command, dsm_env, spawn
from helpers import until

pytestmark = pytest.mark.etcd

ORDER = "definitions/order.yaml"


@pytest.fixture
def at(etcd_url, namespace):
    return ("--etcd", etcd_url, "--namespace", namespace)


def submit(at, *args, **kw):
    result = dsm("submit", *args, *at, **kw)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_payload_file_dash_reads_stdin_for_submit(at):
    (iid,) = submit(at, ORDER, "--payload-file", "-", input='{"total": 42}')
    record = json.loads(dsm("status", iid, "--json", *at).stdout)
    assert record["payload"]["total"] == 42


def test_etcd_run_timeout_says_the_instance_keeps_running(at):
    result = dsm("run", ORDER, "--workers", "0", "--timeout", "300ms", *at)
    assert result.returncode == 4
    assert "still running" in result.stderr and "dsm status" in result.stderr


def test_status_of_a_machine_without_version(at, write):
    path = write("nover.yaml", """
        machine: nover
        start: a
        states:
          a:
            next: done
          done:
            terminal: true
        """)
    (iid,) = submit(at, str(path))
    result = dsm("status", iid, *at)
    assert result.returncode == 0, result.stderr
    assert "None" not in result.stdout
    assert re.search(r"^machine:\s+nover \(sha256:", result.stdout, re.M)
    versioned = dsm("status", submit(at, ORDER)[0], *at)
    assert re.search(r"^machine:\s+order \(version 1, sha256:", versioned.stdout, re.M)


def test_list_prints_a_header_and_says_when_there_is_nothing(at):
    empty = dsm("list", *at)
    assert empty.returncode == 0 and empty.stdout == ""
    assert "no instances" in empty.stderr
    as_json = dsm("list", "--json", *at)
    assert as_json.returncode == 0 and as_json.stdout == "[]\n" and as_json.stderr == ""
    (iid,) = submit(at, ORDER, "--payload", '{"total": 5}')
    listed = dsm("list", *at)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "MACHINE", "STATUS", "STATE", "TRANSITIONS", "CREATED"]
    assert row.split()[:3] == [iid, "order", "running"]
    assert listed.stderr == ""


def test_list_into_a_closed_pipe_exits_quietly(at, tmp_path):
    jsonl = tmp_path / "many.jsonl"
    jsonl.write_text("{}\n" * 1500)  # more than a pipe's buffer of listing
    submit(at, ORDER, "--jsonl", str(jsonl))
    proc = subprocess.Popen([*dsm_command(), "list", *at], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env=dsm_env(), text=True)
    first = proc.stdout.readline()  # `dsm list | head -1`
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, stderr
    assert first.split()[0] == "ID"
    assert stderr == ""


def test_submit_jsonl_shows_progress_on_a_terminal(at, tmp_path):
    jsonl = tmp_path / "many.jsonl"
    jsonl.write_text("{}\n" * 300)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([*dsm_command(), "submit", ORDER, "--jsonl", str(jsonl), *at], stdout=subprocess.PIPE,
                              stderr=slave, cwd=ROOT, env=dsm_env(TERM="xterm", COLUMNS="100"), timeout=120)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    assert len(proc.stdout.split()) == 300
    assert b"300/300" in shown, shown[-500:]
    plain = dsm("submit", ORDER, "--jsonl", str(jsonl), *at)  # not a terminal: ids only, no progress
    assert plain.returncode == 0 and plain.stderr == "" and len(plain.stdout.split()) == 300


def test_https_to_a_plaintext_etcd_says_tls_failed(etcd_url):
    result = dsm("list", "--etcd", etcd_url.replace("http://", "https://"))
    assert result.returncode == 3
    assert "TLS" in result.stderr and "connection refused" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_local_workers_runs_only_its_own_instance(at):
    """A developer's `dsm run --etcd` against a shared namespace must not run other people's work."""
    (other,) = submit(at, ORDER, "--payload", '{"total": 5}')
    result = dsm("run", ORDER, "--payload", '{"total": 7}', "--workers", "2", "--json", *at)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "succeeded"
    record = json.loads(dsm("status", other, "--json", *at).stdout)
    assert record["status"] == "running" and record["transitions"] == 0


FLAKY = """
machine: flaky
start: s
states:
  s:
    tick: clifflaky:call
    retry: {max_attempts: 3, backoff: 10ms, jitter: false}
    next: done
  done:
    terminal: true
"""
FLAKY_PY = """
def call(payload, ctx):
    if ctx.attempt < payload.get("succeed_at", 99):
        raise ConnectionError(f"refused on attempt {ctx.attempt}")
"""


def run_id(result):
    assert result.returncode in (0, 1, 4), result.stderr
    return re.search(r"instance (\S+) submitted", result.stderr).group(1)


def test_status_shows_failed_attempts_with_tracebacks_and_the_final_error(at, write):
    path = str(write("flaky.yaml", FLAKY, clifflaky=FLAKY_PY))
    ok = run_id(dsm("run", path, "--payload", '{"succeed_at": 3}', *at))
    shown = dsm("status", ok, *at)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"attempt 1 failed at \S+ on \S+ after \d+ ms: ConnectionError: refused on attempt 1",
                     shown.stdout)
    assert "attempt 2 failed" in shown.stdout and 'raise ConnectionError(f"refused on attempt' in shown.stdout
    bad = run_id(dsm("run", path, *at))
    shown = dsm("status", bad, *at)
    assert "error:       ConnectionError in s after 3 attempt(s): refused on attempt 3" in shown.stdout
    assert "Traceback (most recent call last)" in shown.stdout and "clifflaky.py" in shown.stdout


def test_status_shows_a_retry_waiting(at, write):
    path = str(write("later.yaml", FLAKY.replace("10ms", "1h"), clifflaky=FLAKY_PY))
    result = dsm("run", path, "--timeout", "3s", "--json", *at)
    assert result.returncode == 4, result.stderr
    iid = json.loads(result.stdout)["id"]
    shown = dsm("status", iid, *at)
    assert re.search(r"^waiting:\s+s: retry, attempt 2 at \S+, after ConnectionError: refused on attempt 1$",
                     shown.stdout, re.M), shown.stdout
    assert "status:      running" in shown.stdout


def test_status_of_an_instance_that_failed_shows_its_earlier_attempts_too(at, write):
    path = str(write("flaky.yaml", FLAKY, clifflaky=FLAKY_PY))
    bad = run_id(dsm("run", path, *at))
    shown = dsm("status", bad, *at).stdout
    assert re.search(r"^\s+s: attempt 1 failed at \S+ on \S+ after \d+ ms: ConnectionError: refused on attempt 1$",
                     shown, re.M), shown
    assert "s: attempt 2 failed" in shown and "s: attempt 3 failed" not in shown  # the third is the error


def test_signal_from_the_command_line_and_run_with_local_workers_runs_the_child_too(at):
    """`dsm run --etcd` of a parent: its local workers run the child its call state starts (and
    nothing else); `dsm signal` lets the child go on; a signal to the finished instance is refused."""
    run = spawn("run", "definitions/onboarding.yaml", "--payload", '{"amount": 5}', "--workers", "2", "--json", *at)
    try:
        def waiting_child() -> str | None:
            listed = json.loads(dsm("list", "--machine", "approval", "--json", *at).stdout)
            return next((i["id"] for i in listed if i["waiting"] and i["waiting"][0]["kind"] == "signal"), None)

        child = until(waiting_child, "the child waits for its signal", timeout=60, interval=0.2)
        sent = dsm("signal", child, "decision", "--outcome", "approve", "--payload", '{"by": "ann"}', *at)
        assert sent.returncode == 0 and sent.stdout == "", sent.stderr
        out, errors = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, errors
    record = json.loads(out)
    assert record["status"] == "succeeded" and record["payload"]["by"] == "ann" and record["payload"]["paid"]
    again = dsm("signal", child, "decision", "--outcome", "approve", *at)
    assert again.returncode == 2 and "succeeded" in again.stderr
    unknown = dsm("signal", "no-such-id", "decision", *at)
    assert unknown.returncode == 2 and "no instance" in unknown.stderr


def test_a_signal_the_machine_does_not_take_is_refused_with_exit_2_and_nothing_stored(at):
    """`dsm signal` checks the name and the outcome against the instance's machine before it
    stores anything: a misspelled name, or an outcome no state waiting for it routes on, exits 2
    with a message naming what the machine takes."""
    (iid,) = submit(at, "definitions/approval.yaml", "--payload", '{"amount": 5}')
    misspelled = dsm("signal", iid, "decison", *at)
    assert misspelled.returncode == 2, (misspelled.returncode, misspelled.stderr)
    assert "'decision'" in misspelled.stderr and "'approve'" in misspelled.stderr, misspelled.stderr
    unknown_outcome = dsm("signal", iid, "decision", "--outcome", "maybe", *at)
    assert unknown_outcome.returncode == 2, (unknown_outcome.returncode, unknown_outcome.stderr)
    assert "'maybe'" in unknown_outcome.stderr and "'approve'" in unknown_outcome.stderr
    assert "'reject'" in unknown_outcome.stderr, unknown_outcome.stderr
    record = json.loads(dsm("status", iid, "--json", *at).stdout)
    assert record["signals"] == []
    sent = dsm("signal", iid, "decision", "--outcome", "approve", *at)
    assert sent.returncode == 0 and sent.stdout == "", sent.stderr
    assert [s["name"] for s in json.loads(dsm("status", iid, "--json", *at).stdout)["signals"]] == ["decision"]
    assert dsm("cancel", iid, *at).returncode == 0
    finished = dsm("signal", iid, "decison", *at)  # finished: refused as such, whatever the name
    assert finished.returncode == 2 and "cancelled" in finished.stderr, finished.stderr
