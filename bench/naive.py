"""The naive design dsm replaces, done faithfully: poll every instance each loop, lock it with an
etcd lock (aetcd's Lock: a lease and a create-revision transaction), read it, tick, put, unlock.

    python bench/naive.py --etcd http://127.0.0.1:2379 --namespace naive bench/linear.yaml

Instances are JSON records {"state", "payload"} under /<namespace>/naive/<id>; `submit` creates
them, `worker` runs until every instance is terminal. Same machine, same handlers, same etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aetcd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsm import compiler  # noqa: E402
from dsm.graph import Graph, Kind  # noqa: E402


def prefix(namespace: str) -> bytes:
    return f"/{namespace}/naive/".encode()


async def submit(client: aetcd.Client, namespace: str, graph: Graph, count: int) -> None:
    for i in range(count):
        record = {"state": graph.start, "payload": {}}
        await client.put(prefix(namespace) + f"{i:08d}".encode(), json.dumps(record).encode())


def step(graph: Graph, record: dict) -> dict:
    state = graph.states[record["state"]]
    payload = record["payload"]
    if state.tick is not None:
        result = state.tick.func(payload, None)
        if isinstance(result, dict):
            payload = result
    assert state.kind is Kind.NEXT, "the naive baseline runs linear machines"
    return {"state": state.next, "payload": payload}


async def work(client: aetcd.Client, namespace: str, graph: Graph) -> int:
    transitions = 0
    while True:
        listing = await client.get_prefix(prefix(namespace))  # poll every instance, every loop
        pending = [kv.key for kv in listing if not graph.states[json.loads(kv.value)["state"]].terminal]
        if not pending:
            return transitions
        for key in pending:
            lock = client.lock(b"/" + namespace.encode() + b"/naive-lock/" + key, ttl=10)
            if not await lock.acquire(timeout=1):
                continue
            try:
                current = await client.get(key)
                record = json.loads(current.value)
                if graph.states[record["state"]].terminal:
                    continue
                await client.put(key, json.dumps(step(graph, record)).encode())
                transitions += 1
            finally:
                await lock.release()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("definition")
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--namespace", default="naive")
    parser.add_argument("--submit", type=int, default=0, help="create this many instances and exit")
    args = parser.parse_args()
    graph = compiler.load(args.definition)
    url = urlsplit(args.etcd)
    async with aetcd.Client(host=url.hostname, port=url.port or 2379, timeout=10) as client:
        if args.submit:
            await submit(client, args.namespace, graph, args.submit)
        else:
            print(await work(client, args.namespace, graph))


if __name__ == "__main__":
    asyncio.run(main())
