"""Helpers for tests that run dsm workers as real processes against a real etcd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from clitools import spawn
from helpers import until

from dsm import compiler
from dsm.audit import audit
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.records import FINISHED
from dsm.store import prefix_end
from dsm.store.etcd import EtcdOptions, EtcdStore

MACHINES = Path(__file__).resolve().parent / "machines"


async def snapshot(endpoints: str, namespace: str, **credentials: str) -> list[tuple[Any, list]]:
    """Every instance of the namespace with its history; `credentials`: an etcd user and password."""
    store = await EtcdStore.connect(EtcdOptions.build(endpoints, namespace=namespace, **credentials))
    try:
        client = Operations(store, Keys(namespace))
        out = []
        for inst in await client.list():
            out.append((inst, await client.history(inst.id)))
        return out
    finally:
        await store.close()


async def transitions_committed(store: Any, keys: Keys) -> int:
    """Transitions committed in a namespace, summed over its records (each counts its own)."""
    start, end, total = keys.instances, prefix_end(keys.instances), 0
    while True:
        page = await store.range(start, end, limit=500)
        total += sum(json.loads(kv.value)["transitions"] for kv in page.kvs)
        if not page.more or not page.kvs:
            return total
        start = page.kvs[-1].key + "\0"


def wait_all_finished(endpoints: str, namespace: str, expected: int, timeout: float = 120,
                      **credentials: str) -> list:
    last: list = []

    def finished() -> list | None:
        nonlocal last
        last = asyncio.run(snapshot(endpoints, namespace, **credentials))
        return last if len(last) >= expected and all(inst.status in FINISHED for inst, _ in last) else None

    def seen() -> str:
        return f"{expected} instances finished (seen: {dict(Counter(inst.status for inst, _ in last))} of {len(last)})"

    # etcd may be restarting in the middle of a test: a failed read means "not yet"
    return until(finished, seen, timeout=timeout, interval=0.3, retry_on=(Exception,))


def leased_keys(endpoints: str, namespace: str) -> list[str]:
    """The keys of the namespace bound to a lease (workers' entries, the election): none once the leases
    of every worker expired or were revoked."""
    async def read() -> list[str]:
        store = await EtcdStore.connect(EtcdOptions.build(endpoints, namespace=namespace))
        try:
            root = Keys(namespace).root
            return [kv.key for kv in (await store.range(root, prefix_end(root), keys_only=True)).kvs if kv.lease]
        finally:
            await store.close()

    return asyncio.run(read())


def audit_all(results: list, graphs: dict[str, Any]) -> dict[str, list[str]]:
    return {inst.id: audit(graphs[inst.digest], inst, history) for inst, history in results}


def load_graph(path: Path) -> Any:
    return compiler.load(path)


class Workers:
    """dsm worker processes for one namespace; killed (SIGKILL) at the end of the test."""

    def __init__(self, endpoints: str, namespace: str, log: Path, tick: float = 0.05, lease_ttl: int = 3):
        self.endpoints = endpoints
        self.namespace = namespace
        self.env = {"DSM_TEST_LOG": str(log), "DSM_TEST_TICK": str(tick)}
        self.lease_ttl = lease_ttl
        self.procs: list[subprocess.Popen] = []

    def start(self, *paths: Path, concurrency: int = 4, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        proc = spawn("worker", *map(str, paths), "--etcd", self.endpoints, "--namespace", self.namespace,
                     "--concurrency", str(concurrency), "--lease-ttl", str(self.lease_ttl), *extra, **self.env)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> list[tuple[int, str]]:
        out = []
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                _, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            out.append((p.returncode, err))
        return out


def invocations(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
