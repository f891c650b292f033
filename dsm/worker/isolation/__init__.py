"""Tick handlers in child processes, so user code cannot stall the worker or outlive its timeout.

Threads share the worker's GIL and, for `async def` handlers, an event loop: a handler that holds
the GIL (a catastrophic regex, a C extension) freezes the worker's own loop, its lease lapses, and
other instances' ticks run twice. `ProcessExecutor` moves handlers out of the worker's process.

Design:

* Up to one child process per slot (`size` of them, the worker's concurrency). A child runs one
  attempt at a time, in the order it was sent them; a call waits in the parent until a child can
  take it (below); a call whose timeout passes while it waits is never started. Children start
  when the first call needs them and are replaced when they die or are killed. They are started as
  a fresh interpreter (`sys.executable -c`), never forked from the worker, whose gRPC threads make
  `fork` unsafe. Each child gets the worker's `sys.path` (plus `search_path`), so it finds the
  handler modules the worker found, imports each handler once (`dsm.handlers.resolve`) and keeps
  it, and runs `async def` handlers on its own event loop.
* Quick handlers are paced onto a few busy children rather than spread over all of them: waking a
  sleeping process is most of what a trivial tick costs (about 120 us of children's CPU per tick
  with 64 children taking turns, 50 us with a handful). A call queues in the least loaded child
  that runs paced calls (below), or takes an idle child when their queues are full and fewer than
  `hot` (twice the CPUs) children run paced calls; otherwise it waits in the parent. Handlers
  whose calls wait (for I/O, a lock, a sleep: a call that ran `QUICK` or longer, or mostly off the
  CPU) gain from more children than CPUs, so their calls are not paced: they take any idle child,
  as many at once as there are slots. The child reports how long each call ran and how much of it
  on the CPU (`_ran`). A paced call still running after `STUCK` stops counting and its handler is
  no longer paced; a paced call that waited `STUCK` takes any idle child.
* Paced calls queue in their hot child, up to `DEPTH` of them behind the one it runs; every call
  is written at the end of the turn of the event loop that sent it, so the calls sent to a child
  during one turn go in one write, and the child reads them with one wake-up (a pipe write that
  wakes a sleeping process was most of the parent's cost of a tick). A queued call has not
  started: the child runs its calls in order, so every call after the first unanswered one is
  still waiting (unless the one ahead ended at that very moment, its answer on the way: a call
  taken back then may run twice, as a tick may anyway). Such a call is taken back (a `_DROP`
  frame, read by the child before it starts its next call) when the call ahead of it runs past
  `STUCK`, when its own timeout passes (it never runs), when the worker closes its children, and
  when its child dies or is killed (no frame needed then). Taken back, it waits in the parent,
  first in line. Timeouts, abandon and the death of a child work as for the call a child runs.
* The timeout is kept by the parent, which only waits: when an attempt's timeout passes, its
  outcome is `timed_out(call)` and its child is SIGKILLed and replaced. Nothing the handler does
  can hold a slot past its timeout, and the worker's loop never runs user code.
* Protocol: typed frames on the child's stdin and stdout (`frames.py`, where the wire format is
  written down): a call, an abandon or a drop to the child; ready, a result or a failure back. The
  child normalizes with the shared `normalize` / `failure_of`, so an attempt ends the same way as on
  a thread. Before it reads anything, the child moves the protocol pipes to private descriptors and
  points descriptors 0 and 1 at /dev/null and stderr: what a handler prints cannot corrupt the
  protocol, and logs go to the worker's stderr. A child that breaks the protocol is killed.
* `ctx.heartbeat()` in the child first reads any frames already waiting (without blocking), so an
  abandon sent by the worker makes it raise `AttemptAbandoned` as on a thread.
* A child that dies during an attempt (`os._exit`, a crash, the OOM killer) fails that attempt
  with the retryable `WorkerProcessDied`, naming the state and the exit code or signal.
* A handler that forks makes a copy of the child, pipes included. The copy closes them as it is
  forked and never reads or writes a frame: one that comes back from the handler ends at once,
  and its attempt fails as `HandlerForked` (not retried); one that ends itself (`os._exit`,
  `sys.exit`, an exec, multiprocessing) changes nothing. See `_Copies`.
* Children end with the worker: at end of input (`close()`, or the worker's death closes the pipe)
  and, on Linux, by a parent-death signal, which also stops a child stuck in a handler.

The parent side costs at most one write and one read per tick on non-blocking pipes watched by
the event loop (`add_reader`), fewer when quick calls queue, and no thread.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ... import logs
from ...context import Context
from ...graph import Handler
from ...handlers import HandlerImportError, import_module, resolve
from ...transition import Failure, Outcome
from ..executor import TickCall, context_of, failure_of, normalize, past_deadline, timed_out
from . import frames
from .frames import ABANDON as _ABANDON  # noqa: F401 - the names tests write raw frames with
from .frames import CALL as _CALL  # noqa: F401
from .frames import DROP as _DROP  # noqa: F401
from .frames import (
    AbandonFrame,
    CallFrame,
    DropFrame,
    FailedFrame,
    ForkNotice,
    FrameError,
    ReadyFrame,
    ResultFrame,
)
from .frames import encode as _frame  # noqa: F401

log = logging.getLogger(__name__)

DEFAULT_LOG_FORMAT = logs.TEXT  # the text format; `dsm.logs.current` says whether lines are JSON instead

QUICK = 0.002  # seconds: a handler whose calls run shorter, and mostly on the CPU, is paced (see _ran)
TINY = 0.0002  # seconds: a call this short is quick, however little of it was on the CPU
STUCK = 0.5  # seconds a hot call runs, or a paced call waits, before the pacing lets others through
DEPTH = 8  # calls of quick handlers queued in one child at most (sent in one write, read in one wake-up)
FORK_GRACE = 1.0  # seconds a child waits, after a handler that forked returns, for the copy to end (see _Copies)

_READ_SIZE = 1 << 16

# The child's first code: it runs before dsm can be imported, so it sets sys.path itself.
_BOOT = ("import json, sys; o = json.loads(sys.argv[1]); "
         "sys.path[:] = o['path'] + [p for p in sys.path if p not in o['path']]; "
         "from dsm.worker.isolation import _child; _child(o)")


def _exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "its exit status is unknown"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit code {returncode}"


def _about(call: TickCall) -> dict[str, Any]:
    return logs.about(call.instance_id, call.machine, call.state, call.attempt, call.worker)


def _died(call: TickCall, returncode: int | None) -> Failure:
    """The failure of an attempt whose process died under it; retryable, since the next process may not."""
    return Failure("WorkerProcessDied", f"state {call.state!r}: attempt {call.attempt}: the handler process died "
                   f"({_exit_status(returncode)})", retryable=True, bases=("Exception",))


# -- parent ----------------------------------------------------------------------------------------

class _ProcessAttempt:
    __slots__ = ("call", "child", "ended", "future", "hot", "id", "queued_at", "reason", "timer")

    def __init__(self, ident: int, call: TickCall, future: asyncio.Future, queued_at: float):
        self.id = ident
        self.call = call
        self.future = future
        self.child: _Child | None = None  # the child running it
        self.reason: str | None = None  # why it was abandoned
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False
        self.queued_at = queued_at  # loop time it was started (or sent, once it is)
        self.hot = False  # running, paced, not yet seen slow: one of the executor's `hot` calls

    def abandon(self, reason: str) -> None:
        if self.reason is not None or self.ended:
            return
        self.reason = reason
        if self.child is not None:  # a waiting call carries its reason when it is sent
            self.child.send(AbandonFrame(self.id, reason).to_frame())

    async def outcome(self) -> Outcome:
        return past_deadline(self.call, await self.future, self.reason is not None)


class _Child:
    """One child process: one slot. The event loop reads its replies; it never blocks on it."""

    __slots__ = ("_executor", "_loop", "attempts", "gone", "pid", "proc", "rbuf", "ready", "rfd", "wbuf", "wfd",
                 "writing")

    def __init__(self, executor: ProcessExecutor, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen):
        self._executor = executor
        self._loop = loop
        self.proc = proc
        self.pid = proc.pid
        assert proc.stdin is not None and proc.stdout is not None
        self.wfd = proc.stdin.fileno()
        self.rfd = proc.stdout.fileno()
        os.set_blocking(self.wfd, False)
        os.set_blocking(self.rfd, False)
        self.rbuf = b""
        self.wbuf = bytearray()
        self.ready = False
        # Calls sent and not answered, in the order the child runs them: the first is running (or
        # about to); more than one only for quick handlers (`DEPTH`).
        self.attempts: collections.deque[_ProcessAttempt] = collections.deque()
        self.writing = False  # the pipe was full: the loop writes the rest when it drains
        self.gone = False  # detached from the executor: killed, dead or closed
        loop.add_reader(self.rfd, self._readable)

    @property
    def attempt(self) -> _ProcessAttempt | None:
        """The call running (or about to), if any."""
        return self.attempts[0] if self.attempts else None

    def send(self, frame: bytes) -> None:
        """Write a frame now, after any not yet written."""
        self.wbuf += frame
        self.flush()

    def flush(self) -> None:
        if self.gone or self.writing or not self.wbuf:
            return
        try:
            written = os.write(self.wfd, self.wbuf)
        except BlockingIOError:
            written = 0
        except OSError:  # the child is gone; its end of output says so
            self.wbuf.clear()
            return
        del self.wbuf[:written]
        if self.wbuf:
            self.writing = True
            self._loop.add_writer(self.wfd, self._writable)

    def _writable(self) -> None:
        try:
            written = os.write(self.wfd, self.wbuf)
        except BlockingIOError:
            return
        except OSError:
            written = len(self.wbuf)
        del self.wbuf[:written]
        if not self.wbuf:
            self.writing = False
            self._loop.remove_writer(self.wfd)

    def _readable(self) -> None:
        try:
            data = os.read(self.rfd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._executor._lost(self, "its output ended")
            return
        self.read(data)

    def read(self, data: bytes) -> None:
        bodies, self.rbuf = frames.split(self.rbuf + data if self.rbuf else data)
        for body in bodies:
            if self.gone:
                return
            try:
                frame = frames.read_to_worker(body)
            except FrameError as exc:
                log.warning("handler process %d broke the protocol and is killed: %s", self.pid, exc)
                self._executor._lost(self, "it broke the protocol", kill=True)
                return
            self._executor._reply(self, frame)

    def detach(self) -> None:
        """Stop watching the pipes and close them; the process is reaped separately."""
        if self.gone:
            return
        self.gone = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self.rfd)
            if self.writing:
                self._loop.remove_writer(self.wfd)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass


class ProcessExecutor:
    """Handlers in `size` child processes, one attempt at a time each; see the module docstring.

    `search_path`: folders put first on the children's sys.path (the worker's own sys.path
    follows). `env`: the children's environment (None: the worker's). `preload`: modules the
    children import before they take calls, so a slow import is not paid inside a handler's
    timeout. `log_level`: level of the children's `dsm.handler` logger (None: the worker's, read
    when a child starts); `log_format` formats their log lines on stderr. `grace`: how long
    `close()` lets children finish their attempt before it kills them. `hot`: how many children
    run calls of quick handlers at once, each with up to `DEPTH` of them queued, before the next
    waits (default: twice the CPUs; see the module docstring).

    Like the event loop it serves, it is not thread-safe: call it from the loop's thread. POSIX only
    (pipes watched by the loop, a select on them in the child).
    """

    def __init__(self, size: int, *, search_path: Iterable[str | os.PathLike[str]] = (),
                 env: Mapping[str, str] | None = None, preload: Iterable[str] = (), log_level: int | None = None,
                 log_format: str = DEFAULT_LOG_FORMAT, grace: float = 2.0, hot: int | None = None):
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.search_path = tuple(str(Path(p).resolve()) for p in search_path)
        self.env = dict(env) if env is not None else None
        self.preload = tuple(preload)
        self.log_level = log_level
        self.log_format = log_format
        self.grace = grace
        self.started = 0  # child processes started, replacements included
        self.killed = 0  # children killed because an attempt outlived its timeout
        self.hot = min(size, hot if hot is not None else max(2, 2 * (os.cpu_count() or 1)))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[_ProcessAttempt] = collections.deque()  # calls of handlers seen slow
        self._paced: collections.deque[_ProcessAttempt] = collections.deque()  # calls of the others
        self._running_hot: collections.deque[_ProcessAttempt] = collections.deque()  # hot calls running, oldest first
        self._hot_children: set[_Child] = set()  # children running hot calls (all their calls are hot)
        self._unflushed: set[_Child] = set()  # children with calls to write at the end of this turn of the loop
        self._slow: set[str] = set()  # handlers whose calls are not paced
        self._score: dict[str, float] = {}  # handler -> how often its recent calls waited (0 to 1)
        self._timer: asyncio.TimerHandle | None = None
        self._children: set[_Child] = set()
        self._idle: list[_Child] = []
        self._starting = 0
        self._reaping: dict[subprocess.Popen, Callable[[int | None], None] | None] = {}
        self._serial = 0
        self._closed = False

    # -- the Executor protocol

    def start(self, call: TickCall) -> _ProcessAttempt:
        if self._closed:
            raise RuntimeError("the executor is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:  # its children's pipes are watched by that loop
            raise RuntimeError("a ProcessExecutor serves the event loop of its first call only")
        self._serial += 1
        attempt = _ProcessAttempt(self._serial, call, loop.create_future(), loop.time())
        if call.timeout:
            attempt.timer = loop.call_later(call.timeout, self._expire, attempt)
        (self._queue if call.handler.ref in self._slow else self._paced).append(attempt)
        self._dispatch()
        return attempt

    def close(self) -> None:
        """Stop every child; blocks for `grace` at most, then kills. Leaves no process behind.

        Calls still waiting fail at once. Children are told there is no more input and finish
        their attempt, whose outcome is still delivered, within `grace`; the rest are killed.
        """
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._flush()
        for child in list(self._children):  # calls queued in a child, not started: they wait no more either
            self._take_back(child, list(child.attempts)[1:])
        while self._queue or self._paced:
            waiting = (self._queue or self._paced).popleft()
            self._finish(waiting, Outcome(failure=Failure(
                "WorkerProcessDied", f"state {waiting.call.state!r}: attempt {waiting.call.attempt} was not started: "
                "the worker closed its handler processes", retryable=True, bases=("Exception",))))
        children = list(self._children)
        for child in children:
            # End of input. A frame still half-sent is dropped: the child reads a cut frame, then
            # the end, and exits (blocking here to finish it could wait on a child that never reads).
            child.wbuf.clear()
            try:
                child.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
        deadline = time.monotonic() + self.grace
        busy = {c.rfd: c for c in children if c.attempts}
        poller = select.poll()  # not select(): a busy worker may hold descriptors beyond FD_SETSIZE
        for fd in busy:
            poller.register(fd, select.POLLIN)
        while busy:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(remaining * 1000):
                child = busy[fd]
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    child.read(data)  # its outcome counts: delivered as usual
                if not data or not child.attempts or child.gone:
                    poller.unregister(fd)
                    del busy[fd]
        for child in children:
            attempts = list(child.attempts)
            child.attempts.clear()
            self._detach(child)
            returncode = _wait(child.proc, deadline)
            for attempt in attempts:
                self._finish(attempt, Outcome(failure=_died(attempt.call, returncode)))
        for proc in list(self._reaping):
            callback = self._reaping.pop(proc)
            returncode = _wait(proc, time.monotonic())
            if callback is not None:
                callback(returncode)

    # -- slots

    def _dispatch(self) -> None:
        """Give waiting calls to idle children; start children for the calls still waiting."""
        assert self._loop is not None
        now = self._loop.time()
        self._cool(now)
        queue, paced, idle = self._queue, self._paced, self._idle
        while queue and idle:  # handlers seen slow: any idle child
            attempt = queue.popleft()
            if attempt.ended or attempt.future.done():
                self._finish(attempt, None)
                continue
            self._send(idle.pop(), attempt, now, hot=False)
        while paced:  # the others: queued on a few hot children, or any idle child after STUCK
            attempt = paced[0]
            if attempt.ended or attempt.future.done():
                self._finish(paced.popleft(), None)
                continue
            if attempt.call.handler.ref in self._slow or now - attempt.queued_at >= STUCK:
                if not idle:
                    break
                self._send(idle.pop(), paced.popleft(), now, hot=False)
                continue
            child = self._hot_child()
            if child is None:
                break
            self._send(child, paced.popleft(), now, hot=True)
        for waiting in (queue, paced):
            while waiting and (waiting[0].ended or waiting[0].future.done()):
                self._finish(waiting.popleft(), None)
        need = len(queue)
        behind = sum(len(c.attempts) - 1 for c in self._hot_children)  # quick calls queued in children
        if paced or behind:
            # a paced call waiting while children start waits for them, not for more of them
            late = bool(paced) and (paced[0].call.handler.ref in self._slow or (now - paced[0].queued_at >= STUCK
                                                                                 and not self._starting))
            need += len(paced) if late else min(len(paced) + behind,
                                                max(0, self.hot - len(self._hot_children) - len(idle)))
            if self._timer is None and not self._closed:
                # look again when the oldest waits too long or a hot call runs too long (the calls
                # queued behind it are taken back then)
                due = paced[0].queued_at + STUCK if paced and (idle or len(self._children) < self.size) else None
                if self._running_hot:
                    due = min(due if due is not None else float("inf"), self._running_hot[0].queued_at + STUCK)
                if due is not None:
                    self._timer = self._loop.call_at(max(due, now + 0.0005), self._wake)
        while need > self._starting and not self._closed and len(self._children) < self.size:
            try:
                self._spawn()
            except OSError as exc:
                log.error("cannot start a handler process: %s", exc)
                attempt = (queue or paced).popleft()
                self._finish(attempt, Outcome(failure=Failure(
                    "WorkerProcessDied", f"state {attempt.call.state!r}: attempt {attempt.call.attempt}: cannot start "
                    f"a handler process: {exc}", retryable=True, bases=("Exception",))))
                need -= 1

    def _wake(self) -> None:
        self._timer = None
        self._dispatch()

    def _hot_child(self) -> _Child | None:
        """Where the next quick call goes: the least loaded child running quick calls, while its
        queue has room; else an idle child, while fewer than `hot` run quick calls (None: the call
        waits). Filling a few children before waking another is what makes their calls share writes
        and wake-ups; quick calls that keep them busy fill their queues and spread to `hot` of them."""
        best = None
        for child in self._hot_children:
            if len(child.attempts) < DEPTH and (best is None or len(child.attempts) < len(best.attempts)):
                best = child
        if best is None and self._idle and len(self._hot_children) < self.hot:
            return self._idle.pop()
        return best

    def _send(self, child: _Child, attempt: _ProcessAttempt, now: float, *, hot: bool) -> None:
        """Send a call to the child, at the end of this turn of the loop: in one write with the
        others sent to that child meanwhile."""
        attempt.child = child
        child.attempts.append(attempt)
        attempt.hot = hot
        child.wbuf += CallFrame(attempt.id, attempt.call, attempt.reason).to_frame()
        if len(child.attempts) == 1:
            self._running(child, now)
        if not self._unflushed:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._unflushed.add(child)

    def _flush(self) -> None:
        for child in self._unflushed:
            child.flush()
        self._unflushed.clear()

    def _running(self, child: _Child, now: float) -> None:
        """The child's first call starts running (as far as the parent can tell: now)."""
        attempt = child.attempts[0]
        attempt.queued_at = now
        if attempt.hot:
            self._hot_children.add(child)
            self._running_hot.append(attempt)
        else:
            self._hot_children.discard(child)

    def _cool(self, now: float) -> None:
        """Hot calls still running after STUCK: they no longer count, their handler is not paced, and
        the calls queued behind them in the same child are taken back, for other children."""
        running = self._running_hot
        while running and (not running[0].hot or now - running[0].queued_at >= STUCK):
            attempt = running.popleft()
            if attempt.hot:
                attempt.hot = False
                self._seen_slow(attempt.call.handler.ref)
                child = attempt.child
                if child is not None:
                    self._hot_children.discard(child)
                    self._take_back(child, list(child.attempts)[1:])

    def _take_back(self, child: _Child, attempts: list[_ProcessAttempt], *, requeue: bool = True) -> None:
        """Calls queued in `child` that it has not started: they wait in the parent again, first in
        line (unless not `requeue`d: a call whose timeout passed). A child that is alive is told to
        drop them (it reads that before it would start them)."""
        for attempt in reversed(attempts):
            child.attempts.remove(attempt)
            if not child.gone:
                child.wbuf += DropFrame(attempt.id).to_frame()
            attempt.child = None
            attempt.hot = False
            if requeue:
                self._paced.appendleft(attempt)
        child.flush()

    def _ran(self, ref: str, seconds: float, cpu: float | None) -> None:
        """What a call's run time (`seconds`, `cpu` of them on the CPU when measured) says of its
        handler. More children than CPUs only help handlers that wait (for I/O, a lock, a sleep): a
        handler is paced while most of its recent calls were quick and busy. One call preempted on
        a loaded machine does not change that; three slow ones in a row do, three quick ones undo it."""
        waited = seconds >= TINY and (seconds >= QUICK or (cpu is not None and cpu < seconds / 2))
        score = self._score.get(ref, 0.0) * 0.75 + (0.25 if waited else 0.0)
        self._score[ref] = score
        if score >= 0.5:
            self._slow.add(ref)
        else:
            self._slow.discard(ref)

    def _seen_slow(self, ref: str) -> None:
        self._score[ref] = 1.0
        self._slow.add(ref)

    def _spawn(self) -> None:
        options = {
            "path": [str(p) for p in sys.path if str(p) not in self.search_path],
            "search": list(self.search_path),  # first on the import path only while a handler loads
            "ppid": os.getpid(),
            "level": logging.getLogger().getEffectiveLevel(),
            "handler_level": (self.log_level if self.log_level is not None
                              else logging.getLogger("dsm.handler").getEffectiveLevel()),
            "format": self.log_format,
            "log": logs.settings(),  # text or JSON, and the worker's name for lines that cannot know it
            "preload": list(self.preload),
        }
        env = dict(self.env if self.env is not None else os.environ)
        env["DSM_WORKER_PID"] = str(os.getpid())  # which worker a handler runs for, as its own pid did
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(options)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, close_fds=True)
        assert self._loop is not None
        self._children.add(_Child(self, self._loop, proc))
        self._starting += 1
        self.started += 1
        log.debug("started handler process %d", proc.pid)

    def _reply(self, child: _Child, frame: frames.ToWorker) -> None:
        if isinstance(frame, ReadyFrame):
            if not child.ready:
                child.ready = True
                self._starting -= 1
                self._idle.append(child)
                self._dispatch()
            return
        if not child.attempts or frame.id != child.attempts[0].id:
            return  # a late reply to an attempt that was let go (taken back, or its child replaced)
        attempt = child.attempts.popleft()
        self._ran(attempt.call.handler.ref, frame.seconds, frame.cpu_seconds)
        self._finish(attempt, frame.outcome())
        if child.attempts:
            assert self._loop is not None
            self._running(child, self._loop.time())
        else:
            self._hot_children.discard(child)
            if not self._closed:
                self._idle.append(child)
        if not self._closed:
            self._dispatch()

    def _finish(self, attempt: _ProcessAttempt, outcome: Outcome | None) -> None:
        if not attempt.ended:
            attempt.ended = True
            attempt.child = None
            attempt.hot = False
            if attempt.timer is not None:
                attempt.timer.cancel()
        if outcome is not None and not attempt.future.done():
            try:
                attempt.future.set_result(outcome)
            except RuntimeError:  # its event loop is closed: nobody is waiting any more
                pass

    def _expire(self, attempt: _ProcessAttempt) -> None:
        """The attempt's timeout passed: a waiting call is dropped, a running one costs its child."""
        if attempt.ended:
            return
        child = attempt.child
        if child is not None and child.attempt is not attempt:  # queued behind another call: it never starts
            self._take_back(child, [attempt], requeue=False)
        elif child is not None:
            self._seen_slow(attempt.call.handler.ref)
            log.debug("killing handler process %d: state %r attempt %d outlived its timeout", child.pid,
                      attempt.call.state, attempt.call.attempt, extra=_about(attempt.call))
            self._detach(child)
            child.proc.kill()
            self.killed += 1
            self._reap(child.proc, None)
            self._take_back(child, list(child.attempts)[1:])
            child.attempts.clear()
        self._finish(attempt, timed_out(attempt.call))
        self._dispatch()

    def _lost(self, child: _Child, why: str, *, kill: bool = False) -> None:
        """A child ended (or broke the protocol) on its own: fail its attempt once its exit status is known."""
        attempt, ready = child.attempt, child.ready
        self._detach(child)
        if kill:
            child.proc.kill()
        self._take_back(child, list(child.attempts)[1:])  # queued behind the call it died in: not started
        child.attempts.clear()

        def exited(returncode: int | None) -> None:
            if attempt is not None:
                log.debug("handler process %d died running the attempt (%s)", child.pid, _exit_status(returncode),
                          extra=_about(attempt.call))
                self._finish(attempt, Outcome(failure=_died(attempt.call, returncode)))
            elif not ready and not self._closed:
                log.warning("handler process %d ended before it was ready: %s (%s)", child.pid, why,
                            _exit_status(returncode))
                while self._queue or self._paced:  # one waiting call learns why, so a broken start-up cannot hang
                    waiting = (self._queue or self._paced).popleft()
                    if not (waiting.ended or waiting.future.done()):
                        self._finish(waiting, Outcome(failure=_died(waiting.call, returncode)))
                        break
                    self._finish(waiting, None)
            self._dispatch()

        self._reap(child.proc, exited)
        self._dispatch()

    def _detach(self, child: _Child) -> None:
        if child.gone:
            return
        if not child.ready:
            self._starting -= 1
        self._children.discard(child)
        self._hot_children.discard(child)
        self._unflushed.discard(child)
        if child in self._idle:
            self._idle.remove(child)
        child.detach()

    def _reap(self, proc: subprocess.Popen, then: Callable[[int | None], None] | None, delay: float = 0.001) -> None:
        """Collect the exit status without blocking the loop: a dying process takes a moment to exit."""
        returncode = proc.poll()
        if returncode is None and delay > 1.0:  # it closed its pipes but lives on: it is of no use now
            proc.kill()
        if returncode is not None or self._loop is None or self._loop.is_closed():
            self._reaping.pop(proc, None)
            if returncode is None:
                returncode = _wait(proc, time.monotonic() + 1.0)
            if then is not None:
                then(returncode)
            return
        self._reaping[proc] = then
        self._loop.call_later(delay, self._reap_again, proc, delay * 2)

    def _reap_again(self, proc: subprocess.Popen, delay: float) -> None:
        if proc in self._reaping:
            self._reap(proc, self._reaping[proc], min(delay, 2.0))


