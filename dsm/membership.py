"""Membership: the live workers of a namespace. Each worker keeps a key under its lease saying who
it is and what it serves.

    /<ns>/workers/<worker id>    {id, host, pid, definitions, allow, refused, concurrency, in_flight, ...}

The key is bound to the worker's lease, so it exists exactly while the worker lives: a worker that
stops revokes its lease and the key goes at once; one that dies goes when its lease expires. What
it serves is what a reader needs to tell whether some live worker can run an instance: the
definitions it has compiled (by digest), those it cannot run (and why), and its allowlist, for
definitions it has not met yet. The worker rewrites the key when any of that changes, checked
every few seconds (`dsm.worker.presence`), never per tick.

The key is also the worker's heartbeat: it is rewritten at least every third of the lease's TTL,
and says (`stale_after`) how long it may go unwritten before the worker is taken for dead. On an
etcd shared with other users a lease proves nothing (any user can keep any lease alive), so the
other workers of the namespace judge by this key instead (`dsm.worker.peers`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import codec, handlers
from .definitions import Registry
from .errors import NotFound
from .keys import Keys
from .records import timestamp
from .store import Store, prefix_end


def prefix(keys: Keys) -> str:
    return keys.workers


def key(keys: Keys, worker_id: str) -> str:
    return keys.worker(worker_id)


@dataclass(frozen=True, slots=True)
class Served:
    machine: str
    version: int | str | None
    digest: str

    def as_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "version": self.version, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a live worker says of itself."""

    id: str
    host: str
    pid: int
    definitions: tuple[Served, ...]
    allow: tuple[str, ...] | None  # module prefixes its handlers may come from; None: any module
    functions: tuple[str, ...]  # handlers allowed one by one, module:function
    refused: tuple[Served, ...]  # definitions it met and cannot run
    concurrency: int
    in_flight: int
    started_at: float
    updated_at: float
    stale_after: float | None = None  # seconds unwritten after which others take it for dead; None: never
    layout: int = 1  # the key layout it writes (`dsm.layout`); entries of releases before there was one: 1

    def as_dict(self) -> dict[str, Any]:
        """The `dsm workers --json` entry."""
        return {"id": self.id, "host": self.host, "pid": self.pid,
                "definitions": [d.as_dict() for d in self.definitions],
                "allow": list(self.allow) if self.allow is not None else None, "functions": list(self.functions),
                "refused": [d.as_dict() for d in self.refused], "concurrency": self.concurrency,
                "in_flight": self.in_flight, "started_at": timestamp(self.started_at),
                "updated_at": timestamp(self.updated_at)}

    def dump(self) -> bytes:
        raw = self.as_dict()
        raw["started_at"], raw["updated_at"] = self.started_at, self.updated_at
        raw["stale_after"] = self.stale_after
        raw["layout"] = self.layout
        return codec.dumps(raw)

    @staticmethod
    def load(value: bytes) -> WorkerInfo:
        d = codec.loads(value)

        def served(items: Iterable[dict[str, Any]]) -> tuple[Served, ...]:
            return tuple(Served(i["machine"], i.get("version"), i["digest"]) for i in items)

        allow = d.get("allow")
        return WorkerInfo(id=d["id"], host=d["host"], pid=d["pid"], definitions=served(d["definitions"]),
                          allow=tuple(allow) if allow is not None else None, functions=tuple(d.get("functions", ())),
                          refused=served(d.get("refused", ())), concurrency=d["concurrency"],
                          in_flight=d["in_flight"], started_at=d["started_at"], updated_at=d["updated_at"],
                          stale_after=d.get("stale_after"), layout=d.get("layout", 1))

    def same_as(self, other: WorkerInfo | None) -> bool:
        """Equal but for when it was written: nothing to tell readers."""
        return other is not None and self.dump_fields() == other.dump_fields()

    def dump_fields(self) -> tuple:
        return (self.definitions, self.allow, self.functions, self.refused, self.concurrency, self.in_flight)

    def serves(self, digest: str, modules: Iterable[str] | None) -> bool:
        """Whether this worker runs instances of `digest`: it has compiled it, or (not met yet)
        its allowlist admits every module the definition names (`modules`; None: not known)."""
        if any(d.digest == digest for d in self.definitions):
            return True
        if any(d.digest == digest for d in self.refused) or modules is None:
            return False
        allowlist = handlers.Allowlist(self.allow, self.functions)
        return all(allowlist.admits(module) for module in modules)


async def live(store: Store, keys: Keys) -> list[WorkerInfo]:
    """Every live worker of the namespace, by id."""
    start, end = prefix(keys), prefix_end(prefix(keys))
    out: list[WorkerInfo] = []
    while True:
        page = await store.range(start, end, limit=500)
        for kv in page.kvs:
            try:
                out.append(WorkerInfo.load(kv.value))
            except (ValueError, KeyError, TypeError):
                continue  # written by something else: not a worker we can describe
        if not page.more or not page.kvs:
            return out
        start = page.kvs[-1].key + "\0"


async def modules_of(store: Store, keys: Keys, digest: str) -> tuple[str, ...] | None:
    """The handler modules a stored definition names (compiled without importing them); None when
    it is not stored, or does not compile."""
    try:  # the registry reads the machines it calls too, and checks every digest
        return (await Registry(store, keys, import_handlers=False).get(digest)).modules()
    except NotFound:
        return None


async def serving(store: Store, keys: Keys, digest: str) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
    """(the live workers, those of them that serve `digest`)."""
    workers = await live(store, keys)
    modules = await modules_of(store, keys, digest) if workers else None
    return workers, [w for w in workers if w.serves(digest, modules)]
