"""Log lines about instances: the fields they carry, and the two formats the command line writes.

Library code logs with `logging.getLogger(__name__)`; only the CLI configures output. A record
about an instance carries the attributes `instance`, `machine`, `state`, `attempt` and `worker`
(`about()` makes the `extra=` for them; a handler's `ctx.logger` adds them to its lines). The
formats:

- `text`: `dsm: LEVEL: instance ID state S attempt N: message`, the part naming the instance on
  lines about one only;
- `json`: one object per line, `time` (ISO 8601 UTC with milliseconds), `level`, `logger`,
  `message`; on a line about an instance also `instance`, `machine`, `state`, `attempt` and
  `worker` (null where unknown); `worker` on any line of a worker process; `exception` with the
  traceback when there is one.

A process that runs one worker names it once (`current.worker`), so lines that cannot know the
worker (a handler process's) carry it all the same. Handler processes take the worker's settings
(`settings()` / `apply()`), so their lines read like the worker's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
FIELDS = ("instance", "machine", "state", "attempt", "worker")  # on every line about an instance
TEXT = "dsm: %(levelname)s: %(context)s%(message)s"


@dataclass(slots=True)
class Settings:
    """How this process writes its log lines."""

    format: LogFormat = "text"
    worker: str | None = None  # the worker this process runs (or runs handlers for)


current = Settings()


def about(instance: str, machine: str | None = None, state: str | None = None, attempt: int | None = None,
          worker: str | None = None) -> dict[str, Any]:
    """The `extra=` of a log call about an instance."""
    return {"instance": instance, "machine": machine, "state": state, "attempt": attempt, "worker": worker}


def timestamp(at: float) -> str:
    """`2026-11-28T13:00:00.123Z`, as in instance records."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


def line(level: str, logger: str, message: str, fields: dict[str, Any] | None = None, *,
         at: float | None = None, exception: str | None = None) -> str:
    """One JSON log line (without its newline)."""
    out: dict[str, Any] = {"time": timestamp(time.time() if at is None else at), "level": level, "logger": logger,
                           "message": message}
    if fields is not None and fields.get("instance") is not None:
        for name in FIELDS:
            out[name] = fields.get(name)
    worker = (fields or {}).get("worker") or current.worker
    if worker is not None:
        out["worker"] = worker
    if exception:
        out["exception"] = exception
    return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Lines that name the instance, state and attempt they are about (`%(context)s`)."""

    def __init__(self, fmt: str = TEXT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        instance, state = getattr(record, "instance", None), getattr(record, "state", None)
        attempt = getattr(record, "attempt", None)
        context = f"instance {instance}" if instance else ""
        context += f" state {state}" if state else ""
        context += f" attempt {attempt}" if attempt else ""
        record.context = f"{context.strip()}: " if context else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        exception = None
        if record.exc_info:
            exception = self.formatException(record.exc_info)
        elif record.exc_text:
            exception = record.exc_text
        if record.stack_info:
            exception = (exception + "\n" if exception else "") + self.formatStack(record.stack_info)
        fields = {name: getattr(record, name, None) for name in FIELDS}
        return line(record.levelname, record.name, record.getMessage(), fields, at=record.created,
                    exception=exception)


def formatter(fmt: LogFormat | None = None, text: str = TEXT) -> logging.Formatter:
    """The formatter of `fmt` (default: this process's); `text` is the template of the text format."""
    return JsonFormatter() if (fmt or current.format) == "json" else TextFormatter(text)


def settings() -> dict[str, Any]:
    """This process's settings, for a process that logs on its behalf (a handler process)."""
    return asdict(current)


def apply(given: dict[str, Any]) -> None:
    """Take the settings another process gave (`settings()`)."""
    current.format = "json" if given.get("format") == "json" else "text"
    current.worker = given.get("worker")
