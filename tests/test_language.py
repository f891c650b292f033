"""The waiting constructs and dynamic fan-out, through the worker on both stores: durable timers
(`wait`), signals (`signal`, buffered, one per visit, with a timeout), maps (`map`, bounded
concurrency, item order, bounded batches) and child machines (`call`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from helpers import token_ref, until_async

from dsm import compiler
from dsm.errors import DefinitionError, InputError, InvalidSignal, NotFound
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import CANCELLED, FAILED, SUCCEEDED, public_record
from dsm.service import serving
from dsm.store import prefix_end


class Cluster:
    """A worker on a store, a client, and the graphs it serves."""

    def __init__(self, store: Any, keys: Keys, graph: Any):
        self.store = store
        self.keys = keys
        self.graph = graph
        self.client = Operations(store, keys)

    async def wait_for(self, iid: str, test, timeout: float = 20.0) -> dict[str, Any]:
        record: dict[str, Any] = {}

        async def reached() -> dict[str, Any] | None:
            nonlocal record
            record = await self.client.record(iid)
            return record if test(record) else None

        return await until_async(reached, lambda: f"instance {iid} to get there (last read: {record})",
                                 timeout=timeout)


def scenario(store_factory, namespace, graph, body, *, concurrency: int = 8):
    async def main():
        store = await store_factory()
        keys = Keys(namespace)
        try:  # (the modules allowed are the machine's and those of the machines it calls)
            async with serving(store, keys, [graph], concurrency=concurrency):
                return await body(Cluster(store, keys, graph))
        finally:
            await store.close()

    return asyncio.run(main())


TIMER = """
machine: timer
start: first
states:
  first:
    next: nap
  nap:
    wait: 400ms
    next: done
  done:
    terminal: true
"""


def test_a_timer_waits_durably_without_a_tick_and_shows_in_waiting(store_factory, write, namespace):
    graph = compiler.load(write("timer.yaml", TIMER))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {})
        waiting = await c.wait_for(iid, lambda r: r["waiting"])
        done = await c.client.wait(iid, timeout=20)
        return waiting, public_record(done, await c.client.history(iid))

    waiting, record = scenario(store_factory, namespace, graph, body)
    (wait,) = waiting["waiting"]
    assert (wait["state"], wait["kind"], wait["signal"]) == ("nap", "timer", None) and wait["until"]
    assert record["status"] == SUCCEEDED
    first, nap = record["history"]
    gap = _ms(nap["at"]) - _ms(first["at"])
    assert gap >= 390, gap


UNTIL = """
machine: until
start: nap
states:
  nap:
    wait: {until: "payload.at"}
    next: done
  done:
    terminal: true
"""


def test_wait_until_takes_epoch_seconds_or_iso_and_a_past_time_continues_at_once(store_factory, write, namespace):
    graph = compiler.load(write("until.yaml", UNTIL))

    async def body(c: Cluster):
        started = time.time()
        soon = await c.client.submit(graph, {"at": started + 0.3})
        past = await c.client.submit(graph, {"at": "2001-01-01T00:00:00Z"})
        bad = await c.client.submit(graph, {"at": "next tuesday"})
        out = [await c.client.wait(i, timeout=20) for i in (soon, past, bad)]
        return started, out

    started, (soon, past, bad) = scenario(store_factory, namespace, graph, body)
    assert soon.status == SUCCEEDED and soon.finished_at >= started + 0.29
    assert past.status == SUCCEEDED
    assert bad.status == FAILED and bad.error.type == "WaitError" and "next tuesday" in bad.error.message
    assert bad.error.state == "nap"


APPROVAL = """
machine: approve
start: ask
states:
  ask:
    next: decide
  decide:
    signal: decision
    on:
      yes: again
      no: rejected
  again:
    signal: decision
    timeout: 300ms
    catch: timed_out
    on:
      yes: done
      no: rejected
  timed_out:
    next: rejected
  done:
    terminal: true
  rejected:
    terminal: true
    status: failed
