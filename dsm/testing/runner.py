"""`dsm test`: run a test file's cases embedded, deterministically, with time skipped.

The instance is kept in memory and moved by the same driver as the embedded engine's
(`dsm.driver.InstanceDriver`: the step, children, signals and handler calls), but nothing overlaps
and no clock is waited on:

- One tick at a time, on this thread (an `async def` handler is awaited here, on a loop of the
  case's own). Of the work that is due, a tick-less state moves on first, as a worker folds it
  into its commit; then the token that has waited longest, by its visit number: fork branches
  and map items take turns in declaration order.
- Time is virtual. When nothing is due, the clock jumps to the earliest `not_before` (a retry's
  backoff, a timer, a signal's timeout), so a backoff of an hour passes at once, and waits end in
  the order they would have. Handlers see the real clock (`ctx.deadline` is real time); a state's
  `timeout` is not enforced on a real handler, which runs to its end: mock `{raise: TimeoutError}`
  to test what a timeout does.
- A mocked handler is not called: each call takes the next of its results. A mocked `return` of a
  mapping is merged into the payload the tick was given, top-level key by key (the mock says what
  the handler adds or changes, not the whole payload); a label is returned as it is.
- The instance id is the case's `id`, by default `test-N`, so payloads that use it are stable.
- Signals: the case's signals are sent in the order given, each when a signal state waits for
  its name and nothing else can run (before any time is skipped, so before a signal's timeout).
  A signal goes to whichever instance waits for it: the case's own, or a child.
- A `call` state's child machine runs right there, as part of the case, with the same mocks and
  signals; its end lets the parent go on. Its transitions are not in the case's `path`.
- A case ends when the instance does, or when nothing more can happen (it waits for a signal or
  a child that never comes: its status is still `running`), or when something breaks it (a mock
  that ran out, more than `max_steps` steps): then it fails, saying why.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .. import payloads, transition
from ..context import Context
from ..driver import InstanceDriver
from ..errors import InputError
from ..graph import Graph, Handler, State
from ..records import HistoryEntry, Instance, Token, public_record
from ..step import Arrival
from ..ticks import failure_of, normalize, timed
from ..transition import Outcome
from .cases import Case, MockResult, Signal, TestFile, handler_key, load_test_file
from .expect import differences, path_of

WORKER = "dsm-test"  # the `worker` of every history entry a test writes
MAX_STEPS = 100_000  # ticks and tick-less moves of one case, a guard against a case that never ends
TEST_SUFFIXES = (".test.yaml", ".test.yml")


@dataclass(frozen=True, slots=True)
class CaseResult:
    """How one case went: `reasons` says what differed from what it expected (empty: it passed)."""

    file: str
    name: str
    reasons: tuple[str, ...]
    instance: Instance
    history: tuple[HistoryEntry, ...]
    calls: dict[str, int] = field(default_factory=dict)  # handler -> mocked calls it took
    children: tuple[Instance, ...] = ()  # the child instances its call states started (and theirs), as they ended

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def path(self) -> list[str]:
        """The states the instance went through, the terminal one included (what `expect.path` is
        compared with)."""
        return path_of(self.instance, self.history)

    @property
    def record(self) -> dict[str, Any]:
        """The instance record, as `dsm run --json` prints it."""
        return public_record(self.instance, list(self.history))


@dataclass(frozen=True, slots=True)
class FileResult:
    file: str
    cases: tuple[CaseResult, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    @property
    def failures(self) -> tuple[CaseResult, ...]:
        return tuple(c for c in self.cases if not c.passed)

    def report(self) -> str:
        """One line per case, `PASS FILE::NAME` or `FAIL FILE::NAME: REASON; REASON...` (what `dsm
        test` prints)."""
        return "".join(describe(c) for c in self.cases)


def describe(result: CaseResult) -> str:
    """A case's line as `dsm test` prints it: every difference on it, separated by `; `."""
    head = f"{result.file}::{result.name}"
    if result.passed:
        return f"PASS {head}\n"
    return f"FAIL {head}: {'; '.join(result.reasons)}\n"


