"""Pacing: which handler process a call goes to, how many calls queue behind a busy one, and when a
queued call is taken back. A policy with no I/O: it is told what happens (a call to run, a process
ready, a call answered, a timeout, a process gone) and answers with a `Decision` that the supervisor
carries out (frames to write, processes to start or kill, when to decide again); the time it reads
comes from an injected clock.

Why pace. Waking a sleeping process is most of what a trivial tick costs (about 120 us of the
handler processes' CPU per tick with 64 of them taking turns, 50 us with a handful), so calls of
quick handlers are paced onto a few busy processes rather than spread over all of them. Handlers
whose calls wait (for I/O, a lock, a sleep) gain from more processes than CPUs, so their calls are
not paced. A process is a `Lane` here; a call, a `Call`.

The rules (the second to the last are `dispatch`'s, in the order it applies them):

* A handler is paced until its calls are seen to wait: each call's run time (how long its handler
  ran, and how much of that on the CPU) moves the handler's wait score a quarter of the way to 1 (it
  waited: it ran `QUICK` or longer, or mostly off the CPU, and at least `IGNORE_CPU_BELOW`) or to 0;
  a score of 1/2 or more means not paced. One call preempted on a loaded machine does not change
  that; three slow ones in a row do, three quick ones undo it.
* A paced call running `patience` or longer is overrunning: its handler is not paced from then on,
  its lane stops pacing, and the calls queued behind it there are taken back: they wait in the
  parent again, first in line (a drop, which the process reads before it would start them).
* A call of a handler that is not paced takes any idle lane, as many at once as there are lanes;
  but calls of handlers that are busy on the CPU (most of their recent calls used `QUICK` or more
  of it, a quarter of their run time or more) run no more than `pacing_limit` at once: more
  processes would only share the CPUs, each call slower, and a process started for each (the
  others wait in the parent, first in line). A quarter, not a half: a call that computes is
  preempted on a loaded machine, and would look like one that waits, which more processes load
  further.
* A paced call queues in the least loaded pacing lane that holds fewer calls than its handler's
  depth (the running one included); with none, it takes an idle lane while fewer than
  `pacing_limit` lanes pace; otherwise it waits. Filling a few lanes before waking another is what
  makes their calls share writes and wake-ups. A handler's depth is as many of its calls as fill
  `QUEUE_TIME` of a process's time, by their mean run time (plus `CALL_COST` each), between 2 and
  `max_depth`: a no-op handler's calls queue 40 deep, a handler of half a millisecond's only 2, so
  its calls spread over the pacing lanes rather than wait behind each other in one; a handler
  not seen yet has `depth`. A paced call that waited `patience` takes any idle lane, unpaced.
* Lanes are started for the calls that wait: one for each unpaced call, and for paced calls as many
  as would make `pacing_limit` lanes pace, or one for each when the first waited `patience` (unless
  lanes are starting already; those are waited for), as room allows (`slots` lanes at most).
* While paced calls wait or run, a wake-up is asked for when the first waiting one will have waited
  `patience`, or the oldest running one will have run it.

Outside `dispatch`: a queued call whose timeout passes is taken back and never runs; one whose
timeout passes while it runs costs its lane, which is killed, and its handler is not paced from
then on. A lane that is gone (killed, dead, closed) gives back the calls queued behind the one it
ran, first in line. At close, every queued call is taken back. Lanes idle for long are let go
while more than `pacing_limit` live (`idle_too_long`): a burst of calls that wait may have started
a process for each slot, and each holds its memory until it ends.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

QUICK = 0.002  # seconds: a call that runs shorter, and mostly on the CPU, is quick (did not wait)
IGNORE_CPU_BELOW = 0.0002  # seconds: a call this short is quick whatever its share of the CPU, too short to say
PATIENCE = 0.5  # seconds a paced call runs, or waits, before the pacing lets other calls past it
IDLE_EXIT = 60.0  # seconds a lane beyond the pacing limit may stay idle before it is let go
QUEUE_DEPTH = 8  # calls of a handler not seen yet a pacing lane holds at most, the running one included
MAX_QUEUE_DEPTH = 64  # calls of any handler a pacing lane holds at most
QUEUE_TIME = 0.001  # seconds of a process's time the calls queued in a pacing lane fill, by their handlers' run time
CALL_COST = 0.00002  # seconds a call costs its process besides its handler's run (reading, writing, the outcome)
SOONEST_WAKE = 0.0005  # seconds: a wake-up is never asked for sooner than this from now


class Call:
    """A call as the pacing sees it."""

    __slots__ = ("ended", "handler", "lane", "paced", "since")

    def __init__(self, handler: str) -> None:
        self.handler = handler  # its handler's ref: whether calls are paced is decided per handler
        self.since = 0.0  # clock time it began to wait; once it runs, the time it began to run
        self.paced = False  # sent as a paced call, not overrunning: running or queued in its lane
        self.lane: Lane[Any] | None = None  # the lane holding it, running or queued
        self.ended = False

    @property
    def settled(self) -> bool:
        """It needs no lane any more: ended, or (in a subclass) no longer awaited."""
        return self.ended

    def end(self) -> None:
        """It ended: it holds no lane and counts in the pacing no more."""
        self.ended = True
        self.lane = None
        self.paced = False


CallT = TypeVar("CallT", bound=Call)


class Lane(Generic[CallT]):
    """A handler process as the pacing sees it: the calls it holds, in the order it runs them."""

    __slots__ = ("calls", "idle_since", "ready")

    def __init__(self) -> None:
        # The first is running (or about to: the process has been sent it); the others are queued
        # behind it and not started.
        self.calls: collections.deque[CallT] = collections.deque()
        self.ready = False  # it said it takes calls
        self.idle_since = 0.0  # clock time it last became idle


LaneT = TypeVar("LaneT", bound=Lane[Any])


@dataclass(slots=True)
class Decision(Generic[LaneT, CallT]):
    """What the supervisor does, in this order. Made by the pacer for each event and only read after:
    not frozen, as one is made for nearly every tick and a frozen one costs four times as much."""

    forgotten: Sequence[CallT] = ()  # settled calls that no longer wait: let go
    taken_back: Sequence[tuple[LaneT, CallT]] = ()  # drop these queued calls there
    sent: Sequence[tuple[LaneT, CallT]] = ()  # send these calls there, in this order
    kill: LaneT | None = None  # kill this lane's process (a call it ran outlived its timeout)
    start: int = 0  # start this many lanes, while there is room (`slots`)
    wake_at: float | None = None  # dispatch again at this clock time (`dispatch(woken=True)`)


NOTHING: Decision[Any, Any] = Decision()  # what many events call for (shared: never changed)


class Pacer(Generic[LaneT, CallT]):
    """The pacing state of one executor: lanes, calls waiting in the parent, handlers' wait scores.

    `slots`: lanes at most. `pacing_limit`: lanes that run paced calls at once. `clock`: seconds,
    monotonic (the event loop's). See the module docstring for the rules."""

    def __init__(self, slots: int, pacing_limit: int, *, clock: Callable[[], float], depth: int = QUEUE_DEPTH,
                 max_depth: int = MAX_QUEUE_DEPTH, patience: float = PATIENCE):
        self.slots = slots
        self.pacing_limit = min(slots, pacing_limit)
        self.clock = clock
        self.depth = depth  # of a handler not seen yet
        self.max_depth = max_depth
        self.patience = patience
        self.lanes: set[LaneT] = set()
        self.idle: list[LaneT] = []  # ready lanes holding no call
        self.starting = 0  # lanes started and not yet ready
        self.pacing_lanes: set[LaneT] = set()  # lanes running paced calls (all the calls they hold are paced)
        self.running_paced: collections.deque[CallT] = collections.deque()  # oldest first; ended ones not yet dropped
        self.waiting_unpaced: collections.deque[CallT] = collections.deque()  # calls of handlers not paced
        self.waiting_paced: collections.deque[CallT] = collections.deque()  # the others
        self.unpaced_handlers: set[str] = set()
        self.wait_scores: dict[str, float] = {}  # handler -> how often its recent calls waited (0 to 1)
        self.busy_handlers: set[str] = set()  # unpaced handlers whose calls keep the CPU busy
        self.busy_scores: dict[str, float] = {}  # handler -> how often its recent calls ran long on the CPU
        self.depths: dict[str, int] = {}  # handler -> calls of it a pacing lane holds (`QUEUE_TIME`)
        self.run_means: dict[str, float] = {}  # handler -> the mean run time of its recent calls, seconds
        self.wake_pending = False  # a wake-up was asked for and has not come
        self.closed = False

    # -- what happens

    def wait(self, call: CallT) -> None:
        """A new call waits for a lane (`dispatch` gives it one)."""
        call.since = self.clock()
        (self.waiting_unpaced if call.handler in self.unpaced_handlers else self.waiting_paced).append(call)

    def add(self, lane: LaneT) -> None:
        """A lane was started; it takes calls once `ready`."""
        self.lanes.add(lane)
        self.starting += 1

    def ready(self, lane: LaneT) -> bool:
        """The lane takes calls now; False if it had said so before."""
        if lane.ready:
            return False
        lane.ready = True
        self.starting -= 1
        lane.idle_since = self.clock()
        self.idle.append(lane)
        return True

    def answered(self, lane: LaneT, seconds: float, cpu_seconds: float | None) -> CallT:
        """The lane's running call ended, its handler having run `seconds` (`cpu_seconds` of them on
        the CPU, None: not measured). Returns that call; the lane runs its next call, or is idle."""
        call = lane.calls.popleft()
        self.note_run_time(call.handler, seconds, cpu_seconds)
        if lane.calls:
            self._starts_running(lane, self.clock())
        else:
            self.pacing_lanes.discard(lane)
            if not self.closed:
                lane.idle_since = self.clock()
                self.idle.append(lane)
        return call

    def expired(self, call: CallT) -> Decision[LaneT, CallT]:
        """The call's timeout passed. Queued behind another, it is taken back and never runs; running,
        it costs its lane (`kill`); waiting in the parent, it is let go at the next dispatch."""
        lane = cast("LaneT | None", call.lane)
        if lane is not None and lane.calls and lane.calls[0] is call:
            self.seen_slow(call.handler)
            return Decision(kill=lane)
        if lane is not None and call in lane.calls:
            dropped: list[tuple[LaneT, CallT]] = []
            self._take_back(lane, [call], dropped, requeue=False)
            return Decision(taken_back=dropped)
        # waiting in the parent; or its lane is gone, its death on the way: the timeout is what it ends with
        return NOTHING

    def remove(self, lane: LaneT) -> CallT | None:
        """The lane is gone (killed, dead or closed). The calls queued behind its running call wait
        again, first in line; the running call, if any, is returned (it ends as the lane's death says)."""
        self.lanes.discard(lane)
        if not lane.ready:
            self.starting -= 1
        self.pacing_lanes.discard(lane)
        if lane in self.idle:
            self.idle.remove(lane)
        running = lane.calls[0] if lane.calls else None
        self._take_back(lane, list(lane.calls)[1:], None)
        lane.calls.clear()
        return running

    def close(self) -> Decision[LaneT, CallT]:
        """No more calls run: every queued call is taken back (`next_waiting` hands out the waiting ones)."""
        self.closed = True
        dropped: list[tuple[LaneT, CallT]] = []
        for lane in list(self.lanes):
            self._take_back(lane, list(lane.calls)[1:], dropped)
        return Decision(taken_back=dropped)

    def idle_too_long(self, seconds: float) -> tuple[list[LaneT], float | None]:
        """Lanes idle for `seconds` or more, the longest idle first, as many as live beyond
        `pacing_limit` (the caller lets them go: `remove`); and the clock time at which the next
        idle lane will have been idle that long, if lanes beyond the limit would still live then
        (None: nothing to look at until a lane becomes idle again)."""
        spare = len(self.lanes) - self.pacing_limit
        if spare <= 0 or self.closed:
            return [], None
        now = self.clock()
        out: list[LaneT] = []
        for lane in self.idle:  # in the order they became idle (a lane is taken from the end)
            if len(out) == spare:
                return out, None
            if now - lane.idle_since < seconds:
                return out, lane.idle_since + seconds
            out.append(lane)
        return out, None

    def next_waiting(self) -> CallT | None:
        """The first call waiting in the parent, taken out of the line (settled or not)."""
        waiting = self.waiting_unpaced or self.waiting_paced
        return waiting.popleft() if waiting else None

    def note_run_time(self, handler: str, seconds: float, cpu_seconds: float | None) -> None:
        """What a call's run time says of its handler: whether its calls are paced, and whether
        they keep the CPU busy (module docstring)."""
        waited = seconds >= IGNORE_CPU_BELOW and (
            seconds >= QUICK or (cpu_seconds is not None and cpu_seconds < seconds / 2))
        _moved(self.wait_scores, self.unpaced_handlers, handler, waited)
        busy = cpu_seconds is not None and cpu_seconds >= QUICK and cpu_seconds >= seconds / 4
        if busy or handler in self.busy_scores:  # (most handlers never are: no score kept for them)
            _moved(self.busy_scores, self.busy_handlers, handler, busy)
        mean = self.run_means.get(handler)
        mean = seconds if mean is None else mean * 0.75 + seconds * 0.25
        self.run_means[handler] = mean
        self.depths[handler] = max(2, min(self.max_depth, int(QUEUE_TIME / (mean + CALL_COST))))

    def seen_slow(self, handler: str) -> None:
        """A call of the handler overran or timed out: its calls are not paced until quick ones undo it."""
        self.wait_scores[handler] = 1.0
        self.unpaced_handlers.add(handler)

    # -- the decision

    def dispatch(self, *, woken: bool = False) -> Decision[LaneT, CallT]:
        """Give waiting calls to lanes, take back the calls queued behind overrunning ones, and say
        how many lanes to start and when to look again (`woken`: this is that wake-up)."""
        if woken:
            self.wake_pending = False
        now = self.clock()
        forgotten: list[CallT] = []
        dropped: list[tuple[LaneT, CallT]] = []
        sent: list[tuple[LaneT, CallT]] = []
        running = self.running_paced
        if running and (not running[0].paced or now - running[0].since >= self.patience):
            self._take_back_from_overrunning(now, dropped)
        unpaced, paced, idle = self.waiting_unpaced, self.waiting_paced, self.idle
        busy, held = self.busy_handlers, 0  # held: calls of busy handlers left waiting, first in line
        cpu_room = self.pacing_limit - self._running_busy() if busy else 0
        while len(unpaced) > held and idle:
            call = unpaced[held]
            if call.settled:
                del unpaced[held]
                forgotten.append(call)
                continue
            if call.handler in busy:
                if cpu_room <= 0:
                    held += 1
                    continue
                cpu_room -= 1
            del unpaced[held]
            self._send(idle.pop(), call, now, False, sent)
        while paced:
            call = paced[0]
            if call.settled:
                forgotten.append(paced.popleft())
                continue
            if call.handler in self.unpaced_handlers or now - call.since >= self.patience:
                if not idle:
                    break
                if call.handler in busy:  # queued here before its handler was seen to be busy
                    if cpu_room <= 0:
                        break
                    cpu_room -= 1
                self._send(idle.pop(), paced.popleft(), now, False, sent)
                continue
            lane = self._lane_for_paced_call(self.depths.get(call.handler, self.depth))
            if lane is None:
                break
            self._send(lane, paced.popleft(), now, True, sent)
        while unpaced and unpaced[0].settled:  # (the first paced call was just seen not to be)
            forgotten.append(unpaced.popleft())
        # a lane for each waiting call, but for the calls of busy handlers beyond the CPU room
        need = len(unpaced) if not busy else sum(1 for c in unpaced if c.handler not in busy) + min(
            max(0, cpu_room), sum(1 for c in unpaced if c.handler in busy))
        wake_at = None
        queued = 0  # paced calls queued behind a running one
        for lane in self.pacing_lanes:
            queued += len(lane.calls) - 1
        if paced or queued:
            # a paced call waiting while lanes start waits for them, not for more of them
            late = bool(paced) and (paced[0].handler in self.unpaced_handlers
                                    or (now - paced[0].since >= self.patience and not self.starting))
            need += len(paced) if late else min(len(paced) + queued,
                                                max(0, self.pacing_limit - len(self.pacing_lanes) - len(idle)))
            if not self.wake_pending and not self.closed:
                # look again when the first waits too long, or the oldest running paced call runs too
                # long (the calls queued behind it are taken back then)
                due = paced[0].since + self.patience if paced and (idle or len(self.lanes) < self.slots) else None
                if self.running_paced:
                    oldest = self.running_paced[0].since + self.patience
                    due = oldest if due is None else min(due, oldest)
                if due is not None:
                    self.wake_pending = True
                    wake_at = max(due, now + SOONEST_WAKE)
        start = need - self.starting if need > self.starting and not self.closed else 0
        if not (sent or forgotten or dropped or start) and wake_at is None:
            return NOTHING
        return Decision(forgotten, dropped, sent, None, start, wake_at)

    def _running_busy(self) -> int:
        """Calls of busy handlers running now (unpaced: each alone in its lane)."""
        busy = self.busy_handlers
        return sum(1 for lane in self.lanes if lane.calls and lane.calls[0].handler in busy)

    def _lane_for_paced_call(self, depth: int) -> LaneT | None:
        """The least loaded pacing lane while it holds fewer than `depth` calls; else an idle lane,
        while fewer than `pacing_limit` lanes pace (None: the call waits)."""
        best, fewest = None, depth
        for lane in self.pacing_lanes:
            held = len(lane.calls)
            if held < fewest:
                best, fewest = lane, held
        if best is None and self.idle and len(self.pacing_lanes) < self.pacing_limit:
            return self.idle.pop()
        return best

    def _send(self, lane: LaneT, call: CallT, now: float, paced: bool, sent: list[tuple[LaneT, CallT]]) -> None:
        call.lane = lane
        call.paced = paced
        lane.calls.append(call)
        sent.append((lane, call))
        if len(lane.calls) == 1:
            self._starts_running(lane, now)

    def _starts_running(self, lane: LaneT, now: float) -> None:
        """The lane's first call starts running (as far as the parent can tell: now)."""
        call = lane.calls[0]
        call.since = now
        if call.paced:
            self.pacing_lanes.add(lane)
            self.running_paced.append(call)
        else:
            self.pacing_lanes.discard(lane)

    def _take_back_from_overrunning(self, now: float, dropped: list[tuple[LaneT, CallT]]) -> None:
        running = self.running_paced
        while running and (not running[0].paced or now - running[0].since >= self.patience):
            call = running.popleft()
            if call.paced:  # overrunning (the others ended, or were taken back)
                call.paced = False
                self.seen_slow(call.handler)
                lane = cast("LaneT | None", call.lane)
                if lane is not None:
                    self.pacing_lanes.discard(lane)
                    self._take_back(lane, list(lane.calls)[1:], dropped)

    def _take_back(self, lane: LaneT, calls: list[CallT], dropped: list[tuple[LaneT, CallT]] | None, *,
                   requeue: bool = True) -> None:
        """Calls queued in `lane`, not started: they wait in the parent again, first in line (unless
        not `requeue`d: a call whose timeout passed). A live lane is told to drop them (`dropped`);
        a lane that is gone needs no telling."""
        for call in reversed(calls):
            lane.calls.remove(call)
            if dropped is not None:
                dropped.append((lane, call))
            call.lane = None
            call.paced = False
            if requeue:
                self.waiting_paced.appendleft(call)


def _moved(scores: dict[str, float], members: set[str], handler: str, seen: bool) -> None:
    """Move the handler's score a quarter of the way to 1 (`seen`) or to 0: from 1/2 on, it is
    one of `members`."""
    score = scores.get(handler, 0.0) * 0.75 + (0.25 if seen else 0.0)
    scores[handler] = score
    if score >= 0.5:
        members.add(handler)
    else:
        members.discard(handler)
