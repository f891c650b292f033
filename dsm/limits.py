"""Limits a user raises through the environment (DSM_MAX_STATES, DSM_GUARD_MAX_SIZE ...).

One reader for all of them, so that a wrong value is refused the same way whichever it is,
naming the variable, instead of being ignored.
"""

from __future__ import annotations

import os

from .errors import InputError


def from_env(variable: str, default: int) -> int:
    """The positive whole number in `variable`, or `default` when it is unset or empty."""
    raw = os.environ.get(variable)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{variable}: {raw!r} is not a whole number") from None
    if value < 1:
        raise InputError(f"{variable}: must be at least 1, got {value}")
    return value
