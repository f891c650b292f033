"""Payloads are JSON objects: checked, copied and sized here, once, for every door they pass.

The fast path is C all the way (json.dumps, json.loads, ==); only when it disagrees does a
slower walk find the exact path of the offending value for the error message.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Any

from . import codec

DEFAULT_LIMIT = 1024 * 1024  # serialized bytes
MAX_DEPTH = 253  # nested objects and arrays: the most the fast encoder (orjson) writes
# Decimal digits of an integer, at most: Python's default limit for turning an integer into text
# and back (sys.get_int_max_str_digits). Fixed here rather than read from this process, so that a
# payload one process writes, every other process (worker, client, API) reads, whatever its own
# setting; lower only in a process whose interpreter is set lower, which could not write more.
MAX_INT_DIGITS = 4300


def default_limit() -> int:
    """The payload limit: DSM_PAYLOAD_LIMIT (bytes) or 1 MiB."""
    raw = os.environ.get("DSM_PAYLOAD_LIMIT")
    if raw and raw.isdigit() and int(raw) > 0:
        return int(raw)
    return DEFAULT_LIMIT


class PayloadError(ValueError):
    """A payload is not a JSON object, or is too large; `kind` names which."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


def _path(parts: list[Any]) -> str:
    out = "payload"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if isinstance(p, str) and p.isidentifier() else f"[{p!r}]"
    return out


def int_digits() -> int:
    """The most decimal digits of a payload integer: MAX_INT_DIGITS, or this interpreter's own limit
    when it is set lower."""
    own = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    return min(MAX_INT_DIGITS, own) if own else MAX_INT_DIGITS


def too_many_digits(number: int) -> bool:
    """Whether an integer has more decimal digits than payloads keep (`int_digits`)."""
    return abs(number) >= _ceiling(int_digits())


@functools.lru_cache(maxsize=4)
def _ceiling(digits: int) -> int:
    return 10 ** digits  # the smallest integer of digits + 1 digits


def _surrogate(text: str) -> str | None:
    """The first lone surrogate in `text`: not a character, so not in any UTF-8 (or JSON) text."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


class _LongInteger:
    """An integer of JSON text with more digits than payloads keep, read as this (`parse`) so that
    `check` can say where it was."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


def _too_long(where: list[Any], digits: int | None, limit: int) -> str:
    count = f" ({digits})" if digits is not None else ""
    return (f"{_path(where)} is an integer of more than {limit} digits{count}; payload integers keep their exact "
            f"value up to {limit} digits")


def _explain(value: Any) -> str | None:
    """Find the first value that is not JSON; None when everything is (tuples count as lists)."""
    if not isinstance(value, dict):
        return f"expected a JSON object (dict), got {type(value).__name__}"
    limit = int_digits()
    stack: list[tuple[Any, list[Any]]] = [(value, [])]
    while stack:
        item, where = stack.pop()
        if isinstance(item, (dict, list, tuple)) and len(where) + 1 > MAX_DEPTH:
            return f"{_path(where[:3])}... is nested deeper than {MAX_DEPTH} levels"
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return f"{_path(where)} has a key {key!r} of type {type(key).__name__}; JSON keys are strings"
                bad = _surrogate(key)
                if bad is not None:
                    return (f"{_path(where)} has a key holding a lone surrogate {bad!r}, which is not a character "
                            "(JSON text cannot carry it)")
                stack.append((child, where + [key]))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, where + [i]) for i, child in enumerate(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{_path(where)} is {item!r}, which JSON cannot represent"
        elif isinstance(item, str):
            bad = _surrogate(item)
            if bad is not None:
                return f"{_path(where)} holds a lone surrogate {bad!r}, which is not a character (JSON text cannot " \
                       "carry it)"
        elif isinstance(item, int):  # bool included
            if too_many_digits(item):
                return _too_long(where, None, limit)
        elif isinstance(item, _LongInteger):
            return _too_long(where, item.digits, limit)
        elif item is not None:
            return f"{_path(where)} is a {type(item).__name__}, which is not a JSON value"
    return None


def check(value: Any, *, limit: int | None = None) -> tuple[dict[str, Any], int]:
    """Return (a private canonical copy, serialized size) or raise PayloadError."""
    limit = default_limit() if limit is None else limit
    try:
        raw = codec.dumps_strict(value)
        copy = codec.loads(raw)
        exact = isinstance(value, dict) and copy == value  # NaN written as null, tuples as lists: not exact
    except (TypeError, ValueError, RecursionError):
        exact, raw, copy = False, b"", None
    if not exact:
        problem = _explain(value)
        if problem is not None:
            raise PayloadError("InvalidPayload", problem)
        try:  # JSON after all (tuples, integers beyond 64 bits): the strict stdlib encoder decides
            text = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            raise PayloadError("InvalidPayload", "payload could not be serialized as JSON") from None
        raw = text.encode("utf-8")
        copy = json.loads(text)
    size = len(raw)
    if size > limit:
        raise PayloadError("PayloadTooLarge", f"payload is {size} bytes serialized; the limit is {limit} bytes")
    return copy, size


def parse(text: str, *, what: str = "payload", limit: int | None = None) -> dict[str, Any]:
    """Parse user-given JSON text (--payload, a JSONL line) into a checked payload."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except ValueError as exc:
        raise PayloadError("InvalidPayload", f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise PayloadError("InvalidPayload", f"{what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise PayloadError("InvalidPayload", f"{what} must be a JSON object, got {json_kind(value)}")
    return check(value, limit=limit)[0]


def _parse_int(text: str) -> int | _LongInteger:
    digits = len(text) - text.startswith("-")
    return _LongInteger(digits) if digits > int_digits() else int(text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_kind(value: Any) -> str:
    """What kind of JSON value this is, for messages ("an array", "a string" ...)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def copy(value: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a payload already known to be JSON, for a handler to mutate freely."""
    return codec.loads(codec.dumps(value))
