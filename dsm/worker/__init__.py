"""Workers: processes (or, embedded, tasks of one process) that claim tokens, tick and commit.

`Worker` orchestrates; its parts live beside it, one job each (see `core.py`). `running()` runs
a worker in-process for the duration of a block; `dsm.service.serving` wires one over it (the
definitions served, their registry, where handlers run), for the CLI, `dsm.Client.embedded`,
benchmarks and tests. An embedded `dsm run` and `dsm test` run no worker (`dsm.driver`).

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
    from ..executors import Executor, ThreadExecutor
    from ..housekeeping import Housekeeper, HousekeepingOptions
    from ..store import Store
    from ..ticks import TickCall
    from .config import WorkerConfig
    from .core import SYNC, Worker, default_worker_id
    from .stats import WorkerStats

_WHERE = {"Housekeeper": "..housekeeping", "HousekeepingOptions": "..housekeeping", "SYNC": ".core",
          "Worker": ".core", "WorkerConfig": ".config", "WorkerStats": ".stats", "default_worker_id": ".core",
          "Executor": "..executors", "ThreadExecutor": "..executors", "TickCall": "..ticks"}


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
    lease. `options` are `Worker`'s: fields of `WorkerConfig`, and its collaborators. Setting `stop`
    ends the worker early. With `housekeeping`, the worker also stands in the housekeeping election
    under its lease (`dsm.housekeeping`).

    A worker never lives on with a part gone: when one ends by itself (the worker's run, or its
    housekeeper), the block is cancelled where it waits, the worker stops, releasing what it
    holds, and `PartFailed` is raised from the block, naming the part and why."""
    from ..errors import PartFailed
    from ..housekeeping import Housekeeper
    from .core import Worker

    worker = Worker(store, registry, **options)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    block = asyncio.current_task()
    failures: list[PartFailed] = []
    leaving = False

    def ended(task: asyncio.Task) -> None:
        if leaving or failures:
            return
        if task is run and not task.cancelled() and isinstance(task.exception(), PartFailed):
            failures.append(task.exception())  # type: ignore[arg-type]
        elif task is run and stop.is_set() and not task.cancelled() and task.exception() is None:
            return  # stopped when asked
        else:
            cause = asyncio.CancelledError() if task.cancelled() else task.exception()
            part = "housekeeper" if task is not run else "run"
            failures.append(PartFailed(f"worker {worker.id}", part, cause))
        stop.set()
        if block is not None:
            block.cancel()

    run = loop.create_task(worker.run(stop, grace=grace), name=f"dsm-worker-{worker.id}")
    run.add_done_callback(ended)
    keeper = None
    if housekeeping is not None:
        worker.housekeeper = Housekeeper(store, worker.keys, worker.lease, name=worker.id, options=housekeeping,
                                         wall=worker.wall)
        keeper = loop.create_task(worker.housekeeper.run(), name=f"dsm-housekeeping-{worker.id}")
        keeper.add_done_callback(ended)
    try:
        yield worker
    except asyncio.CancelledError:
        if not failures:
            raise
        if block is not None and hasattr(block, "uncancel"):
            block.uncancel()
    finally:
        leaving = True
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        stop.set()
        if failures:
            await asyncio.gather(run, return_exceptions=True)
        else:
            await run
    if failures:
        raise failures[0] from failures[0].cause


__all__ = ["Executor", "Housekeeper", "HousekeepingOptions", "SYNC", "ThreadExecutor", "TickCall", "Worker",
           "WorkerConfig", "WorkerStats", "default_worker_id", "running"]
