"""Starting an instance under an id that may exist: the same start again is the same instance.

A client that retries a submit (a timeout, a crash, a `--jsonl` file sent twice) must not create a
second instance. The id is the key: creating it is a compare-create in the store, so of any number
of concurrent submitters one creates the instance and the others read it and compare. Same
definition (digest) and same payload (as JSON values, exactly: 1 and 1.0 differ) is the same
start, and returns the instance; anything else is refused, saying what differs.

The payload an instance started with is its record's `input`. An input larger than INPUT_KEPT
bytes is not kept in the record (it would double a large payload in every commit); its digest is,
and the comparison uses it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

from .errors import InstanceExists
from .records import Instance
from .transition import same_json

INPUT_KEPT = 256 * 1024  # bytes of serialized input kept in the record


def input_digest(payload: dict[str, Any]) -> str:
    """The digest of a payload as a JSON value: independent of key order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def keep_input(inst: Instance, size: int) -> Instance:
    """The new instance's record with its input, or (over INPUT_KEPT bytes) the input's digest."""
    if size <= INPUT_KEPT or inst.input is None:
        return inst
    return replace(inst, input=None, input_digest=input_digest(inst.input))


def same_start(existing: Instance, new: Instance) -> None:
    """Raise InstanceExists unless `new` starts what `existing` started: the same definition and
    the same input."""
    if existing.digest != new.digest:
        raise InstanceExists(f"instance {existing.id} exists with another definition: {existing.machine} "
                             f"{existing.digest[:19]}, not {new.machine} {new.digest[:19]}; choose another id")
    if existing.input is not None and new.input is not None:
        same = same_json(existing.input, new.input)
    else:
        same = existing.input_digest is not None and existing.input_digest == _digest_of(new)
    if not same:
        started = _preview(existing.input) if existing.input is not None else "a payload too large to show"
        raise InstanceExists(f"instance {existing.id} exists with another payload (it started with {started}); "
                             "choose another id")


def _digest_of(inst: Instance) -> str | None:
    if inst.input_digest is not None:
        return inst.input_digest
    return input_digest(inst.input) if inst.input is not None else None


def _preview(payload: Any, limit: int = 200) -> str:
    text = json.dumps(payload, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."
