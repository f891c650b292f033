"""Runs the `dsm` command (argv after the first two) and, once its worker serves, ends one of the
worker's long-lived tasks as a crash would: `python partkiller.py TASK_PREFIX dsm-args...`.

The task is cancelled from outside, the way a bug that ends a part (an exception nobody catches,
a loop that returns) leaves it: done, while the rest of the process goes on."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsm import cli  # noqa: E402
from dsm.worker import core  # noqa: E402

target = sys.argv.pop(1)
original = core.Worker.run


async def run(self: core.Worker, stop: asyncio.Event | None = None, *, grace: float = 30.0) -> None:
    async def strike() -> None:
        while True:
            await asyncio.sleep(0.2)
            tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith(target) and not t.done()]
            if tasks and self.lease.ready.is_set():
                await asyncio.sleep(1.0)  # serving, with its entry among live workers
                print(f"partkiller: cancelling {tasks[0].get_name()}", file=sys.stderr, flush=True)
                tasks[0].cancel()
                return

    striking = asyncio.get_running_loop().create_task(strike())
    try:
        await original(self, stop, grace=grace)
    finally:
        striking.cancel()


core.Worker.run = run  # type: ignore[method-assign]
cli.main()
