"""Durations as the machine language writes them: seconds, or strings like 250ms, 30s, 5m, 2h, 1d."""

from __future__ import annotations

import math
import re

from .errors import InputError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# The schema carries the same pattern so editors flag bad durations before dsm does.
PATTERN = r"^\s*(\d+(\.\d+)?(ms|s|m|h|d)\s*)+$"
_WHOLE = re.compile(PATTERN)


def parse_duration(value: object, *, what: str = "duration") -> float:
    """Return seconds for a number or a unit string; compound forms like '1m30s' add up."""
    if isinstance(value, bool):
        raise InputError(f"{what}: expected a number of seconds or a string like 30s, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float
            seconds = math.inf
        if not seconds >= 0 or seconds == math.inf:
            raise InputError(f"{what}: must be a finite number of seconds >= 0, got {shown(value)}")
        return seconds
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None:
            return parse_duration(number, what=what)
        if _WHOLE.match(text):
            seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
            if seconds == math.inf:  # digits enough to pass any float
                raise InputError(f"{what}: must be a finite duration, got {shown(value)}")
            return seconds
    raise InputError(f"{what}: expected a number of seconds or a string like 250ms, 30s, 5m, 2h, 1d; "
                     f"got {shown(value)}")


def shown(value: object, limit: int = 40) -> str:
    """A value for a one-line message: a long one cut, an integer of many digits told by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 128:
        try:
            return f"an integer of {len(str(abs(value)))} digits"
        except ValueError:  # more digits than Python turns into text
            return "an integer of thousands of digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def format_duration(seconds: float) -> str:
    """Render seconds the way a user would write them back in YAML."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
