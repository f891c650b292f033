"""A worker's small HTTP endpoints (`dsm.metrics`, `dsm.healthz`): a WSGI app served on a thread
of its own, so a request never waits for the worker's event loop and never holds it up.

The server is prometheus_client's threading WSGI server, bound to 127.0.0.1 unless told
otherwise; requests are not logged (a line on stderr per scrape or probe is noise).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import ThreadingWSGIServer

App = Callable[[dict[str, Any], Any], Iterable[bytes]]


@dataclass(frozen=True)
class Address:
    host: str
    port: int  # the port bound (the one asked for, or the one given for 0)

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serving(app: App, host: str, port: int, *, name: str) -> Iterator[Address]:
    """Serve `app` on HOST:PORT (port 0: any free port) on a daemon thread called `name` while the
    block runs. OSError when the address cannot be bound."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    httpd = make_server(host, port, app, Server, handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True)
    thread.start()
    try:
        yield Address(host, httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


def plain(start_response: Any, status: str, text: str, headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    """A short text answer."""
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), *headers])
    return [text.encode()]
