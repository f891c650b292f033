"""Housekeeping: expired instances deleted whole, in bounded batches, safely under faults; dsm delete;
the election; compaction."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from clitools import dsm
from faults import ops_of
from helpers import in_namespace, run_instances, until_async
from indexes import inconsistencies, read_all

from dsm import compiler, handlers
from dsm.definitions import Registry
from dsm.errors import Compacted, InputError, NotFound, StoreUnavailable
from dsm.housekeeping import Housekeeper, HousekeepingOptions, backfill, delete_expired
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import dump_instance, load_instance, replace
from dsm.store import Delete, prefix_end
from dsm.store.memory import ManualClock, MemoryStore
from dsm.worker import running

LINE = """
machine: {name}
start: a
retention: {retention}
states:
  a:
    next: b
  b:
    next: done
  done:
    terminal: true
"""
ENDS = """
machine: ends
start: done
retention: 0
states:
  done:
    terminal: true
"""
WAITS = """
machine: waits
start: a
retention: 0
states:
  a:
    tick: nowhere:tick
    next: done
  done:
    terminal: true
"""


def line(name: str, retention: str):
    return compiler.compile_text(LINE.format(name=name, retention=retention), f"{name}.yaml")


def text(source: str):
    return compiler.compile_text(source, "m.yaml", import_handlers=False)


async def drain(store, keys, now, **kw) -> list[tuple[int, bool]]:
    rounds = []
    while True:
        deleted, more = await delete_expired(store, keys, now=now, **kw)
        rounds.append((deleted, more))
        if not more:
            return rounds


def test_expired_instances_are_deleted_whole_and_the_others_kept(store_factory):
    zero, hour = line("zero", "0"), line("hour", "1h")

    async def body(store, keys):
        client = Operations(store, keys)
        gone, _, _ = await run_instances(store, zero, [{}] * 5, keys=keys)
        kept, _, _ = await run_instances(store, hour, [{}] * 3, keys=keys)
        running = await client.submit(text(WAITS), {})
        now = time.time() + 1  # expiry rounds up to the millisecond
        first = await drain(store, keys, now)
        missing = []
        for inst in gone:
            try:
                await client.instance(inst.id)
            except NotFound:
                missing.append(inst.id)
            assert await client.history(inst.id) == []
        listed = [i.id for i in await client.list()]
        problems = await inconsistencies(store, keys)
        later = await drain(store, keys, now + 3601)
        left = [i.id for i in await client.list()]
        return gone, kept, running, first, missing, listed, problems, later, left, await inconsistencies(store, keys)

    gone, kept, running, first, missing, listed, problems, later, left, after = in_namespace(store_factory, body)
    assert first == [(5, False)] and sorted(missing) == sorted(i.id for i in gone)
    assert sorted(listed) == sorted([running] + [i.id for i in kept]) and problems == []
    assert later == [(3, False)] and left == [running] and after == []  # running: never deleted


def test_deletion_goes_in_bounded_batches(store_factory):
    async def body(store, keys):
        await Operations(store, keys).submit_many(text(ENDS), [{}] * 150)
        sizes: list[int] = []
        real = store.txn

        async def counting(compare, success=(), failure=()):
            if any(isinstance(op, Delete) for op in ops_of(success)):
                sizes.append(len(success))
            return await real(compare, success, failure)

        store.txn = counting
        rounds = await drain(store, keys, time.time() + 1, batch=64, max_history=20)
        store.txn = real
        return rounds, sizes, await read_all(store, keys.root)

    rounds, sizes, left = in_namespace(store_factory, body)
    assert rounds == [(64, True), (64, True), (22, False)]
    assert max(sizes) == 20 and sum(sizes) == 150  # each request: at most 20 history keys (one per instance here)
    assert [kv.key for kv in left if "/def/" not in kv.key and "/machines/" not in kv.key
            and "/meta/" not in kv.key] == []  # definitions and the namespace's marks stay


def test_a_round_reads_many_entries_and_deletes_them_in_requests_of_64(store_factory):
    async def body(store, keys):
        await Operations(store, keys).submit_many(text(ENDS), [{}] * 150)
        sizes: list[int] = []
        real = store.txn

        async def counting(compare, success=(), failure=()):
            if any(isinstance(op, Delete) for op in ops_of(success)):
                sizes.append(len(success))
            return await real(compare, success, failure)

        store.txn = counting
        rounds = await drain(store, keys, time.time() + 1, batch=100)
        store.txn = real
        return rounds, sizes

    rounds, sizes = in_namespace(store_factory, body)
    assert rounds == [(100, True), (50, False)] and sizes == [64, 36, 50]


def test_an_entry_that_no_longer_describes_its_record_deletes_nothing_else(store_factory):
    """A record rewritten as running after it finished (as a redrive does) keeps its life; the
    expiry entry left behind goes. A record rewritten but still finished is deleted all the same."""
    async def body(store, keys):
        client = Operations(store, keys)
        revived_id, rewritten_id = await client.submit_many(text(ENDS), [{}, {}])
        for iid, status in ((revived_id, "running"), (rewritten_id, None)):
            kv = await store.get(keys.instance(iid))
            inst = load_instance(kv.value)
            changed = replace(inst, status=status, finished_at=None) if status else inst
            await store.put(keys.instance(iid), dump_instance(changed))
        rounds = await drain(store, keys, time.time() + 1)
        revived = await client.instance(revived_id)
        try:
            await client.instance(rewritten_id)
            rewritten = True
        except NotFound:
            rewritten = False
        return rounds, revived, rewritten, await read_all(store, keys.expiry_prefix)

    rounds, revived, rewritten, expiries = in_namespace(store_factory, body)
    assert revived.status == "running" and not rewritten
    assert rounds == [(1, False)] and expiries == []


class Faulty:
    """A store whose n-th deleting transaction fails: not applied, or applied with its answer lost."""

    def __init__(self, store, nth: int, applied: bool):
        self.store, self.nth, self.applied, self.seen = store, nth, applied, 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def txn(self, compare, success=(), failure=()):
        if any(isinstance(op, Delete) for op in ops_of(success)):
            self.seen += 1
            if self.seen == self.nth:
                if self.applied:
                    await self.store.txn(compare, success, failure)
                raise StoreUnavailable("injected: the answer was lost")
        return await self.store.txn(compare, success, failure)


@pytest.mark.parametrize("applied", [False, True], ids=["not-applied", "answer-lost"])
def test_housekeeping_stopped_mid_batch_leaves_nothing_half_deleted(store_factory, applied):
    graph = line("zero", "0")

    async def body(store, keys):
        done, _, _ = await run_instances(store, graph, [{}] * 12, keys=keys)
        faulty = Faulty(store, 2, applied)
        with pytest.raises(StoreUnavailable):
            await delete_expired(faulty, keys, now=time.time() + 1, max_history=6)  # 3 of 2 transitions a request
        client = Operations(store, keys)
        listed = {i.id for i in await client.list()}
        shown = set()
        for inst in done:
            try:
                record = await client.record(inst.id)
                assert len(record["history"]) == record["transitions"] == 2
                shown.add(inst.id)
            except NotFound:
                pass
        problems = await inconsistencies(store, keys)
        rounds = await drain(store, keys, time.time() + 1)
        return listed, shown, problems, rounds, await client.list(), await inconsistencies(store, keys)

    listed, shown, problems, rounds, left, after = in_namespace(store_factory, body)
    assert problems == [] and listed == shown
    assert len(listed) == (12 - 6 if applied else 12 - 3)  # whole requests applied, or not at all
    assert sum(d for d, _ in rounds) == len(listed) and left == [] and after == []


def test_delete_removes_a_finished_instance_and_refuses_a_running_one(store_factory):
    async def body(store, keys):
        client = Operations(store, keys)
        (done,), _, _ = await run_instances(store, line("hour", "1h"), [{}], keys=keys)
        running = await client.submit(text(WAITS), {})
        await client.delete(done.id)
        errors = []
        for iid in (done.id, running, "no-such-id"):
            try:
                await client.delete(iid)
            except (InputError, NotFound) as exc:
                errors.append((type(exc).__name__, str(exc)))
        return errors, [i.id for i in await client.list()], running, await inconsistencies(store, keys)

    errors, listed, running, problems = in_namespace(store_factory, body)
    assert [e[0] for e in errors] == ["NotFound", "InputError", "NotFound"]
    assert "running" in errors[1][1] and "cancel" in errors[1][1]
    assert listed == [running] and problems == []


def test_a_redriven_instance_is_listed_as_running_and_no_longer_expires(store_factory):
    async def body(store, keys):
        client = Operations(store, keys)
        iid = await client.submit(text(WAITS), {})
        await client.cancel(iid)
        cancelled = [i.id for i in await client.list(status="cancelled")]
        again = await client.redrive(iid)
        listed = {s: [i.id for i in await client.list(status=s)] for s in ("running", "cancelled")}
        rounds = await drain(store, keys, time.time() + 1)
        return iid, cancelled, again.status, listed, rounds, (await client.instance(iid)).status, \
            await inconsistencies(store, keys)

    iid, cancelled, status, listed, rounds, after, problems = in_namespace(store_factory, body)
    assert cancelled == [iid] and status == "running"
    assert listed == {"running": [iid], "cancelled": []} and problems == []
    assert rounds == [(0, False)] and after == "running"  # its expiry went with its finish


def test_records_written_before_the_index_existed_are_indexed_once(store_factory):
    """A namespace written by a dsm without the index: its finished records get their entries once
    (so they are listed, and deleted in their time), and nothing is written twice. A running one
    needs none: its work markers list it."""
    async def body(store, keys):
        client = Operations(store, keys)
        done, _, _ = await run_instances(store, line("hour", "1h"), [{}] * 3, keys=keys)
        running_id = await client.submit(text(WAITS), {})
        for prefix in (f"{keys.root}idx/", keys.expiry_prefix):  # as an older dsm left them: no entries
            await store.delete(prefix, prefix_end(prefix))
        await store.delete(keys.indexed)  # nor the mark, which this dsm's client put in the empty namespace
        unlisted = await client.list()
        added, again = await backfill(store, keys), await backfill(store, keys)
        listed = sorted(i.id for i in await client.list())
        problems = await inconsistencies(store, keys)
        rounds = await drain(store, keys, time.time() + 3602)
        ids = sorted([running_id] + [i.id for i in done])
        return [i.id for i in unlisted], running_id, added, again, listed, ids, problems, rounds

    unlisted, running_id, added, again, listed, ids, problems, rounds = in_namespace(store_factory, body)
    assert unlisted == [running_id] and (added, again) == (3, 0) and listed == ids and problems == []
    assert rounds == [(3, False)]  # the finished ones expire in their time; the running one stays


def test_a_namespace_whose_first_instances_this_client_wrote_needs_no_backfill(store_factory):
    """The client that writes the first instances of a namespace marks it indexed, so the first
    housekeeper reads no records to backfill; one that finds records without the mark (they may
    predate the index) leaves the mark to the backfill, which then indexes them."""
    async def body(store, keys):
        graph = text(WAITS)
        await Operations(store, keys).submit_many(graph, [{}] * 3)
        marked = await store.get(keys.indexed) is not None
        other = Keys(keys.namespace + "-old")
        try:
            old = await Operations(store, other).submit(graph, {})
            await Operations(store, other).cancel(old)  # finished: a listing entry of its own
            for prefix in (f"{other.root}idx/", other.expiry_prefix, other.indexed):  # as an older dsm left it
                await store.delete(prefix, prefix_end(prefix))
            await Operations(store, other).submit(graph, {})
            left_unmarked = await store.get(other.indexed) is None
            return marked, left_unmarked, await backfill(store, keys), await backfill(store, other)
        finally:
            await store.delete(other.root, prefix_end(other.root))

    marked, left_unmarked, backfilled, backfilled_old = in_namespace(store_factory, body)
    assert marked and left_unmarked
    assert (backfilled, backfilled_old) == (0, 1)  # the old record only: the new one has its entries


def test_compaction_keeps_the_history_of_the_retention_period():
    """The housekeeper compacts to the newest revision it saw at least `compaction_retention` ago."""
    clock = ManualClock()

    async def go():
        store = MemoryStore(clock=clock)
        keys = Keys()
        lease = await store.lease_grant(10)

        class Lease:
            ready = asyncio.Event()
            id = lease

        Lease.ready.set()
        keeper = Housekeeper(store, keys, Lease(), name="hk", clock=clock,
                             options=HousekeepingOptions(compaction_retention=60))
        revisions = []
        for _ in range(13):  # a write and a round every 6s (the sampling interval: a tenth of 60s)
            await store.put("/x", b"v")
            revisions.append(await store.revision())
            await keeper.compact()
            clock.advance(6.0)
            await store.lease_keepalive(lease)
        now_rev = await store.revision()
        with pytest.raises(Compacted):
            await store.watch("/x", start_revision=revisions[0])
        watch = await store.watch("/x", start_revision=keeper.stats.compacted_to)
        await watch.cancel()
        return keeper.stats.compacted_to, revisions, now_rev

    compacted, revisions, now_rev = asyncio.run(go())
    # the last round ran at 72s: the newest sample at least 60s old is the one of 12s
    assert compacted == revisions[2] < now_rev


def test_a_worker_with_housekeeping_deletes_expired_instances_on_the_memory_store():
    graph = line("zero", "0")

    async def go():
        store = MemoryStore()
        keys = Keys()
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        client = Operations(store, keys)
        async with running(store, registry, housekeeping=HousekeepingOptions(interval=0.05)) as worker:
            ids = await client.submit_many(graph, [{}] * 10)

            async def emptied() -> bool:
                return not await client.list()

            await until_async(emptied, "every expired instance deleted", interval=0.05)
            elected = worker.housekeeper.stats.elected
            deleted = worker.housekeeper.stats.deleted
        return ids, await client.list(), elected, deleted, await inconsistencies(store, keys)

    ids, left, elected, deleted, problems = asyncio.run(go())
    assert left == [] and elected == 1 and deleted == len(ids) and problems == []


def test_an_embedded_run_of_a_machine_with_zero_retention_prints_its_record(write):
    path = write("zero.yaml", LINE.format(name="zero", retention="0"))
    result = dsm("run", str(path), "--json")
    assert result.returncode == 0, result.stderr
    assert '"transitions": 2' in result.stdout and '"expires_at": "' in result.stdout


# -- through the CLI and real worker processes, on etcd -------------------------------------------

@pytest.fixture
def at(etcd_url, namespace):
    return ("--etcd", etcd_url, "--namespace", namespace)


@pytest.mark.etcd
def test_dsm_delete(at, write):
    finished = write("ends.yaml", ENDS.replace("retention: 0", "retention: 1d"))
    waits = write("waits.yaml", WAITS)
    (done,) = dsm("submit", str(finished), *at).stdout.split()
    (busy,) = dsm("submit", str(waits), "--no-import", *at).stdout.split()
    result = dsm("delete", done, *at)
    assert result.returncode == 0, result.stderr
    assert f"instance {done} (succeeded) deleted" in result.stderr
    assert dsm("status", done, *at).returncode == 2
    assert [s["id"] for s in json.loads(dsm("list", "--json", *at).stdout)] == [busy]
    again = dsm("delete", done, *at)
    assert again.returncode == 2 and f"no instance '{done}'" in again.stderr
    refused = dsm("delete", busy, *at)
    assert refused.returncode == 2 and "is running" in refused.stderr and "Traceback" not in refused.stderr
    assert dsm("status", busy, *at).returncode == 0
    named = dsm("submit", str(finished), "--id", "order-7", *at)
    assert "expires: " in dsm("status", "order-7", *at).stdout
    assert dsm("delete", "order-7", *at).returncode == 0
    again = dsm("submit", str(finished), "--id", "order-7", "--payload", '{"other": 1}', *at)  # a deleted id is free
    assert (named.stdout, again.returncode, again.stdout) == ("order-7\n", 0, "order-7\n"), again.stderr
    assert json.loads(dsm("status", "order-7", "--json", *at).stdout)["payload"] == {"other": 1}
