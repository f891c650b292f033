"""Where tick handlers run.

An executor takes a `TickCall` and gives back an `Attempt`: a handle the worker (or the embedded
engine) awaits for the outcome and can abandon (the token was cancelled, the claim lost). Whatever the handler does,
the attempt ends by its timeout: the executor, not the handler, keeps that promise.

`ThreadExecutor` runs handlers in this process: one thread per slot, each with its own event
loop for `async def` handlers, so a handler that blocks stalls only its own slot. A handler that
ignores its timeout keeps its thread, but not its slot: the thread is retired when it returns
and a fresh one takes its place, so the pool never shrinks. A call that timed out before a thread
took it is never run. What threads cannot give is protection from a handler that holds the GIL
(a C extension, a catastrophic regex): `dsm.worker.isolation.ProcessExecutor` runs handlers in
child processes for that.

What a handler's result or exception becomes (`normalize`, `failure_of`) is `dsm.ticks`'s, the
same for every executor.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from typing import Protocol

from .ticks import TickCall, context_of, failure_of, normalize, past_deadline, timed_out
from .transition import Outcome


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
