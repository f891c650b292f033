"""The pacing of handler processes, alone: lanes stand for processes, a fake clock for time."""

from __future__ import annotations

import pytest

from dsm.worker.isolation.pacing import (
    CALL_COST,
    PATIENCE,
    QUEUE_DEPTH,
    QUEUE_TIME,
    SOONEST_WAKE,
    Call,
    Decision,
    Lane,
    Pacer,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Process(Lane[Call]):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __repr__(self) -> str:
        return self.name


QUICK_CALL = (0.0001, 0.0001)  # run time of a call of a quick handler: seconds, CPU seconds
WAITING_CALL = (0.05, 0.001)  # one that waited (for I/O, a sleep)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def pacer(clock: Clock, slots: int = 8, pacing_limit: int = 2, **kw: float) -> Pacer[Process, Call]:
    return Pacer(slots, pacing_limit, clock=clock, **kw)  # type: ignore[arg-type]


def ready_lanes(p: Pacer[Process, Call], count: int) -> list[Process]:
    lanes = [Process(f"p{i}") for i in range(count)]
    for lane in lanes:
        p.add(lane)
        assert p.ready(lane)
    return lanes


def calls(p: Pacer[Process, Call], count: int, handler: str = "m:quick") -> list[Call]:
    made = [Call(handler) for _ in range(count)]
    for call in made:
        p.wait(call)
    return made


def held(lanes: list[Process]) -> dict[str, int]:
    return {lane.name: len(lane.calls) for lane in lanes}


def unpace(p: Pacer[Process, Call], handler: str) -> None:
    for _ in range(3):
        p.note_run_time(handler, *WAITING_CALL)
    assert handler in p.unpaced_handlers


# -- where a call goes --------------------------------------------------------------------------------

def test_quick_calls_fill_a_pacing_lane_before_they_wake_another(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=2)
    lanes = ready_lanes(p, 4)
    calls(p, 5)
    decision = p.dispatch()
    assert len(decision.sent) == 5 and decision.start == 0
    assert sorted(held(lanes).values()) == [0, 0, 0, 5]  # in one write, read with one wake-up
    calls(p, QUEUE_DEPTH - 5 + 1)
    p.dispatch()
    assert sorted(held(lanes).values()) == [0, 0, 1, QUEUE_DEPTH]  # full: the next one woke another


def test_a_quick_call_queues_in_the_least_loaded_pacing_lane(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=2)
    lanes = ready_lanes(p, 4)
    calls(p, QUEUE_DEPTH + 1)
    p.dispatch()
    full = next(lane for lane in lanes if len(lane.calls) == QUEUE_DEPTH)
    for _ in range(QUEUE_DEPTH - 2):
        p.answered(full, *QUICK_CALL).end()
    assert sorted(held(lanes).values()) == [0, 0, 1, 2]
    (new,) = calls(p, 1)
    p.dispatch()
    assert new.lane is not full and sorted(held(lanes).values()) == [0, 0, 2, 2]


def test_a_pacing_lane_holds_up_to_the_queue_depth_then_calls_wait(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=2)
    lanes = ready_lanes(p, 4)
    waiting = calls(p, 2 * QUEUE_DEPTH + 3)
    decision = p.dispatch()
    assert sorted(held(lanes).values()) == [0, 0, QUEUE_DEPTH, QUEUE_DEPTH]
    assert list(p.waiting_paced) == waiting[-3:]
    assert decision.start == 0  # the pacing lanes are all there are to be: no more are started
    assert decision.wake_at == clock.now + PATIENCE  # the first waiting call will have waited too long then


def test_a_call_answered_makes_room_for_the_next_one(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=1)
    (lane,) = ready_lanes(p, 1)
    first, *others = calls(p, QUEUE_DEPTH + 1)
    p.dispatch()
    assert list(p.waiting_paced) == others[-1:]
    assert p.answered(lane, *QUICK_CALL) is first
    first.end()
    decision = p.dispatch()
    assert [call for _, call in decision.sent] == others[-1:] and len(lane.calls) == QUEUE_DEPTH


def test_a_pacing_lane_holds_a_millisecond_of_a_handlers_calls_by_their_run_time(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    lanes = ready_lanes(p, 4)
    for _ in range(4):
        p.note_run_time("m:noop", 0.000005, 0.000005)  # 5 us each: a millisecond holds 40 of them
    depth = int(QUEUE_TIME / (0.000005 + CALL_COST))
    assert depth == 40 > QUEUE_DEPTH
    calls(p, depth + 1, "m:noop")
    p.dispatch()
    assert sorted(held(lanes).values()) == [0, 0, 1, depth]  # one write, one wake-up for 40 calls
    half = pacer(clock, slots=8, pacing_limit=3)
    for _ in range(4):
        half.note_run_time("m:half", 0.0005, 0.0005)  # half a millisecond on the CPU: still quick, paced
    assert "m:half" not in half.unpaced_handlers
    lanes = ready_lanes(half, 4)
    made = calls(half, 7, "m:half")
    half.dispatch()
    # two each (the running one and the next, so no process waits for its next call), over the
    # pacing lanes, rather than seven behind each other in one
    assert sorted(held(lanes).values()) == [0, 2, 2, 2] and list(half.waiting_paced) == made[-1:]


def test_one_slow_call_makes_its_handlers_calls_queue_shallow_at_once(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    lanes = ready_lanes(p, 4)
    for _ in range(4):
        p.note_run_time("m:cache", 0.000005, 0.000005)  # hits: 40 to a lane
    p.note_run_time("m:cache", 0.3, 0.001)  # a miss that waited: one such call does not unpace it
    assert "m:cache" not in p.unpaced_handlers
    made = calls(p, 5, "m:cache")
    p.dispatch()
    # its mean run time is now 75 ms: two to a lane, not 40 behind the next slow one
    assert sorted(held(lanes).values()) == [0, 0, 2, 2] and list(p.waiting_paced) == made[-1:]


def test_a_pacing_lane_holds_no_more_than_the_most_calls_however_short(clock: Clock) -> None:
    p = pacer(clock, slots=4, pacing_limit=1, max_depth=16)
    (lane,) = ready_lanes(p, 1)
    p.note_run_time("m:noop", 0.0, 0.0)
    calls(p, 20, "m:noop")
    p.dispatch()
    assert len(lane.calls) == 16 and len(p.waiting_paced) == 4


def test_calls_of_a_handler_that_waits_take_any_idle_lane_one_each(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=1)
    unpace(p, "m:slow")
    lanes = ready_lanes(p, 3)
    made = calls(p, 5, "m:slow")
    decision = p.dispatch()
    assert held(lanes) == {"p0": 1, "p1": 1, "p2": 1}
    assert list(p.waiting_unpaced) == made[3:]
    assert decision.start == 2  # one lane for each call that waits
    assert not p.pacing_lanes


def test_a_handler_is_paced_until_most_of_its_recent_calls_waited(clock: Clock) -> None:
    p = pacer(clock)
    p.note_run_time("m:h", *WAITING_CALL)
    assert "m:h" not in p.unpaced_handlers  # one slow call on a loaded machine changes nothing
    p.note_run_time("m:h", *WAITING_CALL)
    p.note_run_time("m:h", *WAITING_CALL)
    assert "m:h" in p.unpaced_handlers  # three in a row do
    for _ in range(3):
        p.note_run_time("m:h", *QUICK_CALL)
    assert "m:h" not in p.unpaced_handlers  # three quick ones undo it
    p.note_run_time("m:h", 0.001, 0.0001)  # short, but mostly off the CPU: it waited
    p.note_run_time("m:h", 0.001, None)  # not measured: short is quick
    p.note_run_time("m:h", 0.00015, 0.0)  # too short to say: quick
    assert p.wait_scores["m:h"] < 0.25


def test_a_paced_call_that_waited_too_long_takes_any_idle_lane(clock: Clock) -> None:
    p = pacer(clock, slots=4, pacing_limit=1)
    lanes = ready_lanes(p, 2)
    made = calls(p, QUEUE_DEPTH + 1)
    p.dispatch()
    assert held(lanes) in ({"p0": QUEUE_DEPTH, "p1": 0}, {"p0": 0, "p1": QUEUE_DEPTH})
    clock.now += PATIENCE / 2  # the running call is still young; no call has waited too long
    p.answered(next(lane for lane in lanes if lane.calls), *QUICK_CALL).end()
    clock.now += PATIENCE / 2
    decision = p.dispatch(woken=True)
    assert [call for _, call in decision.sent] == made[-1:]
    idle_one = decision.sent[0][0]
    assert len(idle_one.calls) == 1 and not made[-1].paced and idle_one not in p.pacing_lanes


# -- taking calls back ------------------------------------------------------------------------------

def test_calls_queued_behind_a_call_that_runs_too_long_are_taken_back(clock: Clock) -> None:
    p = pacer(clock, slots=4, pacing_limit=1)
    lanes = ready_lanes(p, 2)
    running, *queued = calls(p, 4)
    p.dispatch()
    (busy,) = [lane for lane in lanes if lane.calls]
    clock.now += PATIENCE
    decision = p.dispatch(woken=True)
    assert [(lane, call) for lane, call in decision.taken_back] == [(busy, c) for c in reversed(queued)]
    assert "m:quick" in p.unpaced_handlers  # its handler is not paced any more
    # taken back, they wait first in line; not paced now, they take the other idle lane, one of them
    assert [call for _, call in decision.sent] == queued[:1] and decision.sent[0][0] is not busy
    assert list(p.waiting_unpaced) == [] and list(p.waiting_paced) == queued[1:]
    assert list(busy.calls) == [running] and busy not in p.pacing_lanes
    assert decision.start == 2  # a lane for each call still waiting


def test_a_queued_call_whose_timeout_passes_is_taken_back_and_never_runs(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=1)
    (lane,) = ready_lanes(p, 1)
    running, queued, last = calls(p, 3)
    p.dispatch()
    decision = p.expired(queued)
    assert decision.taken_back == [(lane, queued)] and decision.kill is None
    assert list(lane.calls) == [running, last] and queued.lane is None
    assert not p.waiting_paced and not p.waiting_unpaced  # not waiting again either
    assert "m:quick" not in p.unpaced_handlers


def test_a_running_call_whose_timeout_passes_costs_its_lane(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=1)
    (lane,) = ready_lanes(p, 1)
    running, *queued = calls(p, 3)
    p.dispatch()
    decision = p.expired(running)
    assert decision.kill is lane and not decision.taken_back
    assert "m:quick" in p.unpaced_handlers
    assert p.remove(lane) is running  # the supervisor kills it: the calls behind it wait again
    assert list(p.waiting_paced) == queued and not lane.calls and not p.lanes


def test_a_call_waiting_in_the_parent_whose_timeout_passes_is_let_go_at_the_next_dispatch(clock: Clock) -> None:
    p = pacer(clock)
    (call,) = calls(p, 1)
    assert p.expired(call) == Decision()
    call.end()
    decision = p.dispatch()
    assert decision.forgotten == [call] and decision.start == 0 and not p.waiting_paced


def test_a_lane_that_dies_gives_back_the_calls_queued_behind_its_running_one(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=1)
    lanes = ready_lanes(p, 2)
    running, *queued = calls(p, 3)
    p.dispatch()
    (busy,) = [lane for lane in lanes if lane.calls]
    assert p.remove(busy) is running
    assert list(p.waiting_paced) == queued and all(c.lane is None and not c.paced for c in queued)
    decision = p.dispatch()
    assert [call for _, call in decision.sent] == queued  # onto the other lane, which paces now
    assert decision.start == 0


def test_close_takes_back_every_queued_call_and_hands_out_the_waiting_ones(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=1)
    (lane,) = ready_lanes(p, 1)
    running, *queued = calls(p, QUEUE_DEPTH + 2)
    p.dispatch()
    decision = p.close()
    assert sorted(id(c) for _, c in decision.taken_back) == sorted(id(c) for c in queued[:QUEUE_DEPTH - 1])
    handed_out = []
    while (call := p.next_waiting()) is not None:
        handed_out.append(call)
    assert handed_out == queued and list(lane.calls) == [running]
    assert p.dispatch().start == 0  # closed: nothing more is started


# -- starting lanes and waking up ---------------------------------------------------------------------

def test_lanes_are_started_for_paced_calls_up_to_the_pacing_limit(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=3)
    calls(p, 20)
    decision = p.dispatch()
    assert decision.start == 3 and not decision.sent
    for _ in range(3):
        p.add(Process("new"))
    assert p.dispatch().start == 0  # starting already: waited for


def test_a_paced_call_that_waited_too_long_asks_for_a_lane_each_once_none_is_starting(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=1)
    (lane,) = ready_lanes(p, 1)
    calls(p, QUEUE_DEPTH + 3)
    assert p.dispatch().start == 0
    clock.now += PATIENCE  # the running call overran: the queued calls come back, and want lanes
    decision = p.dispatch(woken=True)
    assert decision.start == QUEUE_DEPTH + 2


def test_one_wake_up_is_asked_for_at_a_time(clock: Clock) -> None:
    p = pacer(clock, slots=2, pacing_limit=1)
    ready_lanes(p, 1)
    calls(p, 2)
    first = p.dispatch()
    assert first.wake_at == clock.now + PATIENCE  # when the running call will have run too long
    calls(p, 1)
    assert p.dispatch().wake_at is None  # one is pending
    clock.now += 0.1
    assert p.dispatch(woken=True).wake_at == clock.now - 0.1 + PATIENCE


def test_a_wake_up_is_never_asked_for_in_the_past(clock: Clock) -> None:
    p = pacer(clock, slots=2, pacing_limit=1)
    ready_lanes(p, 1)
    calls(p, QUEUE_DEPTH + 1)
    p.dispatch()
    clock.now += 10 * PATIENCE  # a late wake-up: the calls taken back have waited long since
    decision = p.dispatch(woken=True)
    assert decision.wake_at == clock.now + SOONEST_WAKE


def test_settled_calls_are_let_go_as_they_come_to_the_head_of_the_line(clock: Clock) -> None:
    p = pacer(clock, pacing_limit=1)
    unpace(p, "m:slow")
    slow = calls(p, 2, "m:slow")
    quick = calls(p, 3)
    for call in (slow[0], quick[0], quick[2]):
        call.end()
    decision = p.dispatch()  # no lane yet
    assert {id(c) for c in decision.forgotten} == {id(slow[0]), id(quick[0])}
    assert list(p.waiting_unpaced) == slow[1:] and list(p.waiting_paced) == quick[1:]
    ready_lanes(p, 2)
    decision = p.dispatch()
    assert {id(c) for _, c in decision.sent} == {id(slow[1]), id(quick[1])} and decision.forgotten == [quick[2]]


def test_a_lane_is_ready_once(clock: Clock) -> None:
    p = pacer(clock)
    lane = Process("p")
    p.add(lane)
    assert p.starting == 1
    assert p.ready(lane) and not p.ready(lane)
    assert p.starting == 0 and p.idle == [lane]


def test_lanes_idle_too_long_beyond_the_pacing_limit_are_let_go_longest_idle_first(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    lanes = ready_lanes(p, 5)  # idle since 100
    clock.now = 130.0
    p.seen_slow("m:wait")
    calls(p, 2, "m:wait")
    sent = p.dispatch().sent
    busy = [lane for lane, _ in sent]
    assert len(busy) == 2
    for lane in busy:
        p.answered(lane, *WAITING_CALL)  # idle since 130
    clock.now = 150.0
    assert p.idle_too_long(60.0) == ([], 160.0)  # the longest idle will have been idle 60 s at 160
    clock.now = 160.0
    idle, again = p.idle_too_long(60.0)
    # five live, the pacing keeps two: the three idle since 100 go, the two used at 130 stay
    assert idle == [lane for lane in lanes if lane not in busy] and again is None
    for lane in idle:
        p.remove(lane)
    clock.now = 500.0
    assert p.idle_too_long(60.0) == ([], None)  # no more than the pacing limit live
    assert p.idle_too_long(60.0) == ([], None)


def test_only_lanes_beyond_the_pacing_limit_are_let_go(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    lanes = ready_lanes(p, 3)
    clock.now = 1000.0
    idle, again = p.idle_too_long(60.0)
    assert idle == lanes[:1] and again is None  # the one idle longest (first to become idle)


BUSY_CALL = (0.05, 0.05)  # run time of a call that kept the CPU busy for 50 ms


def busy_handler(p: Pacer[Process, Call], handler: str = "m:busy") -> str:
    for _ in range(3):
        p.note_run_time(handler, *BUSY_CALL)
    assert handler in p.unpaced_handlers and handler in p.busy_handlers
    return handler


def test_calls_of_a_handler_busy_on_the_cpu_run_no_more_than_the_pacing_limit_at_once(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    ready_lanes(p, 6)
    waiting = calls(p, 4, busy_handler(p))
    sent = p.dispatch().sent
    assert [c for _, c in sent] == waiting[:2]  # two CPUs' worth; the others wait, in order
    lane = sent[0][0]
    p.answered(lane, *BUSY_CALL)
    assert [c for _, c in p.dispatch().sent] == [waiting[2]]


def test_calls_of_busy_handlers_held_back_do_not_hold_up_calls_that_wait(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    ready_lanes(p, 6)
    p.seen_slow("m:wait")
    busy = calls(p, 3, busy_handler(p))
    waits = calls(p, 2, "m:wait")
    sent = [c for _, c in p.dispatch().sent]
    assert sent == [*busy[:2], *waits]
    assert list(p.waiting_unpaced) == [busy[2]]


def test_lanes_are_not_started_for_calls_of_busy_handlers_beyond_the_pacing_limit(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    calls(p, 5, busy_handler(p))
    assert p.dispatch().start == 2
    for name in ("p0", "p1"):
        p.add(Process(name))  # the supervisor starts them
    p.seen_slow("m:wait")
    calls(p, 3, "m:wait")
    assert p.dispatch().start == 3  # two lanes are starting already: three more for the calls that wait


def test_a_handler_no_longer_busy_on_the_cpu_is_not_held_back(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    handler = busy_handler(p)
    for _ in range(3):
        p.note_run_time(handler, *WAITING_CALL)  # its calls now wait (for I/O) more than they compute
    assert handler in p.unpaced_handlers and handler not in p.busy_handlers


def test_a_call_that_computes_counts_as_busy_when_a_loaded_machine_preempted_it(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    for _ in range(3):
        p.note_run_time("m:busy", 0.2, 0.06)  # 60 ms on the CPU over 200 ms: it shared the CPU
    assert "m:busy" in p.busy_handlers
    for _ in range(3):
        p.note_run_time("m:io", 0.2, 0.02)  # 20 ms of 200: it waited, mostly
    assert "m:io" in p.unpaced_handlers and "m:io" not in p.busy_handlers


def test_calls_queued_as_paced_before_their_handler_was_seen_busy_keep_to_the_bound(clock: Clock) -> None:
    p = pacer(clock, slots=8, pacing_limit=2)
    ready_lanes(p, 6)
    early = calls(p, 3, "m:busy")  # paced: nothing is known of the handler yet
    assert list(p.waiting_paced) == early
    busy_handler(p)  # then its calls elsewhere are seen to compute
    sent = [c for _, c in p.dispatch().sent]
    assert sent == early[:2] and list(p.waiting_paced) == [early[2]]
