"""Checks that the listing and expiry indexes agree with the records, for tests of anything that writes them."""

from __future__ import annotations

from typing import Any

from dsm import index
from dsm.keys import Keys
from dsm.records import load_history, load_instance
from dsm.store import prefix_end


async def read_all(store: Any, prefix: str) -> list[Any]:
    out: list[Any] = []
    start, end = prefix, prefix_end(prefix)
    while True:
        page = await store.range(start, end, limit=1000)
        out.extend(page.kvs)
        if not page.more or not page.kvs:
            return out
        start = page.kvs[-1].key + "\0"


async def inconsistencies(store: Any, keys: Keys) -> list[str]:
    """What `dsm status` or `dsm list` would show wrongly: a record without its entries or its
    history, an entry or a history key without its record, a running record without a work marker
    (which lists it) or a marker away from its instance's place, a search entry that is not its
    record's attribute's, an expiry entry naming other attributes. Empty when all agree."""
    records = {load_instance(kv.value).id: load_instance(kv.value) for kv in await read_all(store, keys.instances)}
    want_idx: set[str] = set()
    want_exp: set[str] = set()
    for inst in records.values():
        if inst.finished:
            want_idx.add(index.listing_key(keys, inst.id, inst.status, inst.machine, index.created_ms(inst)))
        want_idx.update(index.search_key(keys, inst.id, name, text, index.created_ms(inst))
                        for name, text in inst.search.items())
        ms = index.expires_ms(inst)
        if ms is not None:
            want_exp.add(keys.expiry(ms, inst.id))
    have_idx = {kv.key for kv in await read_all(store, f"{keys.root}idx/")}
    expiries = await read_all(store, keys.expiry_prefix)
    have_exp = {kv.key for kv in expiries}
    named = [kv.key for kv in expiries if kv.key.rpartition("/")[2] in records
             and dict(index.Expiry.load(kv.value).search) != dict(records[kv.key.rpartition("/")[2]].search)]
    problems = [f"missing entry {k}" for k in sorted(want_idx - have_idx)]
    problems += [f"entry without its record {k}" for k in sorted(have_idx - want_idx)]
    problems += [f"missing expiry {k}" for k in sorted(want_exp - have_exp)]
    problems += [f"expiry without its record {k}" for k in sorted(have_exp - want_exp)]
    problems += [f"expiry naming other search attributes than its record {k}" for k in named]
    placed: set[str] = set()
    for kv in await read_all(store, keys.work_prefix):
        ref = keys.parse_work(kv.key)
        if ref is None:
            problems.append(f"work key of no layout: {kv.key}")
        elif ref.instance in records and ref.place != keys.place_of(records[ref.instance]):
            problems.append(f"marker away from its instance's place: {kv.key}")
        else:
            placed.add(ref.instance)
    problems += [f"running record without a marker: {iid}" for iid, inst in records.items()
                 if not inst.finished and iid not in placed]
    history: dict[str, int] = {}  # entries stored, in chunks (or one-entry keys) and in records
    for kv in await read_all(store, f"{keys.root}hist/"):
        iid = kv.key[len(f"{keys.root}hist/"):].rpartition("/")[0]
        history[iid] = history.get(iid, 0) + len(load_history(kv.value))
    for iid, inst in records.items():
        if inst.recent:
            history[iid] = history.get(iid, 0) + len(inst.recent)
    for iid, count in history.items():
        if iid not in records:
            problems.append(f"history without its record: {iid} ({count} entries)")
        elif count != records[iid].transitions:
            problems.append(f"history of {iid} has {count} entries, its record counts {records[iid].transitions}")
    for iid, inst in records.items():
        if inst.transitions and iid not in history:
            problems.append(f"record {iid} without its history")
    return problems