"""


def test_signals_are_buffered_consumed_in_order_one_per_visit_and_route_on(store_factory, write, namespace):
    graph = compiler.load(write("approve.yaml", APPROVAL))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {"n": 1}, instance_id="sig-1")
        await c.wait_for(iid, lambda r: r["waiting"] and r["waiting"][0]["kind"] == "signal")
        parked = await c.client.record(iid)
        # two signals at once: the first is consumed at `decide`, the second waits for `again`
        await c.client.signal(iid, "decision", {"by": "ann"}, outcome="yes")
        await c.client.signal(iid, "decision", {"by": "bob", "note": "fine"}, outcome="yes")
        done = await c.client.wait(iid, timeout=20)
        return parked, public_record(done, await c.client.history(iid))

    parked, record = scenario(store_factory, namespace, graph, body)
    (wait,) = parked["waiting"]
    assert (wait["state"], wait["kind"], wait["signal"], wait["until"]) == ("decide", "signal", "decision", None)
    assert record["status"] == SUCCEEDED and record["signals"] == []
    assert record["payload"] == {"n": 1, "by": "bob", "note": "fine"}
    entries = {h["state"]: h for h in record["history"]}
    assert entries["decide"]["signal"]["name"] == "decision" and entries["decide"]["outcome"] == "yes"
    assert [h["state"] for h in record["history"]] == ["ask", "decide", "again"]


def test_a_signal_sent_before_the_state_is_kept_and_a_timeout_goes_to_catch(store_factory, write, namespace):
    graph = compiler.load(write("approve.yaml", APPROVAL))

    async def body(c: Cluster):
        early = await c.client.submit(graph, {}, instance_id="early")
        await c.client.signal(early, "decision", {"at_once": True}, outcome="no")
        slow = await c.client.submit(graph, {}, instance_id="slow")
        await c.wait_for(slow, lambda r: r["waiting"])
        await c.client.signal(slow, "decision", outcome="yes")
        return [public_record(await c.client.wait(i, timeout=20), await c.client.history(i)) for i in (early, slow)]

    early, slow = scenario(store_factory, namespace, graph, body)
    assert early["status"] == FAILED and early["state"] == "rejected" and early["payload"]["at_once"] is True
    assert slow["status"] == FAILED and slow["state"] == "rejected"
    assert [h["state"] for h in slow["history"]] == ["ask", "decide", "again", "timed_out"]
    assert slow["payload"]["error"]["type"] == "SignalTimeout"


def test_a_signal_to_a_finished_or_unknown_instance_is_refused_and_writes_nothing(store_factory, write, namespace):
    graph = compiler.load(write("approve.yaml", APPROVAL))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {})
        await c.client.signal(iid, "decision", outcome="no")
        await c.client.wait(iid, timeout=20)
        before = await c.store.range(f"/{namespace}/", prefix_end(f"/{namespace}/"))
        errors = []
        for target in (iid, "no-such-instance"):
            try:
                await c.client.signal(target, "decision", outcome="yes")
            except (InputError, NotFound) as exc:
                errors.append(exc)
        after = await c.store.range(f"/{namespace}/", prefix_end(f"/{namespace}/"))
        return errors, before, after

    errors, before, after = scenario(store_factory, namespace, graph, body)
    assert isinstance(errors[0], InputError) and "failed" in str(errors[0])
    assert isinstance(errors[1], NotFound)
    assert [(kv.key, kv.mod_revision) for kv in before.kvs] == [(kv.key, kv.mod_revision) for kv in after.kvs]


GATE = """
machine: gate
start: ask
states:
  ask:
    signal: decision
    on:
      approve: hold
      reject: rejected
  hold:
    signal: go
    next: done
  done:
    terminal: true
  rejected:
    terminal: true
    status: failed
