"""The short chaos runs for CI: every fault once, under load, then every history audited; the
waiting constructs and maps (a map of 500 items, signals, child machines, 1,000 timers) under
the faults that threaten them; and an etcd with auth whose tokens are lost or refused under load."""

from __future__ import annotations

import os

import pytest
from auth_faults import AuthConfig, run_auth
from constructs import ConstructConfig, run_constructs
from harness import Config, run

pytestmark = [pytest.mark.etcd, pytest.mark.slow, pytest.mark.long]


def _require_etcd() -> None:
    from dsm.testing import etcd_binary, etcdctl_binary

    if etcd_binary() is None or etcdctl_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("etcd and etcdctl are required in CI")
        pytest.skip("no etcd binary")


def test_every_fault_under_load_loses_nothing_and_commits_nothing_twice(request):
    _require_etcd()
    report = run(Config(workers=3, fanout=40, loopfork=20, rounds=3, fault_every=2.0, lease_ttl=3))
    summary = report.as_dict()
    print(summary)
    submitted = 60 + 6 * (10 + 5)  # the initial load, and a top-up before each of the six faults
    assert report.instances == submitted
    assert report.statuses == {"succeeded": submitted}, summary
    assert report.invalid_histories == {}, summary["examples"]
    assert report.payload_problems == {}, summary["payload_examples"]
    assert report.index_problems == [], summary["index_problems"]
    kinds = [f["fault"] for f in report.faults]
    assert sorted(kinds) == sorted(["kill_worker", "pause_worker", "restart_member", "restart_leader", "compact",
                                    "restart_cluster"])
    for fault in report.faults:
        if fault["fault"] in ("kill_worker", "pause_worker"):
            # it struck a worker in the middle of work, whose instances all moved on again (the time
            # it took is reported, not judged: timing belongs to bench/)
            assert fault["claims_held"] > 0, fault
            assert fault["recovery_s"] is not None, fault
        else:
            assert fault["recovery_s"] is not None, fault  # commits went on after it


def test_maps_signals_children_and_timers_under_faults_lose_nothing_and_do_nothing_twice():
    """Workers killed during a map of 500 items, while signals are sent and consumed (the last
    round with every worker dead), while parents start children; the whole etcd cluster stopped
    and restarted while 1,000 instances wait on timers. Then, from the store: every history passes
    the audit, every instance ended as expected, each signal sent was consumed once (and none is
    left), each map's results are complete and in item order, each call visit and attempt has
    exactly one child, no timer fired early, no work marker is left."""
    _require_etcd()
    config = ConstructConfig()
    report = run_constructs(config)
    summary = report.as_dict()
    print(summary)
    assert report.invalid_histories == {}, summary["invalid_examples"]
    assert report.problems == {}, summary["problems"]
    assert report.unexpected_statuses == {}, summary["unexpected_statuses"]
    assert report.statuses["bigmap"] == {"succeeded": config.map_instances}
    assert report.statuses["waiter"] == {"succeeded": config.waiters}
    assert report.statuses["caller"] == {"succeeded": config.callers}
    assert report.statuses["sleeper"] == {"succeeded": config.sleepers}
    flaky = config.callers // 2 + config.callers % 2  # each of their visits had a failed first child
    assert report.statuses["callee"] == {"succeeded": config.callers * config.rounds,
                                         "failed": flaky * config.rounds}
    assert report.signals_sent == report.signals_consumed == config.waiters * config.signals
    assert report.signals_left == 0
    assert report.map_items == report.map_items_arrived == report.map_results == config.map_items
    assert report.children_expected == report.children_stored == (config.callers + flaky) * config.rounds
    assert report.timers == config.sleepers and report.timers_early == 0
    assert report.leftover_markers == 0
    struck = {(f["phase"], f["fault"]) for f in report.faults}
    assert struck == {("map", "kill_worker"), ("signals", "kill_worker"), ("signals", "kill_all_workers"),
                      ("calls", "kill_worker"), ("timers", "restart_cluster")}, report.faults
    for phase in ("map", "calls"):  # a kill struck a worker in the middle of that phase's work
        assert any(f.get("phase_claims") for f in report.faults if f["phase"] == phase), report.faults
    assert report.ok


def test_with_etcd_auth_no_worker_outlives_its_token_doing_nothing():
    """An etcd with auth, users limited to their namespace; under load with timers and signals in
    flight: every member killed and restarted (every token gone), the leader killed, every token
    refused (auth disabled and enabled) while streams must reconnect, compaction every second
    under `dsm status --follow` and the api's event streams; tokens that expire after 3 s all
    along. Every worker process is either working (its heartbeat current) or has exited (and was
    restarted); every instance finishes exactly once, those submitted after the faults too."""
    _require_etcd()
    config = AuthConfig()
    report = run_auth(config)
    summary = report.as_dict()
    print(summary)
    assert report.idle == {}, summary["idle_workers"]  # a worker alive, doing nothing
    assert report.problems == {}, summary["problems"]
    assert report.invalid_histories == {}, summary["invalid_examples"]
    assert report.late == {"submitted": config.late, "succeeded": config.late}, summary
    submitted = report.submitted  # the batches: at the start, before each fault (two before compaction), after
    assert submitted == {"a": config.initial + 5 * config.top_up + config.late, "b": 7 * config.per_b}
    assert report.statuses == {ns: {"succeeded": n} for ns, n in submitted.items()}
    assert report.signals["sent"] == report.signals["consumed"] == sum(submitted.values())
    assert sorted(f["fault"] for f in report.faults) == sorted(["kill_cluster", "kill_leader", "auth_reset",
                                                                "compact_loop"])
    for fault in report.faults:  # commits went on, and every worker alive wrote its heartbeat again
        assert fault["commits_s"] is not None and fault["workers_s"] is not None, fault
    assert report.ok
