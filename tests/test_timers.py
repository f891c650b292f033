"""Timer accuracy, short (bench/timers.py measures it with worker processes and prints every
figure): an instance waiting 2 s continues within 1 s of its due time with 1,000 others waiting.
The bound is the contract's, generous on purpose: on an idle machine the lateness is a few
milliseconds, and the test must not fail because the machine is busy with other work."""

from __future__ import annotations

import asyncio

import pytest

from bench import timers

pytestmark = [pytest.mark.etcd]


@pytest.mark.long  # real seconds: run by the long step
def test_an_instance_waiting_2s_continues_within_1s_of_its_due_time_with_1000_others_waiting(etcd):
    settings = timers.Settings(waiting=1000, probes=20, idle=1.0, workers=2, in_process=True)
    result = asyncio.run(timers.measure(settings, endpoint=etcd.endpoint))
    print(timers.table([result]))
    assert result["probes"] == 20
    assert result["lateness_min_s"] >= 0  # never early
    assert result["lateness_max_s"] < 1.0, result
