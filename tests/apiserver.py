"""dsm's HTTP API served by a real uvicorn on a free loopback port, for tests.

The server runs in a thread with an event loop of its own, where its store (memory or a real
etcd) and any worker live too; tests talk to it over HTTP, as a user would, and reach its store
through `call` when they need to set something up or look underneath.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
from helpers import until

from dsm.api.serve import bind, serve_api
from dsm.graph import Graph
from dsm.keys import Keys
from dsm.store import Store, prefix_end
from dsm.store.memory import MemoryStore


class ApiServer:
    def __init__(self, *, etcd: str | None = None, namespace: str = "dsm", graphs: Sequence[Graph] = (),
                 workers: int = 0, token: str | None = None, allowed_hosts: Sequence[str] | None = None,
                 heartbeat: float = 15.0):
        self.etcd = etcd
        self.keys = Keys(namespace)
        self.graphs = list(graphs)
        self.workers = workers
        self.token = token
        self.allowed_hosts = allowed_hosts
        self.heartbeat = heartbeat
        self.url = ""
        self.store: Store | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="api-server", daemon=True)
        self.http: httpx.Client | None = None

    def __enter__(self) -> ApiServer:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            raise RuntimeError(f"the API server did not start: {self._error!r}")
        self.http = httpx.Client(base_url=self.url, timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.http is not None:
            self.http.close()
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the API server did not stop"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.etcd is None:
            store: Store = MemoryStore()
        else:
            from dsm.store.etcd import EtcdOptions, EtcdStore

            store = await EtcdStore.connect(EtcdOptions.build(self.etcd, namespace=self.keys.namespace))
        self.store = store
        def started(url: str, workers_here: str) -> None:
            self.url = url
            self._ready.set()

        try:
            await serve_api(store, self.keys, self.graphs, bind("127.0.0.1", 0), workers=self.workers, stop=self._stop,
                            on_started=started, token=self.token, allowed_hosts=self.allowed_hosts,
                            heartbeat=self.heartbeat)
        finally:
            await store.close()

    def call(self, fn: Callable[[Store, Keys], Awaitable[Any]], timeout: float = 60) -> Any:
        """Run `fn(store, keys)` on the server's loop and return its result."""
        assert self.loop is not None and self.store is not None
        return asyncio.run_coroutine_threadsafe(fn(self.store, self.keys), self.loop).result(timeout)

    def snapshot(self) -> dict[str, int]:
        """Every key of the namespace with its mod revision: what a refused request must leave as it was."""

        async def read(store: Store, keys: Keys) -> dict[str, int]:
            page = await store.range(keys.root, prefix_end(keys.root))
            return {kv.key: kv.mod_revision for kv in page.kvs}

        return self.call(read)

    # -- HTTP helpers ---------------------------------------------------------------------------

    def get(self, path: str, **kw: Any) -> httpx.Response:
        assert self.http is not None
        return self.http.get(path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        assert self.http is not None
        if body is not None:
            kw["json"] = body
        return self.http.post(path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        assert self.http is not None
        return self.http.delete(path, **kw)

    def record(self, instance_id: str) -> dict[str, Any]:
        response = self.get(f"/api/instances/{instance_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(self, instance_id: str, predicate: Callable[[dict[str, Any]], bool],
                 timeout: float = 60) -> dict[str, Any]:
        """The record once `predicate` holds for it (read again as it changes, up to `timeout`)."""
        record: dict[str, Any] = {}

        def reached() -> dict[str, Any] | None:
            nonlocal record
            record = self.record(instance_id)
            return record if predicate(record) else None

        return until(reached, lambda: f"instance {instance_id} to get there (last read: {record})", timeout=timeout,
                     interval=0.05)


def finished(record: dict[str, Any]) -> bool:
    return record["status"] != "running"


def waits_for_signal(record: dict[str, Any]) -> bool:
    return any(w["kind"] == "signal" for w in record["waiting"])
