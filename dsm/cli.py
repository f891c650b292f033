"""The `dsm` command: a thin shell that parses, calls the dsm package, and formats.

Data goes to stdout, logs and progress to stderr. Exit codes are the contract's (ExitCode).
stderr carries two kinds of text: progress and notes (`info`), which -q silences, and errors and
log records (`err`). With -q, stderr stays empty unless the command fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from dsm import compiler, handlers, loader, logs, payloads, records, render, schema
from dsm.durations import parse_duration
from dsm.errors import (
    AccessDenied,
    DefinitionError,
    DsmError,
    InputError,
    NoSpace,
    NotFound,
    PartFailed,
    StoreUnavailable,
)
from dsm.graph import Graph
from dsm.transition import descends_from

if TYPE_CHECKING:
    from dsm.client import AsyncClient
    from dsm.store import Store
    from dsm.store.etcd import EtcdOptions

log = logging.getLogger("dsm.cli")


class ExitCode(IntEnum):
    OK = 0
    INSTANCE_FAILED = 1  # failed or cancelled
    CASE_FAILED = 1  # dsm test: a case did not do what it expected
    PART_FAILED = 1  # a worker or server stopped because a part of it ended (PartFailed)
    INVALID = 2  # invalid definition, input or usage
    UNREACHABLE = 3  # etcd unreachable
    TIMEOUT = 4  # --timeout passed before the instance finished
    INTERRUPTED = 130


def _plain_help(option: Any) -> Any:
    """The --help flag without a `<bool>` type in help (our own flags set an empty metavar)."""
    if option is not None:
        option.metavar = ""
    return option


class _Command(typer.core.TyperCommand):
    """Help with metavars only: recent typer also prints each parameter's Python type (`<bool>`,
    `<path>`, `<list[Path]>`), which options drop when they have a metavar, and arguments here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument" and hasattr(param, "display_type_rich"):
                param.display_type_rich = lambda ctx: None

    def get_help_option(self, ctx: Any) -> Any:
        return _plain_help(super().get_help_option(ctx))


