"""Which key layout a namespace is written in, and bringing one written by an earlier release up to date.

Layout 1 (releases up to 0.1) wrote a history key per transition and four listing entries per
instance. Layout 2 keeps the newest history entries in the record and spills them in chunks, and
lists from one entry per instance (`idx/sm/`, merged across statuses and machines when a listing
does not name both), and holds no claim keys (a claim is the work marker's `owner` and `lease`:
`keys.py`; a 0.1 marker's owner without a lease holds nothing, and 0.1's claim keys, under their
worker's lease, are read by nobody and go with it). Every record, history key and `idx/sm/`
entry of layout 1 reads as layout 2 reads its own, so running, waiting and finished instances
carry on as they are; what layout 2 no longer reads (the `idx/all/`, `idx/status/` and
`idx/machine/` entries) is deleted once, in batches, by the housekeeper of the first worker of
this release elected in the namespace, which then writes `meta/layout`. Deleting them twice does
no harm, so a housekeeper that dies halfway leaves its successor the rest.

Processes of an earlier release must not run beside this one: their commits would write records
without the history entries kept in them. A worker of this release refuses to start while a live
worker of an earlier release is registered in the namespace (`check_workers`); docs/operations.md
says how to upgrade.
"""

from __future__ import annotations

import logging

from .errors import InputError
from .index import legacy_prefixes
from .keys import LAYOUT, Keys
from .membership import live
from .store import Delete, Put, Store, prefix_end

BATCH = 1000  # keys one deletion takes

log = logging.getLogger("dsm.layout")


class OlderRelease(InputError):
    """A live worker of an earlier release holds the namespace."""


async def written(store: Store, keys: Keys) -> int:
    """The namespace's layout: what `meta/layout` says, or 1 when a namespace has no mark."""
    kv = await store.get(keys.layout)
    return int(kv.value) if kv is not None else 1


async def upgrade(store: Store, keys: Keys) -> int:
    """Bring the namespace to LAYOUT; returns how many keys of the earlier layout it deleted."""
    if await written(store, keys) >= LAYOUT:
        return 0
    deleted = 0
    for prefix in legacy_prefixes(keys):
        end = prefix_end(prefix)
        while True:
            found = await store.range(prefix, end, limit=BATCH, keys_only=True)
            if not found.kvs:
                break
            await store.txn([], [Delete(prefix, found.kvs[-1].key + "\0")])
            deleted += len(found.kvs)
    await store.txn([], [Put(keys.layout, str(LAYOUT).encode())])
    log.info("namespace %r: key layout %d; deleted %d listing entries of the earlier layout", keys.namespace,
             LAYOUT, deleted)
    return deleted


async def check_workers(store: Store, keys: Keys) -> None:
    """OlderRelease when a live worker of the namespace writes an earlier layout."""
    older = [w.id for w in await live(store, keys) if w.layout < LAYOUT]
    if older:
        raise OlderRelease(f"namespace {keys.namespace!r} has live workers of an earlier release "
                           f"({', '.join(sorted(older))}): stop them before starting this one (their commits would "
                           f"lose history kept in the records; see Upgrading in docs/operations.md)")
