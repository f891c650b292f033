"""Instance operations over a store: register definitions, start instances, read, list, signal,
cancel, redrive, delete and wait for them, each as the store's own transactions.

This is the store-level layer under every door into dsm: the public client's store transport
(`transport.StoreTransport`, which `dsm api` answers requests with too), the command line's
operator views, and the workers' own cancellations. It speaks in records (`records.Instance`);
the client speaks the public JSON."""

from __future__ import annotations

import asyncio
import builtins
import getpass
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from . import index, logs, payloads, search, transition
from .commits import wake_parent_ops
from .definitions import Registry, register
from .errors import Compacted, InputError, NotFound, StoreError, StoreUnavailable
from .graph import Graph
from .housekeeping import delete_children, deletion_txn
from .idempotency import keep_input, same_start
from .keys import Keys, check_instance_id, check_signal_name
from .layout import with_parent_placed
from .markers import MAX_TXN_OPS, reconcile, sync_marker, work_info
from .membership import WorkerInfo, serving
from .membership import live as live_workers
from .records import (
    STATUSES,
    HistoryEntry,
    Instance,
    dump_instance,
    history_from_stored,
    load_history,
    load_instance,
    new_id,
    public_record,
    row_seq,
)
from .redrive import redrive
from .store import Compare, Delete, Get, KeyValue, Put, Store, Txn, prefix_end

log = logging.getLogger(__name__)

SUBMIT_BATCH = 64
# etcd refuses requests over 1.5 MiB by default (--max-request-bytes); a batch of instances stops
# growing before this many bytes, leaving room for the request's own framing.
SUBMIT_BYTES = 1024 * 1024


def _request_bytes(txn: Txn) -> int:
    """About what a transaction weighs in an etcd request: keys, values and some framing per op."""
    size = 64 + sum(len(c.key) + 16 for c in txn.compare)
    for op in txn.success:
        if isinstance(op, Put):
            size += len(op.key.encode()) + len(op.value) + 16
    return size


