"""Definitions read back from the store: compiled off the event loop, once per digest."""

from __future__ import annotations

import asyncio
import textwrap
import threading

from dsm import compile_text, compiler
from dsm.definitions import Registry, register
from dsm.keys import Keys
from dsm.store.memory import MemoryStore

GOOD = textwrap.dedent("""
    machine: order
    start: a
    states:
      a:
        next: done
      done:
        terminal: true
    """).lstrip("\n")


def test_a_definition_from_the_store_compiles_off_the_event_loop_and_once(monkeypatch):
    graph = compile_text(GOOD, "order.yaml", import_handlers=False)
    threads: list[threading.Thread] = []
    real = compiler.compile_text

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(compiler, "compile_text", spy)

    async def main():
        store = MemoryStore()
        await register(store, Keys(), graph)
        registry = Registry(store, Keys(), import_handlers=False)
        return await asyncio.gather(*(registry.get(graph.digest) for _ in range(3)))

    first, *others = asyncio.run(main())
    assert first.digest == graph.digest and all(o is first for o in others)
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