"""


def test_a_signal_the_machine_does_not_take_is_refused_naming_what_it_takes_and_writes_nothing(
        store_factory, write, namespace):
    """A misspelled name, an outcome no state waiting for the name routes on, an outcome to a name
    whose states route without one, and no outcome where every state needs one: each is refused
    before anything is written, with a message that says what the machine takes."""
    graph = compiler.load(write("gate.yaml", GATE))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {}, instance_id="gate-1")
        await c.wait_for(iid, lambda r: r["waiting"] and r["waiting"][0]["kind"] == "signal")
        before = await c.store.range(f"/{namespace}/", prefix_end(f"/{namespace}/"))
        refused = []
        for name, outcome in [("aprove", None), ("decision", "maybe"), ("decision", None), ("go", "approve")]:
            try:
                await c.client.signal(iid, name, outcome=outcome)
            except InputError as exc:
                refused.append((name, outcome, exc))
            else:
                refused.append((name, outcome, None))
        after = await c.store.range(f"/{namespace}/", prefix_end(f"/{namespace}/"))
        await c.client.signal(iid, "decision", {"by": "ann"}, outcome="approve")
        await c.client.signal(iid, "go")
        done = await c.client.wait(iid, timeout=20)
        return refused, before, after, done

    refused, before, after, done = scenario(store_factory, namespace, graph, body)
    messages = {}
    for name, outcome, exc in refused:
        assert isinstance(exc, InvalidSignal), f"signal {name!r} outcome {outcome!r} was stored"
        assert "gate-1" in str(exc) and "'gate'" in str(exc), str(exc)
        messages[(name, outcome)] = str(exc)
    assert "'decision'" in messages[("aprove", None)] and "'go'" in messages[("aprove", None)]
    assert "'approve'" in messages[("aprove", None)] and "'reject'" in messages[("aprove", None)]
    for key in [("decision", "maybe"), ("decision", None)]:
        assert "'approve'" in messages[key] and "'reject'" in messages[key], messages[key]
    assert "'maybe'" in messages[("decision", "maybe")]
    assert "without an outcome" in messages[("go", "approve")], messages[("go", "approve")]
    assert [(kv.key, kv.mod_revision) for kv in before.kvs] == [(kv.key, kv.mod_revision) for kv in after.kvs]
    assert done.status == SUCCEEDED and done.payload == {"by": "ann"}


def test_a_signal_only_a_called_machine_waits_for_is_refused_by_its_parent(store_factory, write, namespace):
    """The parent's own machine decides what the parent takes: `go` is its child's signal."""
    write("child.yaml", CHILD, childmod=CHILD_PY)
    graph = compiler.load(write("parent.yaml", PARENT))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {"wait_for_signal": True}, instance_id="par-g")
        parked = await c.wait_for(iid, lambda r: r["waiting"] and r["waiting"][0]["kind"] == "child")
        child = parked["waiting"][0]["child"]
        await c.wait_for(child, lambda r: r["waiting"] and r["waiting"][0]["kind"] == "signal")
        try:
            await c.client.signal(iid, "go")
        except InvalidSignal as exc:
            refused: InvalidSignal | None = exc
        else:
            refused = None
        await c.client.signal(child, "go")
        return refused, await c.client.record(iid), public_record(await c.client.wait(iid, timeout=20))

    refused, parked, done = scenario(store_factory, namespace, graph, body)
    assert refused is not None and "waits for no signals" in str(refused), parked["signals"]
    assert done["status"] == SUCCEEDED and done["signals"] == []


MAP = """
machine: mapper
start: fan
states:
  fan:
    map:
      items: payload.xs
      branch: work
      max_concurrency: 3
      with: [factor]
      collect: out
    join: total
  work:
    tick: mapmod:work
    next: total
  total:
    tick: mapmod:total
    next: done
  done:
    terminal: true
"""

MAP_PY = """
import threading, time, random
lock = threading.Lock()
now = [0]
peak = [0]

def work(payload, ctx):
    with lock:
        now[0] += 1
        peak[0] = max(peak[0], now[0])
    time.sleep(random.random() * 0.01)
    with lock:
        now[0] -= 1
    assert ctx.branch == (f"fan[{payload['index']}]",), ctx.branch
    return {"y": payload["item"] * payload["factor"]}

def total(payload, ctx):
    payload["sum"] = sum(r["y"] for r in payload["out"])
    payload["peak"] = peak[0]
