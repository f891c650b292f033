"""Retention in the language and the records; the listing and expiry entries written with the records."""

from __future__ import annotations

import asyncio

import pytest
from clitools import dsm
from helpers import run_instances
from test_worker_parts import KEYS, fan

from dsm import compiler, index
from dsm.commits import commit_txn, plan_commit
from dsm.keys import Keys
from dsm.markers import MAX_TXN_OPS
from dsm.operations import Operations
from dsm.records import DEFAULT_RETENTION, public_record
from dsm.step import Arrival
from dsm.store import Delete, Put, prefix_end
from dsm.transition import Failure, Outcome, start

LINE = """
machine: line
start: a
{retention}
states:
  a:
    next: b
  b:
    next: done
  done:
    terminal: true
"""


def line(write, retention: str = ""):
    return compiler.load(write("line.yaml", LINE.format(retention=retention)))


def test_retention_defaults_to_seven_days_and_takes_durations(write):
    assert line(write).retention == DEFAULT_RETENTION == 7 * 86400
    assert line(write, "retention: 90m").retention == 5400
    assert line(write, "retention: 0").retention == 0


@pytest.mark.parametrize("value", ["forever", "-5", "7 days", "true"])
def test_a_retention_that_does_not_parse_is_a_located_error(write, value):
    path = write("bad.yaml", LINE.format(retention=f"retention: {value}"))
    result = dsm("validate", str(path))
    assert result.returncode == 2
    assert result.stdout.startswith(f"{path}:3:12: error: retention: "), result.stdout


def test_the_record_says_when_retention_deletes_it(write):
    graph = line(write, "retention: 1h")
    record = dsm("run", str(graph.file), "--json")
    assert record.returncode == 0, record.stderr
    import json

    rec = json.loads(record.stdout)
    assert rec["status"] == "succeeded"
    # to the second, as every timestamp of the record
    from datetime import datetime

    def parse(text):
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    assert parse(rec["expires_at"]) - parse(rec["finished_at"]) == pytest.approx(3600, abs=1)


def test_a_running_instance_has_no_expiry(write):
    graph = line(write)
    inst = start(graph, "i1", {}, 100.0)
    assert inst.expires_at is None and public_record(inst)["expires_at"] is None


async def entries(store, keys: Keys) -> tuple[set[str], set[str]]:
    idx = await store.range(f"{keys.root}idx/", prefix_end(f"{keys.root}idx/"))
    exp = await store.range(keys.expiry_prefix, prefix_end(keys.expiry_prefix))
    return {kv.key for kv in idx.kvs}, {kv.key for kv in exp.kvs}


def expected_entries(keys: Keys, inst) -> tuple[set[str], set[str]]:
    listing = {index.listing_key(keys, inst.id, inst.status, inst.machine, index.created_ms(inst))} if inst.finished \
        else set()  # a running instance is listed by its work markers
    ms = index.expires_ms(inst)
    return listing, ({keys.expiry(ms, inst.id)} if ms is not None else set())


def test_entries_follow_the_records_through_creation_finish_and_cancel(write, store_factory):
    graph = line(write, "retention: 2h")
    waiting = compiler.load(write("wait.yaml", """
        machine: waiting
        start: a
        states:
          a:
            tick: slowmod:nap
            next: done
          done:
            terminal: true
        """, slowmod="import time\ndef nap(payload, ctx):\n    time.sleep(30)\n"))

    async def go():
        store = await store_factory()
        keys = Keys("t" + str(id(store)))
        try:
            done, _, _ = await run_instances(store, graph, [{}, {}, {}], keys=keys)
            client = Operations(store, keys)
            running = await client.submit(waiting, {})
            cancelled_id = await client.submit(waiting, {})
            cancelled = await client.cancel(cancelled_id)
            running_inst = await client.instance(running)
            found_idx, found_exp = await entries(store, keys)
            want_idx: set[str] = set()
            want_exp: set[str] = set()
            for inst in [*done, running_inst, cancelled]:
                a, b = expected_entries(keys, inst)
                want_idx |= a
                want_exp |= b
            return found_idx, found_exp, want_idx, want_exp, done, cancelled
        finally:
            await store.delete(f"/{keys.namespace}/", prefix_end(f"/{keys.namespace}/"))
            await store.close()

    found_idx, found_exp, want_idx, want_exp, done, cancelled = asyncio.run(go())
    assert found_idx == want_idx and len(found_idx) == 4  # one listing entry a finished instance
    assert found_exp == want_exp and len(found_exp) == 4  # three succeeded, one cancelled
    assert all(inst.status == "succeeded" for inst in done) and cancelled.status == "cancelled"
    assert all(inst.expires_at == pytest.approx(inst.finished_at + 7200) for inst in done)
    assert cancelled.expires_at == pytest.approx(cancelled.finished_at + DEFAULT_RETENTION)


def test_a_commit_that_fails_a_wide_fork_counts_its_index_entries_in_the_budget():
    """Failing a fork of 140 branches removes 140 markers (the claims in them go with them): the
    commit keeps what fits, and the two index operations of the status change (the listing entry
    put, the expiry entry put; a running instance has none, its markers list it) are part of the count."""
    branches = "\n".join(f"  b{i}: {{tick: x:y, next: j}}" for i in range(140))
    names = ", ".join(f"b{i}" for i in range(140))
    text = f"machine: wide\nstart: s\nstates:\n  s: {{fork: [{names}], join: j}}\n{branches}\n"
    graph = compiler.compile_text(text + "  j: {next: done}\n  done: {terminal: true}\n", "wide.yaml",
                                  import_handlers=False)
    inst = start(graph, "i1", {}, 0.0)
    forked = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], 5, Outcome())], now=1.0, worker="w", slots=0,
                         max_record_bytes=10**7).after
    first = next(t for t in forked.tokens.values() if t.state == "b0")
    failure = Outcome(failure=Failure("Boom", "x", retryable=False))
    plan = plan_commit(graph, forked, [Arrival(first, 6, failure)], now=2.0, worker="w", slots=0,
                       max_record_bytes=10**7)
    txn = commit_txn(KEYS, plan, 8, {first.id: 6}, worker="w", lease=9, now=2.0)
    assert plan.after.status == "failed"
    assert MAX_TXN_OPS - 1 <= len(txn.success) <= MAX_TXN_OPS  # as full as it can be, never over
    failed = index.listing_key(KEYS, "i1", "failed", "wide", 0)
    assert failed in {op.key for op in txn.success if isinstance(op, Put)}
    assert not [op for op in txn.success if "/idx/" in op.key and isinstance(op, Delete)]
    assert any(op.key.startswith(KEYS.expiry_prefix) for op in txn.success if isinstance(op, Put))


def test_a_commit_that_does_not_change_the_status_writes_no_index_entry():
    graph = fan(3)
    inst = start(graph, "i1", {}, 0.0)
    plan = plan_commit(graph, inst, [Arrival(inst.tokens["t1"], 5, Outcome())], now=1.0, worker="w", slots=4,
                       max_record_bytes=10**7)
    txn = commit_txn(KEYS, plan, 7, {"t1": 5}, worker="w", lease=9, now=1.0)
    assert not any("/idx/" in op.key or "/exp/" in op.key for op in txn.success)
