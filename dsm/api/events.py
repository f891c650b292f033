"""Server-sent events: instance records as they change, from a watch on the store.

`GET /api/events` streams one `instance` event per change of a record (a start, each committed
transition, a signal, a cancel, a redrive), carrying the instance's summary, and one `deleted`
event when a record goes. With `?instance=ID` the stream follows that one instance: it starts with
its record and its history so far, then `instance` events carry its record without history
(payload included), and each committed transition comes as a `history` event, in order.

The last event of each store revision has that revision as its `id` (one transaction may start
many instances). A client that reconnects sends it back as `Last-Event-ID` (EventSource does)
and the stream resumes after it. When the events after it cannot be had, the stream sends
`resync`: events were lost, read the listing (or the record) again; the stream goes on from the
store's revision now. That happens when the store has compacted the revisions a stream needs
(after a long disconnect, or when etcd restarted under it), and when the id is above the store's
revision (etcd restored from a backup, or replaced by another): a watch from there would wait,
silent, until the new store caught up, then send changes that are not the ones after the id.
A `Last-Event-ID` that is no revision etcd can hold (empty, not a whole number, negative, or above
2**63 - 1) is refused before the stream starts: 400, as any bad input (`parse_last_id`). Such an
id never came from this API, so no resync could say what the client missed.
A comment line goes out every `heartbeat` seconds, so proxies keep the connection and a client
that went away is noticed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import Compacted, InputError, StoreUnavailable
from ..keys import Keys
from ..records import HistoryEntry, Instance, load_instance, public_record
from ..store import Store, Watch, prefix_end

log = logging.getLogger(__name__)

HEARTBEAT = 15.0  # seconds between keep-alive comments
RETRY_MS = 2000  # how long EventSource waits before it reconnects
QUEUED = 256  # watch batches held for a stream that its client has not read yet
MAX_REVISION = 2**63 - 1  # etcd's revisions are signed 64-bit integers
SUMMARY_FIELDS = ("id", "machine", "version", "status", "state", "active", "transitions", "waiting", "error",
                  "created_at", "finished_at", "redrives", "parent")


def event_summary(inst: Instance) -> dict[str, Any]:
    """What an `instance` event says of an instance: who it is, where it is, what it waits for."""
    record = public_record(inst)
    out = {name: record[name] for name in SUMMARY_FIELDS}
    if out["error"] is not None:
        out["error"] = {k: v for k, v in out["error"].items() if k != "traceback"}
    return out


def frame(event: str, data: Any, revision: int | None = None) -> str:
    """One server-sent event (data as one line of JSON), with an id when `revision` is given."""
    head = f"id: {revision}\n" if revision is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def parse_last_id(text: str | None) -> int | None:
    """The revision a reconnecting client's `Last-Event-ID` names (None: no such header).
    InputError unless it is one etcd can hold: ASCII digits, at most MAX_REVISION. An empty one
    too: EventSource sends the header only when it has an id."""
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_REVISION)) or int(text) > MAX_REVISION:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InputError(f"Last-Event-ID must be a revision as sent in an event's id, a whole number from 0 to "
                         f"{MAX_REVISION}; got {shown!r}")
    return int(text)


_CLOSED = object()
# (instance id, after seq, its record as the stream saw it) -> the entries up to that record
History = Callable[[str, int, Instance], Awaitable[list[HistoryEntry]]]


@dataclass
class Streams:
    """The open event streams of one app, so that a server shutting down can end them at once
    (a stream never ends by itself, and a server waits for open answers before it stops)."""

    queues: set[asyncio.Queue] = field(default_factory=set)
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        for queue in list(self.queues):
            if queue.full():
                queue.get_nowait()  # what it held is not going to be sent anyway
            queue.put_nowait(_CLOSED)


async def _pump(watch: Watch, queue: asyncio.Queue) -> None:
    """Move a watch's batches into a queue (where waiting can time out without breaking the watch)."""
    try:
        async for batch in watch:
            await queue.put(batch)
        await queue.put(StoreUnavailable("watch ended"))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # handed to the stream, which decides
        await queue.put(exc)


