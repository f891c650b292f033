"""The `dsm` command: a thin shell that parses, calls the dsm package, and formats.

Data goes to stdout, logs and progress to stderr. Exit codes are the contract's (ExitCode).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
from rich.console import Console

from dsm import compiler, handlers, payloads, records, render, schema
from dsm.durations import parse_duration
from dsm.errors import DefinitionError, DsmError, InputError, NotFound, StoreUnavailable
from dsm.graph import Graph

log = logging.getLogger("dsm.cli")


class ExitCode(IntEnum):
    OK = 0
    INSTANCE_FAILED = 1  # failed or cancelled
    INVALID = 2  # invalid definition, input or usage
    UNREACHABLE = 3  # etcd unreachable
    TIMEOUT = 4  # --timeout passed before the instance finished
    INTERRUPTED = 130


app = typer.Typer(
    name="dsm",
    help="Declarative state machines in YAML, run embedded or by workers coordinated through etcd v3.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


class Fail(Exception):
    """Stop the command with a one-line message on stderr and an exit code."""

    def __init__(self, code: ExitCode, message: str = ""):
        self.code = code
        super().__init__(message)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details and tracebacks to stderr."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr.")) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    handler: logging.Handler
    if err.is_terminal:
        from rich.logging import RichHandler

        handler = RichHandler(console=err, show_path=False, show_time=verbose, markup=False,
                              rich_tracebacks=verbose)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dsm: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not verbose:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        logging.getLogger("dsm.handler").setLevel(logging.INFO if not quiet else logging.ERROR)


# -- shared helpers ----------------------------------------------------------------------------

def _definition_files(paths: List[Path]) -> List[Path]:
    files: List[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
            if not found:
                raise Fail(ExitCode.INVALID, f"{path}: no *.yaml or *.yml files in this folder")
            files.extend(found)
        else:
            files.append(path)
    return files


def _load(path: Path, *, no_import: bool = False, allow: handlers.Allowlist = handlers.ANY,
          search_path: tuple[str, ...] = ()) -> Graph:
    try:
        return compiler.load(path, import_handlers=not no_import, allow=allow, search_path=search_path)
    except DefinitionError as exc:
        for problem in exc.problems:
            out.print(str(problem), markup=False)
        raise Fail(ExitCode.INVALID) from None


def _payload(payload: Optional[str], payload_file: Optional[Path]) -> dict[str, Any]:
    if payload is not None and payload_file is not None:
        raise Fail(ExitCode.INVALID, "give --payload or --payload-file, not both")
    try:
        if payload_file is not None:
            try:
                text = payload_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise Fail(ExitCode.INVALID, f"--payload-file {payload_file}: {exc.strerror or exc}") from None
            return payloads.parse(text, what=f"--payload-file {payload_file}")
        if payload is not None:
            return payloads.parse(payload, what="--payload")
    except payloads.PayloadError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None
    return {}


def _duration(value: Optional[str], option: str) -> Optional[float]:
    if value is None:
        return None
    try:
        return parse_duration(value, what=option)
    except InputError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class _Progress:
    """Transitions as they commit, one line each on stderr; on a terminal, coloured, with a live
    status line of the states still active."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.started = time.monotonic()
        self.live = err.status("starting", spinner="dots") if enabled and err.is_terminal else None
        if self.live is not None:
            self.live.start()

    def history(self, entry: records.HistoryEntry) -> None:
        if not self.enabled:
            return
        branch = f" [dim]\\[{'/'.join(entry.branch)}][/dim]" if entry.branch else ""
        outcome = f" [cyan]({entry.outcome})[/cyan]" if entry.outcome else ""
        attempt = f" [yellow]attempt {entry.attempt}[/yellow]" if entry.attempt > 1 else ""
        targets = ", ".join(entry.next)
        err.print(f"[dim]{entry.seq:>4}[/dim]  [bold]{entry.state}[/bold]{outcome} -> {targets}{branch}{attempt}")

    def update(self, inst: records.Instance) -> None:
        if self.live is not None:
            took = time.monotonic() - self.started
            self.live.update(f"{inst.transitions} transitions, {took:.1f}s; active: {', '.join(inst.active) or '-'}")

    def finished(self, inst: records.Instance) -> None:
        self.stop()
        if not self.enabled:
            return
        took = time.monotonic() - self.started
        colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(inst.status, "white")
        where = f" at {inst.state}" if inst.state else ""
        err.print(f"[{colour}]instance {inst.id} {inst.status}{where}[/{colour}] "
                  f"({inst.transitions} transitions, {took:.2f}s)")
        if inst.error:
            e = inst.error
            err.print(f"[red]error[/red]: {e.type} in state {e.state} after {e.attempts} attempt(s): {e.message}",
                      markup=True)
        err.print("payload: " + json.dumps(inst.payload, ensure_ascii=False), markup=False)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _exit_for(inst: records.Instance) -> ExitCode:
    return ExitCode.OK if inst.status == records.SUCCEEDED else ExitCode.INSTANCE_FAILED


