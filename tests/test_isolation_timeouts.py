"""Attempts' timeouts, watched with one timer: which have passed, and when the timer is due."""

from __future__ import annotations

from dsm.worker.isolation.timeouts import Timeouts


class Thing:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ended = False

    def __repr__(self) -> str:
        return self.name


def test_things_come_due_first_deadline_first_and_once() -> None:
    timeouts: Timeouts[Thing] = Timeouts()
    a, b, c = Thing("a"), Thing("b"), Thing("c")
    assert timeouts.add(10.0, a)  # the first deadline: the timer is set for it
    assert not timeouts.add(12.0, b)
    assert timeouts.add(5.0, c)  # earlier than the first: the timer moves
    assert timeouts.first() == 5.0
    assert timeouts.due(4.9) == []
    assert timeouts.due(10.0) == [c, a]
    assert timeouts.due(10.0) == [] and timeouts.first() == 12.0


def test_things_that_ended_never_come_due() -> None:
    timeouts: Timeouts[Thing] = Timeouts()
    a, b = Thing("a"), Thing("b")
    timeouts.add(1.0, a)
    timeouts.add(2.0, b)
    a.ended = True
    assert timeouts.first() == 2.0  # the timer is set for b, not for a
    b.ended = True
    assert timeouts.due(100.0) == [] and timeouts.first() is None


def test_equal_deadlines_come_due_in_the_order_added() -> None:
    timeouts: Timeouts[Thing] = Timeouts()
    things = [Thing(str(i)) for i in range(5)]
    for thing in things:
        timeouts.add(1.0, thing)
    assert timeouts.due(1.0) == things


def test_the_heap_does_not_keep_what_ended() -> None:
    """Nearly every attempt ends before its timeout: what ended is dropped as the heap grows."""
    timeouts: Timeouts[Thing] = Timeouts()
    live = Thing("live")
    timeouts.add(1_000.0, live)
    for i in range(10_000):
        thing = Thing(str(i))
        timeouts.add(60.0 + i, thing)
        thing.ended = True
    assert len(timeouts) < 200
    assert timeouts.due(2_000.0) == [live]