async def stream(store: Store, keys: Keys, streams: Streams, *, instance: str | None = None,
                 last_id: int | None = None, heartbeat: float = HEARTBEAT,
                 history: History | None = None) -> AsyncIterator[str]:
    """The event stream (see the module docstring). `history(id, after, record)` reads an instance's
    history entries after a sequence number (for `?instance=`)."""
    if instance is not None:
        start, end = keys.instance(instance), None
    else:
        start, end = keys.instances, prefix_end(keys.instances)
    seen_seq = 0  # with ?instance=: the last history entry sent
    delay = 0.2
    yield f"retry: {RETRY_MS}\n\n"
    revision = last_id  # the last revision the client has (None: from now)
    first = True
    lost = False  # the watch said the revisions after `revision` were compacted: resync from now
    while not streams.closed:
        try:
            watch, revision = await _watch_after(store, start, end, None if lost else revision)
        except StoreUnavailable as exc:
            log.warning("event stream: %s; watching again in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if watch is None:
            lost = False
            yield frame("resync", {"revision": revision}, revision)
            continue
        # one per watch, so nothing of an abandoned watch is read; bounded, so a client that reads
        # slowly holds back its watch rather than this process's memory
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUED)
        streams.queues.add(queue)
        pump = asyncio.get_running_loop().create_task(_pump(watch, queue))
        try:
            if lost:
                lost = False
                yield frame("resync", {"revision": revision}, revision)
            if first:
                first = False
                yield frame("ready", {"revision": revision}, revision)
                if instance is not None:  # where the instance is now, before its changes
                    kv = await store.get(keys.instance(instance))
                    if kv is not None:
                        inst = load_instance(kv.value)
                        yield frame("instance", public_record(inst))
                        for text, seq in await _history_frames(history, instance, seen_seq, inst):
                            seen_seq = seq
                            yield text
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), heartbeat)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is _CLOSED:
                    return
                if isinstance(item, Compacted):  # etcd says so once the watch is created, not by refusing it
                    lost = True
                    break
                if isinstance(item, Exception):
                    log.warning("event stream: %s; watching again from revision %d", item, revision)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    break
                delay = 0.2
                changes = item.events
                for n, event in enumerate(changes):
                    at = event.kv.mod_revision
                    revision = max(revision, at)
                    # the id goes on a revision's last event: resuming after it misses none of that revision
                    ident = at if n + 1 == len(changes) or changes[n + 1].kv.mod_revision != at else None
                    iid = event.kv.key[len(keys.instances):]
                    if event.type == "delete" or not event.kv.value:
                        yield frame("deleted", {"id": iid}, ident)
                        continue
                    inst = load_instance(event.kv.value)
                    if instance is None:
                        yield frame("instance", event_summary(inst), ident)
                        continue
                    for text, seq in await _history_frames(history, instance, seen_seq, inst):
                        seen_seq = seq
                        yield text
                    yield frame("instance", public_record(inst), ident)
        finally:
            streams.queues.discard(queue)
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            await watch.cancel()


async def _watch_after(store: Store, start: str, end: str | None,
                       revision: int | None) -> tuple[Watch | None, int]:
    """A watch of the changes after `revision` (None: after the store's revision now) and the
    revision it follows; or None and the store's revision now when those changes cannot be had:
    compacted, or `revision` is ahead of the store's (restored from a backup, or replaced)."""
    current = await store.revision()
    if revision is None:
        revision = current
    if revision > current:
        return None, current
    try:
        return await store.watch(start, end, start_revision=revision + 1), revision
    except Compacted:
        return None, await store.revision()


async def _history_frames(history: History | None, instance: str, seen: int,
                          inst: Instance) -> list[tuple[str, int]]:
    """`history` events for the entries committed after `seen` (each with its sequence number)."""
    if history is None or inst.transitions <= seen:
        return []
    entries = await history(instance, seen, inst)
    return [(frame("history", {"id": instance, **entry.as_dict()}), entry.seq)
            for entry in entries if entry.seq > seen]


