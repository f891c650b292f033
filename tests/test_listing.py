"""Listing from the index: newest first, filters, pages and cursors, on both stores and through the CLI."""

from __future__ import annotations

import asyncio
import functools
import json
from collections import Counter
from datetime import datetime, timezone

import pytest
from clitools import dsm
from indexes import read_all

from dsm import compiler, index
from dsm.errors import InputError
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import load_instance
from dsm.store import Get, prefix_end
from dsm.store.memory import MemoryStore

WAITS = """
machine: {name}
start: a
states:
  a:
    tick: nowhere:tick
    next: done
  done:
    terminal: true
"""
ENDS = """
machine: {name}
start: done
states:
  done:
    terminal: true
    status: {status}
"""


def machines():
    waits = compiler.compile_text(WAITS.format(name="waits"), "waits.yaml", import_handlers=False)
    other = compiler.compile_text(WAITS.format(name="other"), "other.yaml", import_handlers=False)
    ends = compiler.compile_text(ENDS.format(name="ends", status="succeeded"), "ends.yaml", import_handlers=False)
    fails = compiler.compile_text(ENDS.format(name="fails", status="failed"), "fails.yaml", import_handlers=False)
    return waits, other, ends, fails


class Clock:
    def __init__(self, now: float = 1_700_000_000.0, step: float = 1.0):
        self.now = now
        self.step = step

    def __call__(self) -> float:
        self.now += self.step  # every instance a step (a second) after the one before
        return self.now


async def populate(client: Operations) -> dict[str, list[str]]:
    """Twelve instances, a second apart: by machine and status, oldest first."""
    waits, other, ends, fails = machines()
    made: dict[str, list[str]] = {"all": []}
    for i in range(12):
        graph = (waits, other, ends, fails)[i % 4]
        iid = await client.submit(graph, {"i": i, "big": "x" * 100})
        made["all"].append(iid)
        made.setdefault(graph.machine, []).append(iid)
    cancelled = made["waits"][0]
    await client.cancel(cancelled)
    made["cancelled"] = [cancelled]
    return made


def run_with_store(store_factory, body):
    async def go():
        store = await store_factory()
        keys = Keys("t" + str(id(store)))
        client = Operations(store, keys, wall=Clock())
        try:
            return await body(client)
        finally:
            await store.delete(keys.root, prefix_end(keys.root))
            await store.close()

    return asyncio.run(go())


async def everything(client: Operations, limit: int, *, after: str | None = None,
                     **filters) -> tuple[list[str], int]:
    ids: list[str] = []
    pages = 0
    while True:
        page = await client.page(limit=limit, after=after, **filters)
        pages += 1
        ids += [i.id for i in page.items]
        assert len(page.items) <= limit
        if page.next is None:
            return ids, pages
        after = page.next


def test_pages_list_every_instance_once_newest_first(store_factory):
    async def body(client):
        made = await populate(client)
        return made, await everything(client, 5), await everything(client, 100)

    made, (paged, pages), (whole, one) = run_with_store(store_factory, body)
    assert paged == whole == made["all"][::-1]
    assert pages == 3 and one == 1


def test_filters_by_status_machine_both_and_start_time(store_factory):
    async def body(client):
        made = await populate(client)
        out = {}
        for name, filters in {"waits": {"machine": "waits"}, "succeeded": {"status": "succeeded"},
                              "failed": {"status": "failed"}, "running": {"status": "running"},
                              "cancelled": {"status": "cancelled"},
                              "running_waits": {"status": "running", "machine": "waits"},
                              "since": {"since": 1_700_000_000.0 + 9}}.items():
            out[name] = (await everything(client, 2, **filters))[0]
        return made, out

    made, out = run_with_store(store_factory, body)
    assert out["waits"] == made["waits"][::-1]
    assert out["succeeded"] == made["ends"][::-1]
    assert out["failed"] == made["fails"][::-1]
    assert out["cancelled"] == made["cancelled"]
    running = [i for i in made["all"] if i in made["waits"] + made["other"] and i not in made["cancelled"]]
    assert out["running"] == running[::-1]
    assert out["running_waits"] == [i for i in made["waits"][::-1] if i not in made["cancelled"]]
    assert out["since"] == made["all"][8:][::-1]  # created at +9s and later


