"""Exit codes, the contract's, as named constants; and `Fail`, which ends a command with one of them."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from dsm import records
from dsm.errors import AccessDenied, PartFailed, StoreUnavailable


class ExitCode(IntEnum):
    OK = 0
    INSTANCE_FAILED = 1  # failed or cancelled
    CASE_FAILED = 1  # dsm test: a case did not do what it expected
    PART_FAILED = 1  # a worker or server stopped because a part of it ended (PartFailed)
    INVALID = 2  # invalid definition, input or usage
    UNREACHABLE = 3  # etcd unreachable
    TIMEOUT = 4  # --timeout passed before the instance finished
    INTERRUPTED = 130


class Fail(Exception):
    """Stop the command with a one-line message on stderr and an exit code."""

    def __init__(self, code: ExitCode, message: str = ""):
        self.code = code
        super().__init__(message)


def exit_for(record: dict[str, Any]) -> ExitCode:
    """How `dsm run` and `dsm status --follow` end: as the instance did."""
    return ExitCode.OK if record["status"] == records.SUCCEEDED else ExitCode.INSTANCE_FAILED


def part_failed_code(exc: PartFailed) -> ExitCode:
    """Refused by etcd even with a fresh token: 2, as at start; etcd gone: 3; anything else: 1."""
    if isinstance(exc.cause, AccessDenied):
        return ExitCode.INVALID
    if isinstance(exc.cause, StoreUnavailable):
        return ExitCode.UNREACHABLE
    return ExitCode.PART_FAILED
