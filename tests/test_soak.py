"""The soak benchmark, short: a minute of steady load with a short retention, and etcd's database
stops growing (bench/soak.py runs the long version at full speed and prints every figure)."""

from __future__ import annotations

import asyncio

import pytest

from bench import soak

pytestmark = [pytest.mark.etcd, pytest.mark.slow, pytest.mark.long]


def test_a_minute_of_steady_load_leaves_the_database_flat():
    """At a steady rate (well below what one worker does even on a busy machine, so the database's
    size depends on the rate, not on the machine's load), the database stops growing once the
    retention and compaction periods have passed."""
    settings = soak.Settings(seconds=60, quota_mb=256, retention="2s", compaction_retention="2s", workers=1,
                             concurrency=32, backlog=1000, sample=3, rate=250)
    result = asyncio.run(soak.soak(settings, progress=False))
    figures = result.figures()
    print(soak.table(figures, settings))  # throughput and memory are figures to read, not to assert
    assert not figures["nospace"]
    assert figures["db_end_over_middle"] <= 1.2, figures
    # and what dsm keeps in it (live keys, and the revisions compaction has not reached yet)
    assert figures["db_in_use_end_over_middle"] <= 1.2, figures
    assert figures["instances_submitted"] == figures["instances_succeeded"] > 10_000
    assert figures["unaccounted"] == figures["failed_or_cancelled"] == figures["left_running"] == 0
