"""Instance ids given by the caller, on both stores: starting an id again with the same definition
and payload is the same instance (safe to retry, also under concurrent submitters); anything else
is refused and writes nothing."""

from __future__ import annotations

import asyncio

import pytest
from helpers import token_ref

from dsm import compiler
from dsm.errors import InstanceExists
from dsm.idempotency import INPUT_KEPT
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.store import prefix_end

MACHINE = """
machine: {name}
start: a
states:
  a:
    tick: idsmod:tick
    next: done
  done:
    terminal: true
"""


def graphs(write):
    first = compiler.load(write("first.yaml", MACHINE.format(name="first"), idsmod="def tick(p, c):\n    pass\n"))
    other = compiler.load(write("other.yaml", MACHINE.format(name="other")))
    return first, other


def on_store(store_factory, namespace, body):
    async def main():
        store = await store_factory()
        try:
            keys = Keys(namespace)
            return await body(store, keys, Operations(store, keys))
        finally:
            await store.close()

    return asyncio.run(main())


async def count(store, prefix):
    return len((await store.range(prefix, prefix_end(prefix))).kvs)


def test_the_same_start_again_is_the_same_instance(store_factory, namespace, write):
    graph, _ = graphs(write)

    async def body(store, keys, client):
        first = await client.start(graph, {"total": 1, "items": [1, 2]}, instance_id="order-1")
        again = await client.start(graph, {"items": [1, 2], "total": 1}, instance_id="order-1")  # key order aside
        many = await client.submit_many(graph, [{"total": 1, "items": [1, 2]}, {"total": 2}],
                                        ids=["order-1", "order-2"])
        record = await client.record("order-1")
        return first, again, many, record, await count(store, keys.instances), await count(store, keys.work_prefix)

    first, again, many, record, instances, markers = on_store(store_factory, namespace, body)
    assert first == ("order-1", True) and again == ("order-1", False)
    assert many == ["order-1", "order-2"]
    assert instances == 2 and markers == 2
    assert record["input"] == {"total": 1, "items": [1, 2]}


def test_another_payload_or_definition_under_a_taken_id_is_refused(store_factory, namespace, write):
    graph, other = graphs(write)

    async def body(store, keys, client):
        await client.submit(graph, {"n": 1}, instance_id="x1")
        before = await client.record("x1")
        with pytest.raises(InstanceExists, match=r'x1 exists with another payload \(it started with \{"n": 1\}\)'):
            await client.submit(graph, {"n": 1.0}, instance_id="x1")  # 1 and 1.0 are different JSON values
        with pytest.raises(InstanceExists, match="x1 exists with another definition: first"):
            await client.submit(other, {"n": 1}, instance_id="x1")
        with pytest.raises(InstanceExists):  # a batch stops at the first refusal
            await client.submit_many(graph, [{"n": 2}], ids=["x1"])
        return before, await client.record("x1"), await count(store, keys.instances)

    before, after, instances = on_store(store_factory, namespace, body)
    assert before == after and instances == 1


def test_concurrent_submitters_of_one_id_get_one_instance(store_factory, namespace, write):
    graph, _ = graphs(write)

    async def body(store, keys, client):
        clients = [Operations(store, keys) for _ in range(8)]
        started = await asyncio.gather(*(c.start(graph, {"k": "v"}, instance_id="once") for c in clients))
        return started, await count(store, keys.instances), await count(store, keys.work_prefix)

    started, instances, markers = on_store(store_factory, namespace, body)
    assert [iid for iid, _ in started] == ["once"] * 8
    assert sorted(created for _, created in started) == [False] * 7 + [True]
    assert instances == 1 and markers == 1


def test_a_large_input_is_compared_by_digest(store_factory, namespace, write):
    graph, _ = graphs(write)
    big = {"blob": "x" * (INPUT_KEPT + 10), "n": 1}

    async def body(store, keys, client):
        await client.submit(graph, big, instance_id="big")
        again = await client.start(graph, dict(reversed(big.items())), instance_id="big")
        with pytest.raises(InstanceExists, match="too large to show"):
            await client.submit(graph, {**big, "n": 2}, instance_id="big")
        return again, (await client.record("big"))["input"]

    again, kept = on_store(store_factory, namespace, body)
    assert again == ("big", False) and kept is None


def test_a_deleted_id_may_be_used_again(store_factory, namespace, write):
    graph, _ = graphs(write)

    async def body(store, keys, client):
        await client.submit(graph, {"n": 1}, instance_id="reused")
        markers = keys.work_of_instance((await token_ref(store, keys, "reused")).place)
        await store.delete(keys.instance("reused"))
        await store.delete(markers, prefix_end(markers))
        return await client.start(graph, {"n": 2}, instance_id="reused"), await client.record("reused")

    started, record = on_store(store_factory, namespace, body)
    assert started == ("reused", True) and record["input"] == {"n": 2}
