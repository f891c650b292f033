"""Work markers are an index of instance records; this makes them match when they may not.

A record lists its pending tokens; their markers (`work/<machine>/<age>/<id>#<token>`, `keys.py`) are
what workers watch and claim.
Every transaction keeps the two in step while it fits in one transaction. When it would not
(a fork or a cancel wider than etcd's 128 operations), the writer puts the `SYNC` marker and
defers the rest: whoever claims SYNC, or meets a marker the record no longer lists, reconciles:
markers for tokens that have none, none for tokens that are gone, in bounded transactions
fenced by the record's revision.
"""

from __future__ import annotations

from .keys import Keys, WorkInfo, range_of
from .records import PARKED, Instance, Token, load_instance
from .store import Compare, Delete, Get, Op, Put, Store, Txn

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: operations, and compares, per transaction
SYNC = "sync"  # the pseudo-token whose marker asks a worker to reconcile an instance's markers


def work_info(inst: Instance, token: Token, now: float, owner: str | None = None,
              lease: int | None = None) -> WorkInfo:
    """A token's marker; with `owner` and `lease`, claimed by that worker under that lease."""
    return WorkInfo(inst.machine, inst.digest, token.state, token.not_before, owner,
                    wait=max(0.0, token.not_before - now), lease=lease if owner is not None else None)


def sync_marker(keys: Keys, inst: Instance) -> Put:
    return Put(keys.work(keys.place_of(inst), SYNC), WorkInfo(inst.machine, inst.digest, SYNC).dump())


def reconcile_txns(keys: Keys, iid: str, place: str, inst: Instance | None, rev: int, markers: set[str], *,
                   now: float, max_ops: int = MAX_TXN_OPS, parked: dict[str, int] | None = None) -> list[Txn]:
    """Transactions that make the work markers at `place` match the instance's record (`inst` at
    `rev`; None when the record is gone): markers for tokens that have none, none for tokens that
    are gone, and due ones for tokens the record has due whose marker is parked and claimed by
    nobody (`parked`: token -> the marker's mod revision; a signal that woke more tokens than its
    transaction held leaves them so). Each is fenced by the record's revision (and a rewritten
    marker by its own); the last one also removes the SYNC marker. A place that is not the
    record's (a marker written where it should not be) keeps none."""
    placed = inst is not None and not inst.finished and keys.place_of(inst) == place
    tokens = inst.tokens if placed else {}  # type: ignore[union-attr]
    parked = parked or {}
    units: list[tuple[list[Op], list[Compare]]] = []
    for tid, token in tokens.items():
        if tid not in markers:
            units.append(([Put(keys.work(place, tid), work_info(inst, token, now).dump())], []))  # type: ignore[arg-type]
        elif tid in parked and not token.parked:
            key = keys.work(place, tid)
            units.append(([Put(key, work_info(inst, token, now).dump())],  # type: ignore[arg-type]
                          [Compare.mod(key, "==", parked[tid])]))
    for tid in sorted(markers - set(tokens)):
        if tid != SYNC:
            units.append(([Delete(keys.work(place, tid))], []))  # a claim in it goes with it
    units.append(([Delete(keys.work(place, SYNC))], []))
    fence = (Compare.mod(keys.instance(iid), "==", rev) if inst is not None
             else Compare.version(keys.instance(iid), "==", 0))
    txns: list[Txn] = []
    ops: list[Op] = []
    compares: list[Compare] = [fence]
    for unit_ops, unit_compares in units:
        if len(ops) + len(unit_ops) > max_ops or len(compares) + len(unit_compares) > max_ops:
            txns.append(Txn(compares, ops))
            ops, compares = [], [fence]
        ops.extend(unit_ops)
        compares.extend(unit_compares)
    txns.append(Txn(compares, ops))
    return txns


async def reconcile(store: Store, keys: Keys, iid: str, place: str, *, now: float,
                    max_ops: int = MAX_TXN_OPS) -> Instance | None:
    """Make the instance's markers (at `place`) match its record; return the record as last read."""
    while True:
        result = await store.txn([], [Get(keys.instance(iid)), Get(*range_of(keys.work_of_instance(place)))])
        record, kvs = result.get(0).first, result.get(1).kvs
        markers = set()
        parked: dict[str, int] = {}
        for kv in kvs:
            parsed = keys.parse_work(kv.key)
            if parsed is not None:
                markers.add(parsed.token)
                info = WorkInfo.load(kv.value) if parsed.token != SYNC else None
                if info is not None and info.owner is None and info.not_before >= PARKED:
                    parked[parsed.token] = kv.mod_revision
        inst = load_instance(record.value) if record is not None else None
        rev = record.mod_revision if record is not None else 0
        for txn in reconcile_txns(keys, iid, place, inst, rev, markers, now=now, max_ops=max_ops, parked=parked):
            if not (await store.txn(txn.compare, txn.success)).succeeded:
                break  # the record moved on: look again
        else:
            return inst