"""


def test_a_map_collects_in_item_order_and_never_runs_more_than_its_concurrency(store_factory, write, namespace):
    graph = compiler.load(write("mapper.yaml", MAP, mapmod=MAP_PY))

    async def body(c: Cluster):
        xs = list(range(40))
        ids = [await c.client.submit(graph, {"xs": xs, "factor": 2}), await c.client.submit(graph, {"xs": []})]
        return [public_record(await c.client.wait(i, timeout=60), await c.client.history(i)) for i in ids]

    full, empty = scenario(store_factory, namespace, graph, body, concurrency=16)
    assert full["status"] == SUCCEEDED, full["error"]
    assert [r["y"] for r in full["payload"]["out"]] == [2 * x for x in range(40)]
    assert full["payload"]["out"][5] == {"y": 10}
    assert full["payload"]["sum"] == 2 * sum(range(40)) and 1 <= full["payload"]["peak"] <= 3
    assert sorted(h["branch"][0] for h in full["history"] if h["branch"]) == sorted(f"fan[{i}]" for i in range(40))
    assert empty["status"] == SUCCEEDED and empty["payload"]["out"] == [] and empty["payload"]["sum"] == 0


WIDE_MAP = """
machine: wide
start: fan
states:
  fan:
    map: {items: "payload.xs", branch: item}
    join: done
  item:
    next: done
  done:
    terminal: true
"""


def test_a_map_wider_than_a_transaction_starts_items_in_batches(store_factory, write, namespace):
    graph = compiler.load(write("wide.yaml", WIDE_MAP))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {"xs": list(range(300))})
        return public_record(await c.client.wait(iid, timeout=120), await c.client.history(iid))

    record = scenario(store_factory, namespace, graph, body)
    assert record["status"] == SUCCEEDED, record["error"]
    assert [r["item"] for r in record["payload"]["results"]] == list(range(300))
    assert record["transitions"] == 301


QUICK_MAP = """
machine: quick
start: fan
states:
  fan:
    map: {items: "payload.xs", branch: item}
    join: done
  item:
    tick: quickmod:work
    next: done
  done:
    terminal: true
"""

QUICK_PY = """
def work(payload, ctx):
    return {"y": payload["item"] + 1}
"""


def test_items_that_finish_together_commit_within_the_operations_a_transaction_takes(
        store_factory, write, namespace):
    """Dozens of items of one map finish while its commit is in flight: they fold into the next
    commit, which must still fit in etcd's 128 operations (a history entry and a marker
    each), not be refused and fail the instance."""
    graph = compiler.load(write("quick.yaml", QUICK_MAP, quickmod=QUICK_PY))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {"xs": list(range(500))})
        return public_record(await c.client.wait(iid, timeout=120), await c.client.history(iid))

    record = scenario(store_factory, namespace, graph, body, concurrency=64)
    assert record["status"] == SUCCEEDED, record["error"]
    assert [r["y"] for r in record["payload"]["results"]] == list(range(1, 501))
    assert record["transitions"] == 501


@pytest.mark.long  # real seconds: run by the long step
def test_a_map_of_the_most_items_a_map_takes_without_a_concurrency_limit_succeeds(write):
    """10,000 items and no max_concurrency: items start as others finish, a bounded window of them
    in flight, so the record never holds thousands of live items (it would outgrow what the store
    takes and fail the map with PayloadTooLarge). A map's items are transitions of its instance,
    so the machine raises max_transitions above them."""
    from dsm.store.memory import MemoryStore
    from dsm.transition import MAP_WINDOW

    text = QUICK_MAP.replace("start: fan", "max_transitions: 20000\nstart: fan")
    graph = compiler.load(write("quick.yaml", text, quickmod=QUICK_PY))
    peak = [0]

    async def main():
        store = MemoryStore()
        finished = asyncio.Event()

        def on_commit(step):
            for act in step.instance.activations.values():
                peak[0] = max(peak[0], act.started - len(act.arrived))
            if step.instance.finished:
                finished.set()

        async with serving(store, Keys(), [graph], concurrency=64, on_commit=on_commit):
            client = Operations(store, Keys())
            iid = await client.submit(graph, {"xs": list(range(10_000))})
            await asyncio.wait_for(finished.wait(), 300)  # (not client.wait: it would read every version)
            return await client.instance(iid)

    inst = asyncio.run(main())
    assert inst.status == SUCCEEDED, inst.error
    assert [r["y"] for r in inst.payload["results"]] == list(range(1, 10_001))
    assert 64 <= peak[0] <= MAP_WINDOW


CALL_MAP = """
machine: callmap
start: fan
states:
  fan:
    map: {items: "payload.xs", branch: sub}
    join: done
  sub:
    call: kid.yaml
    next: done
  done:
    terminal: true
"""

KID = """
machine: kid
start: s
states:
  s:
    next: done
  done:
    terminal: true
"""


def test_a_map_of_call_states_starts_its_children_within_the_operations_a_transaction_takes(
        store_factory, write, namespace):
    """Each item of this map starts a child at once; a worker with many free slots must not start
    more children in one commit than etcd's 128 operations hold."""
    write("kid.yaml", KID)
    graph = compiler.load(write("callmap.yaml", CALL_MAP))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {"xs": list(range(40))})
        return public_record(await c.client.wait(iid, timeout=120), await c.client.history(iid))

    record = scenario(store_factory, namespace, graph, body, concurrency=64)
    assert record["status"] == SUCCEEDED, record["error"]
    assert [r["item"] for r in record["payload"]["results"]] == list(range(40))
    assert len({h["child"] for h in record["history"] if h.get("child")}) == 40


PARENT = """
machine: parent
start: prep
states:
  prep:
    next: sub
  sub:
    call: child.yaml
    retry: {max_attempts: 2, backoff: 10ms}
    catch: broken
    next: done
  done:
    terminal: true
  broken:
    terminal: true
    status: failed
"""

CHILD = """
machine: child
start: work
states:
  work:
    tick: childmod:work
    next: hold
  hold:
    choose:
      - when: "payload.get('wait_for_signal')"
        next: stay
      - next: done
  stay:
    signal: go
    next: done
  done:
    terminal: true
"""

CHILD_PY = """
def work(payload, ctx):
    if payload.get("fail"):
        raise ValueError("child refuses")
    payload["child_was_here"] = ctx.instance_id
"""


def test_call_runs_a_child_whose_payload_is_the_result_and_a_failed_child_fails_the_state(
        store_factory, write, namespace):
    write("child.yaml", CHILD, childmod=CHILD_PY)
    graph = compiler.load(write("parent.yaml", PARENT))

    async def body(c: Cluster):
        ok = await c.client.submit(graph, {"x": 1}, instance_id="par-ok")
        bad = await c.client.submit(graph, {"fail": True}, instance_id="par-bad")
        records = [public_record(await c.client.wait(i, timeout=30), await c.client.history(i)) for i in (ok, bad)]
        children = [await c.client.record(h["child"]) for h in records[0]["history"] if h.get("child")]
        return records, children

    (ok, bad), children = scenario(store_factory, namespace, graph, body)
    assert ok["status"] == SUCCEEDED, (ok["error"], ok["payload"])
    (child,) = children
    assert child["parent"] == {"id": "par-ok", "state": "sub"} and child["status"] == SUCCEEDED
    assert ok["payload"] == {"x": 1, "child_was_here": child["id"]}
    assert [h["state"] for h in ok["history"]] == ["prep", "sub"]
    assert bad["status"] == FAILED and bad["state"] == "broken"
    assert bad["payload"]["error"]["type"] == "ChildFailed" and bad["payload"]["error"]["attempts"] == 2
    assert "child refuses" in bad["payload"]["error"]["message"]


def test_cancelling_a_parent_cancels_its_child(store_factory, write, namespace):
    write("child.yaml", CHILD, childmod=CHILD_PY)
    graph = compiler.load(write("parent.yaml", PARENT))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {"wait_for_signal": True}, instance_id="par-c")
        parked = await c.wait_for(iid, lambda r: r["waiting"] and r["waiting"][0]["kind"] == "child")
        child = parked["waiting"][0]["child"]
        await c.wait_for(child, lambda r: r["waiting"] and r["waiting"][0]["kind"] == "signal")
        await c.client.cancel(iid, reason="test")
        return await c.client.record(iid), await c.client.record(child)

    parent, child = scenario(store_factory, namespace, graph, body)
    assert parent["status"] == CANCELLED and child["status"] == CANCELLED
    assert "par-c" in child["cancel"]["reason"] and child["cancel"]["by"] == "parent:par-c"