def test_a_summary_is_the_record_without_history_and_payload(store_factory):
    async def body(client):
        made = await populate(client)
        page = await client.page(limit=1)
        return made, page, await client.record(page.items[0].id)

    made, page, record = run_with_store(store_factory, body)
    summary = index.summary(page.items[0])
    assert "payload" not in summary and "history" not in summary
    assert summary == {k: v for k, v in record.items() if k not in ("payload", "history")}
    assert "expires_at" in summary


def test_bad_cursor_and_status_are_refused(store_factory):
    async def body(client):
        out = []
        for kwargs in ({"after": "nonsense"}, {"status": "sleeping"}, {"limit": 0}):
            try:
                await client.page(**kwargs)
            except InputError as exc:
                out.append(str(exc))
        return out

    assert len(run_with_store(store_factory, body)) == 3


class Counting:
    """A store that counts the keys it hands out, by kind (`idx`, `inst`, `machines` ...), and the
    requests: what a listing costs, whatever the clock says."""

    def __init__(self, store, keys: Keys | None = None):
        self.store = store
        self.keys = keys or Keys()
        self.read: Counter[str] = Counter()
        self.requests = 0
        self.keys_walked = 0  # what etcd 3.5 walks to answer the ranges: every key in them, whatever the limit

    @property
    def keys_read(self) -> int:
        return sum(self.read.values())

    def reset(self) -> None:
        self.read.clear()
        self.requests = self.keys_walked = 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def _count(self, kvs) -> None:
        self.read.update(kv.key[len(self.keys.root):].partition("/")[0] for kv in kvs)

    async def range(self, start, end=None, **kwargs):
        result = await self.store.range(start, end, **kwargs)
        self.requests += 1
        self._count(result.kvs)
        self.keys_walked += await self.store.count(start, end)
        return result

    async def get(self, key):
        kv = await self.store.get(key)
        self.requests += 1
        self._count([kv] if kv is not None else [])
        return kv

    async def txn(self, compare, success=(), failure=()):
        result = await self.store.txn(compare, success, failure)
        self.requests += 1
        for op in success if result.succeeded else failure:
            if isinstance(op, Get) and op.end is not None:
                self.keys_walked += await self.store.count(op.key, op.end)
        for answer in result.responses:
            self._count(getattr(answer, "kvs", ()))
        return result


def test_a_page_reads_its_entries_and_records_only():
    """With 3,000 instances stored, a page of 20 reads the records of its 20 instances and, of each
    range it merges, at most 21 index entries (the 21st says whether more follow), whichever filter:
    never a scan of every record or entry."""
    waits, _, ends, _ = machines()

    async def go():
        store = MemoryStore()
        client = Operations(store, Keys())
        await client.submit_many(waits, [{} for _ in range(1500)])
        await client.submit_many(ends, [{} for _ in range(1500)])
        counting = Counting(store)
        reader = Operations(counting, Keys())
        costs = {}
        for name, filters in {"all": {}, "status": {"status": "succeeded"}, "machine": {"machine": "waits"},
                              "both": {"status": "running", "machine": "waits"}}.items():
            counting.reset()
            page = await reader.page(limit=20, **filters)
            assert len(page.items) == 20 and page.next is not None
            costs[name] = dict(counting.read)
            counting.reset()
            await reader.page(limit=20, after=page.next, **filters)
            costs[name + " next"] = dict(counting.read)
        return costs

    costs = asyncio.run(go())
    assert all(cost["inst"] == 20 for cost in costs.values()), costs
    entries = {name: cost.get("idx", 0) + cost.get("work", 0) for name, cost in costs.items()}  # work: running
    # entries: one range holds them all (both filters given, or by machine) or one each of the two machines
    assert entries["both"] == entries["machine"] == 21 and entries["status"] == 21, costs
    assert entries["all"] == 2 * 21, costs
    assert costs["both"].get("idx", 0) == 0  # the running ones are listed by their markers
    assert all(cost.get("machines", 0) <= 2 for cost in costs.values()), costs  # the registry's names


