"""Parents and children (`call`): a child never outlives its parent's interest in it, and a child
that ends after its parent is gone writes nothing for the parent."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import pytest
from helpers import until_async
from test_language import scenario

from dsm import compiler, handlers
from dsm.errors import InputError, NotFound
from dsm.housekeeping import HousekeepingOptions, deletion_txn
from dsm.keys import Keys, WorkInfo
from dsm.operations import Operations
from dsm.records import load_instance
from dsm.service import serving
from dsm.store import prefix_end
from dsm.store.etcd import EtcdOptions, EtcdStore

WAITKID = """
machine: waitkid
start: hold
states:
  hold:
    signal: go
    next: done
  done:
    terminal: true
"""

LEAVER = """
machine: leaver
start: sub
retention: 0
states:
  sub:
    call: waitkid.yaml
    timeout: 300ms
    catch: done
    next: done
  done:
    terminal: true
"""

HOLDER = """
machine: holder
start: sub
states:
  sub:
    call: waitkid.yaml
    next: done
  done:
    terminal: true
"""


async def _gone(client: Operations, iid: str) -> bool:
    try:
        await client.instance(iid)
    except NotFound:
        return True
    return False


async def _ended_or_gone(client: Operations, iid: str) -> bool:
    try:
        return (await client.instance(iid)).finished
    except NotFound:
        return True


@pytest.mark.etcd
@pytest.mark.parametrize("case", ["timed-out-parent-with-retention-0", "parent-removed-under-its-child",
                                  "stray-marker"])
def test_nothing_is_left_for_a_parent_that_is_gone_and_idle_workers_stay_idle(case, write, etcd_url, namespace):
    """A child that ends after its parent is gone must not put the parent's work marker back: a
    marker without a record was claimed and given back for ever by every worker (two idle workers
    at a third of a CPU each, etcd written a thousand times a second). And a marker without a
    record, however it came to be, is removed by the worker that meets it."""
    write("waitkid.yaml", WAITKID)
    leaver = compiler.load(write("leaver.yaml", LEAVER))
    holder = compiler.load(write("holder.yaml", HOLDER))
    keys = Keys(namespace)

    async def main() -> tuple[int, bool]:
        async with AsyncExitStack() as stack:
            stores = [await EtcdStore.connect(EtcdOptions.build(etcd_url)) for _ in range(3)]
            for store in stores:
                stack.push_async_callback(store.close)
            client = Operations(stores[0], keys)
            workers = []
            for store in stores[1:]:
                service = await stack.enter_async_context(serving(  # lease_ttl 3: a heartbeat a second
                    store, keys, [leaver, holder], allow=handlers.Allowlist(()), concurrency=4, lease_ttl=3.0,
                    housekeeping=HousekeepingOptions(compaction_retention=0, interval=0.1)))
                workers.append(service.worker)
            parents: list[str] = []
            if case == "timed-out-parent-with-retention-0":
                # the call times out, the parent catches ChildTimeout, ends, and retention deletes it
                parents = [await client.submit(leaver, {}, instance_id=f"leaver-{i}") for i in range(3)]
                for pid in parents:
                    await until_async(lambda pid=pid: _gone(client, pid), f"{pid} to be deleted by retention")
            elif case == "parent-removed-under-its-child":
                # the parent's keys go while it waits for its child (as a deletion that knew nothing
                # of children left it): its record, markers and entries
                parents = [await client.submit(holder, {}, instance_id=f"holder-{i}") for i in range(3)]
                for pid in parents:
                    kv = await until_async(lambda pid=pid: _child_waits(client, stores[0], keys, pid),
                                      f"{pid}'s child to wait for its signal")
                    txn = deletion_txn(keys, load_instance(kv.value), kv.mod_revision)
                    assert (await stores[0].txn(txn.compare, txn.success)).succeeded
            else:
                parents = ["ghost-1", "ghost-2", "ghost-3"]
                for pid in parents:  # a marker whose instance has no record
                    await stores[0].put(keys.work(keys.place(holder.machine, 0, pid), "t1"),
                                        WorkInfo(holder.machine, holder.digest, "sub").dump())
            for pid in parents:  # the children end now, after their parents are gone
                child = f"{pid}.c1.1"
                try:
                    await client.signal(child, "go")
                except (NotFound, InputError):
                    pass  # no such child, or it has ended already
                await until_async(lambda child=child: _ended_or_gone(client, child), f"{child} to end")

            async def markers_left() -> list[str]:
                work = await stores[0].range(keys.work_prefix, prefix_end(keys.work_prefix))
                return [kv.key for kv in work.kvs if (ref := keys.parse_work(kv.key)) and ref.instance in parents]

            async def settled() -> bool:
                return not await markers_left()

            # what the children's ends set off settles: the markers of the parents go (a marker put
            # back, or a stray one no worker removes, stays: claimed and given back for ever)
            try:
                await until_async(settled, "no marker left for the parents", timeout=10)
            except AssertionError:
                raise AssertionError(f"markers left for parents that are gone: {await markers_left()}") from None
            # idle workers write next to nothing: two heartbeats of each, a second apart, and little else
            before, claimed = await stores[0].revision(), [w.stats.claimed for w in workers]
            for _ in range(2):
                beats = [w.presence.written_at for w in workers]
                await until_async(lambda beats=beats: all(w.presence.written_at != b for w, b in zip(workers, beats)),
                                  "a heartbeat of each worker")
            return await stores[0].revision() - before, [w.stats.claimed for w in workers] == claimed

    written, idle = asyncio.run(main())
    assert written < 20, f"etcd was written {written} times by idle workers over two heartbeats"
    assert idle, "idle workers claimed work"


async def _child_waits(client: Operations, store: Any, keys: Keys, pid: str) -> Any:
    try:
        child = await client.record(f"{pid}.c1.1", history=False)
    except NotFound:
        return None
    if not (child["waiting"] and child["waiting"][0]["kind"] == "signal"):
        return None
    return await store.get(keys.instance(pid))


# -- a child never outlives its parent's interest in it -----------------------------------------------

IMPATIENT = """
machine: impatient
start: sub
states:
  sub:
    call: waitkid.yaml
    timeout: 300ms
    retry: {max_attempts: 2, backoff: 10ms}
    catch: done
    next: done
  done:
    terminal: true
