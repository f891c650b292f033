"""What a case expected against what its instance did, as readable differences (empty: it passed).

Values compare as JSON values, with one allowance for people writing YAML by hand: numbers
compare by value, so `total: 120` matches a payload's 120.0 (a boolean is never a number). An
expected payload, and the mappings inside it, are subsets: keys not named are not checked.
Lists are compared whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..records import HistoryEntry, Instance
from .cases import Expect

SHOWN = 160  # characters of one value shown in a difference


def path_of(inst: Instance, history: Sequence[HistoryEntry]) -> list[str]:
    """The states an instance went through: the state of each history entry in commit order, then
    the terminal state it ended in (a terminal state has no entry of its own)."""
    return [h.state for h in history] + ([inst.state] if inst.state is not None else [])


def differences(expect: Expect, inst: Instance, history: Sequence[HistoryEntry]) -> list[str]:
    out: list[str] = []
    if expect.status is not None and inst.status != expect.status:
        out.append(f"status: expected {expect.status}, got {inst.status}{_why(inst)}")
    if expect.path is not None:
        got = path_of(inst, history)
        if got != list(expect.path):
            out.append(_path_difference(list(expect.path), got))
    if expect.payload is not None:
        _subset(expect.payload, inst.payload, "payload", out)
    if expect.error is not None:
        error = inst.error.as_dict() if inst.error is not None else None
        if expect.error.fields is None:
            if error is not None:
                out.append(f"error: expected none, got {_show(error)}")
        elif error is None:
            out.append(f"error: expected {_show(dict(expect.error.fields))}, got none")
        else:
            _subset(expect.error.fields, error, "error", out)
    return out


def _why(inst: Instance) -> str:
    """What explains a status: the error, or what a running instance still waits at."""
    e = inst.error
    if e is not None:
        message = " ".join(e.message.split())  # one line, whatever the handler said
        return f" ({e.type} in state {e.state} after {e.attempts} attempt(s): {message})"
    if not inst.finished:
        return f" (waiting at {', '.join(inst.active) or 'nothing'})"
    if inst.state:
        return f" (at {inst.state})"
    return ""


def _path_difference(expected: list[str], got: list[str]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    if at < len(expected) and at < len(got):
        detail = f"from position {at + 1}: expected {expected[at]}, got {got[at]}"
    elif at < len(expected):
        detail = f"it stops after {len(got)} state(s), without {', '.join(expected[at:])}"
    else:
        detail = f"then {', '.join(got[at:])} too"
    return f"path: expected [{', '.join(expected)}], got [{', '.join(got)}]: {detail}"


def _subset(expected: Mapping[str, Any], got: Mapping[str, Any], where: str, out: list[str]) -> None:
    for key, want in expected.items():
        here = f"{where}.{key}" if key.isidentifier() else f"{where}[{json.dumps(key, ensure_ascii=False)}]"
        if key not in got:
            have = ", ".join(got) or "no keys"
            out.append(f"{here}: expected {_show(want)}, missing (there: {have})")
        elif isinstance(want, Mapping) and isinstance(got[key], Mapping):
            _subset(want, got[key], here, out)
        elif not same(want, got[key]):
            out.append(f"{here}: expected {_show(want)}, got {_show(got[key])}")


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, numbers by value (1 == 1.0, but never true == 1)."""
    if _number(a) and _number(b):
        return bool(a == b)
    if type(a) is not type(b):
        return isinstance(a, Mapping) and isinstance(b, Mapping) and _same_mapping(a, b)
    if isinstance(a, Mapping):
        return _same_mapping(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def _same_mapping(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = json.dumps(_plain(value), ensure_ascii=False)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
