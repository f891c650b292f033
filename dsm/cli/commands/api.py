"""`dsm api`: the JSON HTTP API and the dashboard, over etcd or in memory (`dsm.api.serve`)."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .. import inputs
from ..app import command
from ..etcd import EtcdArgs
from ..exits import ExitCode, Fail
from ..loop import run_async, stop_on_signals
from ..output import err, info

if TYPE_CHECKING:
    from dsm.store import Store


@command("api", etcd=True)
def api_command(paths: Annotated[list[Path] | None, typer.Argument(
                    metavar="PATH", show_default=False,
                    help="Definitions to register at start (and, in memory or with --workers, to run).")] = None,
                host: Annotated[str, typer.Option(
                    "--host", metavar="HOST", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
                port: Annotated[int, typer.Option("--port", min=0, max=65535, metavar="PORT",
                                                  help="Port to listen on (0: any free one, printed).")] = 8080,
                workers: Annotated[int | None, typer.Option(
                    "--workers", min=0, metavar="N", show_default="4 in memory, 0 with --etcd",
                    help="Ticks run at once by a worker inside this process, for the definitions given.")] = None,
                allow_host: Annotated[list[str] | None, typer.Option(
                    "--allow-host", metavar="NAME", show_default=False,
                    help="A Host name to answer besides the loopback names, when listening on loopback "
                         "(repeatable; e.g. the name a reverse proxy forwards).")] = None,
                no_token: Annotated[bool, typer.Option(
                    "--no-token", metavar="",
                    help="Listen beyond loopback without DSM_API_TOKEN: actions are open to anyone who can "
                         "reach the port (ignored, with a note, when DSM_API_TOKEN is set).")] = False,
                etcd: EtcdArgs = EtcdArgs()) -> None:
    """Serve the JSON HTTP API (OpenAPI at /api/openapi.json) and the web dashboard.

    With --etcd, over that namespace; the definitions given are registered, so that
    POST /api/machines/NAME/instances starts them, and run here only with --workers N. Without
    --etcd, in memory for a demo: the definitions given run in this process and nothing outlives
    it. Actions (POST, DELETE) need 'Authorization: Bearer TOKEN' when DSM_API_TOKEN is set, and
    are refused from other origins. Listening beyond loopback (--host 0.0.0.0) needs DSM_API_TOKEN,
    or --no-token to leave the actions open to anyone who can reach the port.
    """
    from dsm import api as api_package

    if not api_package.available():
        raise Fail(ExitCode.INVALID, api_package.MISSING)
    from dsm.api.access import LOOPBACK_NAMES, is_loopback

    token = os.environ.get("DSM_API_TOKEN") or None
    loopback = is_loopback(host)
    if token is None and not loopback and not no_token:
        raise Fail(ExitCode.INVALID, f"--host {host} is not loopback: without a token, anyone who can reach it could "
                                     "start, signal, cancel, redrive and delete instances; set DSM_API_TOKEN, or "
                                     "pass --no-token to allow that")
    files = inputs.definition_files(list(paths or []))
    in_memory = not etcd.given
    if in_memory and not files:
        raise Fail(ExitCode.INVALID, "without --etcd, dsm api runs the definitions given, in memory (a demo): give "
                                     "PATH... or --etcd URLS (DSM_ETCD)")
    local = workers if workers is not None else (4 if in_memory else 0)
    if in_memory and local == 0:
        raise Fail(ExitCode.INVALID, "--workers 0 needs --etcd: in memory, nothing else would run the instances")
    if not in_memory:
        etcd.options()
    # the API never imports handlers: only a worker in this process does, for the definitions given
    graphs = [inputs.load(f, no_import=local == 0) for f in files]
    allowed = (*sorted(LOOPBACK_NAMES), host, *(allow_host or ())) if loopback else None

    from dsm.api.serve import bind, serve_api

    try:
        sock = bind(host, port)
    except OSError as exc:
        raise Fail(ExitCode.INVALID, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    received: list[int] = []
    machines = ", ".join(g.machine for g in graphs) or "none given"

    async def go() -> None:
        stop = stop_on_signals(received)
        async with _api_store(etcd) as (store, keys, where):

            def started(url: str, running_here: str) -> None:
                info.print(f"dsm api serving {url} (namespace {keys.namespace!r} {where}; machines: {machines}; "
                           f"workers here: {running_here}; actions "
                           + ("need the token in DSM_API_TOKEN" if token else "need no token: DSM_API_TOKEN is "
                              "not set") + ")", markup=False)
                if no_token and token:
                    info.print("dsm: note: --no-token is ignored: DSM_API_TOKEN is set, so actions need it",
                               markup=False)
                elif not token and not loopback:  # on every start, so that it is not forgotten
                    err.print(f"dsm: warning: --no-token: actions (start, signal, cancel, redrive, delete) are "
                              f"open to anyone who can reach port {url.rpartition(':')[2]} on {host}; set "
                              "DSM_API_TOKEN to require a token", markup=False)

            await serve_api(store, keys, graphs, sock, workers=local, stop=stop, on_started=started, token=token,
                            allowed_hosts=allowed)

    try:
        run_async(go)
    finally:
        sock.close()
    if signal.SIGINT in received:
        raise Fail(ExitCode.INTERRUPTED)  # SIGTERM is the ordinary way to stop a server: exit 0


@asynccontextmanager
async def _api_store(etcd: EtcdArgs) -> AsyncIterator[tuple[Store, Any, str]]:
    """The store `dsm api` serves: etcd's with --etcd, else a new one in memory."""
    from dsm.keys import Keys

    if not etcd.given:
        from dsm.store.memory import MemoryStore

        yield MemoryStore(), Keys(etcd.namespace), "in memory, nothing outlives this process"
        return
    async with etcd.open() as store:
        yield store, etcd.options().keys, f"on etcd {etcd.options().display}"
