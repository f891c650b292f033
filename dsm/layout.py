"""Which key layout a namespace is written in, and bringing one written by an earlier release up to date.

Layout 1 (releases up to 0.1) wrote a history key per transition and four listing entries per
instance. Layout 2 (release 0.2) kept the newest history entries in the record and spilled them in
chunks, listed from one entry per instance (`idx/sm/<status>/`), and held no claim keys (a claim is
the work marker's `owner` and `lease`). Layout 3 (this release) keys an instance's work markers by
its machine and creation, `work/<machine>/<age>/<id>#<token>`, so that they list the running
instances newest first as the running listing entries did: a running instance has no listing
entry, a finished one has one (`keys.py`, `index.py`).

Every record, history key and finished listing entry of layouts 1 and 2 reads as layout 3 reads
its own. What differs is moved or deleted by every worker of this release as it starts, before it
claims anything (`service.serving`; its housekeeper checks again before its first round), while
the namespace is not marked as upgraded (`upgrade`):
- every marker of an earlier layout (`work/<id>/<token>`) is moved to its place, with the
  instance's running listing entry deleted, in one transaction fenced by the record's revision and
  the markers' (a claim in a moved marker is dropped: no worker of this release holds one). A
  child's record gains its parent's creation time, which says where the parent's markers lie
  (`records.Parent.created`). Until an instance's markers are moved its running listing entry
  lists it, and no worker runs it: workers of this release see only markers in their place, and
  start serving once every marker is in its place (a child whose commit woke its parent before
  then would not know where its parent's marker lies). `dsm cancel` of a child of release 0.2
  reads its parent's creation from the parent's record;
- the `idx/all/`, `idx/status/` and `idx/machine/` entries of layout 1 are deleted in batches, and
  then any running listing entry left;
- `meta/layout` is written last. Each step can be done twice, and by two workers at once (each
  move is fenced), so a worker that dies halfway leaves the next one the rest.

Processes of an earlier release must not run beside this one: their commits would write markers
where this release does not look. A worker of this release refuses to start while a live worker of
an earlier release is registered in the namespace (`check_workers`); docs/operations.md says how
to upgrade.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from .errors import InputError
from .index import legacy_prefixes, listing_key
from .keys import LAYOUT, Keys, WorkInfo
from .markers import MAX_TXN_OPS, SYNC
from .membership import live
from .records import RUNNING, Instance, dump_instance, evolve, load_instance, millis
from .store import Compare, Delete, Get, Op, Put, Store, prefix_end

BATCH = 1000  # keys one read or deletion takes

log = logging.getLogger("dsm.layout")


class OlderRelease(InputError):
    """A live worker of an earlier release holds the namespace."""


async def written(store: Store, keys: Keys) -> int:
    """The namespace's layout: what `meta/layout` says, or 1 when a namespace has no mark."""
    kv = await store.get(keys.layout)
    return int(kv.value) if kv is not None else 1


async def upgrade(store: Store, keys: Keys) -> int:
    """Bring the namespace to LAYOUT; returns how many keys of earlier layouts it moved or deleted."""
    if await written(store, keys) >= LAYOUT:
        return 0
    moved = await move_markers(store, keys)
    deleted = 0
    for prefix in [*legacy_prefixes(keys), keys.listings(RUNNING)]:
        deleted += await _delete_all(store, prefix)
    await store.txn([], [Put(keys.layout, str(LAYOUT).encode())])
    log.info("namespace %r: key layout %d; moved the markers of %d instance(s), deleted %d listing entries of "
             "earlier layouts", keys.namespace, LAYOUT, moved, deleted)
    return moved + deleted


async def _delete_all(store: Store, prefix: str) -> int:
    end = prefix_end(prefix)
    deleted = 0
    while True:
        found = await store.range(prefix, end, limit=BATCH, keys_only=True)
        if not found.kvs:
            return deleted
        await store.txn([], [Delete(prefix, found.kvs[-1].key + "\0")])
        deleted += len(found.kvs)