def _run_async(coro_factory: Any) -> Any:
    """Run a coroutine with SIGINT/SIGTERM turned into a clean stop (exit 130 for SIGINT)."""

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        interrupted: list[int] = []

        def on_signal(signum: int) -> None:
            interrupted.append(signum)
            if task is not None:
                task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal, signum)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            return await coro_factory()
        except asyncio.CancelledError:
            if interrupted:
                raise Fail(ExitCode.INTERRUPTED, "interrupted") from None
            raise

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        raise Fail(ExitCode.INTERRUPTED, "interrupted") from None


# -- etcd options ----------------------------------------------------------------------------

EtcdOpt = typer.Option(None, "--etcd", envvar="DSM_ETCD", help="etcd endpoints, comma separated (DSM_ETCD).")
NamespaceOpt = typer.Option("dsm", "--namespace", envvar="DSM_NAMESPACE", help="Key prefix /<namespace>/.")
CacertOpt = typer.Option(None, "--cacert", help="CA bundle to verify etcd's TLS certificate.")
CertOpt = typer.Option(None, "--cert", help="Client certificate for etcd TLS.")
KeyOpt = typer.Option(None, "--key", help="Client key for etcd TLS.")
UserOpt = typer.Option(None, "--user", envvar="DSM_ETCD_USER", help="etcd user; password from DSM_ETCD_PASSWORD.")


def _etcd_options(etcd: Optional[str], namespace: str, cacert: Optional[Path], cert: Optional[Path],
                  key: Optional[Path], user: Optional[str]) -> Any:
    from dsm.store.etcd import EtcdOptions

    if not etcd:
        raise Fail(ExitCode.INVALID, "this command needs an etcd endpoint: give --etcd URLS or set DSM_ETCD")
    try:
        return EtcdOptions.build(etcd, namespace=namespace, cacert=cacert, cert=cert, key=key, user=user,
                                 password=os.environ.get("DSM_ETCD_PASSWORD"))
    except InputError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None


# -- commands --------------------------------------------------------------------------------

