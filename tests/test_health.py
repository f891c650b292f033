"""A worker's health: the judgement alone on a fake clock."""

from __future__ import annotations

from dataclasses import replace

from dsm.store.memory import ManualClock
from dsm.worker.health import Signs, judge

TTL = 9.0


def current(clock: ManualClock) -> Signs:
    """Every part current at the clock's time."""
    now = clock()
    return Signs(lease_ready=True, lease_renewed_at=now, lease_ttl=TTL, watching=True, heartbeat_at=now,
                 heartbeat_window=2 * TTL)


# -- the judgement, alone -------------------------------------------------------------------------

def test_a_worker_whose_parts_are_current_is_healthy_up_to_the_end_of_each_window():
    clock = ManualClock()
    signs = current(clock)
    assert judge(signs, clock()).healthy and judge(signs, clock()).reasons == ()
    assert judge(signs, clock()).as_dict() == {"status": "ok"}
    clock.advance(TTL)  # a lease lives a TTL from its last keep-alive: current to the very end of it
    assert judge(signs, clock()).healthy


def test_a_lease_not_renewed_within_its_ttl_is_not_current():
    clock = ManualClock()
    signs = current(clock)
    clock.advance(TTL + 0.5)
    health = judge(replace(signs, heartbeat_at=clock()), clock())
    assert not health.healthy
    assert health.reasons == ("lease not renewed for 9.5s (TTL 9s)",)
    assert health.as_dict() == {"status": "unhealthy", "reasons": ["lease not renewed for 9.5s (TTL 9s)"]}


def test_no_lease_is_not_current_however_recent_its_last_keep_alive():
    clock = ManualClock()
    health = judge(replace(current(clock), lease_ready=False), clock())
    assert health.reasons == ("no lease: not granted yet, or lost and being replaced",)


def test_a_watch_that_is_not_open_is_unhealthy():
    clock = ManualClock()
    health = judge(replace(current(clock), watching=False), clock())
    assert not health.healthy and health.reasons == ("the watch for work is not open",)


def test_a_heartbeat_older_than_the_time_others_wait_is_unhealthy():
    clock = ManualClock()
    signs = current(clock)
    clock.advance(2 * TTL)
    fresh_lease = replace(signs, lease_renewed_at=clock())
    assert judge(fresh_lease, clock()).healthy
    clock.advance(0.1)
    fresh_lease = replace(signs, lease_renewed_at=clock())
    assert judge(fresh_lease, clock()).reasons == ("heartbeat not written for 18.1s (limit 18s)",)
    assert judge(replace(fresh_lease, heartbeat_at=None), clock()).reasons == ("heartbeat never written (limit 18s)",)


def test_every_reason_is_given_and_a_stopping_worker_is_not_healthy():
    clock = ManualClock()
    signs = current(clock)
    assert judge(replace(signs, stopping=True), clock()).reasons == ("the worker is stopping",)
    clock.advance(100)
    health = judge(replace(signs, watching=False), clock())
    assert health.reasons == ("lease not renewed for 100.0s (TTL 9s)", "the watch for work is not open",
                              "heartbeat not written for 100.0s (limit 18s)")