def test_a_page_walks_the_index_near_it_only():
    """etcd 3.5 counts every key of a range it reads, limit or not: pages are read in windows of
    creation time, so a page of 20 among 3,000 instances (a second apart) walks few entries."""
    waits, _, _, _ = machines()

    async def go():
        store = MemoryStore()
        client = Operations(store, Keys(), wall=Clock())
        await client.submit_many(waits, [{} for _ in range(3000)])
        counting = Counting(store)
        reader = Operations(counting, Keys(), wall=client.wall)
        walked = []
        for filters in ({}, {"status": "running"}, {"machine": "waits"}, {"status": "running", "machine": "waits"}):
            after = None
            for _ in range(3):
                counting.reset()
                page = await reader.page(limit=20, after=after, **filters)
                walked.append(counting.keys_walked)
                after = page.next
        return walked

    walked = asyncio.run(go())
    assert all(w <= 100 for w in walked), walked  # with one range to the end: 3,000 each


def test_a_page_costs_within_the_same_bounds_among_400_or_2000_instances():
    """A page of 10 among instances of 5 machines in every status: the entries it reads are bounded
    by the ranges it merges times the page (plus one), its records are the page's, and the
    requests by the windows it looks through, with 400 instances stored as with 2,000. (Their
    creation times come from a clock of the test's: a loaded machine spreads them differently.)"""
    graphs = [compiler.compile_text(WAITS.format(name=f"m{i}"), f"m{i}.yaml", import_handlers=False) for i in range(3)]
    graphs += [compiler.compile_text(ENDS.format(name="ends", status="succeeded"), "e.yaml", import_handlers=False),
               compiler.compile_text(ENDS.format(name="fails", status="failed"), "f.yaml", import_handlers=False)]
    filters = {"all": {}, "running": {"status": "running"}, "cancelled": {"status": "cancelled"},
               "succeeded": {"status": "succeeded"}, "m0": {"machine": "m0"}, "ends": {"machine": "ends"},
               "both": {"status": "cancelled", "machine": "m1"}}

    async def costs(count: int) -> dict[str, tuple[int, int, int]]:
        store = MemoryStore()
        clock = Clock(step=0.001)  # instances a millisecond apart, however loaded the machine is
        client = Operations(store, Keys(), wall=clock)
        for graph in graphs:
            ids = await client.submit_many(graph, [{} for _ in range(count // len(graphs))])
            if graph.machine.startswith("m"):
                for iid in ids[::3]:
                    await client.cancel(iid)
        counting = Counting(store)
        reader = Operations(counting, Keys(), wall=lambda: clock.now + 1.0)
        out = {}
        for name, kwargs in filters.items():
            counting.reset()
            page = await reader.page(limit=10, **kwargs)
            page = await reader.page(limit=10, after=page.next, **kwargs)
            assert len(page.items) == 10 and page.next is not None, name
            out[name] = (counting.read["idx"], counting.read["inst"], counting.requests)
        return out

    ranges = {"all": 5 * 4, "running": 5, "cancelled": 5, "succeeded": 5, "m0": 4, "ends": 4, "both": 1}
    for count in (400, 2000):  # the same bounds, five times the instances
        found = asyncio.run(costs(count))
        for name, (entries, records, requests) in found.items():
            assert entries <= 2 * ranges[name] * 11, (count, name, found)  # two pages
            assert records == 20 and requests <= 12, (count, name, found)


def test_since_takes_times_and_durations():
    now = 1_800_000_000.0
    assert index.parse_since("2h", now) == now - 7200
    assert index.parse_since("90", now) == now - 90
    assert index.parse_since("2027-01-15T08:00:00Z", now) == datetime(2027, 1, 15, 8, tzinfo=timezone.utc).timestamp()
    assert index.parse_since("2027-01-15T09:00:00+01:00", now) == index.parse_since("2027-01-15T08:00:00Z", now)
    assert index.parse_since("2027-01-15", now) == index.parse_since("2027-01-15T00:00:00Z", now)
    with pytest.raises(InputError, match="--since"):
        index.parse_since("yesterday", now)


# -- the command line, against etcd ---------------------------------------------------------------

@pytest.fixture
def at(etcd_url, namespace):
    return ("--etcd", etcd_url, "--namespace", namespace)


@pytest.mark.etcd
def test_list_pages_with_limit_and_after_printing_next_on_stderr(at, write):
    path = write("waits.yaml", WAITS.format(name="waits"))
    submitted = dsm("submit", str(path), "--no-import", "--jsonl", "-", *at, input="{}\n" * 5)
    assert submitted.returncode == 0, submitted.stderr
    ids = submitted.stdout.split()
    seen: list[str] = []
    after: tuple[str, ...] = ()
    for _ in range(3):
        result = dsm("list", "--limit", "2", "--json", *after, *at)
        assert result.returncode == 0, result.stderr
        items = json.loads(result.stdout)
        assert all("payload" not in s and "history" not in s and s["status"] == "running" for s in items)
        seen += [s["id"] for s in items]
        lines = result.stderr.splitlines()
        if len(seen) < 5:
            (line,) = lines
            assert line.startswith("next: ")
            after = ("--after", line.removeprefix("next: "))
        else:
            assert lines == []
    whole = [s["id"] for s in json.loads(dsm("list", "--json", *at).stdout)]
    assert seen == whole and sorted(seen) == sorted(ids)  # ids made in one millisecond tie: any stable order
    table = dsm("list", "--limit", "1", *at)
    assert table.stdout.splitlines()[1].split()[0] == whole[0] and table.stderr.startswith("next: ")
    quiet = dsm("-q", "list", "--limit", "1", "--json", *at)
    assert quiet.stderr.startswith("next: ")  # the cursor is data, not a note


@pytest.mark.etcd
def test_list_filters_and_refuses_bad_input(at, write):
    path = write("waits.yaml", WAITS.format(name="waits"))
    (iid,) = dsm("submit", str(path), "--no-import", *at).stdout.split()
    assert [s["id"] for s in json.loads(dsm("list", "--json", "--since", "1h", *at).stdout)] == [iid]
    assert json.loads(dsm("list", "--json", "--since", "2999-01-01T00:00:00Z", *at).stdout) == []
    assert json.loads(dsm("list", "--json", "--machine", "waits", "--status", "running", *at).stdout)[0]["id"] == iid
    assert json.loads(dsm("list", "--json", "--status", "succeeded", *at).stdout) == []
    for args in (("--since", "yesterday"), ("--after", "x"), ("--limit", "0"), ("--status", "asleep")):
        result = dsm("list", *args, *at)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr


# -- merging the ranges of several machines and statuses -------------------------------------------

class TiedClock(Clock):
    """Instances two by two in the same millisecond (their ids break the tie), pairs 1.5 s apart."""

    def __init__(self, now: float = 1_700_000_000.0):
        super().__init__(now)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2:
            self.now += 1.5
        return self.now


MERGED = ("order", "order-x", "order0", "billing", "zeta")  # names whose prefixes nest: "order-x/" < "order/"


async def populate_merged(client: Operations) -> None:
    """Forty instances of five machines in every status: running, succeeded, failed and cancelled."""
    for i in range(40):
        name = MERGED[i % len(MERGED)]
        if i % 2 == 0:
            graph = compiler.compile_text(WAITS.format(name=name), f"{name}.yaml", import_handlers=False)
        else:
            status = "succeeded" if i % 4 == 1 else "failed"
            graph = compiler.compile_text(ENDS.format(name=name, status=status), f"{name}.yaml",
                                          import_handlers=False)
        iid = await client.submit(graph, {"i": i})
        if i % 8 == 0:
            await client.cancel(iid)


async def by_full_sort(client: Operations, *, status: str | None = None, machine: str | None = None,
                       since: float | None = None) -> list[str]:
    """What a listing must give: every record that matches, sorted as the index sorts them."""
    found = [load_instance(kv.value) for kv in await read_all(client.store, client.keys.instances)]
    found = [i for i in found if (status is None or i.status == status) and (machine is None or i.machine == machine)
             and (since is None or index.created_ms(i) >= int(since * 1000))]
    return [i.id for i in sorted(found, key=lambda i: index.sort_key(index.created_ms(i), i.id))]


def run_merged(store_factory, body):
    async def go():
        store = await store_factory()
        keys = Keys("t" + str(id(store)))
        client = Operations(store, keys, wall=TiedClock())
        try:
            await populate_merged(client)
            return await body(client)
        finally:
            await store.delete(keys.root, prefix_end(keys.root))
            await store.close()

    return asyncio.run(go())


FILTERS = {"status running": {"status": "running"}, "status succeeded": {"status": "succeeded"},
           "status cancelled": {"status": "cancelled"}, "machine order": {"machine": "order"},
           "machine order-x": {"machine": "order-x"}, "everything": {},
           "since": {"since": 1_700_000_000.0 + 20}, "since and status": {"since": 1_700_000_000.0 + 12,
                                                                        "status": "failed"},
           "since and machine": {"since": 1_700_000_000.0 + 9, "machine": "zeta"},
           "status and machine": {"status": "succeeded", "machine": "order0"}}


def test_merged_listings_page_as_a_full_sort_of_the_records(store_factory):
    """By status across machines, by machine across statuses, unfiltered, with `since`: pages of 1,
    2 and 3 with cursors give the records' own order (newest first, ties by id), each once."""

    async def body(client):
        out = {}
        for name, filters in FILTERS.items():
            want = await by_full_sort(client, **filters)
            got = {size: (await everything(client, size, **filters))[0] for size in (1, 2, 3)}
            whole = (await everything(client, 1000, **filters))[0]
            out[name] = (want, got, whole)
        return out

    for name, (want, got, whole) in run_merged(store_factory, body).items():
        assert want, name
        assert got[1] == got[2] == got[3] == whole == want, name
    assert len(want) == len(set(want))


def test_an_instance_that_finishes_between_two_pages_is_listed_once(store_factory):
    """Two running instances are cancelled after the first page, one behind its cursor and one
    ahead of it: a listing of everything or by machine still lists each instance once, in order;
    one by status lists none twice, the one ahead under its new status, and loses no other."""

    async def body(client, filters):
        before = await by_full_sort(client, **filters)
        first = await client.page(limit=4, **filters)
        records = [load_instance(kv.value) for kv in await read_all(client.store, client.keys.instances)]
        running = sorted((index.sort_key(index.created_ms(i), i.id), i.id) for i in records
                         if i.status == "running" and i.machine == filters.get("machine", i.machine))
        behind = [iid for key, iid in running if key <= first.next][-1]
        ahead = [iid for key, iid in running if key > first.next][0]
        for iid in (behind, ahead):
            await client.cancel(iid)
        rest = (await everything(client, 2, after=first.next, **filters))[0]
        return before, [i.id for i in first.items], rest, ahead

    for name, filters in {"everything": {}, "machine": {"machine": "order"}, "running": {"status": "running"},
                          "cancelled": {"status": "cancelled"}}.items():
        before, listed, rest, ahead = run_merged(store_factory, functools.partial(body, filters=filters))
        seen = listed + rest
        assert len(seen) == len(set(seen)), name
        if name in ("everything", "machine"):
            assert seen == before, name
        elif name == "running":
            assert seen == [i for i in before if i != ahead], name
        else:
            assert ahead in rest and set(seen) == set(before) | {ahead} and len(seen) == len(before) + 1, name


def test_a_finished_instance_has_one_listing_entry_and_its_expiry_a_running_one_its_markers(store_factory):
    async def body(client):
        records = [load_instance(kv.value) for kv in await read_all(client.store, client.keys.instances)]
        entries = [kv.key for kv in await read_all(client.store, f"{client.keys.root}idx/")]
        expiries = [kv.key for kv in await read_all(client.store, client.keys.expiry_prefix)]
        markers = [client.keys.parse_work(kv.key) for kv in await read_all(client.store, client.keys.work_prefix)]
        return records, entries, expiries, markers, client.keys

    records, entries, expiries, markers, keys = run_merged(store_factory, body)
    finished = [i for i in records if i.finished]
    assert sorted(entries) == sorted(index.listing_key(keys, i.id, i.status, i.machine, index.created_ms(i))
                                     for i in finished)
    assert len(records) == 40 and 0 < len(finished) < 40
    assert {m.place for m in markers} == {keys.place_of(i) for i in records if not i.finished}
    assert sorted(expiries) == sorted(keys.expiry(index.expires_ms(i), i.id) for i in records if i.finished)
    assert not any(e.startswith(tuple(index.legacy_prefixes(keys))) for e in entries)


def test_machines_the_registry_does_not_name_are_listed(store_factory):
    """A machine without a pointer in the registry (definitions stored before pointers existed)
    is found by the skip-scan of the listing entries, between and around the names it has."""

    async def body(client):
        for name in ("order0", "billing", "zeta", "order-x"):
            await client.store.delete(client.keys.machine(name))
        out = {}
        for name, filters in FILTERS.items():
            out[name] = ((await everything(client, 3, **filters))[0], await by_full_sort(client, **filters))
        return out

    for name, (got, want) in run_merged(store_factory, body).items():
        assert got == want, name


def test_instances_that_finish_while_a_page_is_read_are_listed_once():
    """Forty machines: an unfiltered listing merges 160 ranges, more than one transaction reads. An
    instance finishes after every read of the index; each machine's ranges are read in one
    transaction, so whatever moved in between, every instance is listed once."""
    graphs = [compiler.compile_text(WAITS.format(name=f"m{i:02d}"), f"m{i}.yaml", import_handlers=False)
              for i in range(40)]

    class Meddling:
        def __init__(self, store, finish):
            self.store, self.finish = store, finish

        def __getattr__(self, name):
            return getattr(self.store, name)

        async def txn(self, compare, success=(), failure=()):
            result = await self.store.txn(compare, success, failure)
            if any(isinstance(op, Get) and op.keys_only and "/idx/sm/" in op.key for op in success):
                await self.finish()
            return result

    async def go():
        store = MemoryStore()
        client = Operations(store, Keys())
        ids = [iid for graph in graphs for iid in await client.submit_many(graph, [{}, {}, {}])]
        victims = ids[::2]

        async def finish():
            if victims:
                await client.cancel(victims.pop())

        reader = Operations(Meddling(store, finish), Keys())
        listed = {name: (await everything(reader, 7, **filters))[0]
                  for name, filters in {"everything": {}, "m07": {"machine": "m07"}}.items()}
        return ids, listed, victims

    ids, listed, victims = asyncio.run(go())
    assert len(victims) < len(ids) // 2  # some finished while pages were read
    assert sorted(listed["everything"]) == sorted(ids)
    assert sorted(listed["m07"]) == sorted(ids[21:24])


def test_an_instance_with_many_markers_never_makes_a_page_skip_the_instances_after_it():
    """A running instance is listed by its markers, as many as its tokens: a read of a page's size
    may end inside one instance's markers. The instances after them (here Y, running, between X's
    markers and the cancelled B) must still come before B, on this page or the next."""
    waits, _, _, _ = machines()

    async def go():
        store, keys = MemoryStore(), Keys()
        at = [1_800_000_000.0]
        client = Operations(store, keys, wall=lambda: at[0])
        ids = {}
        for name in ("C", "B", "Y", "X", "A"):  # oldest first, within one window of a page's reads
            at[0] += 0.2
            ids[name] = await client.submit(waits, {}, instance_id=name)
        await client.cancel("B")
        place = keys.place_of(await client.instance("X"))
        for i in range(50):  # X has 51 tokens' markers (the record lists one: a listing reads keys only)
            await store.put(keys.work(place, f"extra{i:02d}"), b"{}")
        pages, cursor = [], None
        while True:
            page = await index.page(store, keys, machine=waits.machine, limit=3, after=cursor, now=at[0])
            pages.append([i.id for i in page.items])
            cursor = page.next
            if cursor is None:
                return pages

    pages = asyncio.run(go())
    assert [iid for page in pages for iid in page] == ["A", "X", "Y", "B", "C"]
