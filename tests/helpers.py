"""Helpers shared by test modules: small machines and a one-worker runner."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

ONE_TICK = """
machine: slow
start: s
states:
  s:
    tick: {module}:nap
    next: done
  done:
    terminal: true
"""


def one_tick_machine(write: Callable[..., Path], module: str, body: str) -> Path:
    """A machine with one tick, `{module}:nap`, whose body is `body` (Python, indented 4)."""
    source = f"import time\n\ndef nap(payload, ctx):\n    {body}\n"
    return write("slow.yaml", ONE_TICK.format(module=module), **{module: source})


async def run_instances(store: Any, graph: Any, payloads: list[dict], *, concurrency: int = 8,
                        timeout: float = 60, keys: Any = None) -> tuple[list, list, Any]:
    """Submit `payloads` as instances of `graph`, run one worker on `store` until all finish;
    return (instances, histories, worker). `keys` chooses the namespace (default: dsm)."""
    from dsm.keys import Keys
    from dsm.operations import Operations
    from dsm.service import serving

    keys = keys or Keys()
    client = Operations(store, keys)
    async with serving(store, keys, [graph], concurrency=concurrency) as service:
        ids = await client.submit_many(graph, payloads)
        done = await asyncio.gather(*(client.wait(i, timeout=timeout) for i in ids))
        histories = [await client.history(i) for i in ids]
    return list(done), histories, service.worker