"""

FORKER = """
machine: forker
start: split
states:
  split:
    fork: [sub, later]
    join: done
  sub:
    call: waitkid.yaml
    next: done
  later:
    wait: 300ms
    next: explode
  explode:
    choose:
      - when: "payload.get('never')"
        next: done
  done:
    terminal: true
"""


def _by_parent(children: dict[str, Any], pid: str, words: str) -> None:
    """Every child of `pid` was cancelled by it, with a reason that says `words`."""
    assert children, f"{pid} started no child"
    for cid, child in children.items():
        assert child["status"] == "cancelled", (cid, child["status"])
        assert child["cancel"]["by"] == f"parent:{pid}", (cid, child["cancel"])
        assert words in child["cancel"]["reason"] and pid in child["cancel"]["reason"], (cid, child["cancel"])


def _worker(store_factory: Any, namespace: str, graph: Any, body: Any) -> Any:
    """Run `body(cluster)` with a worker that serves `graph` (and the machines it calls)."""
    return scenario(store_factory, namespace, graph, body)


async def _children_of(client: Operations, pid: str, ids: list[str]) -> dict[str, Any]:
    return {cid: await until_async(lambda cid=cid: _finished_record(client, cid), f"child {cid} of {pid} to end")
            for cid in ids}


async def _finished_record(client: Operations, iid: str) -> Any:
    try:
        record = await client.record(iid, history=False)
    except NotFound:  # not started yet
        return None
    return record if record["status"] != "running" else None


MACHINES = {"impatient": (IMPATIENT, "timed out", "succeeded", ["p.c1.1", "p.c1.2"]),
            "forker": (FORKER, "failed", "failed", ["p.c3.1"])}


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_a_call_that_times_out_and_a_parent_that_fails_cancel_their_running_children_on_a_worker(
        machine, store_factory, write, namespace):
    text, words, status, children = MACHINES[machine]
    write("waitkid.yaml", WAITKID)
    graph = compiler.load(write(f"{machine}.yaml", text))

    async def body(c: Any) -> tuple[Any, dict[str, Any]]:
        iid = await c.client.submit(graph, {}, instance_id="p")
        done = await c.client.wait(iid, timeout=30)
        return done, await _children_of(c.client, iid, children)

    done, found = _worker(store_factory, namespace, graph, body)
    assert done.status == status
    _by_parent(found, "p", words)


def test_cancelling_a_parent_cancels_its_child_by_the_parent(store_factory, write, namespace):
    write("waitkid.yaml", WAITKID)
    graph = compiler.load(write("holder.yaml", HOLDER))

    async def body(c: Any) -> dict[str, Any]:
        iid = await c.client.submit(graph, {}, instance_id="p")
        await until_async(lambda: _child_waits(c.client, c.store, c.keys, iid), "the child to wait for its signal")
        await c.client.cancel(iid, reason="not needed", by="ann@host")
        assert (await c.client.record(iid))["cancel"]["by"] == "ann@host"
        return await _children_of(c.client, iid, ["p.c1.1"])

    found = _worker(store_factory, namespace, graph, body)
    _by_parent(found, "p", "cancelled")
    assert "not needed" in found["p.c1.1"]["cancel"]["reason"]


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_the_embedded_engine_cancels_the_children_its_parent_gave_up_on(machine, write):
    from dsm.embedded import run_graph
    from dsm.records import public_record

    text, words, status, ids = MACHINES[machine]
    write("waitkid.yaml", WAITKID)
    graph = compiler.load(write(f"{machine}.yaml", text))
    seen: dict[str, Any] = {}

    def update(inst: Any) -> None:
        seen[inst.id] = inst

    result = asyncio.run(run_graph(graph, {}, instance_id="p", on_update=update, timeout=30))
    assert result.instance.status == status
    children = {iid: public_record(inst) for iid, inst in seen.items() if iid != "p"}
    assert sorted(children) == ids
    _by_parent(children, "p", words)


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_dsm_test_cancels_the_children_its_parent_gave_up_on(machine, write):
    from dsm.records import public_record
    from dsm.testing.runner import run_file

    text, words, status, ids = MACHINES[machine]
    write("waitkid.yaml", WAITKID)
    write(f"{machine}.yaml", text)
    path = write(f"{machine}.test.yaml", f"""
        machine: {machine}.yaml
        cases:
          - name: nobody signals the child
            id: p
            expect: {{status: {status}}}
    """)
    (case,) = run_file(path).cases
    assert case.passed, case.reasons
    children = {child.id: public_record(child) for child in case.children}
    assert sorted(children) == ids
    _by_parent(children, "p", words)


# -- deleting a parent deletes its children ---------------------------------------------------------

TOP = """
machine: top
start: sub
retention: {retention}
states:
  sub:
    call: mid.yaml
    next: done
  done:
    terminal: true
