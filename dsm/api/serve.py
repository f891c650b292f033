"""Running the app with uvicorn inside an event loop that the caller owns (and shares with workers).

The socket is bound here, before uvicorn starts, so that a port in use is an error the command
can report in one line, and port 0 gets a free port whose number is known. Signals are the
caller's: uvicorn's own handlers would re-raise them once it stopped. Stopping ends the open
event streams first, since uvicorn waits for open answers before it stops.

`serve_api` is `dsm api` without its options: the definitions given registered, a worker for
them in this process when asked (`dsm.service`), and the app served until the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette

from ..definitions import register
from ..errors import PartFailed
from ..graph import Graph
from ..housekeeping import HousekeepingOptions
from ..keys import Keys
from ..service import serving
from ..store import Store
from .app import create_app

GRACE = 5  # seconds uvicorn waits for answers in progress when it stops


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the command handles SIGINT and SIGTERM itself
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one); OSError says why not."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(app: Starlette, sock: socket.socket, *, stop: asyncio.Event,
                on_started: Callable[[str], None] | None = None) -> None:
    """Serve `app` on a bound socket until `stop` is set; PartFailed if the server ends before."""
    config = uvicorn.Config(app, log_config=None, lifespan="off", timeout_graceful_shutdown=GRACE)
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="dsm-api-server")
    stopping = asyncio.get_running_loop().create_task(stop.wait())
    try:
        while not server.started and not task.done():
            await asyncio.wait([task, stopping], timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
        if server.started and on_started is not None:
            on_started(url_of(sock))
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        api = getattr(app.state, "api", None)
        if api is not None:
            api.close()
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()
    if not stop.is_set():  # the server ended by itself: the process must not live on without it
        raise PartFailed("dsm api", "HTTP server", None)


@contextlib.asynccontextmanager
async def local_worker(store: Store, keys: Keys, graphs: Sequence[Graph], concurrency: int) -> AsyncIterator[str]:
    """A worker in this process for the definitions given (their modules allowed, their folders on
    the import path), when `concurrency` > 0; yields what runs here, in words. The definitions are
    registered already (`serve_api`)."""
    if concurrency <= 0 or not graphs:
        yield "none"
        return
    async with serving(store, keys, graphs, concurrency=concurrency, store_definitions=False, grace=5,
                       housekeeping=HousekeepingOptions()):
        yield f"{concurrency} ticks at once"


async def serve_api(store: Store, keys: Keys, graphs: Sequence[Graph], sock: socket.socket, *, workers: int,
                    stop: asyncio.Event, on_started: Callable[[str, str], None] | None = None,
                    **app_options: Any) -> None:
    """`dsm api`: register the definitions given, run them with a worker here when `workers` > 0,
    and serve the API over `store` on `sock` until `stop` is set. `on_started(url, workers_here)`
    once it listens; `app_options` are `create_app`'s."""
    for graph in graphs:
        await register(store, keys, graph)
    async with local_worker(store, keys, graphs, workers) as running_here:
        app = create_app(store, keys, **app_options)
        await serve(app, sock, stop=stop,
                    on_started=None if on_started is None else lambda url: on_started(url, running_here))
