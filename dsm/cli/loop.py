"""The event loop a command runs on, with SIGINT and SIGTERM turned into clean stops."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from .exits import ExitCode, Fail


def run_async(coro_factory: Any) -> Any:
    """Run a coroutine with SIGINT/SIGTERM turned into a clean stop (exit 130 for SIGINT)."""

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        interrupted: list[int] = []

        def on_signal(signum: int) -> None:
            interrupted.append(signum)
            if task is not None:
                task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal, signum)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            return await coro_factory()
        except asyncio.CancelledError:
            if interrupted:
                raise Fail(ExitCode.INTERRUPTED, "interrupted") from None
            raise

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        raise Fail(ExitCode.INTERRUPTED, "interrupted") from None


def stop_on_signals(received: list[int]) -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (each noted in `received`): a long-running command
    (`worker`, `api`) stops on it gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop
