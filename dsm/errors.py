"""The error tree of dsm: one small hierarchy, so callers catch by meaning, not by module."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


class DsmError(Exception):
    """Base of every error dsm raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found in a definition, located at a line and column of its file."""

    file: str
    line: int
    col: int
    message: str
    path: str = ""

    def __str__(self) -> str:
        message = " ".join(self.message.split())  # one line per problem, whatever a parser said
        return f"{self.file}:{self.line}:{self.col}: error: {message}"


class DefinitionError(DsmError):
    """A machine definition is invalid; carries every problem found, each with file:line:col."""

    def __init__(self, problems: list[Problem] | Problem):
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = sorted(problems, key=lambda p: (p.file, p.line, p.col))
        first = self.problems[0] if self.problems else None
        self.file = first.file if first else ""
        self.line = first.line if first else 0
        self.col = first.col if first else 0
        self.path = first.path if first else ""
        super().__init__("\n".join(str(p) for p in self.problems))


class InputError(DsmError):
    """Input given on the command line or to the API is invalid (a payload, a duration, an id)."""


class StoreError(DsmError):
    """The store failed an operation."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (etcd down, wrong endpoint, TLS or auth refused)."""


class NoSpace(StoreUnavailable):
    """etcd's NOSPACE alarm is raised: it refuses writes (deletes still pass) until an operator
    makes room and disarms the alarm. Nothing was applied; retry once writes pass again."""


class ConflictError(StoreError):
    """A compare-and-swap lost to a concurrent writer."""


class AccessDenied(StoreError):
    """etcd refused the operation for this user (authentication or role permissions)."""


class LeaseLost(StoreError):
    """A lease expired or was revoked: every claim bound to it is gone."""


class Compacted(StoreError):
    """A watch asked for revisions the store has already compacted away."""

    def __init__(self, compact_revision: int):
        self.compact_revision = compact_revision
        super().__init__(f"revisions below {compact_revision} were compacted")


class PartFailed(DsmError):
    """A long-lived part of a worker or server (watch, lease keeper, heartbeat, housekeeper, HTTP
    server) ended while the process meant to go on: the process stops and exits non-zero, so that a
    supervisor restarts it, rather than living on doing nothing. `cause` is what ended the part."""

    def __init__(self, who: str, part: str, cause: BaseException | None):
        self.who = who
        self.part = part
        self.cause = cause
        if cause is None:
            reason = "ended unexpectedly"
        elif isinstance(cause, asyncio.CancelledError):
            reason = "was cancelled"
        else:
            reason = " ".join(str(cause).split()) or type(cause).__name__
            if not isinstance(cause, DsmError):
                reason = f"{type(cause).__name__}: {reason}"
        super().__init__(f"{who}: {part} stopped: {reason}")


class NotFound(DsmError):
    """An instance or definition asked for by id does not exist."""


class Timeout(DsmError):
    """A wait for an instance gave up: the time it was given passed before the instance finished."""


class HandlerError(DsmError):
    """A tick handler failed an attempt; carries the error type name recorded in the instance."""

    def __init__(self, type_name: str, message: str, *, retryable: bool = True):
        self.type_name = type_name
        self.retryable = retryable
        super().__init__(message)


class AttemptAbandoned(DsmError):
    """Raised by ctx.heartbeat() when the attempt no longer counts (claim lost, cancelled, timed out)."""


class InvalidSignal(InputError):
    """A signal the instance's machine does not take: a name none of its signal states waits for,
    or an outcome label none of the states waiting for that name routes on."""


class InstanceExists(InputError):
    """An instance id is taken by an instance started with another definition or payload."""


class ScheduleExists(InputError):
    """A schedule of that name exists: creating it again is refused (`apply` updates it)."""
