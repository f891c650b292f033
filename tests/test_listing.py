"""Listing from the index: newest first, filters, pages and cursors, on both stores and through the CLI."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

import pytest
from clitools import dsm

from dsm import compiler, index
from dsm.errors import InputError
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.store import prefix_end
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
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0  # every instance a second after the one before
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


async def everything(client: Operations, limit: int, **filters) -> tuple[list[str], int]:
    ids: list[str] = []
    pages = 0
    after = None
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
    """A store that counts the keys it hands out: what a listing costs, whatever the clock says."""

    def __init__(self, store):
        self.store = store
        self.keys_read = 0
        self.keys_walked = 0  # what etcd 3.5 walks to answer the ranges: every key in them, whatever the limit

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def range(self, start, end=None, **kwargs):
        result = await self.store.range(start, end, **kwargs)
        self.keys_read += len(result.kvs)
        self.keys_walked += await self.store.count(start, end)
        return result

    async def get(self, key):
        self.keys_read += 1
        return await self.store.get(key)

    async def txn(self, compare, success=(), failure=()):
        result = await self.store.txn(compare, success, failure)
        self.keys_read += sum(len(r.kvs) for r in result.responses if hasattr(r, "kvs"))
        return result


def test_a_page_reads_its_entries_and_records_only():
    """With 3,000 instances stored, a page of 20 reads 20 index entries and 20 records, whichever
    filter: never a scan of every record or entry."""
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
            counting.keys_read = 0
            page = await reader.page(limit=20, **filters)
            assert len(page.items) == 20 and page.next is not None
            costs[name] = counting.keys_read
            counting.keys_read = 0
            await reader.page(limit=20, after=page.next, **filters)
            costs[name + " next"] = counting.keys_read
        return costs

    costs = asyncio.run(go())
    assert all(cost == 40 for cost in costs.values()), costs


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
        after = None
        for _ in range(3):
            counting.keys_walked = 0
            page = await reader.page(limit=20, after=after)
            walked.append(counting.keys_walked)
            after = page.next
        return walked

    walked = asyncio.run(go())
    assert all(w <= 100 for w in walked), walked  # with one range to the end: 3,000 each


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