def test_a_child_that_is_signalled_lets_its_parent_continue(store_factory, write, namespace):
    write("child.yaml", CHILD, childmod=CHILD_PY)
    graph = compiler.load(write("parent.yaml", PARENT))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {"wait_for_signal": True}, instance_id="par-s")
        parked = await c.wait_for(iid, lambda r: r["waiting"] and r["waiting"][0]["kind"] == "child")
        child = parked["waiting"][0]["child"]
        await c.wait_for(child, lambda r: r["waiting"] and r["waiting"][0]["kind"] == "signal")
        await c.client.signal(child, "go", {"from_signal": 1})
        return public_record(await c.client.wait(iid, timeout=30))

    record = scenario(store_factory, namespace, graph, body)
    assert record["status"] == SUCCEEDED and record["payload"]["from_signal"] == 1


IMPATIENT = """
machine: impatient
start: sub
states:
  sub:
    call: slowkid.yaml
    timeout: 300ms
    catch: nap
    next: done
  nap:
    wait: 3s
    next: done
  done:
    terminal: true
"""

SLOWKID = """
machine: slowkid
start: hold
states:
  hold:
    signal: go
    next: done
  done:
    terminal: true
"""


def test_a_child_its_parent_gave_up_on_is_cancelled_and_a_late_wake_does_not_cut_the_parent_wait_short(
        store_factory, write, namespace):
    """The call timed out and the parent went on (catch) to a timer: the child, still running, is
    cancelled by its parent (it never ends on its own after that). A wake-up that crossed the
    timeout (the child's last commit rewrote the parent's marker as due now, as a child that ends
    just then does) finds the token waiting for its timer: the timer must not fire early."""
    from dsm.keys import WorkInfo

    write("slowkid.yaml", SLOWKID)
    graph = compiler.load(write("impatient.yaml", IMPATIENT))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {}, instance_id="impatient")
        waiting = await c.wait_for(iid, lambda r: r["waiting"] and r["waiting"][0]["kind"] == "timer")
        child = await c.wait_for(f"{iid}.c1.1", lambda r: r["status"] != "running")
        token = next(iter((await c.client.instance(iid)).tokens))
        due = WorkInfo(graph.machine, graph.digest, "nap", 0.0, None, wait=0.0)
        await c.store.put((await token_ref(c.store, c.keys, iid, token)).key, due.dump())
        done = await c.client.wait(iid, timeout=20)
        return waiting, child, public_record(done, await c.client.history(iid))

    waiting, child, record = scenario(store_factory, namespace, graph, body)
    assert child["status"] == CANCELLED and child["cancel"]["by"] == "parent:impatient", child["cancel"]
    assert "timed out" in child["cancel"]["reason"]
    assert record["status"] == SUCCEEDED
    caught, nap = record["history"]
    assert (caught["state"], nap["state"]) == ("sub", "nap")
    assert _ms(nap["at"]) - _ms(caught["at"]) >= 2990, (caught, nap)


# -- compile-time checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ("  s:\n    tick: m:f\n    wait: 1s\n    next: done\n", "has a tick and 'wait'"),
    ("  s:\n    wait: 1s\n    signal: x\n    next: done\n", "has both 'wait' and 'signal'"),
    ("  s:\n    wait: 1s\n    timeout: 2s\n    next: done\n", "cannot have 'timeout'"),
    ("  s:\n    signal: x\n    retry: {max_attempts: 2}\n    next: done\n", "cannot have 'retry'"),
    ("  s:\n    wait: soon\n    next: done\n", "states.s.wait"),
    ("  s:\n    wait: {until: 'payload.('}\n    next: done\n", "does not compile"),
    ("  s:\n    map: {items: payload.xs, branch: done}\n    next: done\n", "several routing keys"),
    ("  s:\n    map: {items: payload.xs, branch: b}\n", "missing join"),
    ("  s:\n    call: nowhere.yaml\n    next: done\n", "no machine file 'nowhere.yaml'"),
    ("  s:\n    on: {a: done}\n", "no tick (or signal)"),
])
def test_the_compiler_refuses_misused_waits_maps_and_calls_at_their_line(write, body, message):
    text = "machine: m\nstart: s\nstates:\n" + body + "  b:\n    next: done\n  done:\n    terminal: true\n"
    path = write("bad.yaml", text)
    with pytest.raises(DefinitionError) as caught:
        compiler.load(path, import_handlers=False)
    problems = caught.value.problems
    assert any(message in p.message for p in problems), [str(p) for p in problems]
    assert all(p.file == str(path) and p.line >= 1 for p in problems)