@app.command()
def validate(paths: List[Path] = typer.Argument(..., help="Definition files, or folders of *.yaml / *.yml."),
             no_import: bool = typer.Option(False, "--no-import", help="Do not import handler modules.")) -> None:
    """Check definitions; print one line per problem: PATH:LINE:COL: error: MESSAGE.

    Limits: DSM_MAX_DEFINITION_BYTES (default 1048576) and DSM_MAX_STATES (default 2000).

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    files = _definition_files(paths)
    bad = 0
    for path in files:
        try:
            graph = compiler.load(path, import_handlers=not no_import)
        except DefinitionError as exc:
            bad += 1
            for problem in exc.problems:
                out.print(str(problem), markup=False)
            continue
        err.print(f"{path}: ok (machine {graph.machine}, {len(graph.states)} states)", markup=False)
    if bad:
        err.print(f"{bad} of {len(files)} file(s) invalid", markup=False)
        raise Fail(ExitCode.INVALID)


@app.command()
def graph(path: Path = typer.Argument(..., help="Definition file."),
          format: str = typer.Option("mermaid", "--format", "-f", help="mermaid or dot."),
          output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to FILE instead of stdout."),
          no_import: bool = typer.Option(False, "--no-import", help="Do not import handler modules.")) -> None:
    """Draw a machine as a Mermaid state diagram or a Graphviz graph.

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    renderer = render.RENDERERS.get(format)
    if renderer is None:
        raise Fail(ExitCode.INVALID, f"--format must be one of {', '.join(render.RENDERERS)}, got {format!r}")
    text = renderer(_load(path, no_import=no_import))
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise Fail(ExitCode.INVALID, f"cannot write {output}: {exc.strerror or exc}") from None
        err.print(f"wrote {output}", markup=False)


@app.command(name="schema")
def schema_command() -> None:
    """Print the JSON Schema of machine definitions."""
    sys.stdout.write(schema.schema_text().rstrip("\n") + "\n")


