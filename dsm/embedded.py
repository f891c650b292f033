"""Embedded execution: one instance run to its end in this process, nothing outlives it.

`--workers N` means N ticks may run at once, each on its own thread, so fork branches really
overlap. The engine (`dsm.engine`) keeps the instance in memory and drives it with the same pure
transition the etcd workers commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import compiler
from .engine import Engine
from .graph import Graph
from .records import HistoryEntry, Instance, public_record


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
    """Run one instance to its end in this process (`dsm.engine`).

    Raises asyncio.TimeoutError (with the partial Result as its only argument) when `timeout` passes.
    """
    engine = Engine(graph, workers=max(1, workers), on_history=on_history, on_update=on_update,
                    inline=timeout is None)
    try:
        inst, history = await asyncio.wait_for(engine.run(payload or {}, instance_id, on_start=on_start), timeout)
    except asyncio.TimeoutError:
        run = engine.partial
        if run is None:
            raise
        raise asyncio.TimeoutError(Result(run.inst, list(run.history))) from None
    return Result(inst, history)


def run(definition: str | Path | Graph, payload: dict[str, Any] | None = None, *, workers: int = 4,
        timeout: float | None = None) -> dict[str, Any]:
    """Run a machine embedded and return its instance record (the `dsm run --json` record)."""
    graph = definition if isinstance(definition, Graph) else compiler.load(definition)
    return asyncio.run(run_graph(graph, payload, workers=workers, timeout=timeout)).record
