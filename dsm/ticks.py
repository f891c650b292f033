"""One attempt of a tick: what its handler is called with, and how what it returns becomes an `Outcome`.

Whoever runs a handler (an executor's thread or process, the embedded engine inline, `dsm test`)
gives it a `TickCall`'s payload and context, and turns its result or exception into an `Outcome`
here, with `normalize` and `failure_of`: an outcome means the same wherever it was made. A tick
call for a token is built by `dsm.step.tick_call`; where it runs is `dsm.executors`'s business.
This module stays light: a handler process imports it each time one starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any

from . import logs, payloads
from .context import Context, make_context
from .errors import AttemptAbandoned, HandlerError
from .frozen import fast_init
from .graph import Handler
from .transition import Failure, Outcome

TRACEBACK_LIMIT = 4096  # characters of a failed attempt's traceback that are kept


@fast_init
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
        tb = tb.tb_next  # the frames that called the handler are dsm's, not the user's
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


_HERE = os.path.dirname(os.path.abspath(__file__))
# Where handlers are called from: the executors' threads, the drivers' inline calls, a handler
# process, the event loop that awaits an async handler. Their frames lead a traceback, not the user's.
_CALLER_FILES = frozenset(os.path.join(_HERE, *name) for name in (("executors.py",), ("driver.py",),
                                                                  ("testing", "runner.py")))
_CALLER_DIRS = frozenset((os.path.join(_HERE, "worker", "isolation"),
                          os.path.dirname(os.path.abspath(asyncio.__file__))))


def _ours(filename: str) -> bool:
    """A frame of dsm's that called a handler, or of the event loop that awaits an async handler."""
    path = os.path.abspath(filename)
    return path in _CALLER_FILES or os.path.dirname(path) in _CALLER_DIRS


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


def timed(outcome: Outcome, started_at: float, duration: float) -> Outcome:
    """The outcome with when its attempt began and how long it ran (for the history)."""
    return Outcome(outcome.payload, outcome.label, outcome.failure, started_at, duration)