def run_file(path: str | Path, *, max_steps: int = MAX_STEPS) -> FileResult:
    """Run every case of a test file. A bad test file raises DefinitionError (every problem at its
    file:line:col) and runs nothing."""
    tests = load_test_file(path)
    return FileResult(tests.file, tuple(run_case(tests, case, max_steps=max_steps) for case in tests.cases))


def run_case(tests: TestFile, case: Case | str, *, max_steps: int = MAX_STEPS) -> CaseResult:
    """Run one case of a loaded test file (given as itself or by name)."""
    if isinstance(case, str):
        found = next((c for c in tests.cases if c.name == case), None)
        if found is None:
            raise KeyError(f"{tests.file} has no case {case!r}; its cases: {', '.join(c.name for c in tests.cases)}")
        case = found
    driver = _Driver(tests.machine, case, max_steps)
    try:
        broken = driver.run()
    finally:
        driver.close()
    reasons = [broken] if broken else differences(case.expect, driver.inst, driver.history)
    return CaseResult(tests.file, case.name, tuple(reasons), driver.inst, tuple(driver.history), dict(driver.calls),
                      tuple(driver.descendants()))


def find_test_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as they are named; in folders, the `*.test.yaml` / `*.test.yml` files in them and
    below (hidden folders aside), in order. A folder without any raises InputError."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(p for p in path.rglob("*") if p.name.endswith(TEST_SUFFIXES) and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise InputError(f"{path}: no test files (*.test.yaml) in this folder")
        files.extend(found)
    return files


class _Broken(Exception):
    """The case cannot go on (a mock ran out, a construct the runner cannot drive): why, in a line."""


@dataclass
class _Shared:
    """What the drivers of one case share: the virtual clock, the mocks' results, the signals not
    sent yet, the step count and the event loop of async handlers."""

    now: float
    limit: int
    results: dict[str, deque[MockResult]]
    signals: deque[Signal]
    calls: Counter[str] = field(default_factory=Counter)
    steps: int = 0
    loop: asyncio.AbstractEventLoop | None = None

    def clock(self) -> float:
        return self.now


