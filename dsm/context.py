"""What a tick handler is told about the attempt it runs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import AttemptAbandoned

handler_log = logging.getLogger("dsm.handler")


@dataclass(frozen=True, slots=True)
class Context:
    """The handler's view of one attempt.

    `idempotency_key` is the same for every attempt of one visit of a state and different for
    the next visit: use it to make side effects happen once even when a tick runs twice.
    `deadline` is a `time.time()` value (None without a timeout). `heartbeat()` raises
    AttemptAbandoned once the attempt no longer counts (timed out, instance cancelled or failed
    elsewhere, claim lost), so long handlers can stop early.
    """

    instance_id: str
    machine: str
    state: str
    attempt: int
    branch: tuple[str, ...]
    idempotency_key: str
    deadline: float | None
    _reason: list[str] = field(default_factory=list, repr=False)  # set once: why the attempt was abandoned
    _beats: list[float] = field(default_factory=list, repr=False)
    _logger: list[logging.LoggerAdapter] = field(default_factory=list, repr=False, compare=False)
    _worker: str | None = field(default=None, repr=False, compare=False)  # for the logger's lines

    @property
    def logger(self) -> logging.LoggerAdapter:
        """`dsm.handler`, its records carrying instance, machine, state, attempt and the worker when
        known (`dsm.logs`; made on first use: most attempts never log, and a quick tick should not
        pay for it)."""
        if not self._logger:
            extra: dict[str, object] = {"instance": self.instance_id, "machine": self.machine, "state": self.state,
                                        "attempt": self.attempt}
            if self._worker is not None:
                extra["worker"] = self._worker
            self._logger.append(logging.LoggerAdapter(handler_log, extra))
        return self._logger[0]

    def heartbeat(self, details: Any = None) -> None:
        """Report progress; raise AttemptAbandoned if the attempt should stop."""
        now = time.time()
        if len(self._beats) < 1:
            self._beats.append(now)
        else:
            self._beats[0] = now
        if self._reason:
            raise AttemptAbandoned(self._reason[0])
        if self.deadline is not None and now > self.deadline:
            raise AttemptAbandoned(f"attempt {self.attempt} of state {self.state!r} passed its deadline")

    @property
    def abandoned(self) -> bool:
        """Whether the worker told this attempt to stop (its deadline passing is not that)."""
        return bool(self._reason)

    @property
    def last_heartbeat(self) -> float | None:
        return self._beats[0] if self._beats else None

    def abandon(self, reason: str) -> None:
        """Called by the worker, never by handlers (list.append is atomic across threads)."""
        if not self._reason:
            self._reason.append(reason)


def make_context(*, instance_id: str, machine: str, state: str, attempt: int, branch: tuple[str, ...],
                 visit: int, deadline: float | None, worker: str | None = None) -> Context:
    # every field by position: a context is made for each attempt, and keywords and default
    # factories make that a quarter slower
    return Context(instance_id, machine, state, attempt, branch, idempotency_key(instance_id, visit), deadline, [], [],
                   [], worker)


def idempotency_key(instance_id: str, visit: int) -> str:
    """The same for every attempt of one visit of a state, different for the next visit."""
    return f"{instance_id}/{visit}"