def test_a_map_branch_that_escapes_is_refused(write):
    text = """
    machine: m
    start: s
    states:
      s:
        map: {items: payload.xs, branch: b}
        join: j
      b:
        choose:
          - when: "payload.item"
            next: j
          - next: done
      j:
        next: done
      done:
        terminal: true
    """
    with pytest.raises(DefinitionError) as caught:
        compiler.load(write("esc.yaml", text))
    assert any("malformed map" in p.message and "'done'" in p.message for p in caught.value.problems), \
        [str(p) for p in caught.value.problems]


def test_a_chain_of_calls_back_to_the_caller_is_refused_with_both_paths(write):
    write("a.yaml", "machine: a\nstart: s\nstates:\n  s:\n    call: b.yaml\n    next: done\n"
                    "  done:\n    terminal: true\n")
    path = write("b.yaml", "machine: b\nstart: s\nstates:\n  s:\n    call: a.yaml\n    next: done\n"
                           "  done:\n    terminal: true\n")
    with pytest.raises(DefinitionError) as caught:
        compiler.load(path)
    text = "\n".join(str(p) for p in caught.value.problems)
    assert "lead back to the caller" in text and "b.yaml" in text and "a.yaml" in text


def test_a_parent_digest_pins_its_child(write):
    write("child.yaml", CHILD, childmod=CHILD_PY)
    parent = write("parent.yaml", PARENT)
    first = compiler.load(parent)
    write("child.yaml", CHILD.replace("signal: go", "signal: gone"), childmod=CHILD_PY)
    second = compiler.load(parent)
    assert first.digest != second.digest
    assert list(first.children()) != list(second.children())


def _ms(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000





def test_the_audit_accepts_map_histories_and_catches_an_item_that_arrives_twice(store_factory, write, namespace):
    from dataclasses import replace

    from dsm.audit import audit

    graph = compiler.load(write("mapper.yaml", MAP, mapmod=MAP_PY))

    async def body(c: Cluster):
        ids = [await c.client.submit(graph, {"xs": list(range(7)), "factor": 1}),
               await c.client.submit(graph, {"xs": []})]
        return [(await c.client.wait(i, timeout=60), await c.client.history(i)) for i in ids]

    (full, full_history), (empty, empty_history) = scenario(store_factory, namespace, graph, body)
    assert audit(graph, full, full_history) == [] and audit(graph, empty, empty_history) == []
    twice = next(h for h in full_history if h.branch == ("fan[3]",))
    doubled = [*full_history, replace(twice, seq=len(full_history) + 1)]
    assert any("fan[3]" in p for p in audit(graph, replace(full, transitions=len(doubled)), doubled))


NESTED = """
machine: nested
start: split
states:
  split:
    fork: [left, right]
    join: end
  left:
    map: {items: "payload.xs", branch: inner, collect: doubled}
    join: left_done
  inner:
    fork: [a, b]
    join: inner_done
  a:
    next: inner_done
  b:
    next: inner_done
  inner_done:
    next: left_done
  left_done:
    next: end
  right:
    next: end
  end:
    next: done
  done:
    terminal: true
"""


def test_maps_and_forks_nest(store_factory, write, namespace):
    from dsm.audit import audit

    graph = compiler.load(write("nested.yaml", NESTED))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {"xs": [1, 2, 3]})
        done = await c.client.wait(iid, timeout=60)
        return done, await c.client.history(iid)

    done, history = scenario(store_factory, namespace, graph, body)
    assert done.status == SUCCEEDED, done.error
    assert [r["item"] for r in done.payload["doubled"]] == [1, 2, 3]
    assert {h.branch for h in history if h.state == "a"} == {("left", f"left[{i}]", "a") for i in range(3)}
    assert audit(graph, done, history) == []


