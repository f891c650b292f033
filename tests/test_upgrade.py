"""Namespaces written by earlier releases (key layouts 1 and 2) keep working under this release.

tests/upgrade/layout1.json and layout2.json hold every key of a namespace that release 0.1.0 and
0.2.0 wrote (tests/upgrade/make_namespace.py made them): instances finished, failed, cancelled, one
past its retention, and running ones waiting for a signal, a timer and a child, one never started.
Each is loaded as it was into a store; this release then lists, shows and finishes them all, its
housekeeper moves the work markers to their place and deletes what this layout no longer reads,
and nothing is lost.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from helpers import until_async
from indexes import inconsistencies, read_all

from dsm import compiler
from dsm.housekeeping import HousekeepingOptions
from dsm.index import legacy_prefixes
from dsm.keys import LAYOUT, Keys
from dsm.layout import OlderRelease, written
from dsm.membership import WorkerInfo
from dsm.operations import Operations
from dsm.service import serving
from dsm.store import Put

HERE = Path(__file__).resolve().parent / "upgrade"
SAVED = {layout: json.loads((HERE / f"layout{layout}.json").read_text()) for layout in (1, 2)}
EARLIER = pytest.mark.parametrize("earlier", [1, 2], ids=["layout1", "layout2"])


async def load_saved(store, namespace: str, earlier: int) -> dict[str, bytes]:
    """The saved namespace's keys put into `namespace` of `store`, as the release of key layout
    `earlier` left them."""
    saved = SAVED[earlier]
    old = f"/{saved['namespace']}/"
    loaded = {f"/{namespace}/" + key[len(old):]: base64.b64decode(value) for key, value, _ in saved["keys"]}
    for key, value in loaded.items():
        await store.put(key, value)
    return loaded


def graphs() -> list:
    return [compiler.load(HERE / name) for name in ("legacy.yaml", "sleeper.yaml", "broken.yaml", "brief.yaml",
                                                    "parent.yaml")]


@EARLIER
def test_a_namespace_of_an_earlier_layout_carries_on(store_factory, namespace, earlier):
    async def body():
        store = await store_factory()
        keys = Keys(namespace)
        client = Operations(store, keys)
        try:
            await load_saved(store, namespace, earlier)
            old_history = {iid: [h.as_dict() for h in await client.history(iid)] for iid in SAVED[earlier]["instances"]}
            assert [h["seq"] for h in old_history["L-done"]] == list(range(1, 9))  # a to c, through the fork
            # listed as the earlier release listed them, before anything was migrated
            listed = {i.id: i.status for i in await client.list()}
            assert listed == {"L-done": "succeeded", "L-gate": "running", "L-cancel": "cancelled",
                              "L-pending": "running", "S-timer": "running", "B-failed": "failed",
                              "Q-brief": "succeeded", "P-parent": "running", "P-parent.c2.1": "running"}
            assert [i.id for i in await client.list(status="running", machine="legacy")] == ["L-pending", "L-gate"]
            assert await written(store, keys) == earlier

            options = HousekeepingOptions(interval=0.2, compaction_retention=0)
            async with serving(store, keys, graphs(), concurrency=4, housekeeping=options):
                await client.signal("L-gate", "go")
                await client.signal("L-pending", "go")
                await client.signal("P-parent.c2.1", "finish")
                for iid in ("L-gate", "L-pending", "S-timer", "P-parent"):
                    inst = await client.wait(iid, timeout=60)
                    assert inst.status == "succeeded", (iid, inst.error)
                await until_async(lambda: written(store, keys), "the namespace upgraded", timeout=30)
                await until_async(lambda: _gone(client, "Q-brief"), "Q-brief deleted by retention", timeout=30)

            assert await written(store, keys) == LAYOUT
            for prefix in [*legacy_prefixes(keys), keys.listings("running")]:
                assert await read_all(store, prefix) == []
            assert [kv.key for kv in await read_all(store, keys.work_prefix)] == []  # all finished
            assert not [kv.key for kv in await read_all(store, keys.root) if "Q-brief" in kv.key]
            assert await inconsistencies(store, keys) == []  # a marker of an earlier layout among them
            # nothing lost: the history of every instance, old entries and new, once each, in order
            for iid, before in old_history.items():
                if iid == "Q-brief":
                    continue
                after = [h.as_dict() for h in await client.history(iid)]
                inst = await client.instance(iid)
                assert after[:len(before)] == before, iid
                assert [h["seq"] for h in after] == list(range(1, inst.transitions + 1)), iid
            record = await client.record("L-gate")  # two transitions then, eight now
            assert [h["state"] for h in record["history"]][:4] == ["a", "b", "gate", "split"]
            assert sorted(h["state"] for h in record["history"][4:6]) == ["left", "right"]
            assert [h["state"] for h in record["history"]][6:] == ["nap", "c"]
            assert record["payload"] == {"a": 1, "b": 1, "left": 1, "right": 1, "c": 1}
            finished = {i.id: i.status for i in await client.list()}
            assert finished == {**{iid: "succeeded" for iid in ("L-done", "L-gate", "L-pending", "S-timer",
                                                                "P-parent", "P-parent.c2.1")},
                                "L-cancel": "cancelled", "B-failed": "failed"}
        finally:
            await store.close()

    asyncio.run(body())


async def _gone(client: Operations, iid: str) -> bool:
    return not await read_all(client.store, client.keys.instance(iid))


def test_a_worker_of_this_release_does_not_start_beside_one_of_an_earlier_release(store_factory, namespace):
    async def body():
        store = await store_factory()
        keys = Keys(namespace)
        try:
            lease = await store.lease_grant(30)
            old = WorkerInfo(id="old:1", host="old", pid=1, definitions=(), allow=None, functions=(), refused=(),
                             concurrency=1, in_flight=0, started_at=0.0, updated_at=0.0)
            raw = json.loads(old.dump())
            del raw["layout"]  # as release 0.1 wrote its entry
            await store.txn([], [Put(f"{keys.root}workers/old:1", json.dumps(raw).encode(), lease)])
            with pytest.raises(OlderRelease, match=r"old:1.*stop them"):
                async with serving(store, keys, graphs()):
                    pass
            await store.lease_revoke(lease)
            async with serving(store, keys, graphs()) as service:  # gone: this release starts
                assert service.worker is not None
        finally:
            await store.close()

    asyncio.run(body())


@EARLIER
def test_the_upgrade_moves_markers_and_deletes_entries_in_batches_and_twice_does_no_harm(store_factory, namespace,
                                                                                       monkeypatch, earlier):
    """Half done (one instance's markers moved), the namespace lists as before; done, its markers
    are in their place, the entries this layout does not read are gone, and all agree; done
    again, nothing changes."""
    from dsm import layout

    async def body():
        store = await store_factory()
        keys = Keys(namespace)
        client = Operations(store, keys)
        try:
            loaded = await load_saved(store, namespace, earlier)
            listed = [(i.id, i.status) for i in await client.list()]
            legacy = [k for k in loaded if any(k.startswith(p) for p in legacy_prefixes(keys))]
            assert len(legacy) == (27 if earlier == 1 else 0)  # three of the four entries of each of 9 instances
            old_markers = [k for k in loaded if keys.parse_legacy_work(k)]
            running = [k for k in loaded if k.startswith(keys.listings("running"))]
            assert len(old_markers) == len(running) == 5
            await layout._move(store, keys, "L-gate")
            assert [(i.id, i.status) for i in await client.list()] == listed
            monkeypatch.setattr(layout, "BATCH", 4)
            assert await layout.upgrade(store, keys) == 4 + len(legacy)  # the instances of the markers left
            assert await layout.upgrade(store, keys) == 0
            assert [(i.id, i.status) for i in await client.list()] == listed
            left = {kv.key for kv in await read_all(store, keys.root)}
            placed = {keys.work(keys.place_of(await client.instance(k.split("/")[-2])), "t1") for k in old_markers}
            assert left == set(loaded) - set(legacy) - set(old_markers) - set(running) | placed | {keys.layout}
            assert await inconsistencies(store, keys) == []
            child = await client.instance("P-parent.c2.1")  # where its parent's markers lie
            assert child.parent is not None and child.parent.created == int(
                (await client.instance("P-parent")).created_at * 1000)
        finally:
            await store.close()

    asyncio.run(body())


WAITKID = ("machine: waitkid\nstart: hold\nstates:\n  hold:\n    signal: go\n    next: done\n"
           "  done:\n    terminal: true\n")
RETRIER = ("machine: retrier\nstart: sub\nstates:\n  sub:\n    call: waitkid.yaml\n"
           "    retry: {max_attempts: 3, backoff: 10ms}\n    next: done\n  done:\n    terminal: true\n")


def test_a_finished_child_of_release_02_redriven_wakes_its_parent_where_its_markers_lie(tmp_path):
    """A child whose record release 0.2 wrote does not say when its parent was created; one that
    had finished before the upgrade has no marker to move, so the upgrade leaves its record as it
    is. Redriven and finished now, it must wake its parent at the parent's place: once listed, no
    marker away from its place, and no worker claiming one that no commit can compare."""
    from dsm.records import load_instance
    from dsm.store.memory import MemoryStore

    (tmp_path / "waitkid.yaml").write_text(WAITKID)
    (tmp_path / "retrier.yaml").write_text(RETRIER)
    graph = compiler.load(tmp_path / "retrier.yaml")

    async def body():
        store, keys = MemoryStore(), Keys("rp")
        client = Operations(store, keys)

        async def children():
            return [i for i in (load_instance(kv.value) for kv in await read_all(store, keys.instances)) if i.parent]

        async def count(n):
            return len(await children()) >= n

        async with serving(store, keys, [graph], concurrency=2):
            pid = await client.submit(graph, {})
            await until_async(lambda: count(1), "child 1", timeout=10)
            (first,) = await children()
            await client.cancel(first.id)  # the parent's call fails (ChildFailed) and retries: child 2
            await until_async(lambda: count(2), "child 2", timeout=10)
            raw = json.loads((await store.get(keys.instance(first.id))).value)
            del raw["parent"]["created"]  # as release 0.2 wrote it
            await store.put(keys.instance(first.id), json.dumps(raw).encode())
            await client.redrive(first.id)
            await client.signal(first.id, "go")  # child 1 ends: it wakes the parent's token
            await client.wait(first.id, timeout=10)
            await asyncio.sleep(0.5)
            calls = [0]
            txn = store.txn

            async def counting(*args, **kwargs):
                calls[0] += 1
                return await txn(*args, **kwargs)

            store.txn = counting
            await asyncio.sleep(0.5)  # nothing to do: the parent waits for child 2
            store.txn = txn
            listed = [i.id for i in await client.list()]
            return pid, listed, await inconsistencies(store, keys), calls[0]

    pid, listed, problems, idle_txns = asyncio.run(body())
    assert listed.count(pid) == 1 and problems == []
    assert idle_txns < 100  # a worker claiming a marker it can never commit retried thousands of times


def test_markers_away_from_their_instances_place_are_removed_not_copied(tmp_path):
    """Reconciling at a place that is not the record's deletes the markers there, and writes none."""
    from dsm.markers import reconcile
    from dsm.store.memory import MemoryStore

    (tmp_path / "waitkid.yaml").write_text(WAITKID)
    graph = compiler.load(tmp_path / "waitkid.yaml")

    async def body():
        store, keys = MemoryStore(), Keys("rc")
        client = Operations(store, keys)
        iid = await client.submit(graph, {})
        inst = await client.instance(iid)
        stray = keys.place(inst.machine, 0, iid)
        await store.put(keys.work(stray, "t1"), b'{"machine":"waitkid","digest":"x","state":"hold"}')
        await reconcile(store, keys, iid, stray, now=0.0)
        return [kv.key for kv in await read_all(store, keys.work_prefix)], keys.work(keys.place_of(inst), "t1")

    work, real = asyncio.run(body())
    assert work == [real]
