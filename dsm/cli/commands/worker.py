"""`dsm worker`: a worker serving a namespace until SIGTERM or SIGINT (`dsm.service` wires it)."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer

from dsm import handlers, logs
from dsm.graph import Graph
from dsm.worker.defaults import DEFAULT_CONCURRENCY, DEFAULT_RUN_AHEAD, RUN_AHEAD_TIME

from .. import inputs
from ..app import command
from ..etcd import EtcdArgs
from ..exits import ExitCode, Fail
from ..loop import run_async, stop_on_signals
from ..output import info

log = logging.getLogger("dsm.cli")

_OPTION = {"metrics": "--metrics-port", "health": "--health-port"}  # the option that asked for each server


@dataclass(frozen=True, slots=True)
class _Served:
    """What the worker serves: its definitions, the modules its handlers may come from, and the
    folders put first on the import path (--path)."""

    graphs: list[Graph]
    allow: handlers.Allowlist
    search_path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Settings:
    """How the worker runs, checked: the options of `dsm worker` but the definitions and etcd's."""

    concurrency: int
    run_ahead: int
    isolation: Literal["process", "thread"]
    lease_ttl: int
    dead_after: float | None
    grace: float
    compaction_retention: float
    metrics: tuple[str, int | None]
    health: tuple[str, int | None]


@command(etcd=True)
def worker(paths: Annotated[list[Path] | None, typer.Argument(
               metavar="PATH", show_default=False,
               help="Definitions this worker serves (and whose modules it may import).")] = None,
           concurrency: Annotated[int, typer.Option(
               "--concurrency", min=1, metavar="N",
               help="Ticks in flight at once, each from its claim to its commit; with --isolation process, "
                    "handlers that wait (I/O, sleeps) take a handler process each.")] = DEFAULT_CONCURRENCY,
           run_ahead: Annotated[int, typer.Option(
               "--run-ahead", min=1, metavar="N",
               help="Ticks a token may run along a line (one token, to a state with a tick) before they are "
                    f"committed together; none waits for its commit more than {RUN_AHEAD_TIME:g}s. A worker that "
                    "dies loses at most those, which run again. 1: a commit per tick.")] = DEFAULT_RUN_AHEAD,
           allow: Annotated[list[str] | None, typer.Option(
               "--allow", metavar="PREFIX", show_default=False,
               help="Module prefix handlers may come from (repeatable; default: the modules of PATHs); "
                    "MODULE:FUNCTION allows one handler, even one imported into MODULE from elsewhere.")] = None,
           path: Annotated[list[Path] | None, typer.Option(
               "--path", metavar="DIR", show_default=False,
               help="Folder put first on the import path (repeatable).")] = None,
           lease_ttl: Annotated[int, typer.Option("--lease-ttl", min=2, metavar="SECONDS",
                                                  help="Seconds before a dead worker's claims expire.")] = 10,
           dead_after: Annotated[str | None, typer.Option(
               "--dead-after", metavar="DURATION", show_default=False,
               help="How long this worker's heartbeat may go unwritten before the other workers take it for "
                    "dead and take its work back, even while its lease lives (any etcd user can keep a lease "
                    "alive). Default: twice --lease-ttl; 0: trust the lease alone.")] = None,
           grace: Annotated[float, typer.Option("--grace", metavar="SECONDS",
                                                help="Seconds to finish running ticks on SIGTERM.")] = 30.0,
           isolation: Annotated[str, typer.Option(
               "--isolation", metavar="process|thread",
               help="Where handlers run: 'process' (child processes, up to one per slot, killed at a tick's "
                    "timeout; a handler cannot stall the worker) or 'thread' (in the worker, faster for "
                    "trusted, quick handlers).")] = "process",
           compaction_retention: Annotated[str, typer.Option(
               "--compaction-retention", metavar="DURATION",
               help="etcd revision history kept when this worker does housekeeping (0: dsm does not "
                    "compact).")] = "5m",
           metrics_port: Annotated[int | None, typer.Option(
               "--metrics-port", envvar="DSM_METRICS_PORT", min=0, max=65535, metavar="PORT", show_default=False,
               help="Serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port; the address is said "
                    "on stderr). (DSM_METRICS_PORT)")] = None,
           metrics_host: Annotated[str, typer.Option(
               "--metrics-host", envvar="DSM_METRICS_HOST", metavar="HOST",
               help="Address the metrics are served on; 0.0.0.0: every interface, as in a container. "
                    "(DSM_METRICS_HOST)")] = "127.0.0.1",
           health_port: Annotated[int | None, typer.Option(
               "--health-port", envvar="DSM_HEALTH_PORT", min=0, max=65535, metavar="PORT", show_default=False,
               help="Answer GET http://HOST:PORT/healthz: 200 while this worker's lease, watch for work and "
                    "heartbeat are current, else 503 with the reasons (0: any free port; the address is said on "
                    "stderr). The metrics port answers /healthz too. (DSM_HEALTH_PORT)")] = None,
           health_host: Annotated[str, typer.Option(
               "--health-host", envvar="DSM_HEALTH_HOST", metavar="HOST",
               help="Address /healthz is served on; 0.0.0.0: every interface. (DSM_HEALTH_HOST)")] = "127.0.0.1",
           etcd: EtcdArgs = EtcdArgs()) -> None:
    """Run ticks for instances stored in etcd until SIGTERM or SIGINT.

    One worker of a namespace at a time (chosen by an etcd election) also keeps house: it deletes
    instances past their machine's retention and compacts etcd's revision history.
    """
    if isolation not in ("process", "thread"):
        raise Fail(ExitCode.INVALID, f"--isolation must be 'process' or 'thread', not {isolation!r}")
    keep_history = inputs.duration(compaction_retention, "--compaction-retention")
    silence = inputs.duration(dead_after, "--dead-after")
    if silence is not None and 0 < silence < lease_ttl:
        raise Fail(ExitCode.INVALID, f"--dead-after must be 0 or at least --lease-ttl ({lease_ttl}s): the heartbeat "
                                     "is written every third of it")
    where: Literal["process", "thread"] = "process" if isolation == "process" else "thread"
    settings = _Settings(concurrency, run_ahead, where, lease_ttl, silence, grace, keep_history or 0.0,
                         (metrics_host, metrics_port), (health_host, health_port))
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):  # a stop asked for during start-up still counts
        signal.signal(signum, lambda number, frame: received.append(number))
    etcd.options()
    served = _definitions(list(paths or []), allow, list(path or []))
    try:
        run_async(lambda: _serve(etcd, served, settings, received))
    except Fail as exc:
        if exc.code != ExitCode.OK:
            raise
    if signal.SIGINT in received:
        raise Fail(ExitCode.INTERRUPTED)  # SIGTERM is the ordinary way to stop a worker: exit 0


