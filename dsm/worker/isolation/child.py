"""A handler process: the loop that reads calls from the worker, runs their handlers, and answers.

It is started by the supervisor as a fresh interpreter running `BOOT`, which sets `sys.path` (the
worker's, so it finds the handler modules the worker found) and calls `main`. Before it reads
anything, `main` moves the protocol pipes to private descriptors and points descriptors 0 and 1
at /dev/null and stderr: what a handler prints cannot corrupt the protocol, and logs go to the
worker's stderr. It imports the modules to preload, then serves: one call at a time, in the order
they were sent (`frames.py`), each handler imported once (`dsm.handlers.resolve`) and kept,
`async def` handlers run on its own event loop. An attempt ends as it would on a thread: the shared
`normalize` / `failure_of` make its outcome. With each outcome goes how long the handler ran, and
how much of that on the CPU, which the pacing reads.

Calls queued behind the running one have not started. Before it starts the next, the process reads
what the worker sent meanwhile: a drop takes a queued call back (it never starts here), an abandon
makes it start abandoned. `ctx.heartbeat()` first reads any frames already waiting (without
blocking), so an abandon sent by the worker makes it raise `AttemptAbandoned` as on a thread. At
the end of its input (the worker closed it, or died) the process ends; on Linux, the worker's death
also kills it by a parent-death signal, even in a handler that never returns. Processes a handler
forks are watched by `forks.py`.

This module is what a handler process imports: it must stay cheap to import (not the worker, the
store or the compiler), as it is paid each time a process starts.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ... import logs
from ...context import Context, idempotency_key
from ...graph import Handler
from ...handlers import HandlerImportError, import_module, resolve
from ...ticks import TickCall, failure_of, normalize
from ...transition import Failure, Outcome
from . import frames
from .forks import FORK_GRACE, ForkGuard
from .frames import READ_SIZE, AbandonFrame, CallFrame, ReadyFrame, ResultFrame

log = logging.getLogger(__package__)  # the package's logger, as the worker's side of it logs

# A handler process's first code: it runs before dsm can be imported, so it sets sys.path itself.
BOOT = ("import json, sys; o = json.loads(sys.argv[1]); "
        "sys.path[:] = o['path'] + [p for p in sys.path if p not in o['path']]; "
        "from dsm.worker.isolation.child import main; main(o)")


@dataclass(frozen=True, slots=True)
class ChildOptions:
    """What a handler process is started with: JSON on its command line, which `BOOT` reads."""

    path: tuple[str, ...]  # its sys.path: the worker's (BOOT sets it before dsm can be imported)
    search: tuple[str, ...]  # folders first on the import path while a handler module loads
    ppid: int  # the worker's pid: a process whose worker is gone already ends at once
    level: int  # of the root logger
    handler_level: int  # of the `dsm.handler` logger
    text_format: str  # the template of its log lines in the text format
    log: dict[str, Any]  # `dsm.logs.settings()`: text or JSON, and the worker's name
    preload: tuple[str, ...]  # modules imported before it takes calls
    # seconds: the CPU clock (a system call) is read for a handler whose last call ran at least this
    # long; a shorter one is too short for its share of the CPU to mean anything to the pacing
    cpu_clock_from: float

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_json(cls, given: dict[str, Any]) -> ChildOptions:
        """From the JSON object `to_json` wrote, as `BOOT` parsed it."""
        return cls(path=tuple(given["path"]), search=tuple(given["search"]), ppid=given["ppid"],
                   level=given["level"], handler_level=given["handler_level"], text_format=given["text_format"],
                   log=given["log"], preload=tuple(given["preload"]), cpu_clock_from=given["cpu_clock_from"])


@dataclass(frozen=True, slots=True)
class ChildContext(Context):
    """A Context whose heartbeat first reads the abandon frames the worker sent since the last one."""

    _poll: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, call: TickCall, poll: Callable[[], None]) -> ChildContext:
        """What `dsm.ticks.context_of` says of `call`, its heartbeat calling `poll` first."""
        return cls(instance_id=call.instance_id, machine=call.machine, state=call.state, attempt=call.attempt,
                   branch=call.branch, idempotency_key=idempotency_key(call.instance_id, call.visit),
                   deadline=call.deadline, _worker=call.worker, _poll=poll)

    def heartbeat(self, details: Any = None) -> None:
        if self._poll is not None:
            self._poll()
        Context.heartbeat(self, details)  # not super(): slots dataclasses break its zero-argument form


class HandlerServer:
    """The handler process's side: read calls, run them one at a time in the order sent, write each outcome."""

    def __init__(self, rfd: int, wfd: int, search: tuple[str, ...] = (), cpu_clock_from: float = 0.0):
        self.search = search
        self.cpu_clock_from = cpu_clock_from  # (`ChildOptions`; 0: on every call)
        self.rfd = rfd
        self.wfd = wfd
        self.forks = ForkGuard((rfd, wfd), lambda: self.current[0] if self.current is not None else None)
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
        self.forks.install()
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

    def send(self, frame: ReadyFrame | ResultFrame) -> None:
        if self.forks.forked:  # a copy of this process never writes to the worker
            self.forks.back()
        view = memoryview(frame.to_frame())
        while view:
            view = view[os.write(self.wfd, view):]

    def poll(self) -> None:
        if self.forks.forked:  # a heartbeat in a copy a handler forked: the frames are not for it
            return
        if not self.eof and self.lock.acquire(blocking=False):  # busy: another thread is reading
            try:
                self.fill(block=False)
            finally:
                self.lock.release()

    def fill(self, *, block: bool) -> None:
        if self.forks.forked:  # a copy of this process never reads what the worker sends
            self.forks.back()
        if not block and not select.select([self.rfd], [], [], 0)[0]:
            return
        data = os.read(self.rfd, READ_SIZE)
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

    def run(self, frame: CallFrame) -> ResultFrame:
        call, ident = frame.call, frame.id
        module, function, ref = call.handler.module, call.handler.function, call.handler.ref
        payload, state, deadline = call.payload, call.state, call.deadline
        ctx = ChildContext.of(call, self.poll)
        if frame.abandoned is not None:
            ctx.abandon(frame.abandoned)
        for pid, earlier in self.forks.late():
            log.warning("handler process %d: process %d, forked by the handler of call %s, came back from it "
                        "after the call had ended, and was ended", os.getpid(), pid, earlier)
        self.current = (ident, ctx)
        started = cpu = 0.0
        measured = False
        try:
            handler = self.handler(module, function)  # a first import is not the handler's run time
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
            self.forks.back()
            outcome = normalize(result, payload, state, call.payload_limit)
        except HandlerImportError as exc:
            self.forks.back(exc)  # a module that forks as it is imported
            outcome = Outcome(failure=Failure("HandlerUnavailable", f"state {state!r}: handler {ref!r}: {exc}",
                                              retryable=True))
        except (Exception, SystemExit, KeyboardInterrupt, asyncio.CancelledError) as exc:  # noqa: BLE001 - user code
            self.forks.back(exc)
            outcome = Outcome(failure=failure_of(exc))
        finally:
            self.current = None
        wall = time.perf_counter() - started if started else 0.0
        cpu_seconds = time.process_time() - cpu if measured and started else None
        self.timed[(module, function)] = wall >= self.cpu_clock_from
        if self.forks.pending:
            grace = FORK_GRACE if deadline is None else max(0.0, min(FORK_GRACE, deadline - time.time()))
            back = self.forks.came_back(ident, grace)
            if back:
                outcome = Outcome(failure=Failure("HandlerForked", f"state {state!r}: the handler forked and came "
                                                  f"back from it in the new process too (pid {back[0]}), which would "
                                                  "have served as this one; it was ended. A handler that forks must "
                                                  "end the new process with os._exit() or replace it with exec",
                                                  retryable=False))
        return ResultFrame(ident, outcome, wall, cpu_seconds)


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


def main(given: dict[str, Any]) -> None:
    """A handler process's main (`BOOT`): set up descriptors, logging and modules, then serve calls."""
    options = ChildOptions.from_json(given)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the worker, which decides what ends
    _die_with_parent(options.ppid)
    rfd, wfd = os.dup(0), os.dup(1)  # private: not inherited by processes a handler starts
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stream = logging.StreamHandler(sys.stderr)
    logs.apply(options.log)
    stream.setFormatter(logs.formatter(text=options.text_format))
    root = logging.getLogger()
    root.handlers[:] = [stream]
    root.setLevel(options.level)
    logging.getLogger("dsm.handler").setLevel(options.handler_level)
    for module in options.preload:
        try:
            import_module(module, search_path=options.search)
        except Exception as exc:  # noqa: BLE001 - the calls that need it will say why; the others can run
            log.warning("handler process %d: cannot preload %s: %s: %s", os.getpid(), module,
                        type(exc).__name__, exc)
    try:
        HandlerServer(rfd, wfd, options.search, options.cpu_clock_from).serve()
    except BrokenPipeError:  # the worker is gone
        pass
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: threads a handler left behind must not keep the child alive