class Operations:
    """The operations on one namespace's instances, over a store the caller owns."""

    def __init__(self, store: Store, keys: Keys | None = None, *, wall: Callable[[], float] = time.time,
                 definitions: Registry | None = None):
        """`definitions`: where the definitions instances pinned are read from, compiled without
        importing their handlers (None: a registry of these operations' own, made when first needed)."""
        self.store = store
        self.keys = keys or Keys()
        self.wall = wall
        self._definitions = definitions
        self._marked = False  # whether this client looked at the namespace's `meta/indexed` mark

    @property
    def definitions(self) -> Registry:
        if self._definitions is None:
            self._definitions = Registry(self.store, self.keys, import_handlers=False)
        return self._definitions

    async def machine_of(self, inst: Instance) -> Graph:
        """The definition an instance pinned (by digest), compiled without importing its handlers.
        NotFound when it cannot be read (not registered, or its content does not match its digest)."""
        try:
            return await self.definitions.get(inst.digest)
        except NotFound as exc:
            raise NotFound(f"instance {inst.id}: its definition cannot be read: {exc}") from None

    async def register(self, graph: Graph) -> None:
        await register(self.store, self.keys, graph)

    def _create_txn(self, graph: Graph, payload: dict[str, Any], instance_id: str, size: int = 0) -> Txn:
        now = self.wall()
        inst = keep_input(transition.start(graph, instance_id, payload, now), size)
        key = self.keys.instance(instance_id)
        ops: list = [Put(key, dump_instance(inst))]
        ops += index.created_ops(self.keys, inst)
        place = self.keys.place_of(inst)
        for token in inst.tokens.values():
            ops.append(Put(self.keys.work(place, token.id), work_info(inst, token, now).dump()))
        return Txn([Compare.create(key, "==", 0)], ops, [Get(key)])  # taken: read what holds the id

    async def submit(self, graph: Graph, payload: dict[str, Any] | None = None, *,
                     instance_id: str | None = None) -> str:
        """Register the definition (once) and start one instance; return its id.

        Starting an id that exists with the same definition and payload returns it and creates
        nothing (safe to retry); with another definition or payload raises InstanceExists."""
        iid, _ = await self.start(graph, payload, instance_id=instance_id)
        return iid

    async def start(self, graph: Graph, payload: dict[str, Any] | None = None, *,
                    instance_id: str | None = None) -> tuple[str, bool]:
        """`submit`, also saying whether the instance was created (False: it existed already)."""
        ((iid, created),) = await self._submit(graph, [payload or {}],
                                               [instance_id] if instance_id is not None else None)
        return iid, created

    async def submit_many(self, graph: Graph, batch: Iterable[dict[str, Any]], *,
                          ids: list[str | None] | None = None) -> list[str]:
        """Start many instances, up to SUBMIT_BATCH per transaction. `ids` gives each its id (None:
        generated); an id that exists is handled as `submit` does."""
        return [iid for iid, _ in await self._submit(graph, batch, ids)]

    async def _submit(self, graph: Graph, batch: Iterable[dict[str, Any]],
                      ids: list[str | None] | None) -> list[tuple[str, bool]]:
        if ids is not None:
            batch = list(batch)
            check_ids(ids, len(batch))
        await self.register(graph)
        await self._mark_indexed()
        out: list[tuple[str, bool]] = []
        pending: list[tuple[str, Txn]] = []
        size = 0
        for i, payload in enumerate(batch):
            checked, checked_size = payloads.check(payload)
            iid = (ids[i] if ids else None) or new_id()
            txn = self._create_txn(graph, checked, iid, checked_size)
            cost = _request_bytes(txn)
            if pending and (len(pending) >= SUBMIT_BATCH or size + cost > SUBMIT_BYTES):
                out.extend(await self._send(pending))
                pending, size = [], 0
            pending.append((iid, txn))
            size += cost
        if pending:
            out.extend(await self._send(pending))
        return out

    async def _mark_indexed(self) -> None:
        """Before the first instances of a namespace are written: it holds no record written before
        the index existed, so say so (`meta/indexed`), or the first housekeeper would read every record
        there is by then to give it entries it already has (50,000 waiting instances: throughput
        halved while it did). A namespace that has records and no mark is left to that backfill:
        they may predate the index. Once per client."""
        if self._marked:
            return
        self._marked = True
        if await self.store.get(self.keys.indexed) is not None:
            return
        records = self.keys.instances
        if (await self.store.range(records, prefix_end(records), limit=1, keys_only=True)).kvs:
            return
        await self.store.txn([Compare.version(self.keys.indexed, "==", 0),
                              Compare(records, "version", "==", 0, end=prefix_end(records))],  # still none
                             [Put(self.keys.indexed, b"1")])

    async def _send(self, pending: list[tuple[str, Txn]]) -> list[tuple[str, bool]]:
        """Create the instances of `pending`; for each, its id and whether it was created here."""
        if len(pending) == 1:
            iid, txn = pending[0]
            results = [await self.store.txn(txn.compare, txn.success, txn.failure)]
        else:
            result = await self.store.txn([], [txn for _, txn in pending])
            results = [result.nested(i) for i in range(len(pending))]
        out: list[tuple[str, bool]] = []
        for (iid, txn), result in zip(pending, results):
            if result.succeeded:
                out.append((iid, True))
                continue
            taken = result.get(0).first
            if taken is None:  # deleted since: the id is free again
                out.extend(await self._send([(iid, txn)]))
                continue
            same_start(load_instance(taken.value), load_instance(txn.success[0].value))  # type: ignore[union-attr]
            out.append((iid, False))
        return out

    async def instance(self, instance_id: str) -> Instance:
        check_instance_id(instance_id)
        return (await self._read(instance_id))[1]

    async def _read(self, instance_id: str) -> tuple[KeyValue, Instance]:
        """The record as stored (for a compare-and-swap on its revision) and as an Instance."""
        kv = await self.store.get(self.keys.instance(instance_id))
        if kv is None:
            raise NotFound(f"no instance {instance_id!r} in namespace {self.keys.namespace!r}")
        return kv, load_instance(kv.value)

    async def history(self, instance_id: str, *, after: int = 0, record: Instance | None = None) -> list[HistoryEntry]:
        """The instance's history entries after seq `after`, in commit order: the chunks under hist/
        (and the one-entry keys of the first layout), then the newest, kept in the record. `record`:
        the record already read (the entries returned end where it does); else it is read first,
        so an entry a commit spills meanwhile is found in its chunk, not lost between the reads."""
        check_instance_id(instance_id)
        if record is None:
            kv = await self.store.get(self.keys.instance(instance_id))
            record = load_instance(kv.value) if kv is not None else None
        recent = [] if record is None else [history_from_stored(row) for row in record.recent if row_seq(row) > after]
        if record is not None and (record.transitions <= after or (recent and recent[0].seq == after + 1)):
            return recent  # all of it is in the record
        # a chunk is named by its last entry: every one holding entries after `after` sorts from here
        start, end = self.keys.history(instance_id, after + 1), prefix_end(self.keys.history_prefix(instance_id))
        out: list[HistoryEntry] = []
        while True:
            page = await self.store.range(start, end, limit=100)
            for kv in page.kvs:
                out.extend(entry for entry in load_history(kv.value) if entry.seq > after)
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + "\0"
        last = out[-1].seq if out else after
        out.extend(entry for entry in recent if entry.seq > last)
        return out if record is None else [entry for entry in out if entry.seq <= record.transitions]

    async def record(self, instance_id: str, *, history: bool = True) -> dict[str, Any]:
        inst = await self.instance(instance_id)
        return public_record(inst, await self.history(instance_id, record=inst) if history else None)

    async def list(self, *, status: str | None = None, machine: str | None = None, since: float | None = None,
                   where: Mapping[str, Any] | None = None) -> list[Instance]:
        """Every instance that matches, newest first (read from the index, page by page)."""
        out: list[Instance] = []
        after = None
        while True:
            page = await self.page(status=status, machine=machine, since=since, where=where, after=after)
            out.extend(page.items)
            if page.next is None:
                return out
            after = page.next

    async def cancel(self, instance_id: str, *, reason: str | None = None, by: str | None = None) -> Instance:
        """Cancel a running instance (a finished one is returned unchanged); the record keeps
        `reason`, `by` (default: `user@host` of this process) and when. Its running children are
        cancelled in turn, by it (`cancel.by` is `parent:<id>`).

        The record is written in one transaction with as many marker deletions as fit; any left
        over (an instance with more live branches than one transaction holds) go right after,
        and a SYNC marker covers them should this process die in between.
        """
        check_instance_id(instance_id)
        return await self._cancel(instance_id, reason=reason, by=by if by is not None else caller())

    async def _cancel(self, instance_id: str, *, reason: str | None, by: str, wake_parent: bool = True) -> Instance:
        """`cancel`; `wake_parent`: a child cancelled by a user makes its parent's waiting token due
        (the parent's call state then fails with ChildFailed); one cancelled by its parent does not."""
        key = self.keys.instance(instance_id)
        while True:
            kv, inst = await self._read(instance_id)
            if inst.finished:
                return inst
            if wake_parent:
                inst = await with_parent_placed(self.store, self.keys, inst)  # a child of release 0.2's
            step = transition.cancel(inst, self.wall(), reason=reason, by=by)
            ops: list = [Put(key, dump_instance(step.instance))]
            ops += index.status_ops(self.keys, inst, step.instance)
            if wake_parent:
                ops += wake_parent_ops(self.keys, inst, step.instance)
            removed = list(step.removed)
            place = self.keys.place_of(inst)
            while removed and len(ops) + 2 <= MAX_TXN_OPS:  # room for a marker and the SYNC marker
                tok = removed.pop()
                ops.append(Delete(self.keys.work(place, tok)))  # a claim in it goes with it
            if removed:
                ops.append(sync_marker(self.keys, step.instance))
            result = await self.store.txn([Compare.mod(key, "==", kv.mod_revision)], ops)
            if result.succeeded:
                if removed:
                    await reconcile(self.store, self.keys, instance_id, place, now=self.wall())
                await self.cancel_released(inst, step.instance)
                return step.instance

    async def cancel_released(self, before: Instance, after: Instance, *, ended: Collection[str] = ()) -> None:
        """Cancel, as their parent, the children `before` waited for and `after` no longer does
        (`transition.released_children`: a call that timed out, a parent that ended), and theirs in
        turn. `ended`: children known to have finished already (nothing to do for them)."""
        for cid, reason in transition.released_children(before, after, self.wall()):
            if cid in ended:
                continue
            try:
                await self._cancel(cid, reason=reason, by=transition.by_parent(after.id), wake_parent=False)
            except NotFound:
                pass  # deleted, or never created (the commit that started it did not apply)

    async def signal(self, instance_id: str, name: str, payload: dict[str, Any] | None = None, *,
                     outcome: str | None = None) -> Instance:
        """Send a signal to a running instance: stored in its record (durable, in the order sent)
        and consumed by the next visit of a signal state that waits for it. Refused before anything
        is written: InvalidSignal for a name or outcome the instance's machine does not take
        (`transition.check_signal`), InputError for a finished instance, NotFound for an unknown one."""
        check_instance_id(instance_id)
        check_signal_name(name)
        if outcome is not None and (not isinstance(outcome, str) or not outcome):
            raise InputError(f"signal outcome must be a non-empty label, got {outcome!r}")
        checked, _ = payloads.check(payload if payload is not None else {})
        key = self.keys.instance(instance_id)
        graph: Graph | None = None
        while True:
            kv, inst = await self._read(instance_id)
            if not inst.finished:  # a finished one is refused as such (below), whatever the signal
                graph = graph or await self.machine_of(inst)  # pinned: the same on every turn
                transition.check_signal(graph, inst, name, outcome)
            now = self.wall()
            step = transition.signal(inst, name, checked, outcome=outcome, now=now)
            ops: list = [Put(key, dump_instance(step.instance))]
            woken = list(step.upserted)  # the tokens it wakes: their markers say due now
            place = self.keys.place_of(inst)
            while woken and len(ops) + 2 <= MAX_TXN_OPS:  # room for a marker and the SYNC marker
                token = woken.pop()
                ops.append(Put(self.keys.work(place, token.id), work_info(step.instance, token, now).dump()))
            if woken:  # more than a transaction holds: whoever claims SYNC writes the rest
                ops.append(sync_marker(self.keys, step.instance))
            result = await self.store.txn([Compare.mod(key, "==", kv.mod_revision)], ops)
            if result.succeeded:
                return step.instance

    async def wait(self, instance_id: str, *, timeout: float | None = None,
                   on_history: Callable[[HistoryEntry], None] | None = None,
                   on_update: Callable[[Instance], None] | None = None) -> Instance:
        """Wait until the instance finishes; report each committed transition and each new
        version of the record as they happen. Raises asyncio.TimeoutError when `timeout` passes."""
        check_instance_id(instance_id)
        return await asyncio.wait_for(self._wait(instance_id, on_history, on_update), timeout)

    async def _wait(self, instance_id: str, on_history: Callable[[HistoryEntry], None] | None,
                    on_update: Callable[[Instance], None] | None) -> Instance:
        key = self.keys.instance(instance_id)
        seen = 0
        delay = 0.2
        while True:
            try:
                kv = await self.store.get(key)
                if kv is None:
                    raise NotFound(f"no instance {instance_id!r} in namespace {self.keys.namespace!r}")
                inst = load_instance(kv.value)
                seen = await self._report(instance_id, inst, seen, on_history, on_update)
                if inst.finished:
                    return inst
                watch = await self.store.watch(key, start_revision=kv.mod_revision + 1)
                try:
                    async for batch in watch:
                        for event in batch.events:
                            if not event.kv.value:
                                raise NotFound(f"instance {instance_id!r} was deleted")
                            inst = load_instance(event.kv.value)
                        seen = await self._report(instance_id, inst, seen, on_history, on_update)
                        if inst.finished:
                            return inst
                finally:
                    await watch.cancel()
            except Compacted:
                continue  # re-read the record and watch from its revision
            except StoreUnavailable as exc:
                log.warning("waiting for it: %s; retrying", exc, extra=logs.about(instance_id))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _report(self, instance_id: str, inst: Instance, seen: int,
                      on_history: Callable[[HistoryEntry], None] | None,
                      on_update: Callable[[Instance], None] | None) -> int:
        if on_history is None or inst.transitions <= seen:
            seen = max(seen, inst.transitions)
        else:
            for entry in await self.history(instance_id, after=seen, record=inst):
                if entry.seq > seen:
                    on_history(entry)
                    seen = entry.seq
        if on_update is not None:  # after the transitions that led to it
            on_update(inst)
        return seen

    async def redrive(self, instance_id: str) -> Instance:
        """Continue a failed or cancelled instance from the states that did not finish (`dsm.redrive`)."""
        check_instance_id(instance_id)
        return await redrive(self.store, self.keys, instance_id, now=self.wall())


    async def workers(self) -> builtins.list[WorkerInfo]:
        """The live workers of the namespace (`dsm workers`)."""
        return await live_workers(self.store, self.keys)

    async def serving(self, digest: str) -> tuple[builtins.list[WorkerInfo], builtins.list[WorkerInfo]]:
        """(the live workers, those of them that serve the definition `digest`)."""
        return await serving(self.store, self.keys, digest)

    async def page(self, *, status: str | None = None, machine: str | None = None, since: float | None = None,
                   where: Mapping[str, Any] | None = None, after: str | None = None,
                   limit: int = index.PAGE) -> index.Page:
        """One page of the listing, newest first: `limit` instances created at or after `since`
        (epoch seconds), whose search attributes equal `where`'s values, after the cursor `after`;
        its `next` resumes after it."""
        if status is not None and status not in STATUSES:
            raise InputError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        if limit < 1:
            raise InputError(f"a page holds at least one instance, not {limit}")
        return await index.page(self.store, self.keys, status=status, machine=machine, since=since,
                                where=search.check_where(where), after=after, limit=limit, now=self.wall())

    async def delete(self, instance_id: str) -> Instance:
        """Delete a finished instance now, as retention would: its record, history and index
        entries, in one transaction, after the children its call states started, and theirs
        (`housekeeping.delete_children`). A running instance is refused (cancel it first)."""
        check_instance_id(instance_id)
        key = self.keys.instance(instance_id)
        while True:
            kv = await self.store.get(key)
            if kv is None:
                raise NotFound(f"no instance {instance_id!r} in namespace {self.keys.namespace!r}")
            inst = load_instance(kv.value)
            if not inst.finished:
                raise InputError(f"instance {instance_id} is {inst.status}: only a finished instance can be "
                                 f"deleted (cancel it first: dsm cancel {instance_id})")
            # looked for whatever the record counts: records written before it counted its children
            await delete_children(self.store, self.keys, instance_id)
            txn = deletion_txn(self.keys, inst, kv.mod_revision)
            if (await self.store.txn(txn.compare, txn.success)).succeeded:
                return inst

    async def alarms(self) -> builtins.list[str]:
        """The store's raised alarms ("NOSPACE": etcd refuses writes); [] also when they cannot be read."""
        try:
            return await self.store.alarms()
        except StoreError as exc:
            log.debug("cannot read the store's alarms: %s", exc)
            return []


def check_ids(ids: Iterable[str | None], count: int) -> None:
    """The ids given for a batch of `count` starts (None: generated): each valid, none twice."""
    ids = list(ids)
    for given in ids:
        if given is not None:
            check_instance_id(given)
    if len(ids) != count:
        raise InputError(f"{len(ids)} instance ids for {count} payloads")
    seen: set[str] = set()
    for given in ids:
        if given in seen:
            raise InputError(f"instance id {given!r} is given twice")
        if given is not None:
            seen.add(given)


def caller() -> str:
    """`user@host` of this process, for the record of who cancelled an instance."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"

