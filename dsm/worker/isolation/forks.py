"""Fork protection in a handler process: a process a handler forks must not serve as the handler process.

A handler that forks makes a copy of the handler process, its protocol pipes included. The copy
closes them as it is forked and never reads or writes a frame: one that comes back from the
handler ends at once, and its attempt fails as `HandlerForked` (not retried); one that ends itself
(`os._exit`, `sys.exit`, an exec, multiprocessing) changes nothing. See `ForkGuard`.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .frames import READ_SIZE, ForkNotice

FORK_GRACE = 1.0  # seconds a handler process waits, after a handler that forked returns, for the copy to end


@dataclass(slots=True)
class ForkedCopy:
    """A process forked from the child while it ran a call, that has not yet been heard of."""

    fd: int  # the read end of the pipe it says on that it came back from the handler
    call: int | None  # the id of the call that was running when it was forked


class ForkGuard:
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
        self.pending: list[ForkedCopy] = []
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
            self.pending.append(ForkedCopy(pipe[0], pipe[2]))

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

    def _heard(self, copy: ForkedCopy) -> list[int]:
        """A copy's pipe is readable: the pid it wrote when it came back, or nothing once it ended or
        exec'd. Either way it is done with; one that came back is reaped (it ends as it writes)."""
        try:
            data = os.read(copy.fd, READ_SIZE)
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
