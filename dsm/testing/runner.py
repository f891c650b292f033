"""`dsm test`: run a test file's cases embedded, deterministically, with time skipped.

The driver keeps the instance in memory, as the embedded engine does, and moves it with the same
pure parts (`transition`, the planner's `apply` and `bounded`, the executors' `normalize` and
`failure_of`), but nothing overlaps and no clock is waited on:

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
from ..context import make_context
from ..engine import MAX_RECORD_BYTES
from ..errors import InputError
from ..graph import Graph, State
from ..records import HistoryEntry, Instance, Token, public_record
from ..transition import Failure, Outcome
from ..worker.executor import failure_of, normalize
from ..worker.planner import Arrival, apply, bounded
from .cases import Case, MockResult, TestFile, handler_key, load_test_file
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
        """One line per case, `PASS FILE::NAME` or `FAIL FILE::NAME: REASON` with further reasons
        indented below (what `dsm test` prints)."""
        return "".join(describe(c) for c in self.cases)


def describe(result: CaseResult) -> str:
    """A case's lines as `dsm test` prints them."""
    head = f"{result.file}::{result.name}"
    if result.passed:
        return f"PASS {head}\n"
    first, *more = result.reasons
    return f"FAIL {head}: {first}\n" + "".join(f"    {reason}\n" for reason in more)


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
    return CaseResult(tests.file, case.name, tuple(reasons), driver.inst, tuple(driver.history), dict(driver.calls))


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


class _Driver:
    """One case's instance, in memory, moved one step at a time on a virtual clock."""

    def __init__(self, graph: Graph, case: Case, max_steps: int):
        self.graph = graph
        self.case = case
        self.max_steps = max_steps
        self.now = time.time()
        self.limit = payloads.default_limit()
        self.inst = transition.start(graph, case.instance_id, payloads.copy(dict(case.payload)), self.now)
        self.history: list[HistoryEntry] = []
        self.results = {key: deque(mock.results) for key, mock in case.mocks.items()}
        self.calls: Counter[str] = Counter()
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> str | None:
        """Drive the instance as far as it goes; return why the case broke, or None."""
        try:
            self.send_signals()
            for _ in range(self.max_steps):
                if self.inst.finished:
                    return None
                token = self.next_due()
                if token is None:
                    later = [t.not_before for t in self.inst.tokens.values() if t.not_before > self.now]
                    finite = [at for at in later if at != float("inf")]
                    if not finite:
                        return None  # nothing will ever be due: the instance waits (status running)
                    self.now = min(finite)  # the time skipped
                    continue
                self.step(token, self.attempt(token, self.graph.states[token.state]))
            if self.inst.finished:
                return None
            return (f"the case did not finish within {self.max_steps} steps (still running at "
                    f"{', '.join(self.inst.active)}); a loop without a way out?")
        except _Broken as exc:
            return str(exc)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()

    # -- signals -----------------------------------------------------------------------------
    def send_signals(self) -> None:
        """The case's signals, all at the start, in order: an instance keeps them until a state
        waits for them, one per visit."""
        if not self.case.signals:
            return
        send = getattr(transition, "signal", None)
        if send is None:
            raise _Broken("signals are not supported yet: this version of dsm has no signal states")
        for sig in self.case.signals:
            try:
                step = send(self.graph, self.inst, sig.name, payload=dict(sig.payload), outcome=sig.outcome,
                            now=self.now)
            except InputError as exc:
                raise _Broken(f"signal {sig.name!r}: {exc}") from None
            self.inst = step.instance
            self.history.extend(step.history)

    # -- choosing and applying ---------------------------------------------------------------
    def next_due(self) -> Token | None:
        due = [t for t in self.inst.tokens.values() if t.not_before <= self.now]
        if not due:
            return None
        return min(due, key=lambda t: (self.graph.states[t.state].tick is not None, t.visit, _number(t.id)))

    def step(self, token: Token, outcome: Outcome) -> None:
        arrivals = [Arrival(token, 0, outcome)]
        after, history = apply(self.graph, self.inst, arrivals, now=self.now, worker=WORKER)
        after, _, too_large = bounded(self.inst, after, arrivals, now=self.now, max_record_bytes=MAX_RECORD_BYTES,
                                      serialize=False)
        self.inst = after
        if not too_large:
            self.history.extend(history)

    # -- one attempt -------------------------------------------------------------------------
    def attempt(self, token: Token, state: State) -> Outcome:
        # `call` and `signal` states are landing in the language; the driver reads them by name so
        # that it runs before and after they do. A `wait` state needs nothing of its own: its
        # token's not_before is the timer, and a due wait moves on as a tick-less state does.
        if getattr(state, "call", None):
            return self.child(token, state)
        if getattr(state, "signal", None):
            return self.signal_due(token, state)
        if state.tick is None:
            return Outcome()  # a tick-less state moves on
        key = handler_key(state.tick)
        if key in self.results:
            return self.mocked(key, token, state)
        return self.call(token, state)

    def child(self, token: Token, state: State) -> Outcome:
        """A `call` state: run the child machine as a case of its own (the same mocks, the payload's
        copy), and give its end as this state's outcome. The hook for child machines, once the
        language has them; until then there is no such state to reach."""
        raise _Broken(f"state {state.name!r} calls a child machine: dsm test does not run child machines yet")

    def signal_due(self, token: Token, state: State) -> Outcome:
        """A token at a `signal` state that is due: its timeout passed without the signal (a
        signal that came was consumed by `transition.signal`, which moved the token on). The hook
        for signal timeouts, once the language has them."""
        raise _Broken(f"state {state.name!r} waits for a signal: dsm test does not drive signal states yet")

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
            return _at(Outcome(failure=failure_of(error)), self.now, 0.0)
        return _at(normalize(_returned(result, payload), payload, state.name, self.limit), self.now, 0.0)

    def call(self, token: Token, state: State) -> Outcome:
        """The real handler, here and now."""
        tick = state.tick
        assert tick is not None
        if tick.func is None:
            return Outcome(failure=Failure("HandlerUnavailable", f"state {state.name!r}: handler {tick.ref!r} was "
                                           "not imported", retryable=True))
        inst = self.inst
        payload = payloads.copy(inst.payload_of(token))
        ctx = make_context(instance_id=inst.id, machine=inst.machine, state=state.name, attempt=token.attempt,
                           branch=token.branch, visit=token.visit,
                           deadline=time.time() + state.timeout if state.timeout else None)
        started = time.perf_counter()
        try:
            result = tick.func(payload, ctx)
            if tick.is_async or asyncio.iscoroutine(result):
                result = self.wait(result)
        except (Exception, SystemExit, asyncio.CancelledError) as exc:
            outcome = Outcome(failure=failure_of(exc))
        else:
            outcome = normalize(result, payload, state.name, self.limit)
        return _at(outcome, self.now, time.perf_counter() - started)

    def wait(self, coro: Any) -> Any:
        """Await an async handler on this thread; inside a running event loop (a test that is a
        coroutine itself), on a thread of its own, still one at a time."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
            return self.loop.run_until_complete(coro)
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


def _at(outcome: Outcome, started_at: float, duration: float) -> Outcome:
    return Outcome(outcome.payload, outcome.label, outcome.failure, started_at, duration)


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


def _number(token_id: str) -> int:
    digits = token_id.lstrip("t")
    return int(digits) if digits.isdigit() else 0


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