@app.command()
def run(path: Path = typer.Argument(..., help="Definition file."),
        payload: Optional[str] = typer.Option(None, "--payload", help="Initial payload, a JSON object."),
        payload_file: Optional[Path] = typer.Option(None, "--payload-file", help="Read the payload from FILE."),
        etcd: Optional[str] = EtcdOpt, namespace: str = NamespaceOpt,
        workers: int = typer.Option(4, "--workers", min=0, help="Ticks run at once (local workers with --etcd)."),
        timeout: Optional[str] = typer.Option(None, "--timeout", help="Give up waiting after DURATION (exit 4)."),
        as_json: bool = typer.Option(False, "--json", help="Print the instance record on stdout."),
        no_import: bool = typer.Option(False, "--no-import", help="Do not import handlers (with --workers 0)."),
        cacert: Optional[Path] = CacertOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = KeyOpt,
        user: Optional[str] = UserOpt) -> None:
    """Start one instance and wait for it: embedded, or on etcd with --etcd.

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    body = _payload(payload, payload_file)
    limit = _duration(timeout, "--timeout")
    if not etcd and workers == 0:
        raise Fail(ExitCode.INVALID, "--workers 0 needs --etcd: embedded runs have no workers elsewhere")
    graph_ = _load(path, no_import=no_import)
    progress = _Progress()
    try:
        if etcd:
            options = _etcd_options(etcd, namespace, cacert, cert, key, user)
            result = _run_async(lambda: _run_etcd(graph_, body, options, workers, limit, progress))
        else:
            result = _run_async(lambda: _run_embedded(graph_, body, workers, limit, progress))
    finally:
        progress.stop()
    inst, history, timed_out = result
    if as_json:
        _print_json(records.public_record(inst, history))
    if timed_out:
        err.print(f"[yellow]--timeout {timeout} passed; instance {inst.id} is {inst.status} "
                  f"(active: {', '.join(inst.active) or '-'})[/yellow]")
        raise Fail(ExitCode.TIMEOUT)
    progress.finished(inst)
    raise typer.Exit(_exit_for(inst))


async def _run_embedded(graph_: Graph, body: dict, workers: int, limit: Optional[float],
                        progress: _Progress) -> tuple:
    from dsm import embedded

    try:
        result = await embedded.run_graph(graph_, body, workers=workers, timeout=limit, on_history=progress.history,
                                          on_update=progress.update,
                                          on_start=lambda iid: err.print(f"instance {iid} started", markup=False))
        return result.instance, result.history, False
    except asyncio.TimeoutError as exc:
        partial = exc.args[0]
        return partial.instance, partial.history, True


async def _run_etcd(graph_: Graph, body: dict, options: Any, workers: int, limit: Optional[float],
                    progress: _Progress) -> tuple:
    from dsm.client import Client
    from dsm.definitions import Registry
    from dsm.worker import Worker

    async with _connect(options) as store:
        client = Client(store, options.keys)
        instance_id = await client.submit(graph_, body)
        err.print(f"instance {instance_id} submitted to namespace {options.namespace!r}", markup=False)
        stop = asyncio.Event()
        runner = None
        if workers > 0:
            registry = Registry(store, options.keys, allow=handlers.Allowlist(graph_.modules()),
                                search_path=(str(Path(graph_.file).resolve().parent),))
            registry.add(graph_)
            worker = Worker(store, registry, concurrency=workers)
            runner = asyncio.get_running_loop().create_task(worker.run(stop, grace=5))
        try:
            inst = await client.wait(instance_id, timeout=limit, on_history=progress.history,
                                     on_update=progress.update)
            return inst, await client.history(instance_id), False
        except asyncio.TimeoutError:
            return await client.instance(instance_id), await client.history(instance_id), True
        finally:
            stop.set()
            if runner is not None:
                await asyncio.gather(runner, return_exceptions=True)


class _connect:
    """`async with _connect(options) as store`: exit code 3 with one line when etcd is unreachable."""

    def __init__(self, options: Any):
        self.options = options
        self.store: Any = None

    async def __aenter__(self) -> Any:
        from dsm.store.etcd import EtcdStore

        try:
            self.store = await EtcdStore.connect(self.options)
        except StoreUnavailable as exc:
            raise Fail(ExitCode.UNREACHABLE, f"etcd unreachable at {self.options.display}: {exc}") from None
        return self.store

    async def __aexit__(self, *exc: Any) -> None:
        if self.store is not None:
            await self.store.close()


def _with_client(options: Any, call: Any) -> Any:
    """Connect, run `call(client)`, disconnect; an unknown instance id is invalid input (exit 2)."""

    async def go() -> Any:
        from dsm.client import Client

        async with _connect(options) as store:
            return await call(Client(store, options.keys))

    try:
        return _run_async(go)
    except NotFound as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None


def _jsonl(path: Path) -> Iterator[dict]:
    try:
        handle = sys.stdin if str(path) == "-" else path.open(encoding="utf-8")
    except OSError as exc:
        raise Fail(ExitCode.INVALID, f"--jsonl {path}: {exc.strerror or exc}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield payloads.parse(line, what=f"{path}:{number}")
            except payloads.PayloadError as exc:
                raise Fail(ExitCode.INVALID, str(exc)) from None


@app.command()
def submit(path: Path = typer.Argument(..., help="Definition file."),
           payload: Optional[str] = typer.Option(None, "--payload", help="Initial payload, a JSON object."),
           payload_file: Optional[Path] = typer.Option(None, "--payload-file", help="Read the payload from FILE."),
           jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="One instance per line of FILE ('-': stdin)."),
           etcd: Optional[str] = EtcdOpt, namespace: str = NamespaceOpt,
           no_import: bool = typer.Option(False, "--no-import", help="Do not import handler modules."),
           cacert: Optional[Path] = CacertOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = KeyOpt,
           user: Optional[str] = UserOpt) -> None:
    """Start instances on etcd; print each instance id on its own line.

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    if jsonl is not None and (payload is not None or payload_file is not None):
        raise Fail(ExitCode.INVALID, "give --jsonl or --payload/--payload-file, not both")
    options = _etcd_options(etcd, namespace, cacert, cert, key, user)
    graph_ = _load(path, no_import=no_import)
    bodies = list(_jsonl(jsonl)) if jsonl is not None else [_payload(payload, payload_file)]

    async def go() -> list[str]:
        from dsm.client import Client

        async with _connect(options) as store:
            return await Client(store, options.keys).submit_many(graph_, bodies)

    for iid in _run_async(go):
        sys.stdout.write(iid + "\n")
    sys.stdout.flush()


