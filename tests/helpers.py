"""Helpers shared by test modules: waiting for a condition, small machines and a one-worker runner."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsm.store import Put, Txn
from dsm.store.memory import MemoryStore

WAIT = 30.0  # how long a test waits for something that should happen (a slow shared machine included)
POLL = 0.02  # how often it looks


def until(check: Callable[[], Any], what: str | Callable[[], str] = "the condition", *, timeout: float = WAIT,
          interval: float = POLL, retry_on: tuple[type[BaseException], ...] = ()) -> Any:
    """Call `check()` until it returns something true, and return that; AssertionError naming
    `what` once `timeout` passed (a function: called then, to say what was seen last). `retry_on`:
    exceptions that mean "not yet" (a page mid-render)."""
    overdue = _overdue(timeout, what)
    while True:
        try:
            found = check()
        except retry_on:
            found = None
        if found or overdue():
            return found
        time.sleep(interval)


async def until_async(check: Callable[[], Any], what: str | Callable[[], str] = "the condition", *,
                      timeout: float = WAIT, interval: float = POLL,
                      retry_on: tuple[type[BaseException], ...] = ()) -> Any:
    """`until` on the event loop: `check()` may be a plain function or a coroutine function."""
    overdue = _overdue(timeout, what)
    while True:
        try:
            found = check()
            found = await found if inspect.isawaitable(found) else found
        except retry_on:
            found = None
        if found or overdue():
            return found
        await asyncio.sleep(interval)


def _overdue(timeout: float, what: str | Callable[[], str]) -> Callable[[], bool]:
    """False until `timeout` has passed; then AssertionError naming `what`."""
    deadline = time.monotonic() + timeout

    def overdue() -> bool:
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what() if callable(what) else what}")
        return False

    return overdue


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
                        timeout: float = 60, keys: Any = None, **options: Any) -> tuple[list, list, Any]:
    """Submit `payloads` as instances of `graph`, run one worker on `store` until all finish;
    return (instances, histories, worker). `keys` chooses the namespace (default: dsm); `options`
    are the worker's (`WorkerConfig` fields)."""
    from dsm.keys import Keys
    from dsm.operations import Operations
    from dsm.service import serving

    keys = keys or Keys()
    client = Operations(store, keys)
    async with serving(store, keys, [graph], concurrency=concurrency, **options) as service:
        ids = await client.submit_many(graph, payloads)
        done = await asyncio.gather(*(client.wait(i, timeout=timeout) for i in ids))
        histories = [await client.history(i) for i in ids]
    return list(done), histories, service.worker


def on_store(store_factory: Any, body: Callable[[Any], Any]) -> Any:
    """`body(store)` on a store made by the `store_factory` fixture, which is closed after."""
    async def main() -> Any:
        store = await store_factory()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def in_namespace(store_factory: Any, body: Callable[[Any, Any], Any]) -> Any:
    """`body(store, keys)` in a namespace of its own on a store made by the `store_factory`
    fixture; the namespace is deleted and the store closed after."""
    from dsm.keys import Keys
    from dsm.store import prefix_end

    async def main() -> Any:
        store = await store_factory()
        keys = Keys("t" + str(id(store)))
        try:
            return await body(store, keys)
        finally:
            await store.delete(keys.root, prefix_end(keys.root))
            await store.close()

    return asyncio.run(main())


async def token_ref(store: Any, keys: Any, iid: str, token: str = "t1") -> Any:
    """The TokenRef of an instance's token (its marker's place read from its record)."""
    from dsm.records import load_instance

    kv = await store.get(keys.instance(iid))
    assert kv is not None, f"no record of instance {iid!r}"
    return keys.ref(load_instance(kv.value), token)


async def markers_of(store: Any, keys: Any, iid: str) -> list[Any]:
    """The work markers of an instance (found from its record), as key-values."""
    from dsm.store import prefix_end

    prefix = keys.work_of_instance((await token_ref(store, keys, iid)).place)
    return list((await store.range(prefix, prefix_end(prefix))).kvs)


class HeldCommits(MemoryStore):
    """A memory store that holds back the commits writing one instance's record (`key`), or any of
    several (`keys`), until let through."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.key: str | None = None
        self.keys: set[str] = set()
        self.held = asyncio.Event()  # a commit of that instance waits
        self.waiting = 0  # commits held now
        self.through = asyncio.Event()

    def _writes(self, ops) -> bool:
        return any((isinstance(op, Put) and (op.key == self.key or op.key in self.keys))
                   or (isinstance(op, Txn) and self._writes(op.success)) for op in ops)

    async def txn(self, compare, success=(), failure=()):
        if (self.key is not None or self.keys) and not self.through.is_set() and self._writes(success):
            self.held.set()
            self.waiting += 1
            await self.through.wait()
            self.waiting -= 1
        return await super().txn(compare, success, failure)