"""

MID = """
machine: mid
start: sub
states:
  sub:
    call: leaf.yaml
    next: done
  done:
    terminal: true
"""

LEAF = """
machine: leaf
start: go
states:
  go:
    next: done
  done:
    terminal: true
"""


@pytest.mark.parametrize("how", ["dsm delete", "retention"])
def test_deleting_a_parent_deletes_its_children_and_theirs(how, store_factory, write, namespace):
    """The children keep the machine's default retention (a week): deleting the parent, by hand or
    by its own retention (0), deletes them with it, whole (records, histories, index entries)."""
    from indexes import inconsistencies

    write("leaf.yaml", LEAF)
    write("mid.yaml", MID)
    graph = compiler.load(write("top.yaml", TOP.format(retention="0" if how == "retention" else "1d")))
    # a user's own instance whose id only looks like a child's is not one
    lookalike = compiler.load(write("lookalike.yaml", LEAF.replace("machine: leaf", "machine: lookalike")))

    async def main() -> tuple[list[str], list[str]]:
        store = await store_factory()
        keys = Keys(namespace)
        client = Operations(store, keys)
        try:
            async with serving(store, keys, [graph], allow=handlers.Allowlist(()),
                               housekeeping=HousekeepingOptions(compaction_retention=0, interval=0.05)):
                await client.submit(lookalike, {}, instance_id="p.c9.1")
                family = ["p", "p.c1.1", "p.c1.1.c1.1"]
                await client.submit(graph, {}, instance_id="p")
                for iid in family[1:]:  # the children end first, then the parent (then retention 0 may take all)
                    await until_async(lambda iid=iid: _ended_or_gone(client, iid), f"{iid} to end")
                if how == "dsm delete":
                    await until_async(lambda: _finished_record(client, "p"), "the parent to end")
                    await client.delete("p")
                gone = []
                for iid in family:
                    await until_async(lambda iid=iid: _gone(client, iid), f"{iid} to be deleted")
                    gone.append(iid)
                assert (await client.instance("p.c9.1")).status == "succeeded"
                return gone, await inconsistencies(store, keys)
        finally:
            await store.close()

    gone, problems = asyncio.run(main())
    assert gone == ["p", "p.c1.1", "p.c1.1.c1.1"] and problems == []


INSTANT = """
machine: instant
start: done
states:
  done:
    terminal: true
"""

CALLS_INSTANT = """
machine: caller
start: sub
states:
  sub:
    call: instant.yaml
    next: done
  done:
    terminal: true
"""


def test_a_child_that_ends_as_it_starts_lets_its_parent_go_on(store_factory, write, namespace):
    """A child whose start state is terminal is created finished: no commit of its own ever wakes
    the parent, so the call state that starts it does not park."""
    write("instant.yaml", INSTANT)
    graph = compiler.load(write("caller.yaml", CALLS_INSTANT))

    async def body(c: Any) -> Any:
        iid = await c.client.submit(graph, {"x": 1}, instance_id="p")
        return await c.client.wait(iid, timeout=10)

    done = _worker(store_factory, namespace, graph, body)
    assert done.status == "succeeded" and done.payload == {"x": 1}


def test_a_child_that_ends_as_it_starts_lets_its_parent_go_on_embedded_and_in_dsm_test(write):
    from dsm.embedded import run_graph
    from dsm.testing.runner import run_file

    write("instant.yaml", INSTANT)
    graph = compiler.load(write("caller.yaml", CALLS_INSTANT))
    result = asyncio.run(run_graph(graph, {"x": 1}, timeout=10))
    assert result.instance.status == "succeeded" and result.instance.payload == {"x": 1}
    path = write("caller.test.yaml", """
        machine: caller.yaml
        cases:
          - name: the child ends at once
            expect: {status: succeeded, path: [sub, done]}
    """)
    (case,) = run_file(path).cases
    assert case.passed, case.reasons
