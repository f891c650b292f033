"""The dsm command end to end (embedded): exit codes, the --json record, validate's output format."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
from clitools import ROOT, dsm, spawn, waits_for_signals
from helpers import one_tick_machine

RECORD_KEYS = ["id", "machine", "version", "digest", "status", "state", "active", "payload", "error",
               "created_at", "finished_at", "transitions", "history"]
# added after the contract's first fields
LATER_KEYS = ["input", "waiting", "redrives", "cancel", "expires_at", "signals", "parent"]
HISTORY_KEYS = ["seq", "state", "next", "branch", "attempt", "outcome", "worker", "at", "started_at", "duration_ms",
                "failures"]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ORDER = "definitions/order.yaml"


def test_validate_good_files_and_folders():
    result = dsm("validate", "definitions", ORDER)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "definitions/order.yaml: ok" in result.stderr


def test_validate_prints_every_problem_as_path_line_col(write):
    path = write("bad.yaml", """
        machine: bad
        start: a
        states:
          a:
            next: dnoe
          b:
            tick: m:f
          done:
            terminal: true
            tick: m:f
        """)
    result = dsm("validate", "--no-import", str(path))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert lines == [
        f"{path}:5:11: error: state 'a': next refers to unknown state 'dnoe' (did you mean 'done'?)",
        f"{path}:6:3: error: state 'b' has no routing key: give it one of next, on, choose, fork + join, "
        "or terminal: true",
        f"{path}:10:5: error: terminal state 'done' cannot have a tick",
    ]
    assert "Traceback" not in result.stderr


def test_validate_schema_error_names_the_key_path(write):
    path = write("bad.yaml", """
        machine: bad
        start: a
        states:
          a:
            tick: m:f
            retry: {max_attempts: zero}
            next: done
          done:
            terminal: true
        """)
    result = dsm("validate", "--no-import", str(path))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f'{path}:6:27: error: states.a.retry.max_attempts: expected an integer, got string "zero"']


def test_validate_malformed_yaml_and_missing_file(write, tmp_path):
    path = write("broken.yaml", "machine: x\nstates: [a, b\n")
    result = dsm("validate", str(path), str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    out = result.stdout.splitlines()
    assert out[0].startswith(f"{path}:") and "invalid YAML" in out[0]
    assert out[1].startswith(f"{tmp_path / 'nope.yaml'}:1:1: error: cannot read file")


def test_validate_locates_a_call_path_holding_a_nul_byte(write):
    path = write("nul.yaml", r"""
        machine: parent
        start: a
        states:
          a:
            call: "a\x00b.yaml"
            next: done
          done:
            terminal: true
        """)
    result = dsm("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}:5:11: error: states.a.call: the path 'a\\x00b.yaml' holds a NUL character, which no file "
        "name can hold"]
    assert "internal error" not in result.stderr


def test_validate_reports_a_broken_handler_module_once_at_its_first_state(write, tmp_path):
    path = write("m.yaml", """
        machine: m
        start: a
        states:
          a:
            tick: brokenmod:first
            next: b
          b:
            tick: brokenmod:second
            next: c
          c:
            tick: brokenmod.third
            next: d
          d:
            tick: brokenmod:first
            next: done
          done:
            terminal: true
        """, brokenmod="def first(payload, ctx):\n    return None\n\ndef second(payload, ctx)\n    return None\n")
    result = dsm("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}:5:11: error: states.a.tick: cannot import module 'brokenmod': syntax error at "
        f"{tmp_path / 'brokenmod.py'}:4:25: expected ':'"]


def test_graph_mermaid_and_dot(tmp_path):
    mermaid = dsm("graph", ORDER)
    assert mermaid.returncode == 0
    text = mermaid.stdout
    assert text.startswith("stateDiagram-v2\n")
    assert "state fulfil__fork <<fork>>" in text and "state ship__join <<join>>" in text
    assert "fulfil__fork --> pick" in text and "bill --> ship__join" in text
    assert "check --> cancelled: rejected" in text and "ship --> refund: catch" in text
    assert "done --> [*]" in text and "class cancelled failed" in text
    out = tmp_path / "order.dot"
    dot = dsm("graph", ORDER, "--format", "dot", "-o", str(out))
    assert dot.returncode == 0 and dot.stdout == ""
    text = out.read_text()
    assert text.startswith('digraph "order" {') and '"fulfil__fork" [shape=box, style=filled' in text
    assert '"cancelled" [shape=doublecircle, color="#cc0000"' in text
    bad = dsm("graph", ORDER, "--format", "svg")
    assert bad.returncode == 2 and "--format must be one of mermaid, dot" in bad.stderr


def test_schema_command_prints_the_schema():
    result = dsm("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout) == json.loads((ROOT / "schemas" / "machine.schema.json").read_text())


def test_run_json_record_matches_the_contract():
    result = dsm("run", ORDER, "--json", "--payload", '{"total": 120, "address": "1 Main St"}')
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert list(record) == RECORD_KEYS + LATER_KEYS
    assert record["input"] == {"total": 120, "address": "1 Main St"} and record["waiting"] == []
    assert record["redrives"] == 0 and record["cancel"] is None
    assert (record["machine"], record["version"], record["status"], record["state"]) == ("order", 1, "succeeded",
                                                                                        "done")
    assert record["digest"].startswith("sha256:") and record["active"] == [] and record["error"] is None
    assert TIMESTAMP.match(record["created_at"]) and TIMESTAMP.match(record["finished_at"])
    assert record["transitions"] == 7 == len(record["history"])
    assert [list(h) for h in record["history"]] == [HISTORY_KEYS] * 7
    assert [h["seq"] for h in record["history"]] == list(range(1, 8))
    assert record["history"][1]["outcome"] == "approved"
    assert record["history"][2]["next"] == ["pick", "bill"]
    assert {tuple(h["branch"]) for h in record["history"][3:5]} == {("pick",), ("bill",)}
    assert record["payload"]["insured"] == 1.2 and record["payload"]["tracking"].startswith("TRK-")
    assert "receive -> check" in result.stderr  # progress on stderr


def test_run_failed_instance_exits_1():
    result = dsm("run", ORDER, "--json", "--payload", '{"total": 0}')
    assert result.returncode == 1
    record = json.loads(result.stdout)
    assert (record["status"], record["state"]) == ("failed", "cancelled")


@pytest.mark.long  # real seconds: run by the long step
def test_run_loop_guard_exits_1_with_error():
    result = dsm("run", "definitions/poll.yaml", "--json", "--payload", '{"ready_after": 1000}')
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "LoopGuard" and "max_transitions=30" in error["message"]


def test_run_payload_file(tmp_path):
    payload = tmp_path / "p.json"
    payload.write_text('{"text": "teh wrold", "images": 1}')
    result = dsm("run", "definitions/document.yaml", "--payload-file", str(payload), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["payload"]["clean_text"] == "the world"


@pytest.mark.parametrize("payload,words", [
    ("{not json", "--payload is not valid JSON"),
    ("[1, 2]", "--payload must be a JSON object, got an array"),
    ('{"x": NaN}', "--payload is not valid JSON"),
])
def test_run_bad_payload_exits_2(payload, words):
    result = dsm("run", ORDER, "--payload", payload)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_run_invalid_definition_exits_2(write):
    path = write("bad.yaml", "machine: x\nstart: a\nstates:\n  a:\n    next: b\n")
    result = dsm("run", str(path))
    assert result.returncode == 2
    assert f"{path}:5:11: error: state 'a': next refers to unknown state 'b'" in result.stdout


def test_run_timeout_exits_4(write):
    # the tick never returns: dsm must give up at --timeout rather than wait for it
    path = one_tick_machine(write, "slowmod", "__import__('threading').Event().wait()")
    result = dsm("run", str(path), "--timeout", "500ms", "--json", timeout=60)
    assert result.returncode == 4
    assert json.loads(result.stdout)["status"] == "running"
    assert "--timeout 500ms passed" in result.stderr


def test_run_interrupted_exits_130(write):
    path = one_tick_machine(write, "slowmod2", "time.sleep(3)")
    proc = spawn("run", str(path))
    deadline = time.monotonic() + 20
    line = ""
    while "started" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    assert proc.returncode == 130


def test_handler_that_raises_is_a_clean_failure_not_a_traceback(write):
    path = write("raise.yaml", """
        machine: raiser
        start: s
        states:
          s:
            tick: raisemod:boom
            next: done
          done:
            terminal: true
        """, raisemod="def boom(payload, ctx):\n    raise RuntimeError('kaboom')\n")
    result = dsm("run", str(path), "--json")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error.pop("traceback").endswith("in boom\n    raise RuntimeError('kaboom')\nRuntimeError: kaboom\n")
    assert error == {"type": "RuntimeError", "message": "kaboom", "state": "s", "attempts": 1}
    assert "Traceback" not in result.stderr and "kaboom" in result.stderr
    verbose = dsm("-v", "run", str(path))
    assert "Traceback" in verbose.stderr  # tracebacks go to the log with --verbose


def test_etcd_commands_need_an_endpoint():
    for args in (["status", "x"], ["list"], ["cancel", "x"], ["submit", ORDER], ["worker", ORDER]):
        result = dsm(*args)
        assert result.returncode == 2, args
        assert "needs an etcd endpoint" in result.stderr


def test_unreachable_etcd_exits_3():
    from dsm.testing import free_port

    result = dsm("list", "--etcd", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "etcd unreachable" in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_exit_2():
    assert dsm("run").returncode == 2
    assert dsm("frobnicate").returncode == 2
    assert dsm("run", ORDER, "--workers", "-1").returncode == 2
    result = dsm("run", ORDER, "--timeout", "soon")
    assert result.returncode == 2 and "--timeout" in result.stderr


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "definitions").glob("*.yaml")
                                         if not p.name.endswith(".test.yaml")))  # test files: test_dsm_test.py
def test_every_example_validates_and_runs(path):
    assert dsm("validate", f"definitions/{path}").returncode == 0
    if waits_for_signals(ROOT / "definitions" / path):
        # an embedded run takes no signals: it says so, and runs on until --timeout
        result = dsm("run", f"definitions/{path}", "--timeout", "1s")
        assert result.returncode == 4 and "takes no signals" in result.stderr, result.stderr
        return  # its test file (dsm test) sends the signals
    result = dsm("run", f"definitions/{path}", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "succeeded"


def test_every_etcd_command_takes_the_same_connection_options():
    names = ["--etcd", "--namespace", "--cacert", "--cert", "--key", "--user"]
    for command in ("submit", "worker", "status", "list", "cancel", "run"):
        text = dsm(command, "--help", COLUMNS="200").stdout
        assert all(re.search(rf"{name}\b", text) for name in names), (command, text)


# -- output: -q, -v, closed pipes, help, version ------------------------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_run_prints_nothing_on_stderr_when_it_succeeds(where):
    args = ["run", ORDER, "--payload", '{"total": 120}', "--json"]
    result = dsm("-q", *args) if where == "before" else dsm(*args, "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout)["status"] == "succeeded"  # data still on stdout


def test_quiet_run_of_a_failed_instance_says_why_in_one_line():
    result = dsm("run", ORDER, "--payload", '{"total": 0}', "-q")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "failed" in lines[0] and "cancelled" in lines[0], result.stderr
    assert result.stdout == ""


def test_quiet_applies_to_every_command(tmp_path):
    assert dsm("validate", "definitions", "-q").stderr == ""
    graph = dsm("graph", ORDER, "-o", str(tmp_path / "g.mmd"), "-q")
    assert graph.returncode == 0 and graph.stderr == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command(write, where):
    path = one_tick_machine(write, "raisemod2", "raise RuntimeError('kaboom')")
    result = dsm("-v", "run", str(path)) if where == "before" else dsm("run", str(path), "-v")
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def test_verbose_and_quiet_together_is_a_usage_error():
    result = dsm("run", ORDER, "-v", "-q")
    assert result.returncode == 2 and "-v" in result.stderr and "-q" in result.stderr


def _closed_stdout(*args: str) -> tuple[int, str]:
    """Run dsm with stdout a pipe whose reader has already gone (as in `dsm ... | head -0`)."""
    import os
    import subprocess

    from clitools import dsm_command, dsm_env

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([*dsm_command(), *args], stdout=write, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=dsm_env(), timeout=120)
    finally:
        os.close(write)
    return proc.returncode, proc.stderr


def test_a_closed_stdout_is_not_a_failure():
    code, stderr = _closed_stdout("run", ORDER, "--payload", '{"total": 120}', "--json")
    assert code == 0, stderr  # the instance succeeded: the exit code says so, pipe or no pipe
    assert "succeeded" in stderr and "Traceback" not in stderr and "pipe" not in stderr.lower()
    code, stderr = _closed_stdout("run", ORDER, "--payload", '{"total": 0}', "--json")
    assert code == 1 and "Traceback" not in stderr and "pipe" not in stderr.lower()
    code, stderr = _closed_stdout("graph", ORDER)
    assert code == 0 and stderr == ""


def test_help_shows_plain_metavars():
    """Each command's help, rendered in this process (the command itself is run once, for its root
    help): metavars only, never a Python type."""
    from typer.testing import CliRunner

    from dsm.cli.main import app

    commands = ["validate", "graph", "schema", "run", "submit", "worker", "status", "list", "cancel"]
    noise = re.compile(r"<(bool|str|int|float|path|list\[\w+\]|int range|float range)>")
    result = dsm("--help", COLUMNS="200")
    assert result.returncode == 0, result.stderr
    assert not noise.search(result.stdout), noise.findall(result.stdout)
    helps = {}
    for command in commands:
        shown = CliRunner().invoke(app, [command, "--help"], prog_name="dsm", env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (command, shown.output)
        assert not noise.search(shown.output), (command, noise.findall(shown.output))
        helps[command] = shown.output
    assert re.search(r"--payload-file\s+FILE", helps["run"]) and re.search(r"--etcd\s+URLS", helps["run"])
    assert "PATH" in helps["validate"]


def test_version():
    from importlib.metadata import version

    result = dsm("--version")
    assert result.returncode == 0
    assert result.stdout == f"dsm {version('dsm-workflow')}\n"


# -- input --------------------------------------------------------------------------------------

def test_payload_file_dash_reads_stdin():
    result = dsm("run", "definitions/document.yaml", "--payload-file", "-", "--json",
                 input='{"text": "teh wrold", "images": 1}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["payload"]["clean_text"] == "the world"


def test_no_import_on_an_embedded_run_is_a_usage_error():
    result = dsm("run", ORDER, "--no-import")
    assert result.returncode == 2
    assert "--no-import" in result.stderr and "--etcd" in result.stderr
    assert "started" not in result.stderr  # refused before anything ran


# -- validate: folders hold other YAML too ------------------------------------------------------

def test_validate_folder_skips_files_that_are_not_machines(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "order.yaml").write_text((ROOT / ORDER).read_text())
    (folder / "orders.py").write_text((ROOT / "definitions" / "orders.py").read_text())
    (folder / "docker-compose.yml").write_text((ROOT / "docker-compose.yml").read_text())
    (folder / "ci").mkdir()
    (folder / "ci" / "pipeline.yaml").write_text("jobs:\n  test: {runs-on: linux}\n")
    result = dsm("validate", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert f"{folder / 'order.yaml'}: ok" in result.stderr
    assert f"skipped {folder / 'docker-compose.yml'}: not a machine definition" in result.stderr
    assert f"skipped {folder / 'ci' / 'pipeline.yaml'}: not a machine definition" in result.stderr
    named = dsm("validate", str(folder / "docker-compose.yml"))  # a file named on the command line: always
    assert named.returncode == 2 and "docker-compose.yml:" in named.stdout


def test_validate_folder_still_checks_broken_machines(tmp_path):
    (tmp_path / "broken.yaml").write_text("machine: broken\nstart: a\nstates: [a, b\n")
    (tmp_path / "schema_only.yaml").write_text(
        "# yaml-language-server: $schema=../schemas/machine.schema.json\nstart: a\n")
    result = dsm("validate", "--no-import", str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path / 'broken.yaml'}:" in result.stdout and "invalid YAML" in result.stdout
    assert f"{tmp_path / 'schema_only.yaml'}:" in result.stdout


def test_validate_folder_without_machines_is_an_error(tmp_path):
    (tmp_path / "docker-compose.yml").write_text((ROOT / "docker-compose.yml").read_text())
    result = dsm("validate", str(tmp_path))
    assert result.returncode == 2 and "no machine definitions" in result.stderr


# -- run: timeouts, logs, guards ----------------------------------------------------------------

def test_embedded_timeout_says_the_instance_stopped_with_the_process(write):
    path = one_tick_machine(write, "slowmod3", "__import__('threading').Event().wait()")
    result = dsm("run", str(path), "--timeout", "500ms", timeout=60)
    assert result.returncode == 4
    assert "--timeout 500ms passed" in result.stderr
    assert "stopped" in result.stderr and "embedded" in result.stderr
    assert "WARNING" not in result.stderr and "Traceback" not in result.stderr
    assert "is running" not in result.stderr


def test_handler_log_lines_name_instance_and_state(write):
    path = one_tick_machine(write, "logmod", "ctx.logger.info('charging %s', 'card')")
    result = dsm("run", str(path), "--json")
    assert result.returncode == 0, result.stderr
    iid = json.loads(result.stdout)["id"]
    line = next(x for x in result.stderr.splitlines() if "charging card" in x)
    assert iid in line and "state s" in line and "attempt 1" in line


def test_a_guard_on_a_missing_key_suggests_is_defined(write):
    path = write("guard.yaml", """
        machine: guarded
        start: s
        states:
          s:
            choose:
              - when: "payload.order.total > 100"
                next: big
              - next: done
          big:
            next: done
          done:
            terminal: true
        """)
    result = dsm("run", str(path), "--payload", '{"order": {}}')
    assert result.returncode == 1
    assert "payload.order.total is defined and" in result.stderr, result.stderr


# -- graph: drawn node ids never collide with state names ---------------------------------------

COLLIDE = """
    machine: collide
    start: go__fork
    states:
      go__fork:
        next: go
      go:
        fork: [a, b]
        join: j
      a:
        next: j
      b:
        next: j
      j:
        next: j__join
      j__join:
        next: done
      done:
        terminal: true
    """


def test_graph_pseudo_nodes_never_take_a_state_name(write):
    path = write("collide.yaml", COLLIDE)
    states = {"go__fork", "go", "a", "b", "j", "j__join", "done"}
    text = dsm("graph", "--no-import", str(path)).stdout
    bars = dict(re.findall(r"^\s+state (\S+) <<(fork|join)>>$", text, re.M))
    assert len(bars) == 2 and not set(bars) & states, bars
    fork = next(n for n, kind in bars.items() if kind == "fork")
    join = next(n for n, kind in bars.items() if kind == "join")
    edges = re.findall(r"^\s+(\S+) --> (\S+?)(?::.*)?$", text, re.M)
    assert ("go__fork", "go") in edges and ("go", fork) in edges
    assert {(fork, "a"), (fork, "b"), ("a", join), ("b", join), (join, "j")} <= set(edges)
    assert [e for e in edges if e[0] == "go__fork"] == [("go__fork", "go")]
    assert [e for e in edges if e[0] == "j__join"] == [("j__join", "done")]
    dot = dsm("graph", "--no-import", str(path), "--format", "dot").stdout
    bars = re.findall(r'^\s+"([^"]+)" \[shape=box, style=filled', dot, re.M)
    assert len(bars) == 2 and not set(bars) & states, bars
    assert [e for e in re.findall(r'^\s+"([^"]+)" -> "([^"]+)"', dot, re.M) if e[0] == "go__fork"] == [
        ("go__fork", "go")]


def test_graph_ids_of_unsafe_names_do_not_collide(write):
    path = write("dash.yaml", """
        machine: dash
        start: a-b
        states:
          a-b:
            next: a_b_
          a_b_:
            next: done
          done:
            terminal: true
        """)
    text = dsm("graph", "--no-import", str(path)).stdout
    edges = re.findall(r"^\s+(\S+) --> (\S+)$", text, re.M)
    ids = re.findall(r'^\s+state "a-b" as (\S+)$', text, re.M)
    assert len(ids) == 1 and ids[0] != "a_b_"
    assert (ids[0], "a_b_") in edges and ("a_b_", "done") in edges


def test_run_embedded_with_an_id():
    result = dsm("run", ORDER, "--id", "order-7", "--json", "--payload", '{"total": 5}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == "order-7" and "instance order-7 started" in result.stderr
    bad = dsm("run", ORDER, "--id", "-leading-dash")
    assert bad.returncode == 2 and "invalid instance id" in bad.stderr