@app.command()
def worker(paths: List[Path] = typer.Argument(None, help="Definitions this worker serves (and whose modules "
                                                           "it may import)."),
           etcd: Optional[str] = EtcdOpt, namespace: str = NamespaceOpt,
           concurrency: int = typer.Option(8, "--concurrency", min=1, help="Ticks run at once."),
           allow: List[str] = typer.Option(None, "--allow", help="Module prefix handlers may come from "
                                                                  "(repeatable; default: the modules of PATHs); "
                                                                  "MODULE:FUNCTION allows one handler, even one "
                                                                  "imported into MODULE from elsewhere."),
           path: List[Path] = typer.Option(None, "--path", help="Folder put first on the import path (repeatable)."),
           lease_ttl: int = typer.Option(10, "--lease-ttl", min=2, help="Seconds before a dead worker's "
                                                                         "claims expire."),
           grace: float = typer.Option(30.0, "--grace", help="Seconds to finish running ticks on SIGTERM."),
           cacert: Optional[Path] = CacertOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = KeyOpt,
           user: Optional[str] = UserOpt) -> None:
    """Run ticks for instances stored in etcd until SIGTERM or SIGINT."""
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):  # a stop asked for during start-up still counts
        signal.signal(signum, lambda number, frame: received.append(number))
    options = _etcd_options(etcd, namespace, cacert, cert, key, user)
    files = _definition_files(list(paths or []))
    search = tuple(str(p.resolve()) for p in (path or []))
    folders = tuple(dict.fromkeys(str(f.resolve().parent) for f in files))
    named = handlers.Allowlist(None, handlers.Allowlist.of(allow or ()).functions)  # MODULE:FUNCTION entries
    graphs = [_load(f, search_path=search, allow=named) for f in files]
    prefixes = tuple(allow) if allow else tuple(dict.fromkeys(m for g in graphs for m in g.modules()))
    allowlist = handlers.Allowlist.of(prefixes)
    if not graphs and not allow:
        log.warning("no definitions and no --allow: this worker can only run machines without ticks")

    async def go() -> None:
        from dsm.definitions import Registry, register
        from dsm.worker import Worker

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            received.append(signum)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        if received:
            return
        async with _connect(options) as store:
            registry = Registry(store, options.keys, allow=allowlist, search_path=search + folders)
            for g in graphs:
                registry.add(g)
                await register(store, options.keys, g)
            w = Worker(store, registry, concurrency=concurrency, lease_ttl=float(lease_ttl))
            err.print(f"worker {w.id} serving namespace {options.namespace!r} at {options.display} "
                      f"(concurrency {concurrency}, modules: {allowlist.describe()})", markup=False)
            await w.run(stop, grace=grace)
            err.print(f"worker {w.id} stopped after {w.stats.transitions} transitions", markup=False)

    _run_async(go)
    if signal.SIGINT in received:
        raise Fail(ExitCode.INTERRUPTED)  # SIGTERM is the ordinary way to stop a worker: exit 0


@app.command()
def status(instance_id: str = typer.Argument(..., metavar="ID"),
           as_json: bool = typer.Option(False, "--json", help="Print the whole record as JSON."),
           etcd: Optional[str] = EtcdOpt, namespace: str = NamespaceOpt,
           cacert: Optional[Path] = CacertOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = KeyOpt,
           user: Optional[str] = UserOpt) -> None:
    """Show one instance (the whole record with --json)."""
    options = _etcd_options(etcd, namespace, cacert, cert, key, user)
    record = _with_client(options, lambda client: client.record(instance_id))
    if as_json:
        _print_json(record)
        return
    out.print(f"id:          {record['id']}", markup=False)
    out.print(f"machine:     {record['machine']} (version {record['version']}, {record['digest'][:19]})",
              markup=False)
    out.print(f"status:      {record['status']}" + (f" at {record['state']}" if record["state"] else ""),
              markup=False)
    if record["active"]:
        out.print(f"active:      {', '.join(record['active'])}", markup=False)
    out.print(f"transitions: {record['transitions']}", markup=False)
    out.print(f"created:     {record['created_at']}", markup=False)
    if record["finished_at"]:
        out.print(f"finished:    {record['finished_at']}", markup=False)
    if record["error"]:
        e = record["error"]
        out.print(f"error:       {e['type']} in {e['state']} after {e['attempts']} attempt(s): {e['message']}",
                  markup=False)
    out.print("payload:     " + json.dumps(record["payload"], ensure_ascii=False), markup=False)
    for h in record["history"]:
        branch = f" [{'/'.join(h['branch'])}]" if h["branch"] else ""
        outcome = f" ({h['outcome']})" if h["outcome"] else ""
        out.print(f"  {h['seq']:>4} {h['at']} {h['state']}{outcome} -> {', '.join(h['next'])}{branch} "
                  f"attempt {h['attempt']} by {h['worker']}", markup=False)


