"""Failed attempts leave a trace, through the worker on both stores: the history entry of a visit
lists the attempts that failed before it, a retry waiting shows in `waiting`, and an instance that
failed keeps the error's traceback."""

from __future__ import annotations

import asyncio
import re

from helpers import run_instances

from dsm import compiler
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import FAILED, RUNNING, SUCCEEDED, public_record
from dsm.service import serving

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

FLAKY = """
machine: flaky
start: s
states:
  s:
    tick: flakymod:call
    retry: {max_attempts: 3, backoff: 10ms, jitter: false}
    next: done
  done:
    terminal: true
"""

FLAKY_PY = """
def call(payload, ctx):
    if ctx.attempt < payload.get("succeed_at", 99):
        deep(ctx.attempt)

def deep(n):
    raise ConnectionError(f"refused on attempt {n}")
"""


def test_retried_attempts_are_on_the_history_entry_and_a_failure_keeps_its_traceback(store_factory, write,
                                                                                       namespace):
    graph = compiler.load(write("flaky.yaml", FLAKY, flakymod=FLAKY_PY))

    async def main():
        store = await store_factory()
        try:
            return await run_instances(store, graph, [{"succeed_at": 3}, {}], keys=Keys(namespace))
        finally:
            await store.close()

    (ok, bad), (ok_history, bad_history), worker = asyncio.run(main())
    assert ok.status == SUCCEEDED
    entry = public_record(ok, ok_history)["history"][0]
    assert entry["attempt"] == 3 and STAMP.match(entry["started_at"]) and entry["duration_ms"] >= 0
    assert [f["attempt"] for f in entry["failures"]] == [1, 2]
    first = entry["failures"][0]
    assert first["error"]["type"] == "ConnectionError" and first["error"]["message"] == "refused on attempt 1"
    assert "in deep" in first["error"]["traceback"] and first["error"]["traceback"].rstrip().endswith(
        "ConnectionError: refused on attempt 1")
    assert first["worker"] == worker.id and STAMP.match(first["started_at"]) and first["duration_ms"] >= 0

    record = public_record(bad, bad_history)
    assert record["status"] == FAILED and record["history"] == [] and record["waiting"] == []
    error = record["error"]
    assert (error["type"], error["state"], error["attempts"]) == ("ConnectionError", "s", 3)
    assert "in deep" in error["traceback"] and "refused on attempt 3" in error["traceback"]


SLOW_RETRY = """
machine: later
start: s
states:
  s:
    tick: latermod:call
    retry: {max_attempts: 5, backoff: 1h, jitter: false}
    next: done
  done:
    terminal: true
"""


def test_a_retry_waiting_shows_its_attempt_last_error_and_when(store_factory, write, namespace):
    graph = compiler.load(write("later.yaml", SLOW_RETRY, latermod="def call(payload, ctx):\n"
                                                                  "    raise TimeoutError('upstream slow')\n"))

    async def main():
        store = await store_factory()
        keys = Keys(namespace)
        client = Operations(store, keys)
        seen: list = []
        try:
            async with serving(store, keys, [graph], concurrency=2):
                iid = await client.submit(graph, {})

                def update(inst):
                    if public_record(inst)["waiting"]:
                        seen.append(inst)
                        raise _Seen

                try:
                    await client.wait(iid, timeout=30, on_update=update)
                except _Seen:
                    pass
                return public_record(seen[0]), await client.record(iid)
        finally:
            await store.close()

    when_seen, record = asyncio.run(main())
    for rec in (when_seen, record):
        assert rec["status"] == RUNNING and rec["transitions"] == 0 and rec["error"] is None
        (wait,) = rec["waiting"]
        assert (wait["state"], wait["kind"], wait["attempt"]) == ("s", "retry", 2)
        assert wait["last_error"]["type"] == "TimeoutError" and wait["last_error"]["message"] == "upstream slow"
        assert STAMP.match(wait["until"]) and wait["until"] > rec["created_at"]


class _Seen(Exception):
    pass