def _wait(proc: subprocess.Popen, deadline: float) -> int | None:
    """Wait for a process until `deadline`, then kill it and wait for that (briefly)."""
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    proc.kill()
    try:
        return proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:  # unkillable for now (stuck in the kernel)
        log.error("handler process %d did not exit after SIGKILL", proc.pid)
        return None


# -- child ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _ChildContext(Context):
    """A Context whose heartbeat first reads the abandon frames the worker sent since the last one."""

    _poll: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def heartbeat(self, details: Any = None) -> None:
        if self._poll is not None:
            self._poll()
        Context.heartbeat(self, details)  # not super(): slots dataclasses break its zero-argument form


_CONTEXT_FIELDS = tuple(f.name for f in fields(Context) if f.init)


@dataclass(slots=True)
class _Copy:
    """A process forked from the child while it ran a call, that has not yet been heard of."""

    fd: int  # the read end of the pipe it says on that it came back from the handler
    call: int | None  # the id of the call that was running when it was forked


class _Copies:
    """Processes a handler forks from the child, which start with the child's protocol pipes.

    A copy that comes back from the handler, instead of ending itself (`os._exit`, an exec), would
    go on serving as the child: answer the call, then read calls meant for the child off the shared
    pipe (and answer them, or take half a frame, and another instance's tick is never answered). So
    at every fork of the child, the copy closes the protocol descriptors (`after_in_child`, run by
    os.fork itself), keeps the write end of a pipe made for it, and when it is back from the handler
    (`back`) it says so on that pipe and ends with `os._exit`, touching nothing else. The child, once
    the handler returned, waits for the copies forked during the call to say so, exit or exec (which
    close the pipe), FORK_GRACE at most, and fails the attempt as HandlerForked if one came back. A
    copy heard of later is logged; its attempt has ended.
    """

    def __init__(self, protocol: tuple[int, int], running: Callable[[], int | None]):
        self.pid = os.getpid()
        self.protocol = protocol
        self.running = running  # the id of the call running now, if any
        self.pending: list[_Copy] = []
        self.forked = False  # this process is a copy (set as os.fork returns in it)
        self.report: int | None = None  # in a copy: where it says it came back
        self._fork = threading.local()  # a fork under way in this thread: (read end, write end, call) or None

    def install(self) -> None:
        os.register_at_fork(before=self._before, after_in_parent=self._after_in_parent,
                            after_in_child=self._after_in_child)

    def is_copy(self) -> bool:
        """Asks the system, which knows of forks that ran no fork hooks (a C library's) too."""
        return self.forked or os.getpid() != self.pid

    def _before(self) -> None:
        self._fork.pipe = None if self.forked else (*os.pipe(), self.running())  # closed by an exec

    def _after_in_parent(self) -> None:
        pipe, self._fork.pipe = getattr(self._fork, "pipe", None), None
        if pipe is not None:
            os.close(pipe[1])
            self.pending.append(_Copy(pipe[0], pipe[2]))

    def _after_in_child(self) -> None:
        self.forked = True
        pipe, self._fork.pipe = getattr(self._fork, "pipe", None), None
        if pipe is None:  # forked from a copy, whose descriptors are its own
            return
        for fd in (*self.protocol, pipe[0], *(c.fd for c in self.pending)):
            try:
                os.close(fd)
            except OSError:
                pass
        self.pending = []
        self.report = pipe[1]

    def back(self, exc: BaseException | None = None) -> None:
        """In a copy, back from the handler (`exc`: what it raised): end now. A copy that called
        sys.exit() ends as it asked, and is not said to have come back."""
        if not self.is_copy():
            return
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)
        if self.report is not None:
            try:
                os.write(self.report, ForkNotice(os.getpid()).to_frame())
            except OSError:
                pass
        os._exit(0 if exc is None else 1)

    def came_back(self, call: int, grace: float) -> list[int]:
        """The pids of the copies forked during `call` that came back from its handler, once each
        such copy said so, exited or exec'd, or `grace` seconds passed."""
        deadline = time.monotonic() + grace
        back: list[int] = []
        while True:
            waiting = {c.fd: c for c in self.pending if c.call == call}
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return back
            poller = select.poll()  # not select(): a handler may have opened descriptors beyond FD_SETSIZE
            for fd in waiting:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(left * 1000):
                back += self._heard(waiting[fd])

    def late(self) -> list[tuple[int, int | None]]:
        """(pid, call) of copies that came back after their call ended; forgets those that ended."""
        if not self.pending:
            return []
        poller = select.poll()
        by_fd = {c.fd: c for c in self.pending}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        return [(pid, by_fd[fd].call) for fd, _ in poller.poll(0) for pid in self._heard(by_fd[fd])]

    def _heard(self, copy: _Copy) -> list[int]:
        """A copy's pipe is readable: the pid it wrote when it came back, or nothing once it ended or
        exec'd. Either way it is done with; one that came back is reaped (it ends as it writes)."""
        try:
            data = os.read(copy.fd, _READ_SIZE)
        except OSError:
            data = b""
        self.pending.remove(copy)
        os.close(copy.fd)
        pids = [notice.pid for notice in ForkNotice.all_in(data)]
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # the handler waited for it already
                pass
        return pids


