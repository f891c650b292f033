"""The frames a worker and its handler processes exchange, each a typed message that writes and reads itself.

Wire format. A frame is a 4-byte big-endian length, then that many bytes of body: a JSON array
written by `dsm.codec`. A body codec cannot write (a lone surrogate in an exception's message) is
written by the stdlib as ASCII escapes after one space, which `codec.loads` reads back exactly. The
first item of the array is the frame's kind; each direction numbers its kinds on its own.

Worker to handler process, on the process's stdin:

    [0, id, module, function, payload, instance_id, machine, state, attempt, branch, visit,
        deadline, payload_limit, abandoned]                                   CallFrame
    [1, id, reason]                                                           AbandonFrame
    [2, id]                                                                   DropFrame

Handler process to worker, on its stdout:

    [0]                                                                       ReadyFrame
    [1, id, payload, label, [seconds, cpu_seconds]]                           ResultFrame: a result
    [2, id, type, message, retryable, bases, traceback, [seconds, cpu_seconds]]  ResultFrame: a failure

`id` numbers the calls of one worker's executor. A call carries what `ctx` says (its handler by
module and function; the timeout stays with the worker, which keeps it) and `abandoned`, the reason
when it was abandoned before it was sent. An abandon is for a call running or queued in the
process; a drop takes back a call queued there that has not started. Ready is sent once, when the
process can take calls. A result or a failure ends a call and says how long its handler ran, in
all and on the CPU (`cpu_seconds` is null when the process did not read the CPU clock). There is
no heartbeat frame: `ctx.heartbeat()` in the process reads the frames waiting for it.

One more message stays inside a handler process's family: a process a handler forked tells the
handler process that it came back from the handler with a `ForkNotice`, its pid in ASCII digits
and a newline, on a pipe made for it at the fork (see `forks.py`).

A frame that is cut, not JSON, of an unknown kind, or with items of the wrong number or type is
refused with a `FrameError` that says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, TypeVar

from ... import codec
from ...frozen import slot_setters
from ...graph import Handler
from ...ticks import TickCall
from ...transition import Failure, Outcome

LENGTH_SIZE = 4  # bytes of the length before each body
READ_SIZE = 1 << 16  # bytes read from a pipe at once

# Kinds, the first item of a body. The two directions number theirs separately.
CALL, ABANDON, DROP = 0, 1, 2  # worker to handler process
READY, RESULT, FAILED = 0, 1, 2  # handler process to worker


class FrameError(ValueError):
    """A frame this protocol does not know: cut, not JSON, of an unknown kind, or malformed items."""


def encode(items: list[Any]) -> bytes:
    """One frame: the length, then the JSON array of `items`."""
    try:
        body = codec.dumps(items)
    except (TypeError, ValueError):  # not valid UTF-8 (lone surrogates): ASCII escapes, read back exactly
        body = b" " + json.dumps(items, separators=(",", ":")).encode("ascii")
    return len(body).to_bytes(LENGTH_SIZE, "big") + body


def split(data: bytes) -> tuple[list[bytes], bytes]:
    """The complete frame bodies in `data`, and the bytes of an incomplete frame after them."""
    bodies = []
    pos, end = 0, len(data)
    while end - pos >= LENGTH_SIZE:
        stop = pos + LENGTH_SIZE + int.from_bytes(data[pos:pos + LENGTH_SIZE], "big")
        if stop > end:
            break
        bodies.append(data[pos + LENGTH_SIZE:stop])
        pos = stop
    return bodies, data[pos:]


def _items(body: bytes) -> list[Any]:
    try:
        items = codec.loads(body)
    except ValueError as exc:
        raise FrameError(f"a frame body that is not JSON: {exc}: {_shown(body)}") from None
    if type(items) is not list or not items or type(items[0]) is not int:
        raise FrameError(f"a frame body that is not an array starting with its kind: {_shown(items)}")
    return items


def _body(frame: bytes) -> bytes:
    """The body of one whole frame, its length checked."""
    if len(frame) < LENGTH_SIZE or int.from_bytes(frame[:LENGTH_SIZE], "big") != len(frame) - LENGTH_SIZE:
        raise FrameError(f"not one whole frame: {len(frame)} bytes, of which the length says "
                         f"{int.from_bytes(frame[:LENGTH_SIZE], 'big') + LENGTH_SIZE}")
    return frame[LENGTH_SIZE:]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _refuse(name: str, items: list[Any], why: str) -> NoReturn:
    raise FrameError(f"a malformed {name} frame: {why}: {_shown(items)}")


def _run_time(name: str, items: list[Any], value: Any) -> tuple[float, float | None]:
    if type(value) is not list or len(value) != 2:
        _refuse(name, items, "its run time is not [seconds, CPU seconds or null]")
    seconds, cpu_seconds = value
    if not (type(seconds) is float or type(seconds) is int) or not (
            cpu_seconds is None or type(cpu_seconds) is float or type(cpu_seconds) is int):
        _refuse(name, items, "its run time is not [seconds, CPU seconds or null]")
    return seconds, cpu_seconds


def _strings(values: list[Any]) -> bool:
    for value in values:
        if type(value) is not str:
            return False
    return True


F = TypeVar("F", bound="_Frame")


class _Frame:
    """What every frame does: write itself as one frame, and read itself back from one."""

    __slots__ = ()
    KINDS: ClassVar[tuple[int, ...]]  # the kinds it is sent as

    def items(self) -> list[Any]:
        """The JSON array this frame is sent as."""
        raise NotImplementedError

    def to_frame(self) -> bytes:
        return encode(self.items())

    @classmethod
    def from_items(cls: type[F], items: list[Any]) -> F:
        """The frame `items` (a JSON array, its kind one of KINDS) stand for; FrameError if they are malformed."""
        raise NotImplementedError

    @classmethod
    def from_frame(cls: type[F], frame: bytes) -> F:
        """The frame of this kind that `frame` (its length included) holds; FrameError if it is not one."""
        items = _items(_body(frame))
        if items[0] not in cls.KINDS:
            raise FrameError(f"a frame of kind {items[0]}, not a {cls.__name__}: {_shown(items)}")
        return cls.from_items(items)


# -- worker to handler process ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True, init=False)
class CallFrame(_Frame):
    """Run `call` (its handler by module and function; not its timeout, which the worker keeps, nor
    its worker's name): the process answers with a ResultFrame of the same id.
    `abandoned`: why it was abandoned before it was sent, if it was; it starts abandoned then."""

    KINDS: ClassVar[tuple[int, ...]] = (CALL,)
    id: int
    call: TickCall
    abandoned: str | None = None

    def __init__(self, id: int, call: TickCall, abandoned: str | None = None) -> None:
        # Set through the slots: the __init__ a frozen dataclass is given goes through
        # object.__setattr__ for each field, which made a tick cost the worker a few percent more.
        _set_call_frame_id(self, id)
        _set_call_frame_call(self, call)
        _set_call_frame_abandoned(self, abandoned)

    def items(self) -> list[Any]:
        call = self.call
        return [CALL, self.id, call.handler.module, call.handler.function, call.payload, call.instance_id,
                call.machine, call.state, call.attempt, call.branch, call.visit, call.deadline, call.payload_limit,
                self.abandoned]

    @classmethod
    def from_items(cls, items: list[Any]) -> CallFrame:
        if len(items) != 14:
            _refuse("call", items, f"{len(items)} items where it has 14")
        (_, ident, module, function, payload, instance_id, machine, state, attempt, branch, visit, deadline, limit,
         abandoned) = items
        # (type() rather than isinstance(): a bool is not an integer here)
        if type(ident) is not int or type(attempt) is not int or type(visit) is not int or type(limit) is not int:
            _refuse("call", items, "its id, attempt, visit and payload limit are not all integers")
        if (type(module) is not str or type(function) is not str or type(instance_id) is not str
                or type(machine) is not str or type(state) is not str):
            _refuse("call", items, "its module, function, instance, machine and state are not all strings")
        if type(payload) is not dict:
            _refuse("call", items, "its payload is not an object")
        if type(branch) is not list or (branch and not _strings(branch)):
            _refuse("call", items, "its branch is not an array of strings")
        if not (deadline is None or type(deadline) is float or type(deadline) is int):
            _refuse("call", items, "its deadline is neither a number nor null")
        if not (abandoned is None or type(abandoned) is str):
            _refuse("call", items, "its abandon reason is neither a string nor null")
        handler = Handler(ref=f"{module}:{function}", module=module, function=function)
        return cls(ident, TickCall(handler=handler, payload=payload, instance_id=instance_id, machine=machine,
                                   state=state, attempt=attempt, branch=tuple(branch), visit=visit, timeout=None,
                                   deadline=deadline, payload_limit=limit), abandoned)


@dataclass(frozen=True, slots=True)
class AbandonFrame(_Frame):
    """The call `id` no longer counts (`reason`): running, its `ctx.heartbeat()` raises; queued, it
    starts abandoned; ended, nothing changes."""

    KINDS: ClassVar[tuple[int, ...]] = (ABANDON,)
    id: int
    reason: str

    def items(self) -> list[Any]:
        return [ABANDON, self.id, self.reason]

    @classmethod
    def from_items(cls, items: list[Any]) -> AbandonFrame:
        if len(items) != 3:
            _refuse("abandon", items, f"{len(items)} items where it has 3")
        if type(items[1]) is not int or type(items[2]) is not str:
            _refuse("abandon", items, "it is not [1, integer id, reason]")
        return cls(items[1], items[2])


@dataclass(frozen=True, slots=True)
class DropFrame(_Frame):
    """The call `id`, queued in the process and not started, is taken back: it never starts there."""

    KINDS: ClassVar[tuple[int, ...]] = (DROP,)
    id: int

    def items(self) -> list[Any]:
        return [DROP, self.id]

    @classmethod
    def from_items(cls, items: list[Any]) -> DropFrame:
        if len(items) != 2:
            _refuse("drop", items, f"{len(items)} items where it has 2")
        if type(items[1]) is not int:
            _refuse("drop", items, "its id is not an integer")
        return cls(items[1])


# -- handler process to worker ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ReadyFrame(_Frame):
    """The process has started (its preloads imported) and takes calls."""

    KINDS: ClassVar[tuple[int, ...]] = (READY,)

    def items(self) -> list[Any]:
        return [READY]

    @classmethod
    def from_items(cls, items: list[Any]) -> ReadyFrame:
        if len(items) != 1:
            _refuse("ready", items, f"{len(items)} items where it has 1")
        return cls()


@dataclass(frozen=True, slots=True, init=False)
class ResultFrame(_Frame):
    """The call `id` ended with `outcome`: a checked payload and maybe a label (sent as a result), or
    a failure (sent as failed); its handler ran `seconds`, `cpu_seconds` of them on the CPU (None:
    not measured). Only those parts of the outcome cross; the rest is the worker's to fill in."""

    KINDS: ClassVar[tuple[int, ...]] = (RESULT, FAILED)
    id: int
    outcome: Outcome
    seconds: float
    cpu_seconds: float | None

    def __init__(self, id: int, outcome: Outcome, seconds: float, cpu_seconds: float | None) -> None:
        # through the slots, as a CallFrame: one of these too is made on every tick
        _set_result_frame_id(self, id)
        _set_result_frame_outcome(self, outcome)
        _set_result_frame_seconds(self, seconds)
        _set_result_frame_cpu_seconds(self, cpu_seconds)

    def items(self) -> list[Any]:
        run = [self.seconds, self.cpu_seconds]
        f = self.outcome.failure
        if f is None:
            return [RESULT, self.id, self.outcome.payload, self.outcome.label, run]
        return [FAILED, self.id, f.type, f.message, f.retryable, list(f.bases), f.traceback, run]

    @classmethod
    def from_items(cls, items: list[Any]) -> ResultFrame:
        if items[0] == RESULT:
            if len(items) != 5:
                _refuse("result", items, f"{len(items)} items where it has 5")
            _, ident, payload, label, run = items
            if type(ident) is not int or type(payload) is not dict or not (label is None or type(label) is str):
                _refuse("result", items, "it is not [1, integer id, payload object, label or null, run time]")
            outcome = Outcome(payload, label)
        else:
            if len(items) != 8:
                _refuse("failed", items, f"{len(items)} items where it has 8")
            _, ident, kind, message, retryable, bases, traceback, run = items
            if (type(ident) is not int or type(kind) is not str or type(message) is not str
                    or type(retryable) is not bool or type(bases) is not list or not _strings(bases)
                    or not (traceback is None or type(traceback) is str)):
                _refuse("failed", items, "it is not [2, integer id, type, message, retryable, [base names], "
                        "traceback or null, run time]")
            outcome = Outcome(failure=Failure(kind, message, retryable=retryable, bases=tuple(bases),
                                              traceback=traceback))
        seconds, cpu_seconds = _run_time("result" if items[0] == RESULT else "failed", items, run)
        return cls(ident, outcome, seconds, cpu_seconds)


_set_call_frame_id, _set_call_frame_call, _set_call_frame_abandoned = slot_setters(CallFrame)
(_set_result_frame_id, _set_result_frame_outcome, _set_result_frame_seconds,
 _set_result_frame_cpu_seconds) = slot_setters(ResultFrame)

ToProcess = CallFrame | AbandonFrame | DropFrame
ToWorker = ReadyFrame | ResultFrame

_TO_PROCESS: dict[int, Any] = {CALL: CallFrame, ABANDON: AbandonFrame, DROP: DropFrame}
_TO_WORKER: dict[int, Any] = {READY: ReadyFrame, RESULT: ResultFrame, FAILED: ResultFrame}


def read_to_process(body: bytes) -> ToProcess:
    """A frame the worker sent to a handler process, from its body (as `split` gives it)."""
    frame: ToProcess = _read(body, _TO_PROCESS, "sent to a handler process")
    return frame


def read_to_worker(body: bytes) -> ToWorker:
    """A frame a handler process sent to the worker, from its body (as `split` gives it)."""
    frame: ToWorker = _read(body, _TO_WORKER, "sent by a handler process")
    return frame


def _read(body: bytes, kinds: dict[int, Any], direction: str) -> Any:
    items = _items(body)
    kind = kinds.get(items[0])
    if kind is None:
        raise FrameError(f"a frame of unknown kind {items[0]} {direction}: {_shown(items)}")
    return kind.from_items(items)


# -- between a handler process and the processes its handlers fork ----------------------------------

@dataclass(frozen=True, slots=True)
class ForkNotice:
    """A process forked by a handler says it came back from the handler (and ends): its pid, one line
    of ASCII digits, on the pipe the handler process made for it at the fork. Copies of that copy
    inherit the pipe, so one read may hold several notices."""

    pid: int

    def to_frame(self) -> bytes:
        return b"%d\n" % self.pid

    @classmethod
    def from_frame(cls, frame: bytes) -> ForkNotice:
        notices = cls.all_in(frame)
        if len(notices) != 1 or frame != notices[0].to_frame():
            raise FrameError(f"not one fork notice (a pid and a newline): {_shown(frame)}")
        return notices[0]

    @classmethod
    def all_in(cls, data: bytes) -> list[ForkNotice]:
        """The notices in what was read from such a pipe; words that are not pids are ignored."""
        return [cls(int(word)) for word in data.split() if word.isdigit()]
