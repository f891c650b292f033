"""The worker's side of handler processes: start them, hand them calls, kill them at timeouts, reap them.

`ProcessExecutor` is the executor (`dsm.executors.Executor`) the worker uses with
`--isolation process`. It keeps up to one child process per slot; each is a `ChildProcess`: the
parent's end of its pipes, non-blocking and watched by the event loop (`add_reader`), so the loop
never blocks on a child. Which child a call goes to, and how many children run, is the pacing's
decision (`pacing.py`); this module carries it out.

* Children start when calls need them, as a fresh interpreter (`sys.executable -c`), never forked
  from the worker, whose gRPC threads make `fork` unsafe; each gets the worker's `sys.path` (plus
  `search_path`). One that dies or is killed is replaced when a call needs it.
* The timeout of an attempt is kept here, and the parent only waits: when it passes, the outcome
  is `timed_out(call)`; a call that waited (in the parent, or queued in a child) never starts,
  and one that was running costs its child, which is SIGKILLed. Nothing a handler does can hold a
  slot past its timeout. One loop timer watches every attempt's timeout (`timeouts.py`).
* A child that dies during an attempt (`os._exit`, a crash, the OOM killer) fails that attempt
  with the retryable `WorkerProcessDied`, naming the state and the exit code or signal, once its
  exit status is known (reaped without blocking the loop). A child that breaks the protocol is
  killed, and fails its attempt the same way.
* Calls are written at the end of the turn of the event loop that sent them: the calls sent to a
  child during one turn go in one write.
* `close()` fails the calls still waiting, lets the children finish their attempts within `grace`,
  kills the rest, and reaps them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from ... import logs
from ...ticks import TickCall, past_deadline, timed_out
from ...transition import Failure, Outcome
from . import frames
from .child import BOOT, ChildOptions
from .frames import READ_SIZE, AbandonFrame, CallFrame, DropFrame, FrameError, ReadyFrame
from .pacing import IDLE_EXIT, IGNORE_CPU_BELOW, NOTHING, Call, Decision, Lane, Pacer
from .timeouts import Timeouts

log = logging.getLogger(__package__)  # the package's logger, as the handler processes' side of it logs

DEFAULT_LOG_FORMAT = logs.TEXT  # the text format; `dsm.logs.current` says whether lines are JSON instead

_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution  # a timer this early is due, as for the loop's


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


class ProcessAttempt(Call):
    """An attempt, as the executor keeps it: its call, its future, and why it was abandoned."""

    __slots__ = ("call", "future", "id", "reason")

    def __init__(self, ident: int, call: TickCall, future: asyncio.Future):
        Call.__init__(self, call.handler.ref)
        self.id = ident
        self.call = call
        self.future = future
        self.reason: str | None = None  # why it was abandoned

    @property
    def settled(self) -> bool:
        return self.ended or self.future.done()

    def abandon(self, reason: str) -> None:
        if self.reason is not None or self.ended:
            return
        self.reason = reason
        if self.lane is not None:  # a waiting call carries its reason when it is sent
            cast(ChildProcess, self.lane).send(AbandonFrame(self.id, reason).to_frame())

    async def outcome(self) -> Outcome:
        return past_deadline(self.call, await self.future, self.reason is not None)


class ChildProcess(Lane["ProcessAttempt"]):
    """One child process: one slot. The event loop reads its replies; it never blocks on it."""

    __slots__ = ("_loop", "_lost", "_replied", "gone", "pid", "proc", "rbuf", "rfd", "wbuf", "wfd", "writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen,
                 replied: Callable[[ChildProcess, frames.ToWorker], None],
                 lost: Callable[[ChildProcess, str, bool], None]):
        """`replied(child, frame)`: a frame came. `lost(child, why, kill)`: its output ended, or it broke
        the protocol (to be killed then)."""
        super().__init__()
        self._loop = loop
        self._replied = replied
        self._lost = lost
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
            data = os.read(self.rfd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost(self, "its output ended", False)
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
                self._lost(self, "it broke the protocol", True)
                return
            self._replied(self, frame)

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
    """Handlers in `size` child processes, one attempt at a time each; see the package docstring.

    `search_path`: folders put first on the children's sys.path (the worker's own sys.path
    follows). `env`: the children's environment (None: the worker's). `preload`: modules the
    children import before they take calls, so a slow import is not paid inside a handler's
    timeout. `log_level`: level of the children's `dsm.handler` logger (None: the worker's, read
    when a child starts); `log_format` formats their log lines on stderr. `grace`: how long
    `close()` lets children finish their attempt before it kills them. `hot`: how many children
    run the calls of quick handlers at once, each holding a millisecond's worth of them (by their
    run time, 2 to 64), before the next such call waits (default: twice the CPUs; see
    `pacing.py`). `idle_exit`: seconds a child may stay idle before it ends, while more than `hot`
    children live (children started for a burst of calls that wait, one per slot, do not hold
    their memory for good).

    Like the event loop it serves, it is not thread-safe: call it from the loop's thread. POSIX only
    (pipes watched by the loop, a select on them in the child).
    """

    def __init__(self, size: int, *, search_path: Iterable[str | os.PathLike[str]] = (),
                 env: Mapping[str, str] | None = None, preload: Iterable[str] = (), log_level: int | None = None,
                 log_format: str = DEFAULT_LOG_FORMAT, grace: float = 2.0, hot: int | None = None,
                 idle_exit: float = IDLE_EXIT):
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
        self.retired = 0  # children ended after they stayed idle `idle_exit` seconds
        self.idle_exit = idle_exit
        self._retire_timer: asyncio.TimerHandle | None = None  # when to look for children idle too long
        pacing_limit = hot if hot is not None else max(2, 2 * (os.cpu_count() or 1))
        # the loop's clock from the first call on (`start`)
        self._pacing: Pacer[ChildProcess, ProcessAttempt] = Pacer(size, pacing_limit, clock=time.monotonic)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_timer: asyncio.TimerHandle | None = None  # the wake-up the pacing asked for
        self._timeouts: Timeouts[ProcessAttempt] = Timeouts()
        self._timeout_timer: asyncio.TimerHandle | None = None  # for the first of them
        self._unflushed: set[ChildProcess] = set()  # children with calls to write at the end of this turn of the loop
        self._reaping: dict[subprocess.Popen, Callable[[int | None], None] | None] = {}
        self._serial = 0
        self._closed = False

    # -- the Executor protocol

    def start(self, call: TickCall) -> ProcessAttempt:
        if self._closed:
            raise RuntimeError("the executor is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._pacing.clock = loop.time
        elif loop is not self._loop:  # its children's pipes are watched by that loop
            raise RuntimeError("a ProcessExecutor serves the event loop of its first call only")
        self._serial += 1
        attempt = ProcessAttempt(self._serial, call, loop.create_future())
        self._pacing.wait(attempt)
        if call.timeout:
            deadline = attempt.since + call.timeout  # `since`: now, by the loop's clock
            if self._timeouts.add(deadline, attempt):
                self._set_timeout_timer(deadline)
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
        for timer in (self._wake_timer, self._retire_timer):
            if timer is not None:
                timer.cancel()
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
                    data = os.read(fd, READ_SIZE)
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
        if self._timeout_timer is not None:  # every attempt has ended
            self._timeout_timer.cancel()

    # -- children

    def _dispatch(self, *, woken: bool = False) -> None:
        """Carry out what the pacing decides now: calls to children, children to start."""
        decision = self._pacing.dispatch(woken=woken)
        if decision is not NOTHING:
            self._carry_out(decision)

    def _wake(self) -> None:
        self._wake_timer = None
        self._dispatch(woken=True)

    def _carry_out(self, decision: Decision[ChildProcess, ProcessAttempt]) -> None:
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
            for child, attempt in decision.sent:
                child.wbuf += CallFrame(attempt.id, attempt.call, attempt.reason).to_frame()
                self._unflushed.add(child)
        if decision.kill is not None:
            self._kill(decision.kill)
        if decision.wake_at is not None:
            assert self._loop is not None
            self._wake_timer = self._loop.call_at(decision.wake_at, self._wake)
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
        options = ChildOptions(
            path=tuple(str(p) for p in sys.path if str(p) not in self.search_path),
            search=self.search_path,  # first on the import path only while a handler loads
            ppid=os.getpid(),
            level=logging.getLogger().getEffectiveLevel(),
            handler_level=(self.log_level if self.log_level is not None
                           else logging.getLogger("dsm.handler").getEffectiveLevel()),
            text_format=self.log_format,
            log=logs.settings(),  # text or JSON, and the worker's name for lines that cannot know it
            preload=self.preload,
            cpu_clock_from=IGNORE_CPU_BELOW)  # the pacing does not look at the CPU share of shorter calls
        env = dict(self.env if self.env is not None else os.environ)
        env["DSM_WORKER_PID"] = str(os.getpid())  # which worker a handler runs for, as its own pid did
        proc = subprocess.Popen([sys.executable, "-c", BOOT, options.to_json()], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, close_fds=True)
        assert self._loop is not None
        self._pacing.add(ChildProcess(self._loop, proc, self._reply, self._lost))
        self.started += 1
        log.debug("started handler process %d", proc.pid)

    def _reply(self, child: ChildProcess, frame: frames.ToWorker) -> None:
        if isinstance(frame, ReadyFrame):
            if self._pacing.ready(child):
                self._dispatch()
                self._retire_later()
            return
        if not child.calls or frame.id != child.calls[0].id:
            return  # a late reply to an attempt that was let go (taken back, or its child replaced)
        attempt = self._pacing.answered(child, frame.seconds, frame.cpu_seconds)
        self._finish(attempt, frame.outcome)
        if not self._closed:
            self._dispatch()
            self._retire_later()

    def _retire_later(self) -> None:
        """A child became idle: if more children live than the pacing keeps busy, look for those
        idle too long once one could be."""
        if self._retire_timer is None and len(self._pacing.lanes) > self._pacing.pacing_limit and not self._closed:
            assert self._loop is not None
            self._retire_timer = self._loop.call_later(self.idle_exit, self._retire)

    def _retire(self) -> None:
        """End the children idle for `idle_exit` seconds while more than the pacing's live; look
        again when the next would have been idle that long."""
        self._retire_timer = None
        if self._closed:
            return
        idle, again = self._pacing.idle_too_long(self.idle_exit)
        for child in idle:
            log.debug("handler process %d idle for %gs: ended", child.pid, self.idle_exit)
            self._detach(child)  # its input closed: it ends
            self._reap(child.proc, None)
            self.retired += 1
        if again is not None:
            assert self._loop is not None
            self._retire_timer = self._loop.call_at(again, self._retire)

    def _finish(self, attempt: ProcessAttempt, outcome: Outcome | None) -> None:
        if not attempt.ended:
            attempt.end()
        if outcome is not None and not attempt.future.done():
            try:
                attempt.future.set_result(outcome)
            except RuntimeError:  # its event loop is closed: nobody is waiting any more
                pass

    def _set_timeout_timer(self, when: float) -> None:
        assert self._loop is not None
        if self._timeout_timer is not None:
            self._timeout_timer.cancel()
        self._timeout_timer = self._loop.call_at(when, self._timeouts_passed)

    def _timeouts_passed(self) -> None:
        assert self._loop is not None
        self._timeout_timer = None
        for attempt in self._timeouts.due(self._loop.time() + _CLOCK_RESOLUTION):
            self._expire(attempt)
        first = self._timeouts.first()
        if first is not None and self._timeout_timer is None:
            self._set_timeout_timer(first)

    def _expire(self, attempt: ProcessAttempt) -> None:
        """The attempt's timeout passed: a waiting call is dropped, a running one costs its child."""
        if attempt.ended:
            return
        self._carry_out(self._pacing.expired(attempt))
        self._finish(attempt, timed_out(attempt.call))
        self._dispatch()

    def _kill(self, child: ChildProcess) -> None:
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

    def _lost(self, child: ChildProcess, why: str, kill: bool) -> None:
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

    def _detach(self, child: ChildProcess) -> ProcessAttempt | None:
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
