"""The JSON Schemas of dsm's files (machines, and `dsm test` files), and their errors turned into
located, readable problems."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from .errors import Problem
from .loader import Document, dotted

_SOURCES = Path(__file__).resolve().parent.parent / "schemas"
MACHINE = "machine.schema.json"
TEST_FILE = "test.schema.json"  # `dsm test` files


def schema_text(name: str = MACHINE) -> str:
    """A schema as shipped: inside the wheel, or schemas/ of a source checkout."""
    return _text(name)


def schema(name: str = MACHINE) -> dict[str, Any]:
    return _parsed(name)


@lru_cache(maxsize=4)  # by name, given or defaulted alike: one object per schema, which `_is_duration` needs
def _text(name: str) -> str:
    packaged = resources.files("dsm").joinpath(name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (_SOURCES / name).read_text(encoding="utf-8")


@lru_cache(maxsize=4)
def _parsed(name: str) -> dict[str, Any]:
    return json.loads(_text(name))


@lru_cache(maxsize=4)
def _validator(name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_parsed(name))


def _is_duration(error: jsonschema.ValidationError) -> bool:
    return error.validator == "oneOf" and error.schema is _parsed(MACHINE)["definitions"]["duration"]


def _message(error: jsonschema.ValidationError, doc: Document) -> tuple[tuple, str, bool]:
    """Return (path, message, at_key) for one schema error."""
    path = tuple(error.absolute_path)
    where = dotted(path)
    prefix = f"{where}: " if where else ""
    value = error.instance
    kind = error.validator
    rule: dict[str, Any] = dict(error.schema) if isinstance(error.schema, Mapping) else {}
    validator_value: Any = error.validator_value
    if kind == "additionalProperties":
        allowed = sorted(rule.get("properties", {}))
        extra = [k for k in value if k not in allowed] if isinstance(value, dict) else []
        name = extra[0] if extra else "?"
        hint = difflib.get_close_matches(name, allowed, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(allowed)})"
        return path + (name,), f"{prefix}unknown key {name!r}{suggestion}", True
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return path, f"{prefix}missing required key {missing!r}", False
    if "propertyNames" in error.schema_path:
        text = rule.get("description") or f"must match {rule.get('pattern')}"
        return path + (str(value),), f"{prefix}invalid name {json.dumps(value)}: {text}", True
    if _is_duration(error):
        return path, (
            f"{prefix}expected a duration (a number of seconds or a string like 250ms, 30s, 5m, 2h, 1d), "
            f"got {json.dumps(value)}"
        ), False
    if kind == "pattern":
        description = rule.get("description", "")
        detail = f" ({description})" if description else ""
        return path, f"{prefix}{json.dumps(value)} does not match {validator_value}{detail}", False
    if kind == "type":
        expected = validator_value if isinstance(validator_value, list) else [validator_value]
        wanted = " or ".join(_article(e) for e in expected)
        return path, f"{prefix}expected {wanted}, got {_json_type(value)} {_short(value)}", False
    if kind == "enum":
        options = ", ".join(map(str, validator_value))
        return path, f"{prefix}{json.dumps(value)} is not one of: {options}", False
    return path, f"{prefix}{error.message}", False


def _article(word: str) -> str:
    names = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
             "number": "a number", "boolean": "true or false", "null": "null"}
    return names.get(word, word)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return ""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate(doc: Document, name: str = MACHINE) -> list[Problem]:
    """Every violation of the schema `name` in the document, each at the line and column of the
    offending node."""
    problems = []
    for error in _validator(name).iter_errors(doc.data):
        path, message, at_key = _message(error, doc)
        problems.append(doc.problem(path, message.rstrip(), key=at_key))
    return problems
