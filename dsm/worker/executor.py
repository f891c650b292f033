"""Where tick handlers run, and how what they return becomes an `Outcome`.

An executor takes a `TickCall` and gives back an `Attempt`: a handle the worker awaits for the
outcome and can abandon (the token was cancelled, the claim lost). Whatever the handler does,
the attempt ends by its timeout: the executor, not the handler, keeps that promise.

`ThreadExecutor` runs handlers in this process: one thread per slot, each with its own event
loop for `async def` handlers, so a handler that blocks stalls only its own slot. A handler that
ignores its timeout keeps its thread, but not its slot: the thread is retired when it returns
and a fresh one takes its place, so the pool never shrinks. A call that timed out before a thread
took it is never run. What threads cannot give is protection from a handler that holds the GIL
(a C extension, a catastrophic regex): `dsm.worker.isolation.ProcessExecutor` runs handlers in
child processes for that.

The pure parts, `normalize` and `failure_of`, are shared by every executor.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Protocol

from .. import logs, payloads
from ..context import Context, make_context
from ..errors import AttemptAbandoned, HandlerError
from ..graph import Handler
from ..transition import Failure, Outcome

TRACEBACK_LIMIT = 4096  # characters of a failed attempt's traceback that are kept


@dataclass(frozen=True, slots=True)
class TickCall:
    """One attempt of one tick: the handler, a private copy of the payload, and what `ctx` says."""

    handler: Handler
    payload: dict[str, Any]
    instance_id: str
    machine: str
    state: str
    attempt: int
    branch: tuple[str, ...]
    visit: int
    timeout: float | None
    deadline: float | None  # wall-clock time, for ctx.deadline only
    payload_limit: int
    worker: str | None = None  # who runs it, for the lines ctx.logger writes


class Attempt(Protocol):
    """A running attempt."""

    def abandon(self, reason: str) -> None:
        """The attempt no longer counts: ctx.heartbeat() raises from now on; its result is ignored."""

    async def outcome(self) -> Outcome:
        """Wait for the attempt to end (by its timeout at the latest)."""


class Executor(Protocol):
    def start(self, call: TickCall) -> Attempt: ...

    def close(self) -> None:
        """Stop taking calls; attempts still running end on their own, or (processes) are given a
        short grace and then stopped."""


# -- pure parts ------------------------------------------------------------------------------------

def normalize(result: Any, payload: dict[str, Any], state: str, limit: int) -> Outcome:
    """What a handler returned -> an Outcome: a checked payload and maybe a label, or a failure."""
    label: str | None = None
    new: Any
    if result is None:
        new = payload
    elif isinstance(result, dict):
        new = result
    elif isinstance(result, str):
        label, new = result, payload
    elif (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str)
          and isinstance(result[1], dict)):
        label, new = result
    else:
        return Outcome(failure=Failure("InvalidResult", f"state {state!r}: the handler returned "
                                       f"{type(result).__name__}; expected None, a dict, an outcome label "
                                       "(str) or a (label, dict) pair", retryable=False))
    try:
        checked, _ = payloads.check(new, limit=limit)
    except payloads.PayloadError as exc:
        return Outcome(failure=Failure(exc.kind, f"state {state!r}: {exc}", retryable=False))
    return Outcome(payload=checked, label=label)


def failure_of(exc: BaseException) -> Failure:
    """An exception raised by a handler -> the Failure recorded for its attempt."""
    tb = format_traceback(exc)
    if isinstance(exc, HandlerError):
        return Failure(exc.type_name, str(exc), retryable=exc.retryable, traceback=tb)
    if isinstance(exc, AttemptAbandoned):
        return Failure("AttemptAbandoned", str(exc), retryable=True)
    bases = tuple(c.__name__ for c in type(exc).__mro__[1:] if c not in (object, BaseException))
    message = str(exc) or repr(exc)
    return Failure(type(exc).__name__, message, retryable=True, bases=bases, traceback=tb)


def format_traceback(exc: BaseException) -> str:
    """The traceback of a handler's exception, its last TRACEBACK_LIMIT characters."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next  # the frames that called the handler are the worker's, not the user's
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return text[-TRACEBACK_LIMIT:]


def report_failure(logger: logging.Logger, call: TickCall, outcome: Outcome) -> bool:
    """Log a failed attempt (its traceback at debug level); an abandoned one is nobody's news."""
    failure = outcome.failure
    if failure is None or failure.type == "AttemptAbandoned":
        return False
    about = logs.about(call.instance_id, call.machine, call.state, call.attempt, call.worker)
    logger.warning("tick failed: %s: %s", failure.type, failure.message, extra=about)
    if failure.traceback and logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s", failure.traceback, extra=about)
    return True


_CALLERS = (os.path.dirname(os.path.abspath(__file__)),
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "isolation"),  # handler processes
            os.path.dirname(os.path.abspath(asyncio.__file__)))


def _ours(filename: str) -> bool:
    """A frame of the worker (or of a handler process), or of the event loop that awaits an async handler."""
    return os.path.dirname(os.path.abspath(filename)) in _CALLERS


def timed_out(call: TickCall) -> Outcome:
    return Outcome(failure=Failure("TimeoutError", f"state {call.state!r}: attempt {call.attempt} timed out after "
                                   f"{call.timeout:g}s", retryable=True, bases=("Exception",)))