def test_the_drawing_shows_each_waiting_construct_distinctly(write):
    from dsm import render

    write("child.yaml", CHILD, childmod=CHILD_PY)
    parent = compiler.load(write("parent.yaml", PARENT))
    approve = compiler.load(write("approve.yaml", APPROVAL))
    timer = compiler.load(write("timer.yaml", TIMER))
    mapper = compiler.load(write("mapper.yaml", MAP, mapmod=MAP_PY), import_handlers=False)
    assert "decide : signal decision" in render.mermaid(approve)
    assert "again : signal decision (timeout 300ms)" in render.mermaid(approve)
    assert '"again" [label="again\\nsignal decision (timeout 300ms)", shape=cds' in render.dot(approve)
    assert "nap : wait 400ms" in render.mermaid(timer) and "style=\"rounded,dashed\"" in render.dot(timer)
    assert "sub : call child.yaml" in render.mermaid(parent) and "peripheries=2" in render.dot(parent)
    dot = render.dot(mapper)
    assert '"fan__fork" -> "work" [label="each of payload.xs, 3 at a time", style=dashed];' in dot
    assert "fan__fork --> work: each of payload.xs, 3 at a time" in render.mermaid(mapper)


def test_a_finished_child_makes_only_the_token_waiting_for_it_due(write):
    """The pure step shared by the embedded engine and dsm test (on etcd the child's last commit
    rewrites the parent's work marker instead)."""
    from dsm import transition
    from dsm.records import PARKED, Parent, evolve

    write("child.yaml", CHILD, childmod=CHILD_PY)
    graph = compiler.load(write("parent.yaml", PARENT))
    parent = transition.start(graph, "p", {}, 0.0)
    parent = transition.advance(graph, parent, "t1", transition.Outcome(), now=1.0, worker="w").instance
    step = transition.advance(graph, parent, "t1", transition.Outcome(), now=1.0, worker="w")
    (child,) = step.started
    waiting = step.instance
    assert waiting.tokens["t1"].not_before == PARKED and waiting.tokens["t1"].child == child.id
    assert transition.child_ended(waiting, child) is waiting  # still running: nothing to do
    done = evolve(child, status=SUCCEEDED, finished_at=2.0)
    woken = transition.child_ended(waiting, done)
    assert woken.tokens["t1"].not_before == 0.0
    stranger = evolve(done, parent=Parent("p", "sub", "t1", "parent", graph.digest), id="someone-else")
    assert transition.child_ended(waiting, stranger) is waiting  # not the child that token waits for
    assert transition.ChildResult.of(done.id, done).payload == done.payload
    assert transition.ChildResult.of("gone", None) == transition.ChildResult("gone", None)


def test_a_signal_that_wakes_more_tokens_than_a_transaction_holds_wakes_them_all(store_factory, namespace, write):
    """150 branches wait for the same signal: a signal wakes them all (the first to run takes it,
    the others wait again), though their markers do not fit in one transaction (etcd takes 128
    operations): the rest are woken by whoever claims the SYNC marker."""
    names = [f"b{i}" for i in range(150)]
    branches = "".join(f"  {n}:\n    signal: go\n    next: j\n" for n in names)
    graph = compiler.load(write("wide.yaml", f"machine: widewait\nstart: s\nstates:\n  s:\n"
                                             f"    fork: [{', '.join(names)}]\n    join: j\n{branches}"
                                             "  j:\n    next: done\n  done:\n    terminal: true\n"))

    async def body(c: Cluster):
        iid = await c.client.submit(graph, {})
        await c.wait_for(iid, lambda r: len(r["waiting"]) == 150, timeout=30)
        for _ in range(150):
            await c.client.signal(iid, "go")
        return await c.client.wait(iid, timeout=60)

    done = scenario(store_factory, namespace, graph, body)
    assert done.status == SUCCEEDED
