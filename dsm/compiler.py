"""From a parsed document to a checked, frozen Graph, reporting every problem with file:line:col.

Three steps, each in its own module: the JSON Schema (schema.py); each state, by the table of the
kinds of state (kinds.py: the keys each kind takes, needs and excludes, and how it is built); the
machine as a graph (graphcheck.py). This module runs them in that order and gives the kinds what
they ask of the file: references to other states, durations, retry policies, handlers and the
machines a state calls.

Checks run even when the schema already failed somewhere, on whatever parts are well formed, so
that one run of `dsm validate` shows every problem of a file.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import graphcheck, handlers, kinds, loader, schema
from .durations import parse_duration, shown
from .errors import DefinitionError, InputError, Problem
from .graph import DEFAULT_MAX_TRANSITIONS, DEFAULT_RETENTION, Call, Graph, Handler, RetryPolicy, State, digest_of
from .guards import Guard, GuardError, compile_guard
from .loader import Document

MAX_HINTS = 20  # "did you mean" suggestions per file


class _Compiler:
    """The compilation of one file: its problems, and what building its states asks of it
    (kinds.Compiling)."""

    def __init__(self, doc: Document, import_handlers: bool, allow: handlers.Allowlist,
                 search_path: tuple[str, ...] = (), calls: Mapping[str, Graph] | None = None,
                 chain: tuple[str, ...] = ()):
        self.doc = doc
        self.import_handlers = import_handlers
        self.allow = allow
        self.search_path = search_path
        self.calls = calls  # the children of a definition read from the store, by call path
        self.chain = chain  # the files being compiled that call this one, outermost first
        self.children: dict[str, Graph] = {}  # call path -> child graph, as compiled here
        self.problems: list[Problem] = []
        self.broken_modules: set[str] = set()  # handler modules that did not import, reported once each
        data = doc.data if isinstance(doc.data, dict) else {}
        raw_states = data.get("states")
        self.raw: dict[str, dict[str, Any]] = {
            name: body for name, body in (raw_states.items() if isinstance(raw_states, dict) else ())
            if isinstance(name, str) and isinstance(body, dict)
        }
        self.data = data
        self.hints_left = MAX_HINTS

    # -- reporting ---------------------------------------------------------------------------
    def report(self, path: tuple, message: str, *, key: bool = False) -> None:
        self.problems.append(self.doc.problem(path, message, key=key))

    def state_key(self, name: str) -> tuple:
        return ("states", name)

    def check_ref(self, path: tuple, target: Any, what: str) -> bool:
        if not isinstance(target, str):
            return False
        if target in self.raw:
            return True
        hint: list[str] = []
        if self.hints_left > 0:  # each suggestion compares against every state: a few, not thousands
            self.hints_left -= 1
            hint = difflib.get_close_matches(target, list(self.raw), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        self.report(path, f"{what} refers to unknown state {target!r}{suggestion}")
        return False

    # -- values the states are built from ---------------------------------------------------
    def defaults(self) -> tuple[float | None, dict[str, Any] | None]:
        raw = self.data.get("defaults")
        if not isinstance(raw, dict):
            return None, None
        timeout = self.duration(("defaults", "timeout"), raw.get("timeout"))
        retry = raw.get("retry") if isinstance(raw.get("retry"), dict) else None
        return timeout, retry

    def duration(self, path: tuple, value: Any) -> float | None:
        if value is None:
            return None
        try:
            return parse_duration(value, what=loader.dotted(path))
        except InputError as exc:
            where = loader.dotted(path)
            if not any(p.path == where and p.file == self.doc.file for p in self.problems):
                self.report(path, str(exc))  # what the schema lets through: .inf, .nan, 10**400 seconds
            return None

    def retry_policy(self, path: tuple, raw: dict[str, Any] | None) -> RetryPolicy:
        if not raw:
            return RetryPolicy()
        base = RetryPolicy()
        attempts = raw.get("max_attempts")
        multiplier = raw.get("multiplier")
        if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool) and multiplier >= 1 \
                and not _finite(multiplier):
            self.report(path + ("multiplier",), f"{loader.dotted(path + ('multiplier',))}: must be a finite number "
                        f">= 1, got {shown(multiplier)}")
            multiplier = None
        jitter = raw.get("jitter")
        names = raw.get("non_retryable")
        return RetryPolicy(
            max_attempts=attempts if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 1
            else base.max_attempts,
            backoff=_or(self.duration(path + ("backoff",), raw.get("backoff")), base.backoff),
            multiplier=float(multiplier) if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool)
            and multiplier >= 1 else base.multiplier,
            max_backoff=_or(self.duration(path + ("max_backoff",), raw.get("max_backoff")), base.max_backoff),
            jitter=jitter if isinstance(jitter, bool) else base.jitter,
            non_retryable=tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else (),
        )

    def handler(self, path: tuple, ref: Any) -> Handler | None:
        if not isinstance(ref, str):
            return None
        try:
            if self.import_handlers:
                if handlers.split_ref(ref)[0] in self.broken_modules:
                    return None  # reported once, at the first state that uses it
                return handlers.resolve(ref, allow=self.allow, search_path=self.search_path)
            module, function = handlers.split_ref(ref)
            reason = handlers.refusal(module, function, self.allow)
            if reason:
                raise handlers.HandlerImportError(reason)
            return handlers.unresolved(ref)
        except handlers.HandlerImportError as exc:
            if isinstance(exc, handlers.ModuleImportError):
                self.broken_modules.add(exc.module)
            self.report(path, f"{loader.dotted(path)}: {exc}")
            return None

    def where(self, path: tuple) -> tuple[int, int]:
        return self.doc.where(path, key=True)

    def call(self, path: tuple, target: Any) -> Call | None:
        """The child machine of a `call`: from the store's record of the definition when it was read
        from there, else the file relative to this one, compiled with the same settings."""
        if not isinstance(target, str):
            return None
        if target in self.children:
            return Call(target, self.children[target])
        if self.calls is not None:
            child = self.calls.get(target)
            if child is None:
                self.report(path, f"{loader.dotted(path)}: the stored definition does not include the machine "
                            f"{target!r} it calls")
                return None
            self.children[target] = child
            return Call(target, child)
        if "\0" in target:  # the OS takes no such path: asking it would raise, not answer
            self.report(path, f"{loader.dotted(path)}: the path {target!r} holds a NUL character, which no file "
                        "name can hold")
            return None
        base = Path(self.doc.file).resolve().parent if self.doc.file and not self.doc.file.startswith("<") \
            else Path.cwd()
        try:
            file = (base / target).resolve()
            found = file.is_file()
        except (OSError, ValueError) as exc:  # a name too long, a loop of links, a path the OS refuses
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.report(path, f"{loader.dotted(path)}: cannot look for the machine file {shown(target, 80)}: {reason}")
            return None
        if str(file) in self.chain or str(file) == _resolved(self.doc.file):
            cycle = " -> ".join(Path(f).name for f in (*self.chain, _resolved(self.doc.file), str(file)))
            self.report(path, f"{loader.dotted(path)}: calls lead back to the caller ({cycle})")
            return None
        if not found:
            self.report(path, f"{loader.dotted(path)}: no machine file {target!r} (looked for {file})")
            return None
        try:
            child = load(file, import_handlers=self.import_handlers, allow=self.allow, search_path=self.search_path,
                         _chain=(*self.chain, _resolved(self.doc.file)))
        except DefinitionError as exc:
            self.report(path, f"{loader.dotted(path)}: the called machine {target!r} is not valid (its "
                        "problems follow, at its own path)")
            self.problems.extend(exc.problems)
            return None
        self.children[target] = child
        return Call(target, child)

    # -- whole graph -------------------------------------------------------------------------
    def compile(self) -> Graph | None:
        limit = loader.max_states()
        declared = self.data.get("states")
        if isinstance(declared, dict) and len(declared) > limit:
            first_over = list(declared)[limit]
            self.report(self.state_key(first_over), f"too many states: the machine has {len(declared)}, the "
                        f"limit is {limit} (set DSM_MAX_STATES to raise it)", key=True)
            return None  # checking a machine this large is the cost the limit is there to avoid
        self.problems.extend(schema.validate(self.doc))
        search = self.search()
        defaults = self.defaults()
        states: dict[str, State] = {}
        for name, body in self.raw.items():
            built = kinds.build(self, name, body, defaults)
            if built is not None:
                states[name] = built
        start = self.data.get("start")
        if isinstance(start, str):
            self.check_ref(("start",), start, "start")
        if not isinstance(start, str) or start not in states or len(states) != len(self.raw):
            return None  # structure checks need every state compiled; what is wrong was reported
        structure = graphcheck.check(states, start, self.report)
        if self.problems:
            return None
        max_transitions = self.data.get("max_transitions", DEFAULT_MAX_TRANSITIONS)
        return Graph(
            machine=self.data["machine"],
            start=start,
            states=MappingProxyType(states),
            forks=MappingProxyType(structure.forks),
            frames=MappingProxyType(structure.frames),
            join_of=MappingProxyType(structure.join_of),
            version=self.data.get("version"),
            description=self.data.get("description", ""),
            max_transitions=max_transitions,
            digest=digest_of(self.doc.text, {p: g.digest for p, g in self.children.items()}),
            file=self.doc.file,
            source=self.doc.text,
            retention=_or(self.duration(("retention",), self.data.get("retention")), DEFAULT_RETENTION),
            search=search,
        )

    def search(self) -> Mapping[str, Guard]:
        """The search attributes' expressions (the schema checked their names and how many)."""
        declared = self.data.get("search")
        if not isinstance(declared, dict):
            return MappingProxyType({})
        out: dict[str, Guard] = {}
        for name, source in declared.items():
            if not isinstance(name, str) or not isinstance(source, str):
                continue
            try:
                out[name] = compile_guard(source)
            except GuardError as exc:
                self.report(("search", name), f"search.{name}: {exc}")
        return MappingProxyType(out)


