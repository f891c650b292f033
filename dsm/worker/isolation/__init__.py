"""Tick handlers in child processes, so user code cannot stall the worker or outlive its timeout.

Threads share the worker's GIL and, for `async def` handlers, an event loop: a handler that holds
the GIL (a catastrophic regex, a C extension) freezes the worker's own loop, its lease lapses, and
other instances' ticks run twice. `ProcessExecutor` moves handlers out of the worker's process.

Up to one child process per slot (`size` of them, the worker's concurrency) runs handlers, one
attempt at a time each, in the order it was sent them; handlers busy on the CPU run on no more
than twice the CPUs at once, and children beyond those end once idle for a minute. The parts:

* `supervisor.py`: the worker's side. `ProcessExecutor` starts the children, writes them calls and
  reads their answers on non-blocking pipes watched by the event loop (at most one write and one
  read per tick, fewer when calls queue, and no thread), keeps each attempt's timeout (a child
  whose call outlives it is killed and replaced; `timeouts.py` watches them all with one timer),
  reaps the dead and fails their attempts.
* `pacing.py`: which child a call goes to. Quick handlers are paced onto a few busy children, their
  calls queued there (waking a sleeping process is most of what a trivial tick costs); handlers
  whose calls wait are not; which children have been idle too long. A policy with no I/O and an
  injected clock; the supervisor carries out its decisions.
* `frames.py`: the protocol, typed frames on the child's stdin and stdout (call, abandon, drop; ready,
  result, failure), and the wire format written down.
* `child.py`: the child's side, what a handler process imports (and nothing heavier: not the
  worker, the store or the compiler). It runs calls in order, reads abandons and drops before it
  starts the next, and makes outcomes as a thread would (`normalize`, `failure_of`).
* `forks.py`: a process a handler forks from a child never serves as that child: one that comes
  back from the handler ends at once, and its attempt fails as `HandlerForked`.

Children end with the worker: at the end of their input (`close()`, or the worker's death closes
the pipe) and, on Linux, by a parent-death signal, which also stops a child stuck in a handler.

The names below are imported on first use: a handler process imports `child.py` through this
package and must not pay for the supervisor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .supervisor import DEFAULT_LOG_FORMAT, ProcessAttempt, ProcessExecutor

_WHERE = {"ProcessExecutor": (".supervisor", "ProcessExecutor"), "ProcessAttempt": (".supervisor", "ProcessAttempt"),
          "DEFAULT_LOG_FORMAT": (".supervisor", "DEFAULT_LOG_FORMAT"),
          # the names tests build raw frames and a handler process's server with
          "_Server": (".child", "HandlerServer"), "_frame": (".frames", "encode"), "_CALL": (".frames", "CALL"),
          "_ABANDON": (".frames", "ABANDON"), "_DROP": (".frames", "DROP")}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where[0], __name__), where[1])
    globals()[name] = value
    return value


__all__ = ["DEFAULT_LOG_FORMAT", "ProcessAttempt", "ProcessExecutor"]
