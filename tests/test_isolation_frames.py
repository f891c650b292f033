"""The frames between a worker and its handler processes: each writes itself and reads itself back,
and a frame that is not one of them is refused with a message that says what is wrong with it."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from dsm import handlers
from dsm.ticks import TickCall
from dsm.transition import Failure, Outcome
from dsm.worker.isolation.frames import (
    AbandonFrame,
    CallFrame,
    DropFrame,
    ForkNotice,
    FrameError,
    ReadyFrame,
    ResultFrame,
    encode,
    read_to_process,
    read_to_worker,
    split,
)


def tick(**changes: Any) -> TickCall:
    fields: dict[str, Any] = dict(handler=handlers.unresolved("shop.orders:approve"), payload={"n": 1, "s": "x"},
                                  instance_id="inst-1", machine="orders", state="work", attempt=2,
                                  branch=("a", "b"), visit=3, timeout=None, deadline=1_700_000_000.5,
                                  payload_limit=1 << 20)
    fields.update(changes)
    return TickCall(**fields)


FAILURE = Failure("KeyError", "bad thing", retryable=True, bases=("LookupError", "Exception"),
                  traceback="Traceback (most recent call last): ...")

TO_PROCESS = [
    CallFrame(7, tick()),
    CallFrame(8, tick(deadline=None, branch=(), payload={}), abandoned="the claim was lost"),
    AbandonFrame(7, "the claim was lost"),
    DropFrame(9),
]
TO_WORKER = [
    ReadyFrame(),
    ResultFrame(7, Outcome(payload={"n": 2, "big": 2 ** 70}, label="approved"), 0.00012, 0.0001),
    ResultFrame(8, Outcome(payload={}), 0.5, None),
    ResultFrame(7, Outcome(failure=FAILURE), 0.25, 0.01),
    ResultFrame(8, Outcome(failure=Failure("ValueError", "bad \udc80 byte", retryable=False)), 0.0, None),
]


@pytest.mark.parametrize("frame", TO_PROCESS + TO_WORKER, ids=lambda f: type(f).__name__)
def test_every_frame_reads_back_as_it_was_written(frame: Any) -> None:
    written = frame.to_frame()
    assert type(frame).from_frame(written) == frame
    bodies, rest = split(written)
    read = read_to_process if frame in TO_PROCESS else read_to_worker
    assert rest == b"" and read(bodies[0]) == frame


def test_the_wire_format_is_a_length_and_a_json_array() -> None:
    written = CallFrame(7, tick()).to_frame()
    assert int.from_bytes(written[:4], "big") == len(written) - 4
    assert json.loads(written[4:]) == [0, 7, "shop.orders", "approve", {"n": 1, "s": "x"}, "inst-1", "orders",
                                       "work", 2, ["a", "b"], 3, 1_700_000_000.5, 1 << 20, None]
    assert json.loads(ResultFrame(7, Outcome(payload={"n": 1}, label="ok"), 0.25, 0.125).to_frame()[4:]) == [
        1, 7, {"n": 1}, "ok", [0.25, 0.125]]
    assert json.loads(ResultFrame(7, Outcome(failure=FAILURE), 0.25, None).to_frame()[4:]) == [
        2, 7, "KeyError", "bad thing", True, ["LookupError", "Exception"], FAILURE.traceback, [0.25, None]]
    assert ReadyFrame().to_frame() == b"\x00\x00\x00\x03[0]"


def test_what_a_call_frame_does_not_carry() -> None:
    """The timeout stays with the worker, which keeps it; the handler is named, not sent."""
    read = CallFrame.from_frame(CallFrame(7, tick(timeout=30.0, worker="w-1")).to_frame())
    assert read.call.timeout is None and read.call.worker is None
    assert read.call.handler.ref == "shop.orders:approve" and read.call.handler.func is None


def test_a_result_carries_only_the_outcome_of_the_handler() -> None:
    """When the attempt began and how long it took are the worker's to say, not the process's."""
    sent = ResultFrame(7, Outcome(payload={"n": 1}, label="ok", started_at=1.0, duration=2.0), 0.5, None)
    assert ResultFrame.from_frame(sent.to_frame()).outcome == Outcome(payload={"n": 1}, label="ok")


def test_split_keeps_a_cut_frame_for_the_next_read() -> None:
    data = DropFrame(1).to_frame() + AbandonFrame(2, "why").to_frame()
    bodies, rest = split(data[:-3])
    assert [read_to_process(b) for b in bodies] == [DropFrame(1)]
    bodies, rest = split(rest + data[-3:])
    assert [read_to_process(b) for b in bodies] == [AbandonFrame(2, "why")] and rest == b""


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not JSON"),
    (b'{"kind": 0}', "not an array starting with its kind"),
    (b"[]", "not an array starting with its kind"),
    (b'["0", 1]', "not an array starting with its kind"),
    (b"[7, 1]", "unknown kind 7"),
    (b"[2]", "a malformed drop frame: 1 items where it has 2"),
    (b'[2, "9"]', "a malformed drop frame: its id is not an integer"),
    (b"[1, 7]", "a malformed abandon frame: 2 items where it has 3"),
    (b'[0, 1, "m", "f", [], "i", "m", "s", 1, [], 1, null, 1, null]', "its payload is not an object"),
    (b'[0, 1, "m", "f", {}, "i", "m", "s", 1, [3], 1, null, 1, null]', "its branch is not an array of strings"),
    (b'[0, 1, "m", "f", {}, "i", "m", "s", "1", [], 1, null, 1, null]', "are not all integers"),
    (b'[0, 1, "m", "f", {}, "i", "m", "s", 1, [], 1, "soon", 1, null]', "its deadline is neither"),
])
def test_a_handler_process_refuses_a_malformed_frame_and_says_why(body: bytes, words: str) -> None:
    with pytest.raises(FrameError, match=words):
        read_to_process(body)


@pytest.mark.parametrize("body, words", [
    (b"[3]", "unknown kind 3"),
    (b"[0, 1]", "a malformed ready frame: 2 items where it has 1"),
    (b'[1, 7, {}, null]', "a malformed result frame: 4 items where it has 5"),
    (b'[1, 7, [], null, [0.1, null]]', "a malformed result frame"),
    (b'[1, 7, {}, null, [0.1]]', "its run time is not"),
    (b'[1, 7, {}, null, ["0.1", null]]', "its run time is not"),
    (b'[2, 7, "E", "m", "yes", [], null, [0.1, null]]', "a malformed failed frame"),
])
def test_the_worker_refuses_a_malformed_frame_and_says_why(body: bytes, words: str) -> None:
    with pytest.raises(FrameError, match=words):
        read_to_worker(body)


def test_a_frame_read_as_another_kind_or_cut_is_refused() -> None:
    with pytest.raises(FrameError, match="not a DropFrame"):
        DropFrame.from_frame(AbandonFrame(1, "why").to_frame())
    with pytest.raises(FrameError, match="not one whole frame"):
        DropFrame.from_frame(DropFrame(1).to_frame()[:-1])
    assert encode([2, 1]) == DropFrame(1).to_frame()


def test_fork_notices_are_pids_on_lines() -> None:
    assert ForkNotice(4242).to_frame() == b"4242\n"
    assert ForkNotice.from_frame(b"4242\n") == ForkNotice(4242)
    assert ForkNotice.all_in(b"4242\n4243\n") == [ForkNotice(4242), ForkNotice(4243)]
    assert ForkNotice.all_in(b"") == []
    with pytest.raises(FrameError, match="not one fork notice"):
        ForkNotice.from_frame(b"4242\n4243\n")


@pytest.mark.parametrize("frame", TO_PROCESS + TO_WORKER[1:], ids=lambda f: type(f).__name__)
def test_frames_are_frozen(frame: Any) -> None:
    with pytest.raises(FrozenInstanceError):
        frame.id = 99