class _Driver(InstanceDriver):
    """One case's instance, in memory, moved one step at a time on a virtual clock; the children its
    call states start are drivers too, sharing the case's clock, mocks and signals."""

    def __init__(self, graph: Graph, case: Case, max_steps: int, *, shared: _Shared | None = None,
                 inst: Instance | None = None):
        self.shared = shared if shared is not None else _Shared(
            now=time.time(), limit=payloads.default_limit(),
            results={key: deque(mock.results) for key, mock in case.mocks.items()}, signals=deque(case.signals))
        super().__init__(graph, inst if inst is not None else transition.start(
            graph, case.instance_id, payloads.copy(dict(case.payload)), self.shared.now),
            clock=self.shared.clock, worker=WORKER, payload_limit=self.shared.limit)
        self.case = case
        self.max_steps = max_steps
        self.results = self.shared.results
        self.calls = self.shared.calls

    def run(self) -> str | None:
        """Drive the instance as far as it goes; return why the case broke, or None."""
        try:
            self.drive()
            return None
        except _Broken as exc:
            return str(exc)

    def drive(self) -> None:
        """Move the instance (and its children) until it ends or nothing more can happen."""
        shared = self.shared
        while not self.inst.finished:
            shared.steps += 1
            if shared.steps > self.max_steps:
                raise _Broken(f"the case did not finish within {self.max_steps} steps (still running at "
                              f"{', '.join(self.inst.active)}); a loop without a way out?")
            token = self.next_due(shared.now)
            if token is not None:
                self.step([Arrival(token, 0, self.attempt(token, self.graph.states[token.state]))], shared.now)
                continue
            if self.deliver():
                continue
            later = self.next_wake()
            if later is None:
                return  # nothing will ever be due: the instance waits (status running)
            shared.now = later  # the time skipped

    def close(self) -> None:
        if self.shared.loop is not None:
            self.shared.loop.close()

    # -- children: driven right there, to their end ------------------------------------------------
    def spawn(self, graph: Graph, child: Instance) -> InstanceDriver:
        return _Driver(graph, self.case, self.max_steps, shared=self.shared, inst=child)

    def launch(self, child: InstanceDriver) -> None:
        assert isinstance(child, _Driver)
        child.drive()
        self.child_ended(child)

    # -- signals -----------------------------------------------------------------------------
    def deliver(self) -> bool:
        """Send the case's next signal that a signal state of this instance waits for now; whether
        one was sent."""
        waiting = {t.waits.partition(":")[2] for t in self.inst.tokens.values()
                   if t.waits and t.waits.startswith("signal:") and t.not_before != 0.0}
        pending = self.shared.signals
        sig = next((s for s in pending if s.name in waiting), None)
        if sig is None:
            return False
        pending.remove(sig)
        try:
            self.signal(sig.name, dict(sig.payload), sig.outcome)  # as a cluster refuses it
        except InputError as exc:
            raise _Broken(f"signal {sig.name!r}: {exc}") from None
        return True

    # -- one attempt -------------------------------------------------------------------------
    def attempt(self, token: Token, state: State) -> Outcome:
        # A `wait` state needs nothing of its own: its token's not_before is the timer, and a due
        # wait moves on as a tick-less state does; so does a `call` state, with its child's result.
        if state.tick is None:
            return self.tickless(token)
        key = handler_key(state.tick)
        if key in self.results:
            return self.mocked(key, token, state)
        return self.call_here(token, state)

    def mocked(self, key: str, token: Token, state: State) -> Outcome:
        self.calls[key] += 1
        results = self.results[key]
        mock = self.case.mocks[key]
        if not results:
            given = len(mock.results)
            raise _Broken(f"the mock of {mock.ref} ran out: it gives {given} result(s), and state {state.name!r} "
                          f"called it a {_ordinal(self.calls[key])} time (attempt {token.attempt}); add results "
                          "to its list")
        result = results.popleft()
        payload = payloads.copy(self.inst.payload_of(token))
        if result.kind == "raise":
            error = _exception(result.error or "Exception", result.message or f"raised by the mock of {mock.ref}")
            return timed(Outcome(failure=failure_of(error)), self.shared.now, 0.0)
        return timed(normalize(_returned(result, payload), payload, state.name, self.payload_limit),
                     self.shared.now, 0.0)

    def invoke(self, tick: Handler, payload: dict[str, Any], ctx: Context) -> Any:
        result = super().invoke(tick, payload, ctx)
        if tick.is_async or asyncio.iscoroutine(result):
            result = self.wait(result)
        return result

    def wait(self, coro: Any) -> Any:
        """Await an async handler on this thread; inside a running event loop (a test that is a
        coroutine itself), on a thread of its own, still one at a time."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self.shared.loop is None:
                self.shared.loop = asyncio.new_event_loop()
            return self.shared.loop.run_until_complete(coro)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dsm-test") as pool:
            return pool.submit(asyncio.run, coro).result()


def _returned(result: MockResult, payload: dict[str, Any]) -> Any:
    """What the mocked handler returns: a mapping merged into its payload, a label as it is."""
    value = result.value
    if isinstance(value, dict):
        return {**payload, **value}
    if isinstance(value, tuple):
        label, changes = value
        return label, {**payload, **changes}
    return value


@cache
def _error_class(name: str) -> type[Exception]:
    """The exception class a mock raises: the builtin of that name, or a new one (one per name)."""
    found = getattr(builtins, name, None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return type(name, (Exception,), {"__module__": "dsm.testing.mock", "__doc__": "Raised by a mock."})


def _exception(name: str, message: str) -> Exception:
    cls = _error_class(name)
    try:
        return cls(message)
    except Exception:  # a builtin that wants other arguments (UnicodeDecodeError): its name, our message
        return type(name, (cls,), {"__init__": Exception.__init__, "__str__": Exception.__str__})(message)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def summary(results: Sequence[FileResult]) -> tuple[int, int]:
    """(cases passed, cases failed) over files."""
    cases = [c for r in results for c in r.cases]
    passed = sum(1 for c in cases if c.passed)
    return passed, len(cases) - passed


__all__ = ["CaseResult", "FileResult", "MAX_STEPS", "describe", "find_test_files", "run_case", "run_file",
           "summary"]