class _Server:
    """The child's side: read a call, run it, write the outcome; one at a time."""

    def __init__(self, rfd: int, wfd: int, search: tuple[str, ...] = ()):
        self.search = search
        self.rfd = rfd
        self.wfd = wfd
        self.copies = _Copies((rfd, wfd), lambda: self.current[0] if self.current is not None else None)
        self.rbuf = b""
        self.queued: collections.deque[CallFrame] = collections.deque()  # calls sent here, in order, not started
        self.current: tuple[int, Context] | None = None  # the call running: its id and its ctx
        self.eof = False
        self.handlers: dict[tuple[str, str], Handler] = {}
        self.timed: dict[tuple[str, str], bool] = {}  # handler -> read the CPU clock on its next call
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock = threading.Lock()  # a handler's own threads may heartbeat too

    @property
    def calls(self) -> list[list[Any]]:
        """The calls queued here, as they were sent (their id second, their abandon reason last)."""
        return [frame.items() for frame in self.queued]

    def serve(self) -> None:
        self.copies.install()
        self.send(ReadyFrame())
        while True:
            while not self.queued:
                if self.eof:
                    return
                with self.lock:
                    self.fill(block=True)
            self.send(self.run(self.queued.popleft()))
            if self.queued:  # before the next queued call starts: was it taken back, or abandoned?
                self.poll()

    def send(self, frame: ReadyFrame | ResultFrame | FailedFrame) -> None:
        if self.copies.forked:  # a copy of this process never writes to the worker
            self.copies.back()
        view = memoryview(frame.to_frame())
        while view:
            view = view[os.write(self.wfd, view):]

    def poll(self) -> None:
        if self.copies.forked:  # a heartbeat in a copy a handler forked: the frames are not for it
            return
        if not self.eof and self.lock.acquire(blocking=False):  # busy: another thread is reading
            try:
                self.fill(block=False)
            finally:
                self.lock.release()

    def fill(self, *, block: bool) -> None:
        if self.copies.forked:  # a copy of this process never reads what the worker sends
            self.copies.back()
        if not block and not select.select([self.rfd], [], [], 0)[0]:
            return
        data = os.read(self.rfd, _READ_SIZE)
        if not data:
            self.eof = True
            if self.current is not None:
                self.current[1].abandon("the worker closed its handler processes")
            return
        bodies, self.rbuf = frames.split(self.rbuf + data if self.rbuf else data)
        for body in bodies:
            frame = frames.read_to_process(body)
            if isinstance(frame, CallFrame):
                self.queued.append(frame)
            elif isinstance(frame, AbandonFrame) and self.current is not None and self.current[0] == frame.id:
                self.current[1].abandon(frame.reason)
            elif isinstance(frame, AbandonFrame):  # queued here: it starts abandoned, as one abandoned before sending
                for i, queued in enumerate(self.queued):
                    if queued.id == frame.id and queued.abandoned is None:
                        self.queued[i] = CallFrame(queued.id, queued.call, frame.reason)
            else:  # a drop: taken back, the parent sends it elsewhere, or it timed out
                for queued in self.queued:
                    if queued.id == frame.id:
                        self.queued.remove(queued)
                        break
            # an abandon for an attempt that already ended: nothing to do

    def handler(self, module: str, function: str) -> Handler:
        key = (module, function)
        handler = self.handlers.get(key)
        if handler is None:
            handler = self.handlers[key] = resolve(f"{module}:{function}", search_path=self.search)
        return handler

    def run(self, frame: CallFrame) -> ResultFrame | FailedFrame:
        call, ident = frame.call, frame.id
        module, function, ref = call.handler.module, call.handler.function, call.handler.ref
        payload, state, deadline = call.payload, call.state, call.deadline
        base = context_of(call)
        ctx = _ChildContext(**{name: getattr(base, name) for name in _CONTEXT_FIELDS}, _poll=self.poll)
        if frame.abandoned is not None:
            ctx.abandon(frame.abandoned)
        for pid, earlier in self.copies.late():
            log.warning("handler process %d: process %d, forked by the handler of call %s, came back from it "
                        "after the call had ended, and was ended", os.getpid(), pid, earlier)
        self.current = (ident, ctx)
        started = cpu = 0.0
        measured = False
        try:
            handler = self.handler(module, function)  # a first import is not the handler's run time
            # the CPU clock costs a system call: read it unless the handler's last call was tiny
            measured = self.timed.get((module, function), True)
            started = time.perf_counter()
            if measured:
                cpu = time.process_time()
            if handler.is_async:
                if self.loop is None:
                    self.loop = asyncio.new_event_loop()
                result = self.loop.run_until_complete(handler.func(payload, ctx))  # type: ignore[misc]
            else:
                result = handler.func(payload, ctx)  # type: ignore[misc]
            self.copies.back()
            outcome = normalize(result, payload, state, call.payload_limit)
        except HandlerImportError as exc:
            self.copies.back(exc)  # a module that forks as it is imported
            outcome = Outcome(failure=Failure("HandlerUnavailable", f"state {state!r}: handler {ref!r}: {exc}",
                                              retryable=True))
        except (Exception, SystemExit, KeyboardInterrupt, asyncio.CancelledError) as exc:  # noqa: BLE001 - user code
            self.copies.back(exc)
            outcome = Outcome(failure=failure_of(exc))
        finally:
            self.current = None
        wall = time.perf_counter() - started if started else 0.0
        cpu_seconds = time.process_time() - cpu if measured and started else None
        self.timed[(module, function)] = wall >= TINY
        if self.copies.pending:
            grace = FORK_GRACE if deadline is None else max(0.0, min(FORK_GRACE, deadline - time.time()))
            back = self.copies.came_back(ident, grace)
            if back:
                outcome = Outcome(failure=Failure("HandlerForked", f"state {state!r}: the handler forked and came "
                                                  f"back from it in the new process too (pid {back[0]}), which would "
                                                  "have served as this one; it was ended. A handler that forks must "
                                                  "end the new process with os._exit() or replace it with exec",
                                                  retryable=False))
        if outcome.failure is None:
            assert outcome.payload is not None
            return ResultFrame(ident, outcome.payload, outcome.label, wall, cpu_seconds)
        return FailedFrame(ident, outcome.failure, wall, cpu_seconds)


