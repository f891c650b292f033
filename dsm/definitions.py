"""Definitions by content digest: registered once in the store, compiled once per process.

Every instance pins the digest it started with. A worker that meets a digest it was not started
with fetches the source from the store and compiles it under its own allowlist, so instances keep
their version while the YAML on disk moves on.
"""

from __future__ import annotations

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
        kv = await self.store.get(self.keys.definition(digest))
        if kv is None:
            self._broken[digest] = f"definition {digest} is not registered in namespace {self.keys.namespace!r}"
            raise NotFound(self._broken[digest])
        raw = json.loads(kv.value)
        try:
            if self.import_handlers:
                handlers.add_search_path(self.search_path)
            graph = compiler.compile_text(raw["source"], raw.get("file", digest), import_handlers=self.import_handlers,
                                          allow=self.allow)
        except DefinitionError as exc:
            reason = f"cannot run definition {digest} ({raw.get('machine')}): {exc}"
            self._broken[digest] = reason
            log.error("%s", reason)
            raise NotFound(reason) from None
        self._graphs[digest] = graph
        return graph
