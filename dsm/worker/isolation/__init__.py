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
* Quick handlers are paced onto a few busy children rather than spread over all of them, their
  calls queued there, up to `QUEUE_DEPTH` a child; handlers whose calls wait (for I/O, a lock, a
  sleep) are not paced. Which child a call goes to, how many queue behind a busy one, when a
  queued call is taken back and how many children to start is decided by `pacing.py`, which does
  no I/O; the executor carries its decisions out. Every call is written at the end of the turn of
  the event loop that sent it, so the calls sent to a child during one turn go in one write, and
  the child reads them with one wake-up (a pipe write that wakes a sleeping process was most of
  the parent's cost of a tick). A queued call has not started: the child runs its calls in order,
  so every call after the first unanswered one is still waiting (unless the one ahead ended at
  that very moment, its answer on the way: a call taken back then may run twice, as a tick may
  anyway). A call taken back is dropped by the child before it would start it, and waits in the
  parent again, first in line. Timeouts, abandon and the death of a child work for a queued call
  as for the call a child runs.
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
from typing import Any, cast

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
from .pacing import IGNORE_CPU_BELOW, Call, Decision, Lane, Pacer

log = logging.getLogger(__name__)

DEFAULT_LOG_FORMAT = logs.TEXT  # the text format; `dsm.logs.current` says whether lines are JSON instead

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

class _ProcessAttempt(Call):
    """An attempt, as the executor keeps it: its call, its future, and why it was abandoned."""

    __slots__ = ("call", "future", "id", "reason", "timer")

    def __init__(self, ident: int, call: TickCall, future: asyncio.Future):
        super().__init__(call.handler.ref)
        self.id = ident
        self.call = call
        self.future = future
        self.reason: str | None = None  # why it was abandoned
        self.timer: asyncio.TimerHandle | None = None

    @property
    def settled(self) -> bool:
        return self.ended or self.future.done()

    def abandon(self, reason: str) -> None:
        if self.reason is not None or self.ended:
            return
        self.reason = reason
        if self.lane is not None:  # a waiting call carries its reason when it is sent
            cast(_Child, self.lane).send(AbandonFrame(self.id, reason).to_frame())

    async def outcome(self) -> Outcome:
        return past_deadline(self.call, await self.future, self.reason is not None)


class _Child(Lane["_ProcessAttempt"]):
    """One child process: one slot. The event loop reads its replies; it never blocks on it."""

    __slots__ = ("_executor", "_loop", "gone", "pid", "proc", "rbuf", "rfd", "wbuf", "wfd", "writing")

    def __init__(self, executor: ProcessExecutor, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen):
        super().__init__()
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
        self.writing = False  # the pipe was full: the loop writes the rest when it drains
        self.gone = False  # detached from the executor: killed, dead or closed
        loop.add_reader(self.rfd, self._readable)

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
    run the calls of quick handlers at once, each holding up to `QUEUE_DEPTH` of them, before the
    next such call waits (default: twice the CPUs; see `pacing.py`).

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
        pacing_limit = hot if hot is not None else max(2, 2 * (os.cpu_count() or 1))
        # the loop's clock from the first call on (`start`)
        self._pacing: Pacer[_Child, _ProcessAttempt] = Pacer(size, pacing_limit, clock=time.monotonic)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None  # the wake-up the pacing asked for
        self._unflushed: set[_Child] = set()  # children with calls to write at the end of this turn of the loop
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
            self._pacing.clock = loop.time
        elif loop is not self._loop:  # its children's pipes are watched by that loop
            raise RuntimeError("a ProcessExecutor serves the event loop of its first call only")
        self._serial += 1
        attempt = _ProcessAttempt(self._serial, call, loop.create_future())
        if call.timeout:
            attempt.timer = loop.call_later(call.timeout, self._expire, attempt)
        self._pacing.wait(attempt)
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
        self._carry_out(self._pacing.close())  # calls queued in a child, not started: they wait no more either
        while (waiting := self._pacing.next_waiting()) is not None:
            self._finish(waiting, Outcome(failure=Failure(
                "WorkerProcessDied", f"state {waiting.call.state!r}: attempt {waiting.call.attempt} was not started: "
                "the worker closed its handler processes", retryable=True, bases=("Exception",))))
        children = list(self._pacing.lanes)
        for child in children:
            # End of input. A frame still half-sent is dropped: the child reads a cut frame, then
            # the end, and exits (blocking here to finish it could wait on a child that never reads).
            child.wbuf.clear()
            try:
                child.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
        deadline = time.monotonic() + self.grace
        busy = {c.rfd: c for c in children if c.calls}
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
                if not data or not child.calls or child.gone:
                    poller.unregister(fd)
                    del busy[fd]
        for child in children:
            attempts = list(child.calls)
            self._detach(child)
            returncode = _wait(child.proc, deadline)
            for attempt in attempts:
                self._finish(attempt, Outcome(failure=_died(attempt.call, returncode)))
        for proc in list(self._reaping):
            callback = self._reaping.pop(proc)
            returncode = _wait(proc, time.monotonic())
            if callback is not None:
                callback(returncode)

    # -- children

    def _dispatch(self, *, woken: bool = False) -> None:
        """Carry out what the pacing decides now: calls to children, children to start."""
        self._carry_out(self._pacing.dispatch(woken=woken))

    def _wake(self) -> None:
        self._timer = None
        self._dispatch(woken=True)

    def _carry_out(self, decision: Decision[_Child, _ProcessAttempt]) -> None:
        for call in decision.forgotten:
            self._finish(call, None)
        if decision.taken_back:
            dropped = set()
            for child, call in decision.taken_back:
                child.wbuf += DropFrame(call.id).to_frame()
                dropped.add(child)
            for child in dropped:  # now: the child reads it before it would start that call
                child.flush()
        if decision.sent:
            # at the end of this turn of the loop: in one write with the others sent to that child meanwhile
            if not self._unflushed:
                assert self._loop is not None
                self._loop.call_soon(self._flush)
            for child, call in decision.sent:
                attempt = call
                child.wbuf += CallFrame(attempt.id, attempt.call, attempt.reason).to_frame()
                self._unflushed.add(child)
        if decision.kill is not None:
            self._kill(decision.kill)
        if decision.wake_at is not None:
            assert self._loop is not None
            self._timer = self._loop.call_at(decision.wake_at, self._wake)
        wanted = decision.start
        while wanted > 0 and not self._closed and len(self._pacing.lanes) < self.size:
            try:
                self._spawn()
            except OSError as exc:
                log.error("cannot start a handler process: %s", exc)
                waiting = self._pacing.next_waiting()
                if waiting is not None:
                    self._finish(waiting, Outcome(failure=Failure(
                        "WorkerProcessDied", f"state {waiting.call.state!r}: attempt {waiting.call.attempt}: cannot "
                        f"start a handler process: {exc}", retryable=True, bases=("Exception",))))
            wanted -= 1

    def _flush(self) -> None:
        for child in self._unflushed:
            child.flush()
        self._unflushed.clear()

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
        self._pacing.add(_Child(self, self._loop, proc))
        self.started += 1
        log.debug("started handler process %d", proc.pid)

    def _reply(self, child: _Child, frame: frames.ToWorker) -> None:
        if isinstance(frame, ReadyFrame):
            if self._pacing.ready(child):
                self._dispatch()
            return
        if not child.calls or frame.id != child.calls[0].id:
            return  # a late reply to an attempt that was let go (taken back, or its child replaced)
        attempt = self._pacing.answered(child, frame.seconds, frame.cpu_seconds)
        self._finish(attempt, frame.outcome())
        if not self._closed:
            self._dispatch()

    def _finish(self, attempt: _ProcessAttempt, outcome: Outcome | None) -> None:
        if not attempt.ended:
            attempt.end()
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
        self._carry_out(self._pacing.expired(attempt))
        self._finish(attempt, timed_out(attempt.call))
        self._dispatch()

    def _kill(self, child: _Child) -> None:
        """Kill a child whose call outlived its timeout; the calls queued behind it wait again."""
        running = child.calls[0] if child.calls else None
        if running is not None:
            call = running.call
            log.debug("killing handler process %d: state %r attempt %d outlived its timeout", child.pid,
                      call.state, call.attempt, extra=_about(call))
        self._detach(child)
        child.proc.kill()
        self.killed += 1
        self._reap(child.proc, None)

    def _lost(self, child: _Child, why: str, *, kill: bool = False) -> None:
        """A child ended (or broke the protocol) on its own: fail its attempt once its exit status is known."""
        ready = child.ready
        attempt = self._detach(child)  # those queued behind it wait again
        if kill:
            child.proc.kill()

        def exited(returncode: int | None) -> None:
            if attempt is not None:
                log.debug("handler process %d died running the attempt (%s)", child.pid, _exit_status(returncode),
                          extra=_about(attempt.call))
                self._finish(attempt, Outcome(failure=_died(attempt.call, returncode)))
            elif not ready and not self._closed:
                log.warning("handler process %d ended before it was ready: %s (%s)", child.pid, why,
                            _exit_status(returncode))
                # one waiting call learns why, so a broken start-up cannot hang
                while (waiting := self._pacing.next_waiting()) is not None:
                    if not waiting.settled:
                        self._finish(waiting, Outcome(failure=_died(waiting.call, returncode)))
                        break
                    self._finish(waiting, None)
            self._dispatch()

        self._reap(child.proc, exited)
        self._dispatch()

    def _detach(self, child: _Child) -> _ProcessAttempt | None:
        """Let a child go (killed, dead or closed): the call it was running, if any, is returned."""
        if child.gone:
            return None
        self._unflushed.discard(child)
        running = self._pacing.remove(child)
        child.detach()
        return running

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
        self.timed[(module, function)] = wall >= IGNORE_CPU_BELOW
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
