"""The listing, search and expiry indexes: what `dsm list` and retention read instead of every record.

A finished instance has one listing entry, `idx/sm/<status>/<machine>/<age>/<id>` (see `keys.py`),
named by its creation time so that a range read ascending yields the newest first, and one expiry
entry, named by when retention deletes it. A running instance has neither: its work markers,
`work/<machine>/<age>/<id>#<token>`, lie in the same order and list it (a range of them holds an
instance's markers together; a listing takes each instance once). The entries are written in the
same transaction as the record change that affects them: a finish or cancel (the listing entry
put), a redrive (deleted), deletion. So the index never disagrees with
the records it lists; a page reads its index entries, then only the records of that page.

An instance whose machine has search attributes also has a search entry for each attribute that
has a value, `idx/attr/<name>/<text>/<age>/<id>` (`search.py`), put when it is created, moved by
the commit that changes the value (`search_ops`, in `status_ops`), deleted with it (its expiry
entry names them, so retention deletes them without reading the record). A listing by `where`
reads the range of its first pair, in the same order, and checks the rest on the page's records.

A listing by status and machine reads one range (two for running in a namespace that an upgrade
has not yet finished with: its markers and the earlier layout's entries, `layout.py`). The others
merge several, newest first, by the part of the key after the range's prefix up to MARK
(`sort_key`: age, then id), which orders them as one range would: by status, the ranges of every
machine; by machine, those of the four statuses; unfiltered, all of them. A page costs the page
times the ranges merged, whatever else is stored.

Which machines have entries: the registry (`/<ns>/machines/<name>`, written by
`definitions.register`) names most, but not surely all of them. Its pointers are written in
transactions of their own, before instances start, not with the instances: a namespace whose
definitions were stored before pointers existed has none for a machine until a definition of it is
registered again, yet its workers start children of that machine meanwhile (a call state's child is
created by the parent's commit, `commits.creation_ops`, from the definition the parent pinned by
digest, registering nothing); a pointer that etcd refused while over its quota waits for a later
registration too. So machines are found by a skip-scan of `idx/sm/<status>/` (of `work/` for the
running; the first key from where the scan stands, keys only; then from the end of that key's
machine, and so on), and the registry's names serve as the bounds of that scan: a listing reads
every named machine's range, and the scan probes only the gaps between them. etcd 3.5 walks every
key of a range that it answers with a limit (to count them), so a probe to the end of the status
would walk the entries of every machine after it; a probe of a gap walks only the entries of
machines that the registry does not name, none when it names them all.

The functions here build operations and read pages; they decide nothing about when to write.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from . import codec, search
from .durations import parse_duration
from .errors import InputError, NoSpace
from .keys import AGE_MAX, INSTANCE_ID, MACHINE_NAME, MARK, Keys, millis, sort_key
from .markers import MAX_TXN_OPS
from .records import RUNNING, STATUSES, Instance, load_instance, public_record
from .search import NONE
from .store import Delete, Get, KeyValue, Op, Put, Store, prefix_end

PAGE = 100  # index entries read at once (their records are read in one transaction of as many gets)
MAX_PAGE = 1000  # the most instances one page asked for by a client (or the HTTP API) holds
AFTER = chr(ord(MARK) + 1)  # after a sort key: past its listing entry and its instance's markers, before any other
CURSOR = re.compile(r"([0-9]{13})/(" + INSTANCE_ID.pattern + ")")  # ASCII digits: \d takes any script's
# What the HTTP API takes as `since` (its OpenAPI document says the same): a duration back from now,
# seconds or parts with units (1h30m), or an RFC 3339 date or date-time. `dsm list --since` takes
# more: any ISO 8601 time that Python reads, and durations with spaces.
_NUMBER = r"[0-9]{1,12}(?:\.[0-9]{1,9})?"
SINCE_DURATION = re.compile(f"{_NUMBER}|(?:{_NUMBER}(?:ms|s|m|h|d))+")
_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
                      r"(?:[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2})))?")


def created_ms(inst: Instance) -> int:
    return millis(inst.created_at)


def expires_ms(inst: Instance) -> int | None:
    """The expiry time in whole milliseconds, rounded up: retention never deletes early."""
    at = inst.expires_at
    return None if at is None else math.ceil(at * 1000)


def listing_key(keys: Keys, instance_id: str, status: str, machine: str, created: int) -> str:
    """An instance's listing entry while it has this finished status (it moves when the status
    changes). A running instance has none: its work markers list it."""
    return keys.listing(status, machine) + sort_key(created, instance_id)


def _entry(keys: Keys, inst: Instance) -> list[str]:
    """The listing entry an instance has: one when finished, none while running."""
    return [] if inst.status == RUNNING else [listing_key(keys, inst.id, inst.status, inst.machine, created_ms(inst))]


def legacy_prefixes(keys: Keys) -> list[str]:
    """Where the three listing entries that earlier releases also wrote for every instance lie (all,
    by status, by machine): nothing reads or writes them any more; upgrading deletes them once."""
    return [f"{keys.root}idx/all/", f"{keys.root}idx/status/", f"{keys.root}idx/machine/"]


@dataclass(frozen=True, slots=True)
class Expiry:
    """The value of an expiry entry: enough to delete the instance's listing entries and to bound
    a deletion batch, without reading its record first; and whether it started children, which
    go with it (`housekeeping.delete_children`)."""

    machine: str
    status: str
    created: int  # ms, as in the listing keys
    transitions: int
    children: bool = False
    # its search attributes' texts: their entries go with it
    search: Mapping[str, str] = field(default_factory=lambda: NONE)

    def dump(self) -> bytes:
        return codec.dumps({"machine": self.machine, "status": self.status, "created": self.created,
                            "transitions": self.transitions, **({"children": True} if self.children else {}),
                            **({"search": dict(self.search)} if self.search else {})})

    @staticmethod
    def load(raw: bytes) -> Expiry:
        d: dict[str, Any] = codec.loads(raw)
        return Expiry(d["machine"], d["status"], d["created"], d.get("transitions", 0), bool(d.get("children")),
                      d.get("search") or NONE)

    @staticmethod
    def of(inst: Instance) -> Expiry:
        return Expiry(inst.machine, inst.status, created_ms(inst), inst.transitions, inst.children > 0, inst.search)


def expiry_put(keys: Keys, inst: Instance) -> Put | None:
    ms = expires_ms(inst)
    return None if ms is None else Put(keys.expiry(ms, inst.id), Expiry.of(inst).dump())


def search_key(keys: Keys, instance_id: str, name: str, text: str, created: int) -> str:
    """An instance's search entry for attribute `name` while its value's text is `text`."""
    return keys.attribute(name, text) + sort_key(created, instance_id)


def search_ops(keys: Keys, before: Instance, after: Instance) -> list[Op]:
    """What a change from `before` to `after` does to the search entries: an attribute whose
    text changed moves its entry (deleted under the old text, put under the new); none when no
    attribute changed, which is every transition that leaves them alone."""
    if before.search is after.search:
        return []
    created = created_ms(after)
    ops: list[Op] = []
    for name, old, new in search.changed(before.search, after.search):
        if old is not None:
            ops.append(Delete(search_key(keys, after.id, name, old, created)))
        if new is not None:
            ops.append(Put(search_key(keys, after.id, name, new, created), b""))
    return ops


def search_op_count(before: Instance, after: Instance) -> int:
    """How many operations `search_ops` adds, without building them."""
    if before.search is after.search:
        return 0
    return sum((old is not None) + (new is not None) for _, old, new in search.changed(before.search, after.search))


def created_ops(keys: Keys, inst: Instance) -> list[Op]:
    """The entries of a new instance (in the transaction that creates its record)."""
    ops: list[Op] = [Put(key, b"") for key in _entry(keys, inst)]
    created = created_ms(inst)
    ops += [Put(search_key(keys, inst.id, name, text, created), b"") for name, text in inst.search.items()]
    exp = expiry_put(keys, inst)
    if exp is not None:
        ops.append(exp)
    return ops


def status_ops(keys: Keys, before: Instance, after: Instance) -> list[Op]:
    """What a change from `before` to `after` does to the entries: nothing unless the status, the
    expiry or a search attribute changed; then the listing entry moves and the expiry entry
    follows (it names the attributes), and so do the search entries that changed."""
    ops = search_ops(keys, before, after)
    if before.status == after.status and before.expires_at == after.expires_at:
        exp = expiry_put(keys, after) if ops else None
        return ops if exp is None else [*ops, exp]  # the expiry entry names the attributes
    if before.status != after.status:
        ops += [Delete(key) for key in _entry(keys, before)]
        ops += [Put(key, b"") for key in _entry(keys, after)]
    old, new = expires_ms(before), expiry_put(keys, after)
    if old is not None and (new is None or new.key != keys.expiry(old, before.id)):
        ops.append(Delete(keys.expiry(old, before.id)))
    if new is not None:
        ops.append(new)
    return ops


def status_op_count(before: Instance, after: Instance) -> int:
    """How many operations `status_ops` adds (for a transaction's budget), without building them:
    every commit asks, and most change neither the status nor the expiry."""
    count = search_op_count(before, after)
    if before.status == after.status and before.expires_at == after.expires_at:
        return count + (count > 0 and after.expires_at is not None)
    old, new = expires_ms(before), expires_ms(after)
    moved = (before.status != RUNNING) + (after.status != RUNNING) if before.status != after.status else 0
    return count + moved + (old is not None and old != new) + (new is not None)


def removal_ops(keys: Keys, instance_id: str, expiry: Expiry, expires: int | None) -> list[Op]:
    """Deleting an instance's record, entries, history and leftover work markers: one transaction,
    so nothing is ever half deleted (range deletes are one operation each, whatever they hold)."""
    ops: list[Op] = [Delete(keys.instance(instance_id))]
    if expiry.status != RUNNING:
        ops.append(Delete(listing_key(keys, instance_id, expiry.status, expiry.machine, expiry.created)))
    if expires is not None:
        ops.append(Delete(keys.expiry(expires, instance_id)))
    ops += search_deletes(keys, instance_id, expiry)
    history = keys.history_prefix(instance_id)
    work = keys.work_of_instance(keys.place(expiry.machine, expiry.created, instance_id))
    ops += [Delete(history, prefix_end(history)), Delete(work, prefix_end(work))]
    return ops


def search_deletes(keys: Keys, instance_id: str, expiry: Expiry) -> list[Op]:
    """Deleting the search entries of an instance going away."""
    return [Delete(search_key(keys, instance_id, name, text, expiry.created)) for name, text in expiry.search.items()]


# -- listing ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, newest first; `next` resumes after it (None: nothing follows)."""

    items: list[Instance]
    next: str | None


def check_cursor(cursor: str) -> str:
    if CURSOR.fullmatch(cursor) is None:
        raise InputError(f"invalid cursor {cursor!r}: give the value printed after 'next:' by a listing")
    return cursor


def parse_since(value: str, now: float) -> float:
    """A start time: ISO 8601 (`2026-11-28T13:00:00Z`, a date, an offset; UTC when none is given),
    or a duration back from now (`30m`, `2h`, `7d`, or seconds)."""
    text = value.strip()
    try:
        return now - parse_duration(text, what="--since")
    except InputError:
        pass
    try:
        at = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise InputError(f"--since: expected a time like 2026-11-28T13:00:00Z or a duration back from now "
                         f"like 30m, 2h, 7d; got {value!r}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.timestamp()


def check_since(value: str, now: float) -> float:
    """`since` as the HTTP API takes it (SINCE_DURATION, or an RFC 3339 date or date-time) as a
    time; InputError for anything else, a date that does not exist included."""
    if SINCE_DURATION.fullmatch(value):
        return parse_since(value, now)
    match = _RFC3339.fullmatch(value)
    problem = (f"since: expected a duration back from now (30m, 2h, 7d, 1h30m, or seconds) or an RFC 3339 "
               f"date or date-time (2026-11-28, 2026-11-28T13:00:00Z); got {value!r}")
    if match is None:
        raise InputError(problem)
    year, month, day, hour, minute, second, fraction, sign, zone_hours, zone_minutes = match.groups()
    try:
        if sign is not None and (int(zone_hours) > 23 or int(zone_minutes) > 59):
            raise ValueError("no such offset")
        offset = timedelta(hours=int(zone_hours), minutes=int(zone_minutes)) if sign is not None else timedelta()
        at = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
                      tzinfo=timezone(-offset if sign == "-" else offset))
    except ValueError:
        raise InputError(problem) from None
    return at.timestamp() + float(fraction or 0)


async def page(store: Store, keys: Keys, *, status: str | None = None, machine: str | None = None,
               since: float | None = None, where: Mapping[str, str] | None = None, after: str | None = None,
               limit: int = PAGE, now: float | None = None) -> Page:
    """Up to `limit` instances, newest first, created at or after `since`, after the cursor `after`.

    Reads the index entries of the page, from every range the filter merges, and the records they
    name. An entry whose record went away between the two reads is skipped, and so is one whose
    record changed status when the listing is by status (it is listed under its new status). The
    ranges of one machine are read in one transaction, so an instance whose status changes while a
    page is read is found once, under one status; the cursor is its sort key, the same under every
    status, so a later page neither lists it again nor passes it by.

    etcd 3.5 answers a range with a limit after walking every key of the range (to count them),
    so every range is read in windows of creation time that grow fourfold from a second (from
    `now`, or from the cursor): a page walks the keys near it, not every instance stored.

    `where` (attribute name -> text, as `search.check_where` gives them): the page reads the
    search entries of its first pair, one range, and keeps the instances whose records have every
    pair and the status and machine asked for (those are checked on the records the page reads)."""
    if where:
        name, text = next(iter(where.items()))
        ranges = [[keys.attribute(name, text)]]
    else:
        ranges = await _ranges(store, keys, status, machine)
    wanted = dict(where or {})
    end = None if since is None else prefix_end(sort_key(int(since * 1000), ""))  # ages up to since's: created since
    if after is None:
        low = ""
        origin = int(sort_key(int(((time.time() if now is None else now) + 1.0) * 1000), "")[:13])
        bounds = [f"{origin:013d}"]  # before it: what writers whose clocks run ahead made
    else:
        low = check_cursor(after) + AFTER
        origin = int(after[:13])
        bounds = []
    step = 1000
    while origin + step <= AGE_MAX:
        bounds.append(f"{origin + step:013d}")
        step *= 4
    windows: list[str | None] = [b for b in bounds if end is None or b < end]
    windows.append(end)
    items: list[Instance] = []
    last: str | None = None
    for high in windows:
        while True:
            want = limit - len(items)
            take = min(want, PAGE)
            tails, more, horizon = await _entries(store, ranges, low, high, take)
            if not tails:
                if more and horizon is not None:  # read only keys that name no instance: on past them
                    low = horizon + AFTER
                    continue
                break
            if want <= 0:
                return Page(items, last)  # full, and more follow
            chosen = tails[:take]
            for kv in await _records(store, [keys.instance(tail.partition("/")[2]) for tail in chosen]):
                if kv is None:
                    continue
                inst = load_instance(kv.value)
                if status is not None and inst.status != status:
                    continue
                if wanted and not _matches(inst, machine, wanted):
                    continue
                items.append(inst)
            last = chosen[-1]
            low = last + AFTER
            if not more:
                break  # the window holds nothing more
            if len(items) >= limit:
                return Page(items, last)
        if high is not None:
            low = high
    return Page(items, None)


def _matches(inst: Instance, machine: str | None, where: Mapping[str, str]) -> bool:
    """Whether a record read for a page by `where` is of the machine asked for (its range did not
    say) and has every pair (its range said only the first, as it stood when read)."""
    return (machine is None or inst.machine == machine) and all(inst.search.get(k) == v for k, v in where.items())


def _roots(keys: Keys, status: str) -> list[str]:
    """Where the ranges of a status lie, one under each of these for each machine (`<root><machine>/`):
    a finished status's listing entries; the running instances' work markers (and, in a namespace
    not yet upgraded from layout 2, its running listing entries, `layout.py`)."""
    if status == RUNNING:
        return [keys.work_prefix, keys.listings(RUNNING)]
    return [keys.listings(status)]


async def _ranges(store: Store, keys: Keys, status: str | None, machine: str | None) -> list[list[str]]:
    """The prefixes of the listing ranges a filter merges, those of one machine together."""
    roots = [root for s in (STATUSES if status is None else [status]) for root in _roots(keys, s)]
    machines = [machine] if machine is not None else await listed_machines(store, keys, roots)
    return [[root + name + "/" for root in roots] for name in machines]


async def listed_machines(store: Store, keys: Keys, roots: list[str]) -> list[str]:
    """The machines the registry names, and any other that has listing entries under `roots`:
    a skip-scan of the gaps the registry's names leave (see the module's docstring)."""
    named = await _registered(store, keys)
    found = set(named)
    gaps: list[tuple[str, str, str]] = []  # (root, start, end)
    for prefix in roots:
        start = prefix
        for name in sorted(named, key=lambda n: n + "/"):  # as their ranges lie: "a-b/" before "a/"
            gaps.append((prefix, start, prefix + name + "/"))
            start = prefix_end(prefix + name + "/")
        gaps.append((prefix, start, prefix_end(prefix)))
    while gaps:
        answers = await _read(store, [[Get(start, end, limit=1, keys_only=True)] for _, start, end in gaps])
        following = []
        for (prefix, _, end), (kvs,) in zip(gaps, answers):
            if kvs:
                name = kvs[0].key[len(prefix):].partition("/")[0]
                if MACHINE_NAME.fullmatch(name):
                    found.add(name)
                following.append((prefix, prefix_end(prefix + name + "/"), end))
        gaps = [(prefix, start, end) for prefix, start, end in following if start < end]
    return sorted(found)


async def _registered(store: Store, keys: Keys) -> list[str]:
    """The machines the registry names (keys only: the definitions they point to are not needed)."""
    start, end = keys.machines, prefix_end(keys.machines)
    names: list[str] = []
    while True:
        found = await store.range(start, end, limit=500, keys_only=True)
        names += [kv.key[len(keys.machines):] for kv in found.kvs]
        if not found.more or not found.kvs:
            return [name for name in names if MACHINE_NAME.fullmatch(name)]
        start = found.kvs[-1].key + "\0"


async def _entries(store: Store, ranges: list[list[str]], low: str, high: str | None,
                   take: int) -> tuple[list[str], bool, str | None]:
    """The sort keys from `low` up to `high` (None: the end) of every range, merged, newest first
    and each once (an instance's markers give its sort key once), at most `take` + 1 keys of each
    range (at least one: whether any follows); whether more than `take` follow `low` in the
    window; and the horizon: the least of the last sort keys read from ranges that had more.

    Only sort keys up to the horizon are answered: a range that had more may hold others up to it
    but none before it. Keys that name no instance (an earlier layout's markers under a prefix
    that looks like a machine's) are passed over."""
    limit = take + 1
    reads = [[Get(prefix + low, prefix_end(prefix) if high is None else prefix + high, limit=limit, keys_only=True)
              for prefix in group] for group in ranges]
    tails: set[str] = set()
    horizon: str | None = None
    for group, answers in zip(ranges, await _read(store, reads)):
        for prefix, kvs in zip(group, answers):
            read = [kv.key[len(prefix):].partition(MARK)[0] for kv in kvs]
            tails.update(tail for tail in read if CURSOR.fullmatch(tail))
            if len(kvs) >= limit and (horizon is None or read[-1] < horizon):
                horizon = read[-1]
    merged = sorted(tail for tail in tails if horizon is None or tail <= horizon)
    return merged, horizon is not None or len(merged) > take, horizon


async def _read(store: Store, groups: list[list[Get]]) -> list[list[list[KeyValue]]]:
    """What each read of each group finds. A group's reads go in one transaction (groups share
    one, up to etcd's MAX_TXN_OPS operations), so they see one revision; the transactions go at
    once. While etcd is over its quota (it refuses every transaction then, read-only ones too) each
    read goes alone."""
    batches: list[list[list[Get]]] = []
    room = 0
    for group in groups:
        if len(group) > room:
            batches.append([])
            room = MAX_TXN_OPS
        batches[-1].append(group)
        room -= len(group)

    async def one(batch: list[list[Get]]) -> list[list[list[KeyValue]]]:
        gets = [get for group in batch for get in group]
        try:
            found = [answer.kvs for answer in (await store.txn([], gets)).gets()]
        except NoSpace:
            found = [result.kvs for result in await asyncio.gather(*(
                store.range(get.key, get.end, limit=get.limit, keys_only=get.keys_only) for get in gets))]
        out = []
        for group in batch:
            out.append(found[:len(group)])
            found = found[len(group):]
        return out

    return [group for answers in await asyncio.gather(*(one(batch) for batch in batches)) for group in answers]


async def _records(store: Store, names: list[str]) -> list[KeyValue | None]:
    """The records of a page in one transaction; one read each while etcd is over its quota (etcd
    3.5 then refuses every transaction, read-only ones too, but serves plain reads)."""
    try:
        return [got.first for got in (await store.txn([], [Get(name) for name in names])).gets()]
    except NoSpace:
        return list(await asyncio.gather(*(store.get(name) for name in names)))


def summary(inst: Instance) -> dict[str, Any]:
    """An instance as `dsm list --json` prints it: the record without history and payload."""
    record = public_record(inst)
    del record["payload"]
    return record