def past_deadline(call: TickCall, outcome: Outcome, abandoned: bool) -> Outcome:
    """A handler that stopped because `ctx.heartbeat()` said its deadline had passed timed out:
    its attempt fails as one that ran over (TimeoutError), whichever noticed first."""
    failure = outcome.failure
    if failure is not None and failure.type == "AttemptAbandoned" and call.timeout and not abandoned:
        return timed_out(call)
    return outcome


def context_of(call: TickCall) -> Context:
    return make_context(instance_id=call.instance_id, machine=call.machine, state=call.state,
                        attempt=call.attempt, branch=call.branch, visit=call.visit, deadline=call.deadline,
                        worker=call.worker)


# -- threads -----------------------------------------------------------------------------------------

_STOP = object()


class _ThreadAttempt:
    __slots__ = ("call", "ctx", "future", "taken", "retire", "timer", "_executor", "_coro_task", "_thread_loop")

    def __init__(self, executor: ThreadExecutor, call: TickCall, future: asyncio.Future):
        self._executor = executor
        self.call = call
        self.ctx = context_of(call)
        self.future = future
        self.taken = False  # a thread has started it (set under the executor's lock)
        self.retire = False  # its thread leaves the pool when the handler returns
        self.timer: asyncio.TimerHandle | None = None  # ends the attempt at its timeout
        self._coro_task: asyncio.Task | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    def abandon(self, reason: str) -> None:
        self.ctx.abandon(reason)

    async def outcome(self) -> Outcome:
        done = await self.future
        return past_deadline(self.call, done, self.ctx.abandoned) if self.call.timeout else done

    def _expire(self) -> None:
        """The timeout passed (a timer on the event loop, cheaper than wait_for and shield)."""
        if self.future.done():
            return
        self.ctx.abandon(f"attempt timed out after {self.call.timeout:g}s")
        self._executor._timed_out(self)
        self.future.set_result(timed_out(self.call))


class ThreadExecutor:
    """Handlers on threads of this process, `size` at a time."""

    def __init__(self, size: int, *, name: str = "dsm-tick"):
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serial = 0
        self._threads = 0
        self.retired = 0  # threads given up to handlers that outlived their timeout

    def start(self, call: TickCall) -> _ThreadAttempt:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            for _ in range(self.size):
                self._spawn()
        attempt = _ThreadAttempt(self, call, loop.create_future())
        if call.timeout:
            attempt.timer = loop.call_later(call.timeout, attempt._expire)
        self._jobs.put(attempt)
        return attempt

    def close(self) -> None:
        for _ in range(self._threads):
            self._jobs.put(_STOP)

    def _spawn(self) -> None:
        with self._lock:
            self._serial += 1
            self._threads += 1
        threading.Thread(target=self._serve, name=f"{self.name}-{self._serial}", daemon=True).start()

    def _timed_out(self, attempt: _ThreadAttempt) -> None:
        """Called on the event loop: a queued attempt is skipped; a running one costs its thread."""
        with self._lock:
            if not attempt.taken:
                attempt.taken = True  # no thread will start it now
                return
            attempt.retire = True
        if attempt._coro_task is not None and attempt._thread_loop is not None:
            attempt._thread_loop.call_soon_threadsafe(attempt._coro_task.cancel)
        self.retired += 1
        self._spawn()

    def _serve(self) -> None:
        handler_loop: asyncio.AbstractEventLoop | None = None
        try:
            while True:
                item = self._jobs.get()
                if item is _STOP:
                    return
                attempt: _ThreadAttempt = item
                with self._lock:
                    if attempt.taken:  # timed out while queued
                        continue
                    attempt.taken = True
                call = attempt.call
                func = call.handler.func
                try:
                    if func is None:
                        raise RuntimeError(f"handler {call.handler.ref!r} was not imported")
                    if call.handler.is_async:
                        if handler_loop is None:
                            handler_loop = asyncio.new_event_loop()
                        attempt._thread_loop = handler_loop
                        attempt._coro_task = handler_loop.create_task(func(call.payload, attempt.ctx))
                        result = handler_loop.run_until_complete(attempt._coro_task)
                    else:
                        result = func(call.payload, attempt.ctx)
                    outcome = normalize(result, call.payload, call.state, call.payload_limit)
                except (Exception, SystemExit, KeyboardInterrupt, asyncio.CancelledError) as exc:
                    outcome = Outcome(failure=failure_of(exc))
                self._deliver(attempt, outcome)
                if attempt.retire:
                    with self._lock:
                        self._threads -= 1
                    return
        finally:
            if handler_loop is not None:
                handler_loop.close()

    def _deliver(self, attempt: _ThreadAttempt, outcome: Outcome) -> None:
        """Hand the outcome to the event loop; a burst of quick ticks costs one wake-up."""
        self._done.append((attempt, outcome))
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._settle)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _settle(self) -> None:
        with self._lock:
            self._wake_pending = False
        while self._done:
            attempt, outcome = self._done.popleft()
            if attempt.timer is not None:
                attempt.timer.cancel()
            if not attempt.future.done():
                attempt.future.set_result(outcome)
