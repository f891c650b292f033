"""Workers: processes (or, embedded, tasks of one process) that claim tokens, tick and commit.

`Worker` orchestrates; its parts live beside it, one job each (see `core.py`). `running()` is
the one way to run a worker in-process: the CLI, embedded runs, benchmarks and tests use it.

The other names are imported on first use: a handler process imports `dsm.worker.isolation`,
and must not pay for the worker, the store and the compiler each time one starts.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..definitions import Registry
    from ..housekeeping import Housekeeper, HousekeepingOptions
    from ..store import Store
    from .core import SYNC, Worker, WorkerStats, default_worker_id
    from .executor import Executor, ThreadExecutor, TickCall

_WHERE = {"Housekeeper": "..housekeeping", "HousekeepingOptions": "..housekeeping", "SYNC": ".core",
          "Worker": ".core", "WorkerStats": ".core", "default_worker_id": ".core", "Executor": ".executor",
          "ThreadExecutor": ".executor", "TickCall": ".executor"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dsm.worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


@asynccontextmanager
async def running(store: Store, registry: Registry, *, grace: float = 30.0, stop: asyncio.Event | None = None,
                  housekeeping: HousekeepingOptions | None = None, **options: Any) -> AsyncIterator[Worker]:
    """A worker running on this event loop for the duration of the block; on leaving it, the
    worker finishes its ticks (up to `grace` seconds), gives back its claims and revokes its
    lease. `options` are `Worker`'s. Setting `stop` ends the worker early. With `housekeeping`,
    the worker also stands in the housekeeping election under its lease (`dsm.housekeeping`)."""
    from ..housekeeping import Housekeeper
    from .core import Worker

    worker = Worker(store, registry, **options)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    task = loop.create_task(worker.run(stop, grace=grace), name=f"dsm-worker-{worker.id}")
    keeper = None
    if housekeeping is not None:
        worker.housekeeper = Housekeeper(store, worker.keys, worker.lease, name=worker.id, options=housekeeping,
                                         wall=worker.wall)
        keeper = loop.create_task(worker.housekeeper.run(), name=f"dsm-housekeeping-{worker.id}")
    try:
        yield worker
    finally:
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        stop.set()
        await task


__all__ = ["Executor", "Housekeeper", "HousekeepingOptions", "SYNC", "ThreadExecutor", "TickCall", "Worker",
           "WorkerStats", "default_worker_id", "running"]