def _die_with_parent(ppid: int) -> None:
    """On Linux, ask for SIGKILL when the worker dies, even while a handler never returns."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != ppid:  # the worker died before the request took effect
        os._exit(0)


def _child(options: dict[str, Any]) -> None:
    """The child process's main: set up descriptors, logging and modules, then serve calls."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the worker, which decides what ends
    _die_with_parent(options["ppid"])
    rfd, wfd = os.dup(0), os.dup(1)  # private: not inherited by processes a handler starts
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stream = logging.StreamHandler(sys.stderr)
    logs.apply(options.get("log", {}))
    stream.setFormatter(logs.formatter(text=options["format"]))
    root = logging.getLogger()
    root.handlers[:] = [stream]
    root.setLevel(options["level"])
    logging.getLogger("dsm.handler").setLevel(options["handler_level"])
    search = tuple(options.get("search", ()))
    for module in options["preload"]:
        try:
            import_module(module, search_path=search)
        except Exception as exc:  # noqa: BLE001 - the calls that need it will say why; the others can run
            log.warning("handler process %d: cannot preload %s: %s: %s", os.getpid(), module,
                        type(exc).__name__, exc)
    try:
        _Server(rfd, wfd, search).serve()
    except BrokenPipeError:  # the worker is gone
        pass
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: threads a handler left behind must not keep the child alive
