"""Schedules (SPEC 9): due times in a time zone, firing exactly once per due time, overlap
policies, catch-up after downtime, pause, trigger and backfill. The leader's rounds are driven by
hand with a clock the test moves; no worker runs, so every run started stays running until the
test ends it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from helpers import on_store

from dsm import compiler
from dsm.errors import InputError, NotFound
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.schedules import FieldError, Schedules, Spec, run_id

LINE = "machine: job\nstart: a\nstates:\n  a: {next: done}\n  done: {terminal: true}\n"
T0 = datetime(2026, 12, 7, 9, 0, 30, tzinfo=timezone.utc).timestamp()  # half a minute past a minute


def utc(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Clock:
    def __init__(self, at: float):
        self.at = at

    def __call__(self) -> float:
        return self.at


async def world(store, namespace, clock):
    keys = Keys(namespace)
    ops = Operations(store, keys, wall=clock)
    await ops.register(compiler.compile_text(LINE, "job.yaml", import_handlers=False))
    return ops, Schedules(ops, wall=clock)


def spec(name="nightly", **fields):
    return Spec.of(name, {"machine": "job", **fields})


# -- due times ---------------------------------------------------------------------------------------

def test_cron_due_times_follow_the_time_zone_across_daylight_saving_changes():
    berlin = ZoneInfo("Europe/Berlin")
    daily = spec(cron="30 2 * * *", timezone="Europe/Berlin")
    spring = datetime(2026, 3, 28, 12, 0, tzinfo=berlin).timestamp()
    got = [datetime.fromtimestamp(d, berlin).isoformat() for d in _take(daily.dues(spring), 3)]
    # 02:30 does not exist on the 29th: it runs at the change, as cron does
    assert got == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00", "2026-03-31T02:30:00+02:00"]
    autumn = datetime(2026, 10, 24, 12, 0, tzinfo=berlin).timestamp()
    got = [utc(d) for d in _take(daily.dues(autumn), 2)]
    assert got == ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]  # the repeated 02:30 runs once
    hourly = spec(cron="@hourly", timezone="Europe/Berlin")
    got = [utc(d) for d in _take(hourly.dues(datetime(2026, 10, 25, 1, 30, tzinfo=berlin).timestamp()), 3)]
    assert got == ["2026-10-25T00:00:00Z", "2026-10-25T01:00:00Z", "2026-10-25T02:00:00Z"]  # 02:00 twice


def test_every_counts_from_start_at_and_stops_at_end_at():
    s = spec(every="10m", start_at="2026-12-07T09:05:00Z", end_at="2026-12-07T09:40:00Z")
    assert [utc(d) for d in s.dues(T0)] == ["2026-12-07T09:05:00Z", "2026-12-07T09:15:00Z", "2026-12-07T09:25:00Z",
                                            "2026-12-07T09:35:00Z"]


def test_a_run_is_named_by_its_schedule_and_due_time_in_utc():
    assert run_id("nightly", T0) == "nightly-20261207T090030Z"


@pytest.mark.parametrize("fields, field, message", [
    ({"cron": "61 * * * *"}, "cron", "not a cron expression"),
    ({"cron": "* * * * *", "every": "1m"}, "every", "one of cron or every"),
    ({}, "cron", "one of cron or every"),
    ({"every": "500ms"}, "every", "at least 1s"),
    ({"every": "1m", "timezone": "Mars/Base"}, "timezone", "unknown time zone"),
    ({"every": "1m", "overlap": "sometimes"}, "overlap", "overlap: must be one of"),
    ({"every": "1m", "cadence": 3}, "cadence", "unknown field"),
    ({"every": "1m", "payload": [1]}, "payload", "payload: must be a JSON object"),
    ({"every": "1m", "start_at": "2026-12-07T10:00:00Z", "end_at": "2026-12-07T09:00:00Z"}, "end_at", "after start_at"),
    ({"every": "1m", "jitter": "soon"}, "jitter", "jitter: expected a number of seconds"),
])
def test_a_bad_schedule_is_refused_naming_what_is_wrong(fields, field, message):
    with pytest.raises(FieldError, match=message) as caught:
        Spec.of("s", {"machine": "job", **fields})
    assert caught.value.field == field
    with pytest.raises(InputError, match="invalid schedule name"):
        Spec.of("no spaces", {"machine": "job", "every": "1m"})


def _take(it, n):
    return [next(it) for _ in range(n)]


# -- firing --------------------------------------------------------------------------------------------

def test_each_due_time_fires_once_even_when_two_leaders_race(store_factory, namespace):
    async def body(store):
        clock = Clock(T0)
        ops, schedules = await world(store, namespace, clock)
        await schedules.create(spec(cron="* * * * *"))
        clock.at = T0 + 30  # 09:01:00 is due
        first, second = await asyncio.gather(schedules.round(), schedules.round())
        again, _ = await schedules.round()
        listed = [i.id for i in await ops.list()]
        return first[0] + second[0], again, listed, await schedules.describe("nightly")

    events, again, listed, described = on_store(store_factory, body)
    assert [e["id"] for e in events if e["action"] == "started"] == ["nightly-20261207T090100Z"]
    assert again == [] and listed == ["nightly-20261207T090100Z"]
    assert described["fires"] == 1 and described["next"][0] == "2026-12-07T09:02:00.000Z"
    assert described["runs"][-1]["status"] == "running"


@pytest.mark.parametrize("overlap", ["skip", "buffer_one", "allow_all", "cancel_other"])
def test_overlap_policies(store_factory, namespace, overlap):
    async def body(store):
        clock = Clock(T0)
        ops, schedules = await world(store, namespace, clock)
        await schedules.create(spec(every="1m", overlap=overlap))
        clock.at = T0 + 30
        await schedules.round()  # 09:01 starts
        clock.at = T0 + 90
        second, _ = await schedules.round()  # 09:02 is due while 09:01 runs
        clock.at = T0 + 100
        await ops.cancel("nightly-20261207T090100Z")  # the first run ends (if it still ran)
        third, _ = await schedules.round()
        return second, third, {i.id: i.status for i in await ops.list()}

    second, third, statuses = on_store(store_factory, body)
    first_id, second_id = "nightly-20261207T090100Z", "nightly-20261207T090200Z"
    if overlap == "skip":
        assert [e["action"] for e in second] == ["skipped"] and third == []
        assert statuses == {first_id: "cancelled"}
    elif overlap == "buffer_one":
        assert [e["action"] for e in second] == ["buffered"]
        assert [(e["action"], e["id"]) for e in third] == [("started", second_id)]
        assert statuses == {first_id: "cancelled", second_id: "running"}
    elif overlap == "allow_all":
        assert [e["action"] for e in second] == ["started"]
        assert statuses == {first_id: "cancelled", second_id: "running"}
    else:
        assert [e["action"] for e in second] == ["started"]
        assert statuses == {first_id: "cancelled", second_id: "running"}


def test_downtime_within_the_catchup_window_is_caught_up_and_beyond_it_counted_as_missed(store_factory, namespace):
    async def body(store):
        clock = Clock(T0)
        ops, schedules = await world(store, namespace, clock)
        await schedules.create(spec(every="1m", overlap="allow_all", catchup_window="3m"))
        clock.at = T0 + 30 + 10 * 60  # no leader from 09:01 to 09:11: 11 due times passed
        events, _ = await schedules.round()
        return events, sorted(i.id for i in await ops.list()), await schedules.describe("nightly")

    events, ids, described = on_store(store_factory, body)
    assert [(e["action"], e.get("count")) for e in events][0] == ("missed", 7)  # 09:01 to 09:07
    assert ids == [f"nightly-20261207T09{m:02d}00Z" for m in (8, 9, 10, 11)]  # within the 3 minutes
    assert described["misses"] == 7 and described["fires"] == 4


def test_pause_trigger_unpause_and_backfill(store_factory, namespace):
    async def body(store):
        clock = Clock(T0)
        ops, schedules = await world(store, namespace, clock)
        await schedules.create(spec(cron="*/5 * * * *"))
        await schedules.pause("nightly", note="maintenance")
        clock.at = T0 + 3600
        paused, _ = await schedules.round()
        triggered = await schedules.trigger("nightly")
        await schedules.unpause("nightly")
        after_unpause = (await schedules.describe("nightly"))["next"][0]
        backfilled = await schedules.backfill("nightly", T0, T0 + 1200)
        again = await schedules.backfill("nightly", T0, T0 + 1200)
        return paused, triggered, after_unpause, backfilled, again, sorted(i.id for i in await ops.list())

    paused, triggered, after_unpause, backfilled, again, ids = on_store(store_factory, body)
    assert paused == []  # nothing fires while paused, nor after for the time it was
    assert triggered == "nightly-20261207T100030Z-manual-1"  # named by now, and numbered
    assert after_unpause == "2026-12-07T10:05:00.000Z"
    assert backfilled == again == [f"nightly-20261207T09{m:02d}00Z" for m in (5, 10, 15, 20)]
    assert ids == sorted([triggered, *backfilled])  # the second backfill started nothing


def test_apply_creates_updates_and_leaves_alone(store_factory, namespace):
    async def body(store):
        clock = Clock(T0)
        _, schedules = await world(store, namespace, clock)
        first = await schedules.apply([spec("a", every="1m"), spec("b", cron="@daily")])
        second = await schedules.apply([spec("a", every="2m"), spec("b", cron="@daily")])
        third = await schedules.apply([spec("a", every="2m")], prune=True)
        with pytest.raises(NotFound, match="no machine 'nope'"):
            await schedules.apply([Spec.of("c", {"machine": "nope", "every": "1m"})])
        return first, second, third, [s.spec.name for s in await schedules.all()]

    first, second, third, names = on_store(store_factory, body)
    assert first["created"] == ["a", "b"] and second["updated"] == ["a"] and second["unchanged"] == ["b"]
    assert third["deleted"] == ["b"] and names == ["a"]


def test_every_trigger_starts_its_own_run_and_leaves_the_due_times_their_ids(store_factory, namespace):
    async def body(store):
        clock = Clock(T0 + 30)  # 09:01:00
        ops, schedules = await world(store, namespace, clock)
        await schedules.create(spec(cron="* * * * *", overlap="allow_all"))
        clock.at = T0 + 90  # 09:02:00 exactly, due and not yet fired; the clock stays there
        triggered = [await schedules.trigger("nightly") for _ in range(3)]
        fired, _ = await schedules.round()
        described = await schedules.describe("nightly")
        await schedules.delete("nightly")  # created again, its count starts afresh: its first numbers are taken
        await schedules.create(spec(cron="* * * * *"))
        again = await schedules.trigger("nightly")
        return triggered, fired, described, again, sorted(i.id for i in await ops.list())

    triggered, fired, described, again, ids = on_store(store_factory, body)
    due = "nightly-20261207T090200Z"
    assert triggered == [f"{due}-manual-{n}" for n in (1, 2, 3)]  # three runs, none under the due time's id
    assert [(e["action"], e["id"]) for e in fired] == [("started", due)]  # the due time fires, once
    assert [(r["action"], r["id"], r["status"]) for r in described["runs"]] == [
        *(("triggered", iid, "running") for iid in triggered), ("started", due, "running")]
    assert described["triggers"] == 3 and described["fires"] == 1
    assert again == f"{due}-manual-4" and ids == sorted([*triggered, due, again])