class _Group(typer.core.TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _plain_help(super().get_help_option(ctx))

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:  # Typer's --install-completion / --show-completion flags
            if param.name in ("install_completion", "show_completion"):
                _plain_help(param)
        return params


app = typer.Typer(
    name="dsm",
    cls=_Group,
    help="Declarative state machines in YAML, run embedded or by workers coordinated through etcd v3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _drop(stream: Any) -> None:
    """Point a stream whose reader went away at /dev/null: later writes and flushes vanish."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


def _emit(text: str) -> None:
    """Write data to stdout. A reader that stops reading (`dsm list | head -1`) is not an error:
    the rest of the data is dropped and the command ends with the exit code it has anyway."""
    try:
        sys.stdout.write(text)
    except BrokenPipeError:
        _drop(sys.stdout)


class _StderrConsole(Console):
    """stderr for people: a closed pipe drops the rest instead of ending the process (rich's default).

    With `--log-format json` (`json_lines`), stderr is for machines: each line printed becomes a
    JSON log line (`dsm.logs`) at this console's level, or WARNING for `dsm: warning: ...`; `fields`
    name the instance a line is about. No spinners or progress bars then.
    """

    def __init__(self, level: str) -> None:
        self.level = level
        self.json_lines = False
        super().__init__(stderr=True, highlight=False, soft_wrap=True)

    @property
    def is_terminal(self) -> bool:
        return not self.json_lines and bool(Console.is_terminal.fget(self))  # type: ignore[attr-defined]

    def print(self, *objects: Any, fields: dict[str, Any] | None = None,
              level: str | None = None, **options: Any) -> None:
        if not self.json_lines:
            super().print(*objects, **options)
            return
        if self.quiet:
            return
        markup = options.get("markup") is not False
        text = " ".join(Text.from_markup(o).plain if markup and isinstance(o, str) else str(o) for o in objects)
        level = level or self.level
        text = text.strip().removeprefix("dsm: ")
        for prefix, named in (("warning: ", "WARNING"), ("note: ", "INFO")):
            if text.startswith(prefix):
                text, level = text.removeprefix(prefix), named
        try:
            self.file.write(logs.line(level, "dsm.cli", text, fields) + "\n")
        except BrokenPipeError:
            self.on_broken_pipe()

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _drop(sys.stderr)


err = _StderrConsole("ERROR")  # errors and logs
info = _StderrConsole("INFO")  # progress and notes: silenced by -q


class Fail(Exception):
    """Stop the command with a one-line message on stderr and an exit code."""

    def __init__(self, code: ExitCode, message: str = ""):
        self.code = code
        super().__init__(message)


@dataclass(slots=True)
class _Verbosity:
    """-v / -q / --log-format as given so far: before the command, after it, or both."""

    verbose: bool = False
    quiet: bool = False
    log_format: str = "text"


_verbosity = _Verbosity()

# Options as types, declared once. Flags get an empty metavar: recent typer shows `<bool>` otherwise.
Verbose = Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Log details and tracebacks to stderr.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="Only errors on stderr (none on success).")]
_LOG_FORMAT_HELP = ("Log lines on stderr as 'text' or 'json' (one object per line, with instance, machine, state, "
                    "attempt and worker on lines about an instance).")
LogFormatOpt = Annotated[str | None, typer.Option("--log-format", metavar="text|json", show_default="text",
                                                  help=_LOG_FORMAT_HELP)]
Definition = Annotated[Path, typer.Argument(metavar="PATH", help="Definition file.", show_default=False)]
PayloadOpt = Annotated[str | None, typer.Option("--payload", metavar="JSON", help="Initial payload, a JSON object.")]
PayloadFileOpt = Annotated[Path | None, typer.Option("--payload-file", metavar="FILE",
                                                     help="Read the payload from FILE ('-': stdin).")]
NoImportOpt = Annotated[bool, typer.Option("--no-import", metavar="", help="Do not import handler modules.")]
InstanceId = Annotated[str, typer.Argument(metavar="ID", help="Instance id.", show_default=False)]
GivenId = Annotated[str | None, typer.Option(
    "--id", metavar="ID", help="The instance's id (default: generated). Starting an id that exists with the same "
                               "definition and payload returns that instance; with others is refused (exit 2).")]


DISTRIBUTION = "dsm-workflow"  # the name on the package index (the package and the command are `dsm`)


def _version() -> str:
    """The installed distribution's version; the package's own when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        import dsm

        return dsm.__version__


def _show_version(value: bool) -> None:
    if value:
        _emit(f"dsm {_version()}\n")
        raise typer.Exit()


@app.callback()
def _root(verbose: Verbose = False, quiet: Quiet = False,
          log_format: Annotated[str | None, typer.Option(
              "--log-format", envvar="DSM_LOG_FORMAT", metavar="text|json", show_default="text",
              help=_LOG_FORMAT_HELP + " Also after the command's name. (DSM_LOG_FORMAT)")] = None,
          version: Annotated[bool, typer.Option("--version", metavar="", is_eager=True, callback=_show_version,
                                                help="Print dsm's version and exit.")] = False) -> None:
    _set_verbosity(verbose, quiet, log_format)  # --version is handled by its eager callback


def _set_verbosity(verbose: bool, quiet: bool, log_format: str | None = None) -> None:
    """Apply -v / -q / --log-format wherever they were given (`dsm -v run x.yaml` or `dsm run x.yaml -v`;
    a --log-format after the command wins over one before it, or DSM_LOG_FORMAT)."""
    _verbosity.verbose |= verbose
    _verbosity.quiet |= quiet
    if log_format is not None:
        if log_format not in logs.FORMATS:
            raise Fail(ExitCode.INVALID, f"--log-format must be 'text' or 'json', not {log_format!r}")
        _verbosity.log_format = log_format
    verbose, quiet = _verbosity.verbose, _verbosity.quiet
    if verbose and quiet:
        raise Fail(ExitCode.INVALID, "-v (--verbose) and -q (--quiet) contradict each other: give one of them")
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    info.quiet = quiet
    logs.current.format = "json" if _verbosity.log_format == "json" else "text"
    err.json_lines = info.json_lines = logs.current.format == "json"
    handler: logging.Handler
    if err.is_terminal:
        from rich.logging import RichHandler

        handler = RichHandler(console=err, show_path=False, show_time=verbose, markup=False,
                              rich_tracebacks=verbose)
        handler.setFormatter(logs.TextFormatter("%(context)s%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logs.formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.NOTSET if verbose else logging.CRITICAL)
    logging.getLogger("dsm.handler").setLevel(logging.NOTSET if verbose else logging.ERROR if quiet else logging.INFO)


# -- shared helpers ----------------------------------------------------------------------------

def _definition_files(paths: list[Path]) -> list[Path]:
    """Files named as they are; in folders, the *.yaml / *.yml files that look like machines
    (loader.looks_like_machine), with a note on stderr for each one skipped. Hidden files and
    folders (.git, .venv, ...) are not searched."""
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        machines, found = loader.definitions_in(path)
        for skipped in sorted(set(found) - set(machines)):
            why = ("a test file ('dsm test' runs it)" if skipped.name.endswith((".test.yaml", ".test.yml"))
                   else "not a machine definition (no top-level 'machine:' key)")
            info.print(f"skipped {skipped}: {why}", markup=False)
        if not machines:
            what = "machine definitions" if found else "*.yaml or *.yml files"
            raise Fail(ExitCode.INVALID, f"{path}: no {what} in this folder")
        files.extend(machines)
    return files


def _load(path: Path, *, no_import: bool = False, allow: handlers.Allowlist = handlers.ANY,
          search_path: tuple[str, ...] = ()) -> Graph:
    try:
        return compiler.load(path, import_handlers=not no_import, allow=allow, search_path=search_path)
    except DefinitionError as exc:
        for problem in exc.problems:
            _emit(f"{problem}\n")
        raise Fail(ExitCode.INVALID) from None


def _payload(payload: str | None, payload_file: Path | None) -> dict[str, Any]:
    if payload is not None and payload_file is not None:
        raise Fail(ExitCode.INVALID, "give --payload or --payload-file, not both")
    try:
        if payload_file is not None:
            try:
                text = sys.stdin.read() if str(payload_file) == "-" else payload_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise Fail(ExitCode.INVALID, f"--payload-file {payload_file}: {exc.strerror or exc}") from None
            where = f"--payload-file {payload_file}" + (" (stdin)" if str(payload_file) == "-" else "")
            return payloads.parse(text, what=where)
        if payload is not None:
            return payloads.parse(payload, what="--payload")
    except payloads.PayloadError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None
    return {}


def _duration(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value, what=option)
    except InputError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None


def _print_json(value: Any) -> None:
    _emit(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


class _Progress:
    """Transitions as they commit, one line each on stderr; on a terminal, coloured, with a live
    status line of the states still active. With -q, only the end of an instance that did not
    succeed, in one line."""

    def __init__(self, machine: str | None = None) -> None:
        self.started = time.monotonic()
        self.machine = machine
        self.instance: str | None = None  # once started
        self.live = info.status("starting", spinner="dots") if info.is_terminal and not info.quiet else None
        if self.live is not None:
            self.live.start()

    def note(self, instance_id: str, text: str) -> None:
        """A note about the instance (the first names it: it is the one this progress follows)."""
        self.instance = self.instance or instance_id
        info.print(text, markup=False, fields=logs.about(instance_id, self.machine))

    def history(self, entry: dict[str, Any]) -> None:
        """A committed transition: a history entry of the record."""
        branch = f" [dim]\\[{'/'.join(entry['branch'])}][/dim]" if entry["branch"] else ""
        outcome = f" [cyan]({entry['outcome']})[/cyan]" if entry["outcome"] else ""
        attempt = f" [yellow]attempt {entry['attempt']}[/yellow]" if entry["attempt"] > 1 else ""
        targets = ", ".join(entry["next"])
        about = logs.about(self.instance or "?", self.machine, entry["state"], entry["attempt"], entry["worker"])
        info.print(f"[dim]{entry['seq']:>4}[/dim]  [bold]{entry['state']}[/bold]{outcome} -> {targets}{branch}"
                   f"{attempt}", fields=about)
        for failed in entry.get("failures", ()):  # the attempts of this visit that failed before it
            info.print(f"[dim]      attempt {failed['attempt']} failed:[/dim] "
                       + escape(f"{failed['error']['type']}: {failed['error']['message']}"),
                       fields=logs.about(about["instance"], self.machine, entry["state"], failed["attempt"],
                                         failed["worker"]))

    def update(self, transitions: int, active: list[str]) -> None:
        if self.live is not None:
            took = time.monotonic() - self.started
            self.live.update(f"{transitions} transitions, {took:.1f}s; active: {', '.join(active) or '-'}")

    def finished(self, record: dict[str, Any]) -> None:
        self.stop()
        took = time.monotonic() - self.started
        state, status, iid = record["state"], record["status"], record["id"]
        where = f" at {state}" if state else ""
        e = record["error"]
        error = f"{e['type']} in state {e['state']} after {e['attempts']} attempt(s): {e['message']}" if e else ""
        about = logs.about(iid, record["machine"], state or (e["state"] if e else None))
        if info.quiet:
            if status != records.SUCCEEDED:
                err.print(f"instance {iid} {status}{where}" + (f": {error}" if error else ""), markup=False,
                          fields=about)
            return
        colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(status, "white")
        info.print(f"[{colour}]instance {iid} {status}{where}[/{colour}] "
                   f"({record['transitions']} transitions, {took:.2f}s)", fields=about)
        if error:
            info.print("[red]error[/red]: " + escape(error), fields=about, level="ERROR")
        info.print("payload: " + json.dumps(record["payload"], ensure_ascii=False), markup=False, fields=about)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _hush(logger: str) -> None:
    """Keep a logger's records below ERROR off stderr, unless -v asked for everything."""
    if not _verbosity.verbose:
        logging.getLogger(logger).setLevel(logging.ERROR)


@contextmanager
def _counting(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """`with _counting("submitting", n) as advance`: a progress bar with a count on stderr while a
    long job runs, when stderr is a terminal (and -q was not given); otherwise nothing."""
    if total <= 0 or not info.is_terminal or info.quiet:
        yield lambda done: None
        return
    from rich import progress

    columns = (progress.TextColumn(what), progress.BarColumn(), progress.MofNCompleteColumn(),
               progress.TimeElapsedColumn())
    # stdout carries data: it passes through the display only when it is the terminal as well
    with progress.Progress(*columns, console=info, transient=True, redirect_stdout=sys.stdout.isatty(),
                           redirect_stderr=False) as bar:
        task = bar.add_task(what, total=total)
        yield lambda done: bar.advance(task, done)


def _exit_for(record: dict[str, Any]) -> ExitCode:
    return ExitCode.OK if record["status"] == records.SUCCEEDED else ExitCode.INSTANCE_FAILED


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

@dataclass(frozen=True, slots=True)
class EtcdArgs:
    """The etcd connection options as given on the command line, the same for every command that
    talks to etcd (see `_command`): endpoints, namespace, TLS files and user (the password comes
    from DSM_ETCD_PASSWORD, never from the command line)."""

    endpoints: str | None = None
    namespace: str = "dsm"
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None

    @property
    def given(self) -> bool:
        return bool(self.endpoints)

    def options(self) -> EtcdOptions:
        """The checked store options; a usage error (exit 2) without an endpoint or with bad values."""
        from dsm.store.etcd import EtcdOptions

        if not self.endpoints:
            raise Fail(ExitCode.INVALID, "this command needs an etcd endpoint: give --etcd URLS or set DSM_ETCD")
        try:
            return EtcdOptions.build(self.endpoints, namespace=self.namespace, cacert=self.cacert, cert=self.cert,
                                     key=self.key, user=self.user, password=os.environ.get("DSM_ETCD_PASSWORD"))
        except InputError as exc:
            raise Fail(ExitCode.INVALID, str(exc)) from None

    @asynccontextmanager
    async def open(self, *, wait: asyncio.Event | None = None) -> AsyncIterator[Store]:
        """`async with etcd.open() as store`: exit code 3 with one line when etcd is unreachable.
        With `wait` (a stop event), an unreachable etcd is waited for instead, saying so, until it
        answers or `wait` is set (a worker started before etcd, as compose and Kubernetes may)."""
        from dsm.store.etcd import EtcdStore

        options = self.options()
        delay, said = 0.5, None
        while True:
            try:
                store = await EtcdStore.connect(options)
                break
            except StoreUnavailable as exc:
                if wait is not None and wait.is_set():
                    raise Fail(ExitCode.OK) from None  # stopped while waiting: nothing to say
                if wait is None:
                    raise Fail(ExitCode.UNREACHABLE, f"etcd unreachable at {options.display}: {exc}") from None
                if str(exc) != said:  # once per reason, not once per try
                    said = str(exc)
                    log.warning("waiting for etcd at %s (%s); retrying", options.display, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wait.wait(), delay)
                delay = min(delay * 2, 5.0)
        if said is not None:
            log.warning("etcd at %s answers", options.display)
        try:
            yield store
        finally:
            await store.close()

    def call(self, call: Callable[[AsyncClient], Any]) -> Any:
        """Connect, run `call(client)` (dsm's client over etcd), disconnect; an unknown instance id
        is invalid input (exit 2)."""
        from dsm.client import AsyncClient

        async def go() -> Any:
            async with self.open() as store:
                return await call(AsyncClient.over(store, self.options().keys))

        try:
            return _run_async(go)
        except NotFound as exc:
            raise Fail(ExitCode.INVALID, str(exc)) from None


def _stop_on_signals(received: list[int]) -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (each noted in `received`): a long-running command
    (`worker`, `api`) stops on it gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop


def _keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


_OUTPUT_PARAMETERS = [_keyword("verbose", Verbose, False), _keyword("quiet", Quiet, False),
                      _keyword("log_format", LogFormatOpt, None)]
_ETCD = "etcd connection"  # their own panel in --help
_ETCD_PARAMETERS = [  # etcd_FIELD for each field of EtcdArgs
    _keyword("etcd_endpoints", Annotated[str | None, typer.Option(
        "--etcd", envvar="DSM_ETCD", metavar="URLS", rich_help_panel=_ETCD,
        help="etcd endpoints, comma separated (DSM_ETCD).")], None),
    _keyword("etcd_namespace", Annotated[str, typer.Option(
        "--namespace", envvar="DSM_NAMESPACE", metavar="NAME", rich_help_panel=_ETCD,
        help="Key prefix /<namespace>/.")], "dsm"),
    _keyword("etcd_cacert", Annotated[Path | None, typer.Option(
        "--cacert", metavar="FILE", rich_help_panel=_ETCD, help="CA bundle to verify etcd's TLS certificate.")], None),
    _keyword("etcd_cert", Annotated[Path | None, typer.Option(
        "--cert", metavar="FILE", rich_help_panel=_ETCD, help="Client certificate for etcd TLS.")], None),
    _keyword("etcd_key", Annotated[Path | None, typer.Option(
        "--key", metavar="FILE", rich_help_panel=_ETCD, help="Client key for etcd TLS.")], None),
    _keyword("etcd_user", Annotated[str | None, typer.Option(
        "--user", envvar="DSM_ETCD_USER", metavar="NAME", rich_help_panel=_ETCD,
        help="etcd user; password from DSM_ETCD_PASSWORD.")], None),
]


def _command(name: str | None = None, *, etcd: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """Register a command with the options every command shares: -v / -q (also accepted after the
    command's name) and, with `etcd=True`, the etcd connection options, collected into one `EtcdArgs`
    passed as its `etcd` parameter, so every etcd command spells them the same way."""

    def decorate(func: Callable[..., Any]) -> Any:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if not (etcd and p.name == "etcd")]
        extra = _OUTPUT_PARAMETERS + (_ETCD_PARAMETERS if etcd else [])

        @functools.wraps(func)
        def command(**values: Any) -> Any:
            _set_verbosity(values.pop("verbose"), values.pop("quiet"), values.pop("log_format"))
            if etcd:
                given = {p.name.removeprefix("etcd_"): values.pop(p.name) for p in _ETCD_PARAMETERS}
                values["etcd"] = EtcdArgs(**given)
            return func(**values)

        parameters = own + extra
        command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return app.command(name, cls=_Command)(command)

    return decorate


# -- commands --------------------------------------------------------------------------------

@_command()
def validate(paths: Annotated[list[Path], typer.Argument(metavar="PATH", show_default=False,
                                                         help="Definition files, or folders of *.yaml / *.yml.")],
             no_import: NoImportOpt = False) -> None:
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
                _emit(f"{problem}\n")
            continue
        info.print(f"{path}: ok (machine {graph.machine}, {len(graph.states)} states)", markup=False)
    if bad:
        err.print(f"{bad} of {len(files)} file(s) invalid", markup=False)
        raise Fail(ExitCode.INVALID)


@_command()
def graph(path: Definition,
          format: Annotated[str, typer.Option("--format", "-f", metavar="|".join(render.RENDERERS),
                                              help="Diagram language.")] = "mermaid",
          output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE",
                                                      help="Write to FILE instead of stdout.")] = None,
          no_import: NoImportOpt = False) -> None:
    """Draw a machine as a Mermaid state diagram or a Graphviz graph.

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    renderer = render.RENDERERS.get(format)
    if renderer is None:
        raise Fail(ExitCode.INVALID, f"--format must be one of {', '.join(render.RENDERERS)}, got {format!r}")
    text = renderer(_load(path, no_import=no_import))
    if output is None:
        _emit(text)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise Fail(ExitCode.INVALID, f"cannot write {output}: {exc.strerror or exc}") from None
        info.print(f"wrote {output}", markup=False)


@_command("schema")
def schema_command() -> None:
    """Print the JSON Schema of machine definitions."""
    _emit(schema.schema_text().rstrip("\n") + "\n")


@_command("test")
def test_command(paths: Annotated[list[Path], typer.Argument(
        metavar="PATH", show_default=False, help="Test files, or folders of *.test.yaml.")]) -> None:
    """Run machines' test cases offline: embedded, one tick at a time, time skipped, handlers mocked.

    Prints PASS FILE::NAME or FAIL FILE::NAME: WHAT DIFFERED per case, then N passed, M failed.

    Exit 1 when a case failed, 2 for a bad test file (its problems as FILE:LINE:COL: error: ...).

    Imports the handler modules of the machines, running their code.
    """
    from dsm import testing

    try:
        files = testing.find_test_files(paths)
    except InputError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None
    results: list[testing.FileResult] = []
    bad = 0
    for path in files:
        try:
            result = testing.run_file(path)
        except DefinitionError as exc:
            bad += 1
            for problem in exc.problems:
                _emit(f"{problem}\n")
            continue
        results.append(result)
        _emit(result.report())
    passed, failed = testing.summary(results)
    _emit(f"{passed} passed, {failed} failed\n")
    if bad:
        raise Fail(ExitCode.INVALID, f"{bad} of {len(files)} test file(s) invalid: their cases did not run")
    if failed:
        raise typer.Exit(ExitCode.CASE_FAILED)


@_command(etcd=True)
def run(path: Definition, payload: PayloadOpt = None, payload_file: PayloadFileOpt = None,
        workers: Annotated[int, typer.Option("--workers", min=0, metavar="N",
                                             help="Ticks run at once (local workers with --etcd).")] = 4,
        timeout: Annotated[str | None, typer.Option("--timeout", metavar="DURATION",
                                                    help="Give up waiting after DURATION (exit 4).")] = None,
        as_json: Annotated[bool, typer.Option("--json", metavar="",
                                              help="Print the instance record on stdout.")] = False,
        no_import: Annotated[bool, typer.Option("--no-import", metavar="", help="Do not import handlers "
                                                "(only with --etcd and --workers 0).")] = False,
        instance_id: GivenId = None,
        etcd: EtcdArgs = EtcdArgs()) -> None:
    """Start one instance and wait for it: embedded, or on etcd with --etcd.

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    body = _payload(payload, payload_file)
    limit = _duration(timeout, "--timeout")
    if not etcd.given and workers == 0:
        raise Fail(ExitCode.INVALID, "--workers 0 needs --etcd: embedded runs have no workers elsewhere")
    if no_import and (not etcd.given or workers > 0):
        raise Fail(ExitCode.INVALID, "--no-import needs --etcd URLS --workers 0: embedded runs and local "
                                     "workers run the handlers, so they must import them")
    if instance_id is not None:
        _given_id(instance_id)
    graph_ = _load(path, no_import=no_import)
    progress = _Progress(graph_.machine)
    started: list[str] = []  # the instance, once it is in the store
    try:
        if etcd.given:
            etcd.options()
            result = _run_async(lambda: _run_etcd(graph_, body, etcd, workers, limit, progress, instance_id,
                                                  started))
        else:
            result = _run_async(lambda: _run_embedded(graph_, body, workers, limit, progress, instance_id))
    except Fail as exc:
        if exc.code == ExitCode.INTERRUPTED and started:
            raise Fail(ExitCode.INTERRUPTED, _goes_on(started[0], etcd.namespace)) from None
        raise
    finally:
        progress.stop()
    record, timed_out = result
    if as_json:
        _print_json(record)
    if timed_out:
        active, iid = ", ".join(record["active"]) or "-", record["id"]
        if etcd.given:
            raise Fail(ExitCode.TIMEOUT, f"--timeout {timeout} passed; instance {iid} is still running in "
                                         f"namespace {etcd.namespace!r} (active: {active}): 'dsm status {iid}' "
                                         "shows how it goes on")
        raise Fail(ExitCode.TIMEOUT, f"--timeout {timeout} passed; instance {iid} was stopped unfinished "
                                     f"(active: {active}) when this process ended: embedded instances live only "
                                     "as long as 'dsm run' (with --etcd they outlive it)")
    progress.finished(record)
    raise typer.Exit(_exit_for(record))


async def _run_embedded(graph_: Graph, body: dict, workers: int, limit: float | None,
                        progress: _Progress, instance_id: str | None = None) -> tuple[dict[str, Any], bool]:
    """(the record, whether --timeout passed first) of one instance run in this process."""
    from dsm import embedded

    logs.current.worker = embedded.Engine.worker_id  # the name the history gives to the worker of an embedded run
    if limit is not None:
        # Once --timeout passes, the instance ends with the process. What the embedded worker logs
        # as it stops (ticks still running, claims released) is then nothing for the user to act on.
        asyncio.get_running_loop().call_later(limit, _hush, "dsm.worker")
    hinted: set[str] = set()

    def update(inst: records.Instance) -> None:  # of the instance and of its children
        if inst.parent is None:
            progress.update(inst.transitions, inst.active)
        for wait in records.waiting(inst):
            if wait["kind"] == "signal" and wait["signal"] not in hinted:  # nobody can send it here
                hinted.add(wait["signal"])
                err.print(f"instance {inst.id} waits for signal {wait['signal']!r} at state {wait['state']!r}; an "
                          "embedded run takes no signals: run it on etcd ('dsm run --etcd ...', then 'dsm signal'), "
                          "or test it with 'dsm test' and signals in the test file", markup=False,
                          fields=logs.about(inst.id, inst.machine, wait["state"]))

    try:
        result = await embedded.run_graph(graph_, body, workers=workers, timeout=limit,
                                          on_history=lambda entry: progress.history(entry.as_dict()),
                                          on_update=update,
                                          on_start=lambda iid: progress.note(iid, f"instance {iid} started"),
                                          instance_id=instance_id)
        return result.record, False
    except asyncio.TimeoutError as exc:
        return exc.args[0].record, True


async def _run_etcd(graph_: Graph, body: dict, etcd: EtcdArgs, workers: int, limit: float | None,
                    progress: _Progress, given_id: str | None = None,
                    started: list[str] | None = None) -> tuple[dict[str, Any], bool]:
    """(the record, whether --timeout passed first) of one instance started on etcd and waited for,
    run by `workers` local workers (0: by workers elsewhere)."""
    from dsm.client import AsyncClient
    from dsm.definitions import Registry
    from dsm.errors import Timeout
    from dsm.worker import running

    options = etcd.options()
    async with etcd.open() as store:
        client = AsyncClient.over(store, options.keys)
        instance_id, created = await client.operations.start(graph_, body, instance_id=given_id)
        if started is not None:
            started.append(instance_id)
        if created:
            progress.note(instance_id, f"instance {instance_id} submitted to namespace {options.namespace!r}")
        else:
            progress.note(instance_id, f"instance {instance_id} exists in namespace {options.namespace!r} with this "
                          "definition and payload: waiting for it")

        async def wait() -> tuple[dict[str, Any], bool]:
            try:
                return await client.wait(instance_id, timeout=limit, on_history=progress.history,
                                         on_update=lambda now: progress.update(now["transitions"], now["active"])), \
                    False
            except Timeout:
                return await client.get(instance_id), True

        if workers <= 0 or (not created and (await client.operations.instance(instance_id)).finished):
            return await wait()  # (an instance that exists and has finished needs no workers)
        from dsm.worker import default_worker_id

        logs.current.worker = default_worker_id()  # the local workers' name
        registry = Registry(store, options.keys, allow=handlers.Allowlist(graph_.modules()),
                            search_path=(str(Path(graph_.file).resolve().parent),))
        registry.add(graph_)
        # local workers run this instance (and its children) only, never other work of a shared namespace
        mine = functools.partial(descends_from, root=instance_id)
        async with running(store, registry, concurrency=workers, grace=5, serves=mine):
            return await wait()


def _jsonl(path: Path) -> Iterator[tuple[str | None, dict]]:
    """(instance id or None, payload) per line: a line is the payload; an `id` field at its top
    level names the instance and is not part of the payload. `{"id": ID, "payload": {...}}` (those
    two keys only) gives the payload whole, for payloads that have an `id` of their own."""
    try:
        handle = sys.stdin if str(path) == "-" else path.open(encoding="utf-8")
    except OSError as exc:
        raise Fail(ExitCode.INVALID, f"--jsonl {path}: {exc.strerror or exc}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                body = payloads.parse(line, what=f"{path}:{number}")
            except payloads.PayloadError as exc:
                raise Fail(ExitCode.INVALID, str(exc)) from None
            if "id" not in body:
                yield None, body
                continue
            given = body.pop("id")
            if set(body) == {"payload"} and isinstance(body["payload"], dict):
                body = body["payload"]
            yield _given_id(given, where=f"{path}:{number}: "), body


def _given_id(value: object, *, where: str = "") -> str:
    from dsm.keys import check_instance_id

    try:
        return check_instance_id(value)
    except InputError as exc:
        raise Fail(ExitCode.INVALID, f"{where}{exc}") from None


def _goes_on(instance_id: str, namespace: str) -> str:
    """What Ctrl-C on `dsm run --etcd` leaves behind, and what to do about it."""
    return (f"interrupted; instance {instance_id} goes on in namespace {namespace!r} with the workers that serve "
            f"its definition: follow it with 'dsm status {instance_id} --follow', cancel it with "
            f"'dsm cancel {instance_id}'")


@_command(etcd=True)
def submit(path: Definition, payload: PayloadOpt = None, payload_file: PayloadFileOpt = None,
           jsonl: Annotated[Path | None, typer.Option("--jsonl", metavar="FILE", help=(
               "One instance per line of FILE ('-': stdin); a line's top-level 'id' is its instance id."))] = None,
           no_import: NoImportOpt = False, instance_id: GivenId = None, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Start instances on etcd; print each instance id on its own line.

    Imports the handler modules the definition names, running their code (--no-import skips it).
    Its folder is first on the import path only while they load.
    """
    if jsonl is not None and (payload is not None or payload_file is not None):
        raise Fail(ExitCode.INVALID, "give --jsonl or --payload/--payload-file, not both")
    if jsonl is not None and instance_id is not None:
        raise Fail(ExitCode.INVALID, "--id names one instance: with --jsonl, give each line an 'id' field")
    etcd.options()
    graph_ = _load(path, no_import=no_import)
    starts = list(_jsonl(jsonl)) if jsonl is not None else [
        (_given_id(instance_id) if instance_id is not None else None, _payload(payload, payload_file))]
    bodies = [body for _, body in starts]
    ids = [given for given, _ in starts] if any(given is not None for given, _ in starts) else None

    async def submit_all(client: AsyncClient) -> None:
        from dsm.operations import SUBMIT_BATCH

        step = 16 * SUBMIT_BATCH  # ids are printed, and progress shown, as each slice is stored
        with _counting("submitting", len(bodies) if len(bodies) > 1 else 0) as advance:
            for start in range(0, len(bodies), step):
                for iid in await client.start_many(graph_, bodies[start:start + step],
                                                   ids[start:start + step] if ids else None):
                    _emit(iid + "\n")
                advance(min(step, len(bodies) - start))

    etcd.call(submit_all)


@_command(etcd=True)
def worker(paths: Annotated[list[Path] | None, typer.Argument(
               metavar="PATH", show_default=False,
               help="Definitions this worker serves (and whose modules it may import).")] = None,
           concurrency: Annotated[int, typer.Option("--concurrency", min=1, metavar="N",
                                                    help="Ticks run at once.")] = 8,
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
               help="Where handlers run: 'process' (one child process per slot, killed at a tick's "
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
    keep_history = _duration(compaction_retention, "--compaction-retention")
    silence = _duration(dead_after, "--dead-after")
    if silence is not None and 0 < silence < lease_ttl:
        raise Fail(ExitCode.INVALID, f"--dead-after must be 0 or at least --lease-ttl ({lease_ttl}s): the heartbeat "
                                     "is written every third of it")
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):  # a stop asked for during start-up still counts
        signal.signal(signum, lambda number, frame: received.append(number))
    options = etcd.options()
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
        from dsm.worker import HousekeepingOptions, default_worker_id, running

        stop = _stop_on_signals(received)
        if received:
            return
        worker_id = default_worker_id()
        logs.current.worker = worker_id  # named on its log lines, and on those of its handler processes
        async with etcd.open(wait=stop) as store:
            registry = Registry(store, options.keys, allow=allowlist, search_path=search + folders)
            for g in graphs:
                registry.add(g)
                await register(store, options.keys, g)
            executor = None
            if isolation == "process":
                from dsm.worker.isolation import ProcessExecutor

                executor = ProcessExecutor(concurrency, search_path=search + folders,
                                           preload=[m for g in graphs for m in g.modules()])
            async with running(store, registry, concurrency=concurrency, lease_ttl=float(lease_ttl), grace=grace,
                               stop=stop, executor=executor, dead_after=silence, worker_id=worker_id,
                               housekeeping=HousekeepingOptions(compaction_retention=keep_history or 0.0)) as w:
                with contextlib.ExitStack() as serving:
                    where = "processes" if isolation == "process" else "threads"
                    if metrics_port is not None:
                        from dsm import metrics

                        server = _side_server(serving, lambda: metrics.serving(w, metrics_host, metrics_port),
                                              "--metrics-port", "metrics", metrics_host, metrics_port)
                        where += f", metrics on {server.url}"
                    if health_port is not None:
                        from dsm import healthz

                        probe = _side_server(serving, lambda: healthz.serving(w, health_host, health_port),
                                             "--health-port", "/healthz", health_host, health_port)
                        where += f", health on {probe.url(healthz.PATH)}"
                    info.print(f"worker {w.id} serving namespace {options.namespace!r} at {options.display} "
                               f"(concurrency {concurrency}, handlers in {where}, modules: {allowlist.describe()})",
                               markup=False)
                    await stop.wait()
            info.print(f"worker {w.id} stopped after {w.stats.transitions} transitions", markup=False)

    try:
        _run_async(go)
    except Fail as exc:
        if exc.code != ExitCode.OK:
            raise
    if signal.SIGINT in received:
        raise Fail(ExitCode.INTERRUPTED)  # SIGTERM is the ordinary way to stop a worker: exit 0


def _side_server(serving: contextlib.ExitStack, open_: Callable[[], Any], option: str, what: str, host: str,
                 port: int) -> Any:
    """A worker's small HTTP server (metrics, health) entered on `serving`; exit 2 when it cannot listen."""
    try:
        return serving.enter_context(open_())
    except OSError as exc:
        raise Fail(ExitCode.INVALID, f"{option}: cannot serve {what} on {host}:{port}: {exc.strerror or exc}") from None


@_command(etcd=True)
def status(instance_id: InstanceId,
           as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the whole record as JSON.")] = False,
           follow: Annotated[bool, typer.Option("--follow", "-f", metavar="", help=(
               "Print transitions as they commit until the instance ends; exit as 'dsm run' does "
               "(0 succeeded, 1 failed or cancelled). With --json, one history entry per line."))] = False,
           etcd: EtcdArgs = EtcdArgs()) -> None:
    """Show one instance (the whole record with --json), or follow it (--follow)."""
    if follow:
        _follow(instance_id, as_json, etcd)

    async def look(client: AsyncClient) -> tuple[dict, list, list, list, list[str]]:
        ops = client.operations  # what an operator sees besides the record: workers, alarms, earlier failures
        inst = await ops.instance(instance_id)
        record = records.public_record(inst, await ops.history(instance_id))
        alarms = await ops.alarms()
        if record["status"] != records.RUNNING:
            return record, [], [], earlier_failures(inst), alarms
        return (record, *await ops.serving(record["digest"]), [], alarms)

    from dsm.describe import describe, earlier_failures, serving_line

    record, workers, serving, earlier, alarms = etcd.call(look)
    line, alone = serving_line(record, workers, serving, etcd.namespace) if record["status"] == records.RUNNING \
        else (None, False)
    if "NOSPACE" in alarms:
        nospace = ("etcd's NOSPACE alarm is raised: it refuses writes, so no instance moves until an operator "
                   "makes room and disarms it (docs/operations.md)")
        if as_json:
            err.print(f"dsm: warning: {nospace}", markup=False)
        else:
            _emit(f"alarm:       {nospace}\n")
    if as_json:
        _print_json(record)
        if alone:
            info.print(f"dsm: note: workers: {line}", markup=False)
        return
    _emit("".join(text + "\n" for text in describe(record, workers=line, earlier=earlier)))


@_command("workers", etcd=True)
def workers_command(as_json: Annotated[bool, typer.Option("--json", metavar="",
                                                          help="Print a JSON array of workers.")] = False,
                    etcd: EtcdArgs = EtcdArgs()) -> None:
    """List live workers: id, host, pid, definitions served, concurrency, ticks in flight."""

    async def look(client: AsyncClient) -> tuple[list, list[str]]:
        return await client.operations.workers(), await client.operations.alarms()

    found, alarms = etcd.call(look)
    if "NOSPACE" in alarms:  # each worker waits; none can rewrite its entry to say so, etcd refuses writes
        err.print("dsm: warning: etcd's NOSPACE alarm is raised: every worker waits (no claim, no commit) until an "
                  "operator makes room and disarms it (docs/operations.md)", markup=False)
    if as_json:
        _print_json([w.as_dict() for w in found])
        return
    if not found:
        info.print(f"no live workers in namespace {etcd.namespace!r}", markup=False)
        return
    rows = [["ID", "HOST", "PID", "CONCURRENCY", "IN FLIGHT", "DEFINITIONS"]]
    for w in found:
        served = ", ".join(f"{d.machine}" + (f" v{d.version}" if d.version is not None else "") for d in w.definitions)
        allow = "any module" if w.allow is None else ", ".join(w.allow + w.functions) or "no module"
        rows.append([w.id, w.host, str(w.pid), str(w.concurrency), str(w.in_flight),
                     (served or "-") + f" (allow: {allow})"])
    _emit(_table(rows, right=frozenset({2, 3, 4})))


def _follow(instance_id: str, as_json: bool, etcd: EtcdArgs) -> None:
    """`dsm status ID --follow`: the history so far, then each transition as it commits (the
    client watches the record), and retries as they are scheduled; ends with the instance."""
    from dsm.describe import history_lines, waiting_line

    shown: set[str] = set()

    def out(text: str) -> None:
        _emit(text)
        try:
            sys.stdout.flush()  # as it happens, also into a pipe
        except BrokenPipeError:
            _drop(sys.stdout)

    def on_history(entry: dict[str, Any]) -> None:
        if as_json:
            out(json.dumps(entry, ensure_ascii=False) + "\n")
        else:
            out("".join(line + "\n" for line in history_lines(entry)))

    def on_update(record: dict[str, Any]) -> None:
        if as_json:
            return
        for wait in record["waiting"]:
            line = waiting_line(wait)
            if line not in shown:
                shown.add(line)
                out(f"       waiting: {line}\n")

    record = etcd.call(lambda client: client.wait(instance_id, on_history=on_history, on_update=on_update))
    state, status = record["state"], record["status"]
    where = f" at {state}" if state else ""
    e = record["error"]
    error = f": {e['type']} in state {e['state']} after {e['attempts']} attempt(s): {e['message']}" if e else ""
    (info if status == records.SUCCEEDED else err).print(
        f"instance {record['id']} {status}{where} ({record['transitions']} transitions){error}", markup=False,
        fields=logs.about(record["id"], record["machine"], state or (e["state"] if e else None)))
    raise typer.Exit(_exit_for(record))


@_command("list", etcd=True)
def list_command(status_: Annotated[str | None, typer.Option("--status", metavar="|".join(records.STATUSES),
                                                             help="Only instances with this status.")] = None,
                 machine: Annotated[str | None, typer.Option("--machine", metavar="NAME",
                                                             help="Only instances of this machine.")] = None,
                 since: Annotated[str | None, typer.Option(
                     "--since", metavar="T", help="Only instances started at or after T: an ISO 8601 time "
                     "(2026-11-28T13:00:00Z) or a duration back from now (30m, 2h, 7d).")] = None,
                 limit: Annotated[int | None, typer.Option("--limit", min=1, metavar="N", show_default="all",
                                                           help="At most N instances; when more follow, "
                                                                "'next: CURSOR' on stderr.")] = None,
                 after: Annotated[str | None, typer.Option("--after", metavar="CURSOR",
                                                           help="Continue after CURSOR (from 'next:').")] = None,
                 as_json: Annotated[bool, typer.Option("--json", metavar="",
                                                       help="Print a JSON array of summaries.")] = False,
                 etcd: EtcdArgs = EtcdArgs()) -> None:
    """List instances, newest first, from the index (summaries: records without history and payload)."""
    from dsm import index

    if status_ is not None and status_ not in records.STATUSES:
        raise Fail(ExitCode.INVALID, f"--status must be one of {', '.join(records.STATUSES)}, got {status_!r}")
    try:
        start = index.parse_since(since, time.time()) if since is not None else None
        if after is not None:
            index.check_cursor(after)
    except InputError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None
    rows = [["ID", "MACHINE", "STATUS", "STATE", "TRANSITIONS", "CREATED"]]
    shown = 0

    def show(summary: dict[str, Any]) -> None:
        nonlocal shown
        if as_json:  # streamed: the same text json.dumps(list, indent=2) gives, an item at a time
            item = json.dumps(summary, indent=2, ensure_ascii=False).replace("\n", "\n  ")
            _emit(("[\n  " if not shown else ",\n  ") + item)
        else:
            rows.append([summary["id"], summary["machine"], summary["status"],
                         summary["state"] or ",".join(summary["active"]) or "-", str(summary["transitions"]),
                         summary["created_at"] or "-"])
        shown += 1

    async def listing(client: AsyncClient) -> str | None:
        cursor = after
        while True:
            want = index.PAGE if limit is None else min(index.PAGE, limit - shown)
            page = await client.page(status=status_, machine=machine, since=start, after=cursor, limit=want)
            for summary in page["items"]:
                show(summary)
            cursor = page["next"]
            if cursor is None or (limit is not None and shown >= limit):
                return cursor

    following = etcd.call(listing)
    if as_json:
        _emit("\n]\n" if shown else "[]\n")
    elif shown:
        _emit(_table(rows, right=frozenset({4})))
    else:
        where = f"in namespace {etcd.namespace!r}" + (f" with status {status_}" if status_ else "")
        info.print(f"no instances {where}" + (f" of machine {machine!r}" if machine else "")
                   + (f" started since {since}" if since else "") + (" after the cursor" if after else ""),
                   markup=False)
    if following is not None:
        err.print(f"next: {following}", markup=False)  # data for the next call, so -q keeps it


def _table(rows: list[list[str]], *, right: frozenset[int] = frozenset()) -> str:
    """Rows as text columns, each as wide as its widest cell; `right` columns aligned right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows)
    return "".join(line.rstrip() + "\n" for line in lines)


@_command(etcd=True)
def cancel(instance_id: InstanceId,
           reason: Annotated[str | None, typer.Option("--reason", metavar="TEXT",
                                                      help="Why, kept in the record with who and when.")] = None,
           etcd: EtcdArgs = EtcdArgs()) -> None:
    """Cancel a running instance; the record keeps who (user@host), when and why."""
    record = etcd.call(lambda client: client.cancel(instance_id, reason=reason))
    about = logs.about(record["id"], record["machine"])
    if record["status"] == records.CANCELLED:
        info.print(f"instance {record['id']} cancelled", markup=False, fields=about)
    else:
        info.print(f"instance {record['id']} already {record['status']}; nothing to cancel", markup=False,
                   fields=about)


SignalName = Annotated[str, typer.Argument(metavar="NAME", show_default=False,
                                           help="The signal's name, as a signal state waits for it.")]
SignalPayload = Annotated[str | None, typer.Option("--payload", metavar="JSON",
                                                   help="A JSON object merged into the payload key by key.")]
SignalOutcome = Annotated[str | None, typer.Option("--outcome", metavar="LABEL",
                                                   help="An outcome label: routes a signal state with 'on'.")]


@_command("signal", etcd=True)
def send_signal(instance_id: InstanceId, name: SignalName, payload: SignalPayload = None,
                outcome: SignalOutcome = None, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Send a signal to a running instance; prints nothing and exits 0 once it is stored.

    Signals are durable and buffered: one sent before the instance reaches the state that waits
    for it is kept, and consumed there (in the order sent, one per visit). An unknown or finished
    instance, a NAME no state of the instance's machine waits for, or an --outcome that no state
    waiting for NAME routes on, is refused (exit 2, saying what the machine takes) and nothing is
    written.
    """
    try:
        body = payloads.parse(payload, what="--payload") if payload is not None else {}
    except payloads.PayloadError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None
    etcd.call(lambda client: client.signal(instance_id, name, body, outcome))


@_command(etcd=True)
def redrive(instance_id: InstanceId, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Continue a failed or cancelled instance from the states that did not finish.

    Each continues with the payload it had, its attempts counted afresh; finished fork branches
    keep their results. An instance that succeeded or ended in a failure terminal state is refused.
    """
    record = etcd.call(lambda client: client.redrive(instance_id))
    iid, active = record["id"], record["active"]
    info.print(f"instance {iid} redriven (redrive {record['redrives']}): continues at {', '.join(active)}; "
               f"'dsm status {iid} --follow' follows it", markup=False,
               fields=logs.about(iid, record["machine"], ",".join(active)))


@_command(etcd=True)
def delete(instance_id: InstanceId, etcd: EtcdArgs = EtcdArgs()) -> None:
    """Delete a finished instance now: its record, history and index entries (retention does this
    by itself once the machine's retention has passed). A running instance is refused."""
    summary = etcd.call(lambda client: client.delete(instance_id))
    info.print(f"instance {summary['id']} ({summary['status']}) deleted", markup=False,
               fields=logs.about(summary["id"], summary["machine"]))


@_command("api", etcd=True)
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
    from dsm.api.guard import LOOPBACK_NAMES, is_loopback

    token = os.environ.get("DSM_API_TOKEN") or None
    loopback = is_loopback(host)
    if token is None and not loopback and not no_token:
        raise Fail(ExitCode.INVALID, f"--host {host} is not loopback: without a token, anyone who can reach it could "
                                     "start, signal, cancel, redrive and delete instances; set DSM_API_TOKEN, or "
                                     "pass --no-token to allow that")
    files = _definition_files(list(paths or []))
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
    graphs = [_load(f, no_import=local == 0) for f in files]
    allowed = (*sorted(LOOPBACK_NAMES), host, *(allow_host or ())) if loopback else None

    from dsm.api.serve import bind, local_worker

    try:
        sock = bind(host, port)
    except OSError as exc:
        raise Fail(ExitCode.INVALID, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    received: list[int] = []

    async def go() -> None:
        from dsm.api.app import create_app
        from dsm.api.serve import serve
        from dsm.definitions import register

        stop = _stop_on_signals(received)
        async with _api_store(etcd) as (store, keys, where):
            for g in graphs:
                await register(store, keys, g)
            async with local_worker(store, keys, graphs, local) as running_here:
                app = create_app(store, keys, token=token, allowed_hosts=allowed)
                machines = ", ".join(g.machine for g in graphs) or "none given"

                def started(url: str) -> None:
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

                await serve(app, sock, stop=stop, on_started=started)

    try:
        _run_async(go)
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


def _part_failed_code(exc: PartFailed) -> ExitCode:
    """Refused by etcd even with a fresh token: 2, as at start; etcd gone: 3; anything else: 1."""
    if isinstance(exc.cause, AccessDenied):
        return ExitCode.INVALID
    if isinstance(exc.cause, StoreUnavailable):
        return ExitCode.UNREACHABLE
    return ExitCode.PART_FAILED


def main() -> None:
    """Entry point of the `dsm` command.

    Ends with os._exit once output is flushed: a tick abandoned after --timeout or an interrupt may
    still be running in a handler thread, and the process must not wait for user code to return.
    """
    code = int(ExitCode.OK)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's C core logs each failed TLS handshake at INFO
    try:
        app(prog_name="dsm")  # standalone: usage errors exit 2, typer.Exit carries our codes
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else int(ExitCode.INVALID))
    except Fail as exc:
        if str(exc):
            err.print(f"dsm: {exc}", markup=False)
        code = int(exc.code)
    except KeyboardInterrupt:
        err.print("dsm: interrupted", markup=False)
        code = int(ExitCode.INTERRUPTED)
    except PartFailed as exc:  # a worker or server that cannot go on: a supervisor restarts it
        err.print(f"dsm: {exc}", markup=False)
        code = int(_part_failed_code(exc))
    except NoSpace as exc:
        err.print(f"dsm: etcd refuses writes, its NOSPACE alarm is raised ({exc}); an operator must make room and "
                  "disarm it (docs/operations.md)", markup=False)
        code = int(ExitCode.UNREACHABLE)
    except StoreUnavailable as exc:
        err.print(f"dsm: etcd unreachable: {exc}", markup=False)
        code = int(ExitCode.UNREACHABLE)
    except DsmError as exc:
        err.print(f"dsm: {exc}", markup=False)
        code = int(ExitCode.INVALID)
    except BrokenPipeError:  # a closed pipe met outside _emit and our consoles: end as if dropped
        code = int(ExitCode.OK)
    except Exception as exc:  # the unexpected: one line, the traceback with -v
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            log.exception("unexpected error")
        err.print(f"dsm: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
                  markup=False)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            _drop(stream)
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