async def move_markers(store: Store, keys: Keys) -> int:
    """Move every marker of an earlier layout to its place; returns for how many instances."""
    start, end = keys.work_prefix, prefix_end(keys.work_prefix)
    moved = 0
    while True:
        found = await store.range(start, end, limit=BATCH, keys_only=True)
        ids = dict.fromkeys(legacy[0] for kv in found.kvs if (legacy := keys.parse_legacy_work(kv.key)))
        for instance_id in ids:
            await _move(store, keys, instance_id)
        moved += len(ids)
        if not found.more or not found.kvs:
            return moved
        start = found.kvs[-1].key + "\0"


async def _move(store: Store, keys: Keys, instance_id: str) -> None:
    """Move one instance's markers of an earlier layout to its place, in as many transactions as
    they need, each fenced by the record's revision and by theirs; the last one deletes its running
    listing entry. A marker of this layout already in place is newer (a signal, or a child's end,
    made the token due meanwhile) and stays; the old one goes, and so does one whose token the
    record no longer lists (a worker of this release ran it on meanwhile). A finished or deleted
    instance's old markers only go."""
    key, prefix = keys.instance(instance_id), keys.work_prefix + instance_id + "/"
    while True:
        result = await store.txn([], [Get(key), Get(prefix, prefix_end(prefix))])
        record = result.get(0).first
        legacy = [(kv, keys.parse_legacy_work(kv.key)) for kv in result.get(1).kvs]
        markers = [(kv, found[1]) for kv, found in legacy if found is not None and found[0] == instance_id]
        if not markers:
            return
        inst = load_instance(record.value) if record is not None else None
        fence = ([Compare.mod(key, "==", record.mod_revision)] if record is not None
                 else [Compare.version(key, "==", 0)])
        ops: list[Op] = []
        placed: set[str] = set()
        if inst is not None:
            parented = await with_parent_placed(store, keys, inst)
            if parented is not inst:
                ops.append(Put(key, dump_instance(parented)))
            place = keys.place_of(inst)
            start = keys.work_of_instance(place)
            placed = {ref.token for kv in (await store.range(start, prefix_end(start))).kvs
                      if (ref := keys.parse_work(kv.key)) is not None}
        room = (MAX_TXN_OPS - len(fence) - len(ops) - 1) // 2  # two operations and two compares a marker
        batch = markers[:room]
        compare = list(fence)
        for kv, token in batch:
            compare.append(Compare.mod(kv.key, "==", kv.mod_revision))
            ops.append(Delete(kv.key))
            if inst is not None and not inst.finished and token not in placed and kv.value and (
                    token in inst.tokens or token == SYNC):  # else it went since, under this layout
                new = keys.work(place, token)
                compare.append(Compare.version(new, "==", 0))
                old = WorkInfo.load(kv.value)  # its wait counted from when it was written: from now, what is left
                ops.append(Put(new, WorkInfo(old.machine, old.digest, old.state, old.not_before,
                                             wait=max(0.0, old.not_before - time.time())).dump()))
        if inst is not None and len(markers) <= room and inst.status == RUNNING:
            ops.append(Delete(listing_key(keys, instance_id, RUNNING, inst.machine, millis(inst.created_at))))
        await store.txn(compare, ops)  # refused: the record or a marker moved on; read again


async def with_parent_placed(store: Store, keys: Keys, inst: Instance) -> Instance:
    """A child instance whose record, written before layout 3, does not say when its parent was
    created, with the parent's creation time (read from the parent's record); any other as it is."""
    parent = inst.parent
    if parent is None or parent.created:
        return inst
    kv = await store.get(keys.instance(parent.id))
    if kv is None:
        return inst  # gone: nothing to wake
    return evolve(inst, parent=replace(parent, created=millis(load_instance(kv.value).created_at)))


async def check_workers(store: Store, keys: Keys) -> None:
    """OlderRelease when a live worker of the namespace writes an earlier layout."""
    older = [w.id for w in await live(store, keys) if w.layout < LAYOUT]
    if older:
        raise OlderRelease(f"namespace {keys.namespace!r} has live workers of an earlier release "
                           f"({', '.join(sorted(older))}): stop them before starting this one (their commits would "
                           f"write keys this release does not read; see Upgrading in docs/operations.md)")
