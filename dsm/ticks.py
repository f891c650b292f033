"""Where sync handlers run: a fixed set of daemon threads, results handed back to the event loop
in bursts.

A ThreadPoolExecutor costs a concurrent Future, a condition variable and a loop wake-up per
call. Here a finished tick appends its result to a deque and wakes the loop only if no wake-up is
already pending, so a burst of quick ticks costs one wake-up. The threads are daemons: a handler
that never returns (after a timeout abandoned it) cannot keep the process alive at exit.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from typing import Any, Callable

_STOP = object()


class TickRunner:
    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int, name: str = "dsm-tick"):
        self.loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._wake_pending = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        future = self.loop.create_future()
        self._jobs.put((future, fn, args))
        return future

    def _serve(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            future, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine, which decides
                result, error = None, exc
            self._done.append((future, result, error))
            with self._lock:
                if self._wake_pending:
                    continue
                self._wake_pending = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _deliver(self) -> None:
        with self._lock:
            self._wake_pending = False
        while self._done:
            future, result, error = self._done.popleft()
            if future.done():  # timed out or cancelled meanwhile
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(_STOP)
