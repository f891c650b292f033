"""Redrive: continue a failed or cancelled instance from the work that was pending when it stopped.

The transition decides what comes back (`transition.redrive`: the pending tokens with fresh
attempts, fork activations with the branches that had arrived). This writes it: the record, the
index entries that follow its status (`index.py`) and the work markers of its tokens in one
transaction fenced by the record's revision, so a concurrent cancel, redrive or delete wins or
loses whole. An instance with more pending tokens than one
transaction holds (etcd takes 128 operations) gets the markers that fit and the SYNC marker, then
the rest right after (`markers.reconcile`); should this process die in between, whichever worker
claims SYNC finishes the job.
"""

from __future__ import annotations

from . import index
from .errors import NotFound
from .keys import Keys
from .layout import with_parent_placed
from .markers import MAX_TXN_OPS, reconcile, sync_marker, work_info
from .records import Instance, dump_instance, load_instance
from .store import Compare, Op, Put, Store
from .transition import redrive as restored


async def redrive(store: Store, keys: Keys, instance_id: str, *, now: float,
                  max_ops: int = MAX_TXN_OPS) -> Instance:
    """Put a failed or cancelled instance back to work; return its record as written. Raises
    InputError when it cannot be redriven (running, succeeded, or failed by a failure terminal)."""
    key = keys.instance(instance_id)
    while True:
        kv = await store.get(key)
        if kv is None:
            raise NotFound(f"no instance {instance_id!r} in namespace {keys.namespace!r}")
        before = await with_parent_placed(store, keys, load_instance(kv.value))  # a child of release 0.2
        step = restored(before)
        again = step.instance
        ops: list[Op] = [Put(key, dump_instance(again))]
        ops += index.status_ops(keys, before, again)  # listed as running again, and no longer expiring
        tokens = list(step.upserted)
        place = keys.place_of(again)
        room = max_ops - len(ops) - 1  # the SYNC marker should the tokens not fit
        for token in tokens[:room]:
            ops.append(Put(keys.work(place, token.id), work_info(again, token, now).dump()))
        deferred = len(tokens) > room
        if deferred:
            ops.append(sync_marker(keys, again))
        result = await store.txn([Compare.mod(key, "==", kv.mod_revision)], ops)
        if not result.succeeded:
            continue  # the record changed under us: decide again on what it is now
        if deferred:
            await reconcile(store, keys, instance_id, place, now=now, max_ops=max_ops)
        return again
