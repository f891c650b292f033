"""Log lines: `--log-format json` (one object per line, with the instance's fields on every line
about one) and the text format (naming instance and state), embedded and from a real worker."""

from __future__ import annotations

import json
import logging
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from clitools import dsm, spawn

from dsm import logs

MACHINE = """
machine: chatty
start: work
states:
  work:
    tick: chatty:work
    retry: {max_attempts: 2, backoff: 10ms}
    next: done
  done:
    terminal: true
"""

HANDLERS = """
def work(payload, ctx):
    ctx.logger.info("working on attempt %d", ctx.attempt)
    if ctx.attempt == 1:
        raise ConnectionError("first attempt fails")
"""


def lines_of(stderr: str) -> list[dict[str, Any]]:
    """Every line of stderr, each a JSON object (json.loads fails the test otherwise)."""
    parsed = [json.loads(line) for line in stderr.splitlines()]
    assert parsed and all(isinstance(p, dict) for p in parsed)
    for p in parsed:
        assert {"time", "level", "logger", "message"} <= set(p), p
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", p["time"]), p
    return parsed


def about(parsed: list[dict[str, Any]], instance: str) -> list[dict[str, Any]]:
    """The lines about `instance`: each carries all the fields of one."""
    found = [p for p in parsed if p.get("instance") == instance]
    for p in found:
        assert set(logs.FIELDS) <= set(p), p
    return found


def test_json_logs_of_an_embedded_run_parse_line_by_line(write):
    path = write("chatty.yaml", MACHINE, chatty=HANDLERS)
    result = dsm("run", str(path), "--json", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    iid = json.loads(result.stdout)["id"]
    parsed = lines_of(result.stderr)
    mine = about(parsed, iid)
    assert len(mine) == len(parsed)  # everything said is about this instance
    failed, = [p for p in mine if p["level"] == "WARNING"]
    assert failed["message"] == "tick failed: ConnectionError: first attempt fails"
    assert (failed["machine"], failed["state"], failed["attempt"], failed["worker"]) == ("chatty", "work", 1,
                                                                                          "embedded")
    said = [p for p in mine if p["logger"] == "dsm.handler"]
    assert [(p["message"], p["state"], p["attempt"], p["worker"]) for p in said] == [
        ("working on attempt 1", "work", 1, "embedded"), ("working on attempt 2", "work", 2, "embedded")]
    assert any("succeeded at done" in p["message"] and p["state"] == "done" for p in mine)


def test_the_environment_chooses_the_format_and_the_option_wins(write):
    path = write("chatty.yaml", MACHINE, chatty=HANDLERS)
    from_env = dsm("run", str(path), DSM_LOG_FORMAT="json")
    assert from_env.returncode == 0, from_env.stderr
    lines_of(from_env.stderr)
    overridden = dsm("run", str(path), "--log-format", "text", DSM_LOG_FORMAT="json")
    assert overridden.returncode == 0
    assert not overridden.stderr.lstrip().startswith("{")
    before = dsm("--log-format", "json", "run", str(path))
    lines_of(before.stderr)


def test_text_logs_name_instance_and_state(write):
    path = write("chatty.yaml", MACHINE, chatty=HANDLERS)
    result = dsm("run", str(path), "--json")
    iid = json.loads(result.stdout)["id"]
    line = next(x for x in result.stderr.splitlines() if "tick failed" in x)
    assert line == (f"dsm: WARNING: instance {iid} state work attempt 1: "
                    "tick failed: ConnectionError: first attempt fails")


def test_an_unknown_log_format_is_a_usage_error(write):
    path = write("chatty.yaml", MACHINE, chatty=HANDLERS)
    result = dsm("run", str(path), "--log-format", "xml")
    assert result.returncode == 2
    assert "--log-format must be 'text' or 'json'" in result.stderr


@pytest.mark.etcd
@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_worker_logs_json_with_the_instance_fields(etcd, namespace, write, tmp_path: Path, isolation):
    """Every line a worker writes parses; lines about an instance name it, its machine, state,
    attempt and the worker, also those its handlers write from their own processes."""
    path = write("chatty.yaml", MACHINE, chatty=HANDLERS)
    env = {"DSM_ETCD": etcd.endpoint, "DSM_NAMESPACE": namespace}
    worker = spawn("worker", str(path), "--log-format", "json", "--isolation", isolation, cwd=tmp_path, **env)
    try:
        first = json.loads(worker.stderr.readline())
        assert "serving namespace" in first["message"]
        run = dsm("run", str(path), "--workers", "0", "--json", "--log-format", "json", cwd=tmp_path, **env)
        assert run.returncode == 0, run.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=60)
    worker_id = first["worker"]
    assert worker_id.endswith(f":{worker.pid}")
    iid = json.loads(run.stdout)["id"]
    parsed = [first, *lines_of(stderr)]
    mine = about(parsed, iid)
    assert all(p["worker"] == worker_id for p in parsed)
    assert [(p["logger"], p["level"], p["state"], p["attempt"], p["message"]) for p in mine] == [
        ("dsm.handler", "INFO", "work", 1, "working on attempt 1"),
        ("dsm.worker", "WARNING", "work", 1, "tick failed: ConnectionError: first attempt fails"),
        ("dsm.handler", "INFO", "work", 2, "working on attempt 2"),
    ]
    assert all(p["machine"] == "chatty" for p in mine)
    client = about(lines_of(run.stderr), iid)  # the client's notes about the instance carry it too
    assert client and all(p["machine"] == "chatty" for p in client)


@pytest.mark.etcd
def test_a_worker_logs_text_naming_instance_and_state(etcd, namespace, write, tmp_path: Path):
    path = write("chatty.yaml", MACHINE, chatty=HANDLERS)
    env = {"DSM_ETCD": etcd.endpoint, "DSM_NAMESPACE": namespace}
    worker = spawn("worker", str(path), cwd=tmp_path, **env)
    try:
        assert "serving namespace" in worker.stderr.readline()
        run = dsm("run", str(path), "--workers", "0", "--json", cwd=tmp_path, **env)
        assert run.returncode == 0, run.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=60)
    iid = json.loads(run.stdout)["id"]
    assert (f"dsm: WARNING: instance {iid} state work attempt 1: tick failed: ConnectionError: first attempt fails"
            in stderr.splitlines())
    assert f"dsm: INFO: instance {iid} state work attempt 2: working on attempt 2" in stderr.splitlines()


def test_a_json_line_keeps_a_traceback_and_stays_one_line():
    formatter = logs.JsonFormatter()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord("dsm.worker", logging.ERROR, __file__, 1, "internal error on %s", ("x",),
                                   exc_info=__import__("sys").exc_info())
    record.__dict__.update(logs.about("i-1", "m", "s", 2, "w:1"))
    text = formatter.format(record)
    assert "\n" not in text
    parsed = json.loads(text)
    assert parsed["message"] == "internal error on x" and parsed["level"] == "ERROR"
    assert (parsed["instance"], parsed["machine"], parsed["state"], parsed["attempt"], parsed["worker"]) == (
        "i-1", "m", "s", 2, "w:1")
    assert "ValueError: bad\nthing" in parsed["exception"]


def test_a_line_not_about_an_instance_has_no_instance_fields():
    record = logging.LogRecord("dsm.worker", logging.WARNING, __file__, 1, "lease lost", (), None)
    parsed = json.loads(logs.JsonFormatter().format(record))
    assert set(parsed) == {"time", "level", "logger", "message"}