@app.command(name="list")
def list_command(status_: Optional[str] = typer.Option(None, "--status", help="Only instances with this status."),
                 machine: Optional[str] = typer.Option(None, "--machine", help="Only instances of this machine."),
                 as_json: bool = typer.Option(False, "--json", help="Print a JSON array of records."),
                 etcd: Optional[str] = EtcdOpt, namespace: str = NamespaceOpt,
                 cacert: Optional[Path] = CacertOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = KeyOpt,
                 user: Optional[str] = UserOpt) -> None:
    """List instances (records without history)."""
    if status_ is not None and status_ not in records.STATUSES:
        raise Fail(ExitCode.INVALID, f"--status must be one of {', '.join(records.STATUSES)}, got {status_!r}")
    options = _etcd_options(etcd, namespace, cacert, cert, key, user)
    found = _with_client(options, lambda client: client.list(status=status_, machine=machine))
    if as_json:
        _print_json([records.public_record(i) for i in found])
        return
    for inst in found:
        where = inst.state or ",".join(inst.active) or "-"
        out.print(f"{inst.id}  {inst.machine:<16} {inst.status:<10} {where:<20} "
                  f"{inst.transitions:>6}  {records.timestamp(inst.created_at)}", markup=False)


@app.command()
def cancel(instance_id: str = typer.Argument(..., metavar="ID"),
           etcd: Optional[str] = EtcdOpt, namespace: str = NamespaceOpt,
           cacert: Optional[Path] = CacertOpt, cert: Optional[Path] = CertOpt, key: Optional[Path] = KeyOpt,
           user: Optional[str] = UserOpt) -> None:
    """Cancel a running instance."""
    options = _etcd_options(etcd, namespace, cacert, cert, key, user)
    inst = _with_client(options, lambda client: client.cancel(instance_id))
    if inst.status == records.CANCELLED:
        err.print(f"instance {inst.id} cancelled", markup=False)
    else:
        err.print(f"instance {inst.id} already {inst.status}; nothing to cancel", markup=False)


def main() -> None:
    """Entry point of the `dsm` command.

    Ends with os._exit once output is flushed: a tick abandoned after --timeout or an interrupt may
    still be running in a handler thread, and the process must not wait for user code to return.
    """
    code = int(ExitCode.OK)
    try:
        app()  # standalone: usage errors exit 2, typer.Exit carries our codes
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else int(ExitCode.INVALID))
    except Fail as exc:
        if str(exc):
            err.print(f"dsm: {exc}", markup=False)
        code = int(exc.code)
    except KeyboardInterrupt:
        err.print("dsm: interrupted", markup=False)
        code = int(ExitCode.INTERRUPTED)
    except StoreUnavailable as exc:
        err.print(f"dsm: etcd unreachable: {exc}", markup=False)
        code = int(ExitCode.UNREACHABLE)
    except DsmError as exc:
        err.print(f"dsm: {exc}", markup=False)
        code = int(ExitCode.INVALID)
    except Exception as exc:  # the unexpected: one line, the traceback with -v
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            log.exception("unexpected error")
        err.print(f"dsm: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
                  markup=False)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    main()