def _finite(number: float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer beyond any float
        return False


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _resolved(file: str) -> str:
    return str(Path(file).resolve()) if file and not file.startswith("<") else file


def compile_document(doc: Document, *, import_handlers: bool = True, allow: handlers.Allowlist = handlers.ANY,
                     search_path: Iterable[str | Path] = (), calls: Mapping[str, Graph] | None = None,
                     _chain: tuple[str, ...] = ()) -> Graph:
    """Check a parsed document and build its Graph; raise DefinitionError listing every problem.

    Handler modules are imported with `search_path` first on the import path, for those imports
    only (see handlers.py). `calls` gives the machines a stored definition calls, by call path
    (a definition read from a file finds them next to it)."""
    compiler = _Compiler(doc, import_handlers, allow, tuple(str(p) for p in search_path), calls, _chain)
    graph = compiler.compile()
    if compiler.problems or graph is None:
        problems = compiler.problems or [doc.problem((), "definition could not be compiled")]
        raise DefinitionError(problems)
    return graph


def compile_text(text: str, file: str = "<string>", *, import_handlers: bool = True,
                 allow: handlers.Allowlist = handlers.ANY, search_path: Iterable[str | Path] = (),
                 calls: Mapping[str, Graph] | None = None) -> Graph:
    """Compile a definition given as text; its modules are found on `search_path` and the
    process's own import path, never in a folder of its own (text has none)."""
    return compile_document(loader.parse(text, file), import_handlers=import_handlers, allow=allow,
                            search_path=search_path, calls=calls)


def load(path: str | Path, *, import_handlers: bool = True, allow: handlers.Allowlist = handlers.ANY,
         search_path: Iterable[str | Path] = (), _chain: tuple[str, ...] = ()) -> Graph:
    """Read, check and compile a machine file; its folder goes first on the import path while its
    handler modules are imported (after `search_path`). Machines it calls are compiled with it."""
    return compile_document(loader.read(path), import_handlers=import_handlers, allow=allow,
                            search_path=[*search_path, Path(path).resolve().parent], _chain=_chain)