def _definitions(paths: list[Path], allow: list[str] | None, path: list[Path]) -> _Served:
    """The definitions named (files, or folders of them), compiled with their handlers, and the
    modules allowed: --allow's, else those the definitions name."""
    files = inputs.definition_files(paths)
    search = tuple(str(p.resolve()) for p in path)
    named = handlers.Allowlist(None, handlers.Allowlist.of(allow or ()).functions)  # MODULE:FUNCTION entries
    graphs = [inputs.load(f, search_path=search, allow=named) for f in files]
    prefixes = tuple(allow) if allow else tuple(dict.fromkeys(m for g in graphs for m in g.modules()))
    if not graphs and not allow:
        log.warning("no definitions and no --allow: this worker can only run machines without ticks")
    return _Served(graphs, handlers.Allowlist.of(prefixes), search)


async def _serve(etcd: EtcdArgs, served: _Served, settings: _Settings, received: list[int]) -> None:
    """Wait for etcd, then serve until a signal sets the stop."""
    from dsm.service import CannotListen, Listen, serving
    from dsm.worker import HousekeepingOptions, default_worker_id
    from dsm.worker.collector import pace_collector

    stop = stop_on_signals(received)
    if received:
        return
    pace_collector()  # this process is the worker's
    options = etcd.options()
    worker_id = default_worker_id()
    logs.current.worker = worker_id  # named on its log lines, and on those of its handler processes
    (metrics_host, metrics_port), (health_host, health_port) = settings.metrics, settings.health
    async with etcd.open(wait=stop) as store:
        try:
            async with serving(
                    store, options.keys, served.graphs, concurrency=settings.concurrency, allow=served.allow,
                    search_path=served.search_path, isolation=settings.isolation,
                    metrics=Listen(metrics_host, metrics_port) if metrics_port is not None else None,
                    health=Listen(health_host, health_port) if health_port is not None else None,
                    lease_ttl=float(settings.lease_ttl), grace=settings.grace, stop=stop,
                    dead_after=settings.dead_after, worker_id=worker_id, run_ahead=settings.run_ahead,
                    housekeeping=HousekeepingOptions(compaction_retention=settings.compaction_retention)) as service:
                where = "processes" if settings.isolation == "process" else "threads"
                if service.metrics is not None:
                    where += f", metrics on {service.metrics.url}"
                if service.health is not None:
                    from dsm.healthz import PATH

                    where += f", health on {service.health.url(PATH)}"
                info.print(f"worker {service.worker.id} serving namespace {options.namespace!r} at {options.display} "
                           f"(concurrency {settings.concurrency}, handlers in {where}, modules: "
                           f"{served.allow.describe()})", markup=False)
                await stop.wait()
        except CannotListen as exc:
            raise Fail(ExitCode.INVALID, f"{_OPTION[exc.what]}: {exc}") from None
        info.print(f"worker {service.worker.id} stopped after {service.worker.stats.transitions} transitions",
                   markup=False)
