"""Embedded execution: the same worker and client over a MemoryStore, all in one process.

Nothing outlives the process. `--workers N` means N ticks may run at once, each sync handler in
its own thread (async handlers share one event-loop thread), so fork branches really overlap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import compiler, handlers
from .client import Client
from .definitions import Registry
from .graph import Graph
from .keys import Keys
from .records import HistoryEntry, Instance, public_record
from .store.memory import MemoryStore
from .worker import running


@dataclass
class Result:
    """A finished (or, after a timeout, unfinished) instance and its history."""

    instance: Instance
    history: list[HistoryEntry]

    @property
    def record(self) -> dict[str, Any]:
        return public_record(self.instance, self.history)


async def run_graph(graph: Graph, payload: dict[str, Any] | None = None, *, workers: int = 4,
                    timeout: float | None = None, on_history: Callable[[HistoryEntry], None] | None = None,
                    on_update: Callable[[Instance], None] | None = None,
                    on_start: Callable[[str], None] | None = None, instance_id: str | None = None) -> Result:
    """Run one instance to its end in a fresh in-process store.

    Raises asyncio.TimeoutError (with the partial Result as its only argument) when `timeout` passes.
    """
    store = MemoryStore()
    keys = Keys()
    registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
    registry.add(graph)
    client = Client(store, keys)
    try:
        async with running(store, registry, concurrency=max(1, workers), worker_id="embedded", grace=0.5):
            instance_id = await client.submit(graph, payload or {}, instance_id=instance_id)
            if on_start is not None:
                on_start(instance_id)
            try:
                inst = await client.wait(instance_id, timeout=timeout, on_history=on_history, on_update=on_update)
            except asyncio.TimeoutError:
                partial = Result(await client.instance(instance_id), await client.history(instance_id))
                raise asyncio.TimeoutError(partial) from None
            return Result(inst, await client.history(instance_id))
    finally:
        await store.close()


def run(definition: str | Path | Graph, payload: dict[str, Any] | None = None, *, workers: int = 4,
        timeout: float | None = None) -> dict[str, Any]:
    """Run a machine embedded and return its instance record (the `dsm run --json` record)."""
    graph = definition if isinstance(definition, Graph) else compiler.load(definition)
    return asyncio.run(run_graph(graph, payload, workers=workers, timeout=timeout)).record
