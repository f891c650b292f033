"""Instance records this worker holds claims on, cached between a claim and the commits after it.

A record is kept while some claimed token of its instance is queued or running here (counted),
and always replaced by a newer revision, never an older one: the commit fences on the revision
it read, so a stale cache costs a failed compare, not a wrong commit.
"""

from __future__ import annotations

from typing import NamedTuple

from ..records import Instance, load_instance
from ..store import KeyValue


class Cached(NamedTuple):
    instance: Instance
    revision: int  # the record's mod revision: a commit over it is fenced by it


class RecordCache:
    def __init__(self) -> None:
        self._records: dict[str, Cached] = {}
        self._refcount: dict[str, int] = {}

    def __contains__(self, iid: object) -> bool:
        return iid in self._records

    def get(self, iid: str) -> Cached:
        return self._records[iid]

    def remember(self, kv: KeyValue) -> Instance:
        """A record read from the store; kept unless a newer one is cached."""
        cached = self._records.get(_instance_id(kv.key))
        if cached is not None and cached.revision >= kv.mod_revision:
            return cached.instance
        inst = load_instance(kv.value)
        self._records[inst.id] = Cached(inst, kv.mod_revision)
        return inst

    def put(self, inst: Instance, revision: int) -> None:
        cached = self._records.get(inst.id)
        if cached is None or cached.revision < revision:
            self._records[inst.id] = Cached(inst, revision)

    def hold(self, iid: str) -> None:
        self._refcount[iid] = self._refcount.get(iid, 0) + 1

    def release(self, iid: str) -> None:
        count = self._refcount.get(iid, 1) - 1
        if count <= 0:
            self._refcount.pop(iid, None)
            self._records.pop(iid, None)
        else:
            self._refcount[iid] = count


def _instance_id(key: str) -> str:
    return key.rsplit("/", 1)[-1]
