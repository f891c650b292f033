"""A running service: the definitions it serves, a worker that runs them, and its small servers.

`serving` is the one way to wire a worker in-process. `dsm worker`, the local workers of
`dsm run --etcd` and `dsm api --workers N`, the embedded client and the tests all go through it:
it builds the `Registry` (the definitions' handler modules allowed, their folders on the import
path), stores the definitions in the namespace, picks where handlers run, starts the worker
(`dsm.worker.running`) and, when asked, its metrics and health servers. The store is the
caller's: opened (etcd, with the caller's way of waiting for it) or made (memory) before, and
closed after.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from . import handlers, layout
from .definitions import Registry, register
from .errors import DsmError
from .graph import Graph
from .keys import Keys
from .store import Store
from .worker import running
from .worker.defaults import DEFAULT_CONCURRENCY

if TYPE_CHECKING:
    from .metrics import MetricsServer
    from .worker import Worker
    from .wsgi import Address

Isolation = Literal["process", "thread"]
_Server = TypeVar("_Server")


@dataclass(frozen=True, slots=True)
class Listen:
    """Where one of the service's small HTTP servers listens (port 0: any free port)."""

    host: str
    port: int


class CannotListen(DsmError):
    """A server of the service (metrics, health) cannot listen on its address; `what` says which."""

    def __init__(self, what: Literal["metrics", "health"], message: str):
        self.what = what
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Service:
    """What `serving` runs: the worker, and where its metrics and health are served (if they are)."""

    worker: Worker
    metrics: MetricsServer | None = None
    health: Address | None = None

    @property
    def registry(self) -> Registry:
        return self.worker.registry


def folders_of(graphs: Sequence[Graph]) -> tuple[str, ...]:
    """The folders of the definitions' files, each once: their handler modules are imported from there."""
    return tuple(dict.fromkeys(str(Path(g.file).resolve().parent) for g in graphs))


@asynccontextmanager
async def serving(store: Store, keys: Keys, graphs: Sequence[Graph] = (), *, concurrency: int = DEFAULT_CONCURRENCY,
                  allow: handlers.Allowlist | None = None, search_path: Sequence[str] = (),
                  store_definitions: bool = True, isolation: Isolation = "thread", metrics: Listen | None = None,
                  health: Listen | None = None, **options: Any) -> AsyncIterator[Service]:
    """A worker serving `graphs` on `store` for the duration of the block.

    `allow`: the handler modules it may import (default: those of `graphs` and the machines they
    call). `search_path`: folders put first on the import path, before the definitions' own.
    `store_definitions`: register `graphs` in the namespace first (False: the caller has).
    `isolation`: 'process' runs handlers in child processes (`dsm.worker.isolation`), which load
    the definitions' modules ahead; 'thread' in the worker. `metrics` / `health`: serve them there
    while the worker runs (`CannotListen` when the address cannot be bound). `options` are
    `dsm.worker.running`'s and `Worker`'s, passed as they are."""
    await layout.check_workers(store, keys)  # OlderRelease: this release must not run beside an earlier one
    await layout.upgrade(store, keys)  # before its first claim: nothing runs on a marker out of its place
    path = (*search_path, *folders_of(graphs))
    if allow is None:
        allow = handlers.Allowlist(tuple(dict.fromkeys(m for g in graphs for m in g.modules())))
    registry = Registry(store, keys, allow=allow, search_path=path)
    for graph in graphs:
        registry.add(graph)
        if store_definitions:
            await register(store, keys, graph)
    if isolation == "process":
        from .worker.isolation import ProcessExecutor

        options["executor"] = ProcessExecutor(concurrency, search_path=path,
                                              preload=[m for g in graphs for m in g.modules()])
    async with running(store, registry, concurrency=concurrency, **options) as worker:
        with contextlib.ExitStack() as servers:
            metrics_server = health_server = None
            if metrics is not None:
                from . import metrics as metrics_module

                metrics_server = _listen(servers, lambda: metrics_module.serving(worker, metrics.host, metrics.port),
                                         "metrics", "metrics", metrics)
            if health is not None:
                from . import healthz

                health_server = _listen(servers, lambda: healthz.serving(worker, health.host, health.port),
                                        "health", healthz.PATH, health)
            yield Service(worker, metrics_server, health_server)


def _listen(servers: contextlib.ExitStack, open_: Callable[[], contextlib.AbstractContextManager[_Server]],
            what: Literal["metrics", "health"], serves: str, at: Listen) -> _Server:
    try:
        return servers.enter_context(open_())
    except OSError as exc:
        raise CannotListen(what, f"cannot serve {serves} on {at.host}:{at.port}: {exc.strerror or exc}") from None
