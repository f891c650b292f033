"""The listing index and the expiry index: what `dsm list` and retention read instead of every record.

Every instance has four listing entries (all, by status, by machine, by status and machine; see
`keys.py`), named by its creation time so that a range read ascending yields the newest first.
A finished instance also has one expiry entry, named by when retention deletes it. They are
written in the same transaction as the record change that affects them: creation, a status
change (finish, cancel, a redrive), deletion. So the index never disagrees with the records it
lists; a page reads its index entries, then only the records of that page.

The functions here build operations and read pages; they decide nothing about when to write.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from . import codec
from .durations import parse_duration
from .errors import InputError, NoSpace
from .keys import INSTANCE_ID, Keys
from .records import Instance, load_instance, public_record
from .store import Delete, Get, KeyValue, Op, Put, Store, prefix_end

AGE_MAX = 9_999_999_999_999  # milliseconds: the age part of an index key counts down from here
PAGE = 100  # index entries read at once (their records are read in one transaction of as many gets)
MAX_PAGE = 1000  # the most instances one page asked for by a client (or the HTTP API) holds
CURSOR = re.compile(r"([0-9]{13})/(" + INSTANCE_ID.pattern + ")")  # ASCII digits: \d takes any script's
# What the HTTP API takes as `since` (its OpenAPI document says the same): a duration back from now,
# seconds or parts with units (1h30m), or an RFC 3339 date or date-time. `dsm list --since` takes
# more: any ISO 8601 time that Python reads, and durations with spaces.
_NUMBER = r"[0-9]{1,12}(?:\.[0-9]{1,9})?"
SINCE_DURATION = re.compile(f"{_NUMBER}|(?:{_NUMBER}(?:ms|s|m|h|d))+")
_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
                      r"(?:[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2})))?")


def created_ms(inst: Instance) -> int:
    return int(inst.created_at * 1000)


def expires_ms(inst: Instance) -> int | None:
    """The expiry time in whole milliseconds, rounded up: retention never deletes early."""
    at = inst.expires_at
    return None if at is None else math.ceil(at * 1000)


def sort_key(created: int, instance_id: str) -> str:
    """The part of an index key after its prefix; also the cursor that resumes after it."""
    return f"{AGE_MAX - min(max(created, 0), AGE_MAX):013d}/{instance_id}"


def listing_keys(keys: Keys, instance_id: str, status: str, machine: str, created: int) -> list[str]:
    """The four listing entries of an instance with this status."""
    tail = sort_key(created, instance_id)
    return [keys.index_prefix() + tail, keys.index_prefix(machine=machine) + tail,
            *status_keys(keys, instance_id, status, machine, created)]


def status_keys(keys: Keys, instance_id: str, status: str, machine: str, created: int) -> list[str]:
    """The two listing entries that name the status (they move when it changes)."""
    tail = sort_key(created, instance_id)
    return [keys.index_prefix(status=status) + tail, keys.index_prefix(status=status, machine=machine) + tail]


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

    def dump(self) -> bytes:
        return codec.dumps({"machine": self.machine, "status": self.status, "created": self.created,
                            "transitions": self.transitions, **({"children": True} if self.children else {})})

    @staticmethod
    def load(raw: bytes) -> Expiry:
        d: dict[str, Any] = codec.loads(raw)
        return Expiry(d["machine"], d["status"], d["created"], d.get("transitions", 0), bool(d.get("children")))

    @staticmethod
    def of(inst: Instance) -> Expiry:
        return Expiry(inst.machine, inst.status, created_ms(inst), inst.transitions, inst.children > 0)


def expiry_put(keys: Keys, inst: Instance) -> Put | None:
    ms = expires_ms(inst)
    return None if ms is None else Put(keys.expiry(ms, inst.id), Expiry.of(inst).dump())


def created_ops(keys: Keys, inst: Instance) -> list[Op]:
    """The entries of a new instance (in the transaction that creates its record)."""
    ops: list[Op] = [Put(k, b"") for k in listing_keys(keys, inst.id, inst.status, inst.machine, created_ms(inst))]
    exp = expiry_put(keys, inst)
    if exp is not None:
        ops.append(exp)
    return ops


def status_ops(keys: Keys, before: Instance, after: Instance) -> list[Op]:
    """What a change from `before` to `after` does to the entries: nothing unless the status or
    the expiry changed; then the status entries move and the expiry entry follows."""
    if before.status == after.status and before.expires_at == after.expires_at:
        return []
    created = created_ms(before)
    ops: list[Op] = []
    if before.status != after.status:
        ops += [Delete(k) for k in status_keys(keys, before.id, before.status, before.machine, created)]
        ops += [Put(k, b"") for k in status_keys(keys, after.id, after.status, after.machine, created)]
    old, new = expires_ms(before), expiry_put(keys, after)
    if old is not None and (new is None or new.key != keys.expiry(old, before.id)):
        ops.append(Delete(keys.expiry(old, before.id)))
    if new is not None:
        ops.append(new)
    return ops


def status_op_count(before: Instance, after: Instance) -> int:
    """How many operations `status_ops` adds (for a transaction's budget), without building them:
    every commit asks, and most change neither the status nor the expiry."""
    if before.status == after.status and before.expires_at == after.expires_at:
        return 0
    old, new = expires_ms(before), expires_ms(after)
    moved = 4 if before.status != after.status else 0  # the two status entries deleted, and put anew
    return moved + (old is not None and old != new) + (new is not None)


def removal_ops(keys: Keys, instance_id: str, expiry: Expiry, expires: int | None) -> list[Op]:
    """Deleting an instance's record, entries, history and leftover work markers: one transaction,
    so nothing is ever half deleted (range deletes are one operation each, whatever they hold)."""
    ops: list[Op] = [Delete(keys.instance(instance_id))]
    ops += [Delete(k) for k in listing_keys(keys, instance_id, expiry.status, expiry.machine, expiry.created)]
    if expires is not None:
        ops.append(Delete(keys.expiry(expires, instance_id)))
    history = keys.history_prefix(instance_id)
    work = keys.work_of_instance(instance_id)
    ops += [Delete(history, prefix_end(history)), Delete(work, prefix_end(work))]
    return ops


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
               since: float | None = None, after: str | None = None, limit: int = PAGE,
               now: float | None = None) -> Page:
    """Up to `limit` instances, newest first, created at or after `since`, after the cursor `after`.

    Reads the index entries of the page and the records they name. An entry whose record changed
    status or went away between the two reads is skipped (it is listed under its new status).

    etcd 3.5 answers a range with a limit after walking every key of the range (to count them),
    so the index is read in windows of creation time that grow fourfold from a second (from `now`,
    or from the cursor): a page walks the keys near it, not every instance stored."""
    prefix = keys.index_prefix(status, machine)
    end = prefix_end(prefix)
    if since is not None:
        end = prefix_end(prefix + sort_key(int(since * 1000), ""))  # ages up to since's: created since
    if after is None:
        start = prefix
        origin = int(sort_key(int(((time.time() if now is None else now) + 1.0) * 1000), "")[:13])
        windows = [prefix + f"{origin:013d}"]  # before it: what writers whose clocks run ahead made
    else:
        start = prefix + check_cursor(after) + "\0"
        origin = int(after[:13])
        windows = []
    step = 1000
    while origin + step <= AGE_MAX:
        windows.append(prefix + f"{origin + step:013d}")
        step *= 4
    ends = iter([w for w in windows if w < end] + [end])
    window = next(ends)
    items: list[Instance] = []
    last: str | None = None
    while True:
        want = limit - len(items)
        found = await store.range(start, window, limit=min(max(want, 1), PAGE), keys_only=True)
        if found.kvs and want <= 0:
            return Page(items, last)  # full, and more follow
        if found.kvs:
            tails = [kv.key[len(prefix):] for kv in found.kvs]
            for tail, kv in zip(tails, await _records(store, [keys.instance(t.partition("/")[2]) for t in tails])):
                last = tail
                if kv is None:
                    continue
                inst = load_instance(kv.value)
                if status is not None and inst.status != status:
                    continue
                items.append(inst)
            if found.more:
                if len(items) >= limit:
                    return Page(items, last)
                start = found.kvs[-1].key + "\0"
                continue
        if window == end:
            return Page(items, None)
        start, window = window, next(ends)


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
