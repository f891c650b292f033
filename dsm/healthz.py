"""A worker's health over HTTP: `dsm worker --health-port P` answers `GET /healthz`, for liveness
probes (Kubernetes, compose healthchecks).

200 `{"status": "ok", "worker": ID}` while the worker's lease, its watch for work and its heartbeat
are current; 503 `{"status": "unhealthy", "worker": ID, "reasons": [...]}` otherwise (the judgement
is `dsm.worker.health`); 404 elsewhere. The metrics port (`dsm.metrics`) answers `/healthz` the
same way. Each request asks the worker afresh, from the server's thread (`dsm.wsgi`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from . import wsgi

if TYPE_CHECKING:
    from .worker import Worker

PATH = "/healthz"


def app(worker: Worker) -> wsgi.App:
    """The WSGI app that answers `/healthz` for `worker` (and 404 elsewhere)."""

    def answer(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return wsgi.plain(start_response, "404 Not Found", f"dsm serves its health on {PATH}\n")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return wsgi.plain(start_response, "405 Method Not Allowed", f"{PATH} answers GET\n",
                              [("Allow", "GET, HEAD")])
        health = worker.health()
        said = health.as_dict()
        body = json.dumps({"status": said["status"], "worker": worker.id, **said}).encode() + b"\n"
        start_response("200 OK" if health.healthy else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store")])
        return [] if method == "HEAD" else [body]

    return answer


@contextmanager
def serving(worker: Worker, host: str = "127.0.0.1", port: int = 0) -> Iterator[wsgi.Address]:
    """Answer http://HOST:PORT/healthz for `worker` (port 0: any free port) while the block runs.
    OSError when the address cannot be bound."""
    with wsgi.serving(app(worker), host, port, name=f"dsm-health-{worker.id}") as address:
        yield address
