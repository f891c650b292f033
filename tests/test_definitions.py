"""Definitions read back from the store: checked against their digest, compiled off the event loop, once."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from helpers import until_async

from dsm import compile_text, compiler
from dsm.definitions import Registry, decode, encode, register
from dsm.errors import NotFound
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.store.memory import MemoryStore
from dsm.worker import Worker

GOOD = "machine: order\nstart: a\nstates:\n  a: {next: done}\n  done: {terminal: true}\n"
PLANTED = GOOD.replace("a: {next: done}", "a: {next: evil}\n  evil: {next: done}")


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


def test_a_definition_whose_content_does_not_match_its_digest_is_refused(store_factory, namespace, caplog):
    graph = compile_text(GOOD, "order.yaml", import_handlers=False)
    forged = compile_text(PLANTED, "order.yaml", import_handlers=False)
    keys = Keys(namespace)

    async def main():
        store = await store_factory()
        try:
            # someone with write access to the namespace plants other content under the real digest
            await store.put(keys.definition(graph.digest), encode(forged))
            registry = Registry(store, keys, import_handlers=False)
            with pytest.raises(NotFound) as refused:
                await registry.get(graph.digest)
            with pytest.raises(NotFound):
                await registry.get(graph.digest)  # refused again without asking the store
            await store.put(keys.definition("sha256:" + "0" * 64), b"not json")
            with pytest.raises(NotFound) as garbage:
                await registry.get("sha256:" + "0" * 64)
            # registering the real definition replaces the forgery; a fresh reader accepts it
            await register(store, keys, graph)
            repaired = await Registry(store, keys, import_handlers=False).get(graph.digest)
            # and registering again leaves a matching definition alone
            await register(store, keys, graph)
            kv = await store.get(keys.definition(graph.digest))
            return str(refused.value), str(garbage.value), repaired, decode(graph.digest, kv.value)
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="dsm.definitions"):
        refused, garbage, repaired, stored = asyncio.run(main())
    assert graph.digest in refused and repr(namespace) in refused and forged.digest in refused
    assert "refusing to run it" in refused and "is not a stored definition" in garbage
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and graph.digest in errors[0] and namespace in errors[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "replacing it" in warnings[0] and graph.digest in warnings[0]
    assert repaired.digest == graph.digest and "evil" not in repaired.states
    assert stored[0] is not None and stored[0]["source"] == GOOD


def test_an_instance_pinned_to_a_forged_definition_does_not_run_it(namespace, caplog):
    """End to end on the memory store: a worker that must fetch the definition refuses it, and the
    instance stays where it is instead of running the planted machine."""
    graph = compile_text(GOOD, "order.yaml", import_handlers=False)
    forged = compile_text(PLANTED, "order.yaml", import_handlers=False)
    keys = Keys(namespace)

    async def main():
        store = MemoryStore()
        client = Operations(store, keys)
        iid = await client.submit(graph, {})
        await store.put(keys.definition(graph.digest), encode(forged))  # planted after the submit
        worker = Worker(store, Registry(store, keys, import_handlers=False), keys=keys, concurrency=1)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(worker.run(stop))

        async def met() -> bool:  # the worker refused the definition, or (as before digests were checked) ran it
            return (any("refusing to run it" in r.getMessage() for r in caplog.records)
                    or (await client.instance(iid)).finished)

        await until_async(met, "the worker met the forged definition")
        stop.set()
        await task
        return await client.record(iid)

    with caplog.at_level(logging.ERROR):
        record = asyncio.run(main())
    assert record["status"] == "running" and record["transitions"] == 0


def test_a_machine_names_its_newest_definition(store_factory, namespace):
    """The pointer moves to a definition stored for the first time, not back to one stored before."""
    v1 = compile_text(GOOD, "order.yaml", import_handlers=False)
    v2 = compile_text(GOOD.replace("machine: order", "machine: order\nversion: 2"), "order.yaml",
                      import_handlers=False)
    other = compile_text(GOOD.replace("machine: order", "machine: other"), "other.yaml", import_handlers=False)
    keys = Keys(namespace)

    async def main():
        from dsm.definitions import machines, newest

        store = await store_factory()
        try:
            assert await newest(store, keys, "order") is None
            await register(store, keys, v1)
            first = await newest(store, keys, "order")
            await register(store, keys, v2)
            second = await newest(store, keys, "order")
            await register(store, keys, v1)  # stored already: a worker restarted with the old file
            third = await newest(store, keys, "order")
            await register(store, keys, other)
            listed = await machines(store, keys)
            # a namespace from before pointers: registering again (stored already) gives one
            await store.delete(keys.machine("order"))
            await register(store, keys, v1)
            backfilled = await newest(store, keys, "order")
            return first, second, third, listed, backfilled
        finally:
            await store.close()

    first, second, third, listed, backfilled = asyncio.run(main())
    assert (first.digest, first.version) == (v1.digest, None)
    assert (second.digest, second.version) == (v2.digest, 2) and second.registered_at >= first.registered_at
    assert third == second
    assert [(m.machine, m.digest) for m in listed] == [("order", v2.digest), ("other", other.digest)]
    assert backfilled.digest == v1.digest
