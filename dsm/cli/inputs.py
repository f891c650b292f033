"""What commands read: definition files and folders, payloads, durations, instance ids, JSON
lines; each refused with a usage error (exit 2) that says what is wrong."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsm import compiler, handlers, loader, payloads
from dsm.durations import parse_duration
from dsm.errors import DefinitionError, InputError
from dsm.graph import Graph

from .exits import ExitCode, Fail
from .output import emit, info


def definition_files(paths: list[Path]) -> list[Path]:
    """Files named as they are; in folders, the *.yaml / *.yml files that look like machines
    (loader.looks_like_machine), with a note on stderr for each one skipped. Hidden files and
    folders (.git, .venv, ...) are not searched."""
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        machines, found = loader.definitions_in(path)
        for skipped in sorted(set(found) - set(machines)):
            why = ("a test file ('dsm test' runs it)" if skipped.name.endswith((".test.yaml", ".test.yml"))
                   else "not a machine definition (no top-level 'machine:' key)")
            info.print(f"skipped {skipped}: {why}", markup=False)
        if not machines:
            what = "machine definitions" if found else "*.yaml or *.yml files"
            raise Fail(ExitCode.INVALID, f"{path}: no {what} in this folder")
        files.extend(machines)
    return files


def print_problems(exc: DefinitionError) -> None:
    """A definition's problems on stdout, one line each: PATH:LINE:COL: error: MESSAGE."""
    for problem in exc.problems:
        emit(f"{problem}\n")


def load(path: Path, *, no_import: bool = False, allow: handlers.Allowlist = handlers.ANY,
         search_path: tuple[str, ...] = ()) -> Graph:
    try:
        return compiler.load(path, import_handlers=not no_import, allow=allow, search_path=search_path)
    except DefinitionError as exc:
        print_problems(exc)
        raise Fail(ExitCode.INVALID) from None


def payload(text: str | None, payload_file: Path | None) -> dict[str, Any]:
    if text is not None and payload_file is not None:
        raise Fail(ExitCode.INVALID, "give --payload or --payload-file, not both")
    try:
        if payload_file is not None:
            try:
                text = sys.stdin.read() if str(payload_file) == "-" else payload_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise Fail(ExitCode.INVALID, f"--payload-file {payload_file}: {exc.strerror or exc}") from None
            where = f"--payload-file {payload_file}" + (" (stdin)" if str(payload_file) == "-" else "")
            return payloads.parse(text, what=where)
        if text is not None:
            return payloads.parse(text, what="--payload")
    except payloads.PayloadError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None
    return {}


def duration(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value, what=option)
    except InputError as exc:
        raise Fail(ExitCode.INVALID, str(exc)) from None


def given_id(value: object, *, where: str = "") -> str:
    from dsm.keys import check_instance_id

    try:
        return check_instance_id(value)
    except InputError as exc:
        raise Fail(ExitCode.INVALID, f"{where}{exc}") from None


def jsonl(path: Path) -> Iterator[tuple[str | None, dict]]:
    """(instance id or None, payload) per line: a line is the payload; an `id` field at its top
    level names the instance and is not part of the payload. `{"id": ID, "payload": {...}}` (those
    two keys only) gives the payload whole, for payloads that have an `id` of their own."""
    try:
        handle = sys.stdin if str(path) == "-" else path.open(encoding="utf-8")
    except OSError as exc:
        raise Fail(ExitCode.INVALID, f"--jsonl {path}: {exc.strerror or exc}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                body = payloads.parse(line, what=f"{path}:{number}")
            except payloads.PayloadError as exc:
                raise Fail(ExitCode.INVALID, str(exc)) from None
            if "id" not in body:
                yield None, body
                continue
            given = body.pop("id")
            if set(body) == {"payload"} and isinstance(body["payload"], dict):
                body = body["payload"]
            yield given_id(given, where=f"{path}:{number}: "), body
