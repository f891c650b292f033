"""Definitions by content digest: registered once in the store, compiled once per process.

Every instance pins the digest it started with. A worker that meets a digest it was not started
with fetches the source from the store and compiles it under its own allowlist, so instances keep
their version while the YAML on disk moves on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from . import compiler, handlers
from .errors import DefinitionError, NotFound
from .graph import Graph
from .keys import Keys
from .store import Compare, Put, Store

log = logging.getLogger(__name__)


def encode(graph: Graph) -> bytes:
    return json.dumps({"machine": graph.machine, "version": graph.version, "file": Path(graph.file).name,
                       "source": graph.source}, separators=(",", ":")).encode()


async def register(store: Store, keys: Keys, graph: Graph) -> None:
    """Store the definition under its digest unless it is there already (content never changes)."""
    key = keys.definition(graph.digest)
    await store.txn([Compare.version(key, "==", 0)], [Put(key, encode(graph))])


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

    def add(self, graph: Graph) -> None:
        self._graphs[graph.digest] = graph

    def known(self) -> Iterable[Graph]:
        return self._graphs.values()

    def refusal(self, digest: str) -> str | None:
        """Why this process cannot run a digest (compiled before and failed), or None."""
        return self._broken.get(digest)

    async def get(self, digest: str) -> Graph:
        graph = self._graphs.get(digest)
        if graph is not None:
            return graph
        if digest in self._broken:
            raise NotFound(self._broken[digest])
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
        raw = json.loads(kv.value)
        try:
            # compiling a large definition (and importing its modules) takes a while: never on the
            # event loop, where it would stall the lease keep-alive and every running tick
            graph = await asyncio.to_thread(self._compile, digest, raw)
        except DefinitionError as exc:
            reason = f"cannot run definition {digest} ({raw.get('machine')}): {exc}"
            self._broken[digest] = reason
            log.error("%s", reason)
            raise NotFound(reason) from None
        self._graphs[digest] = graph
        return graph

    def _compile(self, digest: str, raw: dict) -> Graph:
        if self.import_handlers:
            handlers.add_search_path(self.search_path)
        return compiler.compile_text(raw["source"], raw.get("file", digest), import_handlers=self.import_handlers,
                                     allow=self.allow)
