"""Runs the `dsm` command (argv after the first two) and, once its worker serves, ends one of the
worker's long-lived tasks as a crash would: `python partkiller.py TASK_PREFIX dsm-args...`.

The task is cancelled from outside, the way a bug that ends a part (an exception nobody catches,
a loop that returns) leaves it: done, while the rest of the process goes on."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import until_async  # noqa: E402

from dsm import cli  # noqa: E402
from dsm.worker import core  # noqa: E402

target = sys.argv.pop(1)
original = core.Worker.run


async def run(self: core.Worker, stop: asyncio.Event | None = None, *, grace: float = 30.0) -> None:
    def serving() -> list[asyncio.Task]:
        """The target tasks, once the worker serves with its entry among live workers."""
        if not (self.lease.ready.is_set() and self.presence.written_at is not None):
            return []
        return [t for t in asyncio.all_tasks() if t.get_name().startswith(target) and not t.done()]

    async def strike() -> None:
        tasks = await until_async(serving, f"a task {target} of a serving worker", timeout=60)
        print(f"partkiller: cancelling {tasks[0].get_name()}", file=sys.stderr, flush=True)
        # Until it ends: on Python 3.11, asyncio.wait_for loses a cancellation that arrives as what
        # it waits for completes (a watch's first answer, say), and the task goes on as if none came.
        while not tasks[0].done():
            tasks[0].cancel()
            await asyncio.wait([tasks[0]], timeout=1.0)

    striking = asyncio.get_running_loop().create_task(strike())
    try:
        await original(self, stop, grace=grace)
    finally:
        striking.cancel()


core.Worker.run = run  # type: ignore[method-assign]
cli.main()
