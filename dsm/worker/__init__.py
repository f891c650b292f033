"""Workers: processes (or, embedded, tasks of one process) that claim tokens, tick and commit.

`Worker` orchestrates; its parts live beside it, one job each (see `core.py`). `running()` is
the one way to run a worker in-process: the CLI, embedded runs, benchmarks and tests use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ..definitions import Registry
from ..store import Store
from .core import SYNC, Worker, WorkerStats, default_worker_id
from .executor import Executor, ThreadExecutor, TickCall


@asynccontextmanager
async def running(store: Store, registry: Registry, *, grace: float = 30.0, stop: asyncio.Event | None = None,
                  **options: Any) -> AsyncIterator[Worker]:
    """A worker running on this event loop for the duration of the block; on leaving it, the
    worker finishes its ticks (up to `grace` seconds), gives back its claims and revokes its
    lease. `options` are `Worker`'s. Setting `stop` ends the worker early."""
    worker = Worker(store, registry, **options)
    stop = stop or asyncio.Event()
    task = asyncio.get_running_loop().create_task(worker.run(stop, grace=grace), name=f"dsm-worker-{worker.id}")
    try:
        yield worker
    finally:
        stop.set()
        await task


__all__ = ["Executor", "SYNC", "ThreadExecutor", "TickCall", "Worker", "WorkerStats", "default_worker_id",
           "running"]
