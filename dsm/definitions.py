"""Definitions by content digest: registered once in the store, compiled once per process.

Every instance pins the digest it started with. A worker that meets a digest it was not started
with fetches the source from the store and compiles it under its own allowlist, so instances keep
their version while the YAML on disk moves on.

Anyone who can write the namespace can write under any digest, so the digest is checked on every
read: the stored source must hash to it (`graph.digest_of`, as the compiler computes it), or the
definition is refused. Registering a definition whose digest is taken by content that does not
match replaces that content: the right one is known by its hash, so the first writer cannot pin
a forgery under a legitimate digest.

Each machine also has a pointer to its newest definition (`/<ns>/machines/<machine>`), written in
the transaction that first stores a definition of it: whatever starts an instance by the
machine's name (`dsm api`) starts the definition stored last. Registering a definition that is
stored already changes nothing, so a worker restarted with an older file does not move it back
(going back is a new version: change the file, its digest changes). A namespace whose definitions
were stored before pointers existed gets one when a definition of the machine is registered again.
The pointer is only a name: the definition it names is read, and checked, by its digest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import codec, compiler, handlers
from .errors import DefinitionError, NoSpace, NotFound
from .graph import Graph, digest_of
from .keys import Keys
from .records import timestamp
from .store import Compare, Get, Put, Store, prefix_end

log = logging.getLogger(__name__)


MISMATCH_RETRY = 30.0  # seconds before a process looks again at a digest whose content did not match


def calls_of(graph: Graph) -> dict[str, str]:
    """The machines a definition calls directly: call path -> digest."""
    return {st.call.path: st.call.graph.digest for st in graph.states.values()
            if st.call is not None and st.call.graph is not None}


def encode(graph: Graph) -> bytes:
    raw: dict[str, Any] = {"machine": graph.machine, "version": graph.version, "file": Path(graph.file).name,
                           "source": graph.source}
    calls = calls_of(graph)
    if calls:
        raw["calls"] = calls  # covered by the digest, as the source is
    return json.dumps(raw, separators=(",", ":")).encode()


def decode(digest: str, value: bytes) -> tuple[dict[str, Any] | None, str]:
    """The stored definition if its source hashes to `digest`; else None and what is wrong."""
    try:
        raw = json.loads(value)
    except ValueError:
        raw = None
    if not isinstance(raw, dict) or not isinstance(raw.get("source"), str):
        return None, "is not a stored definition"
    calls = raw.get("calls", {})
    if not isinstance(calls, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in calls.items()):
        return None, "is not a stored definition (its calls are malformed)"
    actual = digest_of(raw["source"], calls)
    if actual != digest:
        return None, f"holds content whose digest is {actual}"
    return raw, ""


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """A machine's newest definition, as its pointer names it (`/<ns>/machines/<machine>`)."""

    machine: str
    digest: str
    version: int | str | None
    description: str
    registered_at: float

    @staticmethod
    def of(graph: Graph, now: float) -> MachineInfo:
        return MachineInfo(graph.machine, graph.digest, graph.version, graph.description, now)

    def dump(self) -> bytes:
        return codec.dumps({"machine": self.machine, "digest": self.digest, "version": self.version,
                            "description": self.description, "registered_at": self.registered_at})

    @staticmethod
    def load(raw: bytes) -> MachineInfo:
        d: dict[str, Any] = codec.loads(raw)
        return MachineInfo(str(d["machine"]), str(d["digest"]), d.get("version"), str(d.get("description") or ""),
                           float(d.get("registered_at") or 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "version": self.version, "digest": self.digest,
                "description": self.description, "registered_at": timestamp(self.registered_at)}


async def register(store: Store, keys: Keys, graph: Graph) -> None:
    """Store the definition under its digest unless it is there already (content never changes);
    content under the digest that does not hash to it is replaced. The machines it calls are
    registered first, so that whoever reads it finds them. A definition stored here for the first
    time becomes its machine's newest, in the same transaction."""
    for child in graph.children().values():
        await _register_one(store, keys, child)
    await _register_one(store, keys, graph)


async def _register_one(store: Store, keys: Keys, graph: Graph) -> None:
    key = keys.definition(graph.digest)
    pointer = keys.machine(graph.machine)
    value = encode(graph)
    # plain range reads: etcd 3.5 refuses every transaction, read-only ones too, while over its quota
    present, named = await asyncio.gather(store.range(key), store.range(pointer))
    if present.kvs and decode(graph.digest, present.kvs[0].value)[0] is not None:
        if not named.kvs:
            await _name_newest(store, keys, graph)
        return  # nothing else to write: a worker starts even while etcd refuses writes (NOSPACE)
    newest = Put(pointer, MachineInfo.of(graph, time.time()).dump())
    while True:
        result = await store.txn([Compare.version(key, "==", 0)], [Put(key, value), newest], [Get(key)])
        if result.succeeded:
            return
        found = result.get(0).first
        if found is None:
            continue  # deleted in between: try to create it again
        stored, problem = decode(graph.digest, found.value)
        if stored is None:
            log.warning("definition %s in namespace %r %s; replacing it with the definition that has this digest "
                        "(%s)", graph.digest, keys.namespace, problem, graph.machine)
            replaced = await store.txn([Compare.mod(key, "==", found.mod_revision)], [Put(key, value)])
            if not replaced.succeeded:
                continue
        if not named.kvs:
            await _name_newest(store, keys, graph)
        return


async def _name_newest(store: Store, keys: Keys, graph: Graph) -> None:
    """Give a machine that has no pointer yet (definitions stored before pointers existed) this one."""
    pointer = keys.machine(graph.machine)
    try:
        await store.txn([Compare.version(pointer, "==", 0)], [Put(pointer, MachineInfo.of(graph, time.time()).dump())])
    except NoSpace:
        log.debug("etcd refuses writes: machine %s gets its pointer at a later registration", graph.machine)


async def newest(store: Store, keys: Keys, machine: str) -> MachineInfo | None:
    """The newest definition registered for a machine (None: none is)."""
    kv = await store.get(keys.machine(machine))
    return None if kv is None else MachineInfo.load(kv.value)


async def machines(store: Store, keys: Keys) -> list[MachineInfo]:
    """Every machine registered in the namespace, by name, with its newest definition."""
    start, end = keys.machines, prefix_end(keys.machines)
    out: list[MachineInfo] = []
    while True:
        page = await store.range(start, end, limit=500)
        for kv in page.kvs:
            try:
                out.append(MachineInfo.load(kv.value))
            except (ValueError, KeyError, TypeError):
                continue  # written by something other than dsm
        if not page.more or not page.kvs:
            return out
        start = page.kvs[-1].key + "\0"


@dataclass
class Registry:
    """Compiled graphs by digest for one process: local files first, then the store."""

    store: Store | None
    keys: Keys
    allow: handlers.Allowlist = handlers.ANY
    search_path: tuple[str, ...] = ()
    import_handlers: bool = True
    _graphs: dict[str, Graph] = field(default_factory=dict)
    _broken: dict[str, str] = field(default_factory=dict)
    _loading: dict[str, asyncio.Future[Graph]] = field(default_factory=dict)
    _look_again: dict[str, float] = field(default_factory=dict)  # digest -> when a mismatch is read again
    _machines: dict[str, str] = field(default_factory=dict)  # digest -> machine name, of refused definitions

    def add(self, graph: Graph) -> None:
        self._graphs[graph.digest] = graph
        for child in graph.children().values():
            self._graphs.setdefault(child.digest, child)

    def known(self) -> Iterable[Graph]:
        return self._graphs.values()

    def refusal(self, digest: str) -> str | None:
        """Why this process cannot run a digest (compiled before and failed), or None."""
        again = self._look_again.get(digest)
        if again is not None and time.monotonic() >= again:  # the content may have been repaired since
            del self._look_again[digest]
            self._broken.pop(digest, None)
        return self._broken.get(digest)

    async def get(self, digest: str) -> Graph:
        graph = self._graphs.get(digest)
        if graph is not None:
            return graph
        refused = self.refusal(digest)
        if refused is not None:
            raise NotFound(refused)
        if self.store is None:
            raise NotFound(f"definition {digest} is not known to this process")
        loading = self._loading.get(digest)
        if loading is None:  # one load per digest, however many instances ask at once
            loading = asyncio.ensure_future(self._load(digest))
            self._loading[digest] = loading
            loading.add_done_callback(lambda done: self._loaded(digest, done))
        return await asyncio.shield(loading)

    def _loaded(self, digest: str, done: asyncio.Future[Graph]) -> None:
        self._loading.pop(digest, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have gone

    async def _load(self, digest: str) -> Graph:
        kv = await self.store.get(self.keys.definition(digest)) if self.store is not None else None
        if kv is None:
            self._broken[digest] = f"definition {digest} is not registered in namespace {self.keys.namespace!r}"
            raise NotFound(self._broken[digest])
        raw, problem = decode(digest, kv.value)
        if raw is None:
            reason = (f"definition {digest} in namespace {self.keys.namespace!r} {problem}: refusing to run it "
                      "(it was written by something other than dsm, or tampered with)")
            self._broken[digest] = reason
            self._look_again[digest] = time.monotonic() + MISMATCH_RETRY
            log.error("%s", reason)
            raise NotFound(reason)
        calls: dict[str, Graph] = {}
        for path, child in raw.get("calls", {}).items():
            try:
                calls[path] = await self.get(child)
            except NotFound as exc:
                reason = f"cannot run definition {digest} ({raw.get('machine')}): the machine {path!r} it calls: {exc}"
                self._broken[digest] = reason
                self._machines[digest] = str(raw.get("machine"))
                raise NotFound(reason) from None
        try:
            # compiling a large definition (and importing its modules) takes a while: never on the
            # event loop, where it would stall the lease keep-alive and every running tick
            graph = await asyncio.to_thread(self._compile, digest, raw, calls)
        except DefinitionError as exc:
            reason = f"cannot run definition {digest} ({raw.get('machine')}): {exc}"
            self._broken[digest] = reason
            self._machines[digest] = str(raw.get("machine"))
            # Once per definition and process, in one line: its instances are left to other workers.
            first = exc.problems[0].message if exc.problems else str(exc)
            more = f" (and {len(exc.problems) - 1} more problem(s))" if len(exc.problems) > 1 else ""
            log.warning("cannot run definition %s (machine %s) here: %s%s; leaving its instances to other workers",
                        digest, raw.get("machine"), " ".join(first.split()), more)
            raise NotFound(reason) from None
        self._graphs[digest] = graph
        return graph

    def _compile(self, digest: str, raw: dict[str, Any], calls: dict[str, Graph] | None = None) -> Graph:
        # A definition from the store has no folder: its modules come from this process's own
        # search path (--path, the folders of its definitions) and installed packages only.
        name = Path(str(raw.get("file") or digest)).name  # a label for messages, not covered by the digest
        return compiler.compile_text(raw["source"], name, import_handlers=self.import_handlers, allow=self.allow,
                                     search_path=self.search_path, calls=calls if raw.get("calls") else None)

    def refused(self) -> dict[str, str | None]:
        """Digests this process cannot run, with their machine's name when known (what a worker
        says of itself)."""
        return {digest: self._machines.get(digest) for digest in list(self._broken) if self.refusal(digest)}
