"""Schedules on a real etcd, through the command line and `dsm worker` processes: runs fire once
per due time across a kill -9 of the leader and across a kill and restart of etcd (no gap, no
duplicate; with search attributes moving as the runs go), and a schedule file's errors point at
their file:line:col."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timezone

import pytest
from clitools import dsm, spawn, stop

pytestmark = pytest.mark.etcd

MACHINE = """
machine: beat
start: a
states:
  a:
    tick: beatmod:tick
    next: done
  done:
    terminal: true
"""


def due_of(iid: str) -> float:
    return datetime.strptime(iid.rsplit("-", 1)[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()


def listed(etcd_url: str, namespace: str) -> list[dict]:
    out = dsm("list", "--json", "--etcd", etcd_url, "--namespace", namespace)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.long  # seconds of real time pass, due time by due time: with the chaos runs
def test_runs_fire_once_per_due_time_across_a_kill_of_the_leader(write, etcd_url, namespace):
    path = write("beat.yaml", MACHINE, beatmod="def tick(payload, ctx):\n    return {}\n")
    conn = ["--etcd", etcd_url, "--namespace", namespace]
    created = dsm("schedule", "create", "beat", "--file", str(path), "--every", "1s", "--overlap", "allow_all",
                  *conn)
    assert created.returncode == 0, created.stderr
    workers = [spawn("worker", str(path), "--lease-ttl", "2", "--dead-after", "0", *conn) for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        while len(listed(etcd_url, namespace)) < 3 and time.monotonic() < deadline:
            time.sleep(0.3)
        leader = dsm("workers", "--json", *conn)
        holder = _housekeeper(etcd_url, namespace)
        victim = next(w for w in workers if holder.endswith(f":{w.pid}"))
        os.killpg(victim.pid, signal.SIGKILL)  # the leader dies mid-stream; its lease expires in 2 s
        victim.wait()
        time.sleep(6)
        paused = dsm("schedule", "pause", "beat", "--note", "end of test", *conn)
        assert paused.returncode == 0, paused.stderr
        time.sleep(1.5)  # a fire in flight as it paused lands
        runs = listed(etcd_url, namespace)
        described = json.loads(dsm("schedule", "describe", "beat", "--json", *conn).stdout)
    finally:
        for w in workers:
            if w.poll() is None:
                stop(w)
    assert leader.returncode == 0
    dues = sorted(due_of(r["id"]) for r in runs)
    assert len(dues) == len(set(dues)) >= 8  # one run a due time
    assert dues == [dues[0] + i for i in range(len(dues))]  # every second, none missed across the kill
    assert described["fires"] >= len(dues) and described["misses"] == 0
    assert described["paused"] and described["note"] == "end of test"


def _housekeeper(etcd_url: str, namespace: str) -> str:
    import asyncio

    from dsm.keys import Keys
    from dsm.store.etcd import EtcdOptions, EtcdStore

    async def read() -> str:
        store = await EtcdStore.connect(EtcdOptions.build(etcd_url, namespace=namespace))
        try:
            kv = await store.get(Keys(namespace).housekeeper)
            return kv.value.decode() if kv else ""
        finally:
            await store.close()

    return asyncio.run(read())


def test_the_command_line_creates_lists_triggers_backfills_and_deletes(write, etcd_url, namespace):
    path = write("beat.yaml", MACHINE, beatmod="def tick(payload, ctx):\n    return {}\n")
    conn = ["--etcd", etcd_url, "--namespace", namespace]
    assert dsm("schedule", "create", "nightly", "--file", str(path), "--cron", "30 2 * * *", "--timezone",
               "Europe/Berlin", "--payload", '{"k": 1}', *conn).returncode == 0
    again = dsm("schedule", "create", "nightly", "--machine", "beat", "--every", "1h", *conn)
    assert again.returncode == 2 and "exists" in again.stderr
    unknown = dsm("schedule", "create", "other", "--machine", "nope", "--every", "1h", *conn)
    assert unknown.returncode == 2 and "no machine 'nope'" in unknown.stderr
    table = dsm("schedule", "list", *conn)
    assert table.returncode == 0 and "nightly" in table.stdout and "Europe/Berlin" in table.stdout
    triggered = dsm("schedule", "trigger", "nightly", *conn)
    assert triggered.returncode == 0 and triggered.stdout.startswith("nightly-")
    filled = dsm("schedule", "backfill", "nightly", "--from", "2026-11-01T00:00:00Z", "--to",
                 "2026-11-03T12:00:00Z", *conn)
    assert filled.stdout.split() == ["nightly-20261101T013000Z", "nightly-20261102T013000Z",
                                     "nightly-20261103T013000Z"]
    described = dsm("schedule", "describe", "nightly", *conn)
    assert described.returncode == 0 and "backfilled" in described.stdout and "triggered" in described.stdout
    assert dsm("schedule", "delete", "nightly", *conn).returncode == 0
    gone = dsm("schedule", "describe", "nightly", *conn)
    assert gone.returncode == 2 and "no schedule 'nightly'" in gone.stderr
    assert len(listed(etcd_url, namespace)) == 4  # its runs stay


def test_apply_reports_a_schedule_files_errors_at_their_line_and_creates_nothing(write, etcd_url, namespace):
    path = write("beat.yaml", MACHINE, beatmod="def tick(payload, ctx):\n    return {}\n")
    conn = ["--etcd", etcd_url, "--namespace", namespace]
    assert dsm("submit", str(path), *conn).returncode == 0  # registers the machine
    bad = write("schedules.yaml", """
        - name: hourly
          machine: beat
          cron: "@hourly"
        - name: broken
          machine: beat
          cron: "99 * * * *"
          overlap: sometimes
        """)
    out = dsm("schedule", "apply", str(bad), *conn)
    assert out.returncode == 2
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{bad}:6:") and "not a cron expression" in lines[0], out.stdout
    assert lines[1].startswith(f"{bad}:7:") and "overlap" in lines[1], out.stdout
    assert "no schedules" in dsm("schedule", "list", *conn).stderr
    good = write("schedules.yaml", """
        - name: hourly
          machine: beat
          cron: "@hourly"
        - name: often
          machine: beat
          every: 10m
          jitter: 30s
        """)
    first = dsm("schedule", "apply", str(good), *conn)
    second = dsm("schedule", "apply", str(good), *conn)
    assert "schedule hourly created" in first.stderr and "schedule often created" in first.stderr
    assert "schedule hourly unchanged" in second.stderr and "schedule often unchanged" in second.stderr


@pytest.mark.long  # seconds of real time pass, due time by due time: with the chaos runs
def test_a_stopped_cluster_catches_up_within_the_window_and_counts_the_rest_as_missed(write, etcd_url, namespace):
    path = write("beat.yaml", MACHINE, beatmod="def tick(payload, ctx):\n    return {}\n")
    conn = ["--etcd", etcd_url, "--namespace", namespace]
    assert dsm("schedule", "create", "beat", "--file", str(path), "--every", "1s", "--overlap", "allow_all",
               "--catchup-window", "3s", *conn).returncode == 0
    worker = spawn("worker", str(path), "--lease-ttl", "2", *conn)
    try:
        deadline = time.monotonic() + 30
        while len(listed(etcd_url, namespace)) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        stop(worker)  # no worker runs: due times pass
        stopped = time.time()
        time.sleep(8)
        worker = spawn("worker", str(path), "--lease-ttl", "2", *conn)
        back = time.time()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # a due time after the worker came back has fired, so every older one has (they fire
            # in order): the catch-up is whole, however long the worker took to start
            described = json.loads(dsm("schedule", "describe", "beat", "--json", *conn).stdout)
            if described["misses"] and any(due_of(r["id"]) > back + 2 for r in listed(etcd_url, namespace)):
                break
            time.sleep(0.3)
        assert dsm("schedule", "pause", "beat", *conn).returncode == 0
        time.sleep(1)
        described = json.loads(dsm("schedule", "describe", "beat", "--json", *conn).stdout)
        runs = listed(etcd_url, namespace)
    finally:
        if worker.poll() is None:
            stop(worker)
    dues = sorted(due_of(r["id"]) for r in runs)
    assert len(dues) == len(set(dues)) == described["fires"]
    assert described["misses"] >= 3  # the due times more than 3 s old when a worker came back
    gap = [b - a for a, b in zip(dues, dues[1:]) if b - a > 1]
    assert len(gap) == 1 and gap[0] == described["misses"] + 1  # one hole, exactly the missed due times
    caught_up = [d for d in dues if d > dues[0] + 1 and d > stopped]
    assert len(caught_up) >= 3  # the ones within the window started when it came back


STAGED = """
machine: staged
start: a
search:
  stage: payload.stage
  beat: payload.beat
states:
  a:
    tick: stagedmod:first
    next: b
  b:
    tick: stagedmod:second
    next: done
  done:
    terminal: true
"""
STAGED_HANDLERS = """
def first(payload, ctx):
    payload["stage"] = "first"
    return payload

def second(payload, ctx):
    payload["stage"] = "second"
    return payload
"""


@pytest.mark.long
def test_schedules_and_search_attributes_across_an_etcd_restart(write):
    """etcd killed (SIGKILL) and started again on its data while a schedule fires every second and
    its runs move their search entries: every due time runs once (those that passed while etcd
    was down, within the catch-up window, once it is back), and the index agrees with the records."""
    import asyncio

    from indexes import inconsistencies

    from dsm.keys import Keys
    from dsm.store.etcd import EtcdOptions, EtcdStore
    from dsm.testing import make_cluster

    cluster = make_cluster(1)
    cluster.start()
    namespace = "restart"
    conn = ["--etcd", cluster.endpoint, "--namespace", namespace]
    path = write("staged.yaml", STAGED, stagedmod=STAGED_HANDLERS)
    workers = []
    try:
        created = dsm("schedule", "create", "beat", "--file", str(path), "--every", "1s", "--overlap", "allow_all",
                      "--catchup-window", "30s", "--payload", '{"beat": "yes"}', *conn)
        assert created.returncode == 0, created.stderr
        workers = [spawn("worker", str(path), "--lease-ttl", "3", *conn) for _ in range(2)]
        deadline = time.monotonic() + 30
        while len(listed(cluster.endpoint, namespace)) < 3 and time.monotonic() < deadline:
            time.sleep(0.3)
        member = cluster.members[0]
        cluster.kill_member(member)
        time.sleep(3.0)  # due times pass while etcd is down
        cluster.start_member(member, new=False)
        cluster.wait_ready()
        back = time.time()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(due_of(r["id"]) > back + 2 for r in listed(cluster.endpoint, namespace)):
                break
            time.sleep(0.3)
        assert dsm("schedule", "pause", "beat", *conn).returncode == 0
        deadline = time.monotonic() + 60  # the runs started finish
        while time.monotonic() < deadline:
            runs = listed(cluster.endpoint, namespace)
            if all(r["status"] == "succeeded" for r in runs):
                break
            time.sleep(0.3)
        described = json.loads(dsm("schedule", "describe", "beat", "--json", *conn).stdout)
        by_stage = dsm("list", "--json", "--where", "stage=second", "--where", "beat=yes", *conn)
        stale = dsm("list", "--json", "--where", "stage=first", *conn)
        for w in workers:
            stop(w)

        async def check() -> list[str]:
            store = await EtcdStore.connect(EtcdOptions.build(cluster.endpoint, namespace=namespace))
            try:
                return await inconsistencies(store, Keys(namespace))
            finally:
                await store.close()

        problems = asyncio.run(check())
    finally:
        for w in workers:
            if w.poll() is None:
                stop(w)
        cluster.stop()
    assert all(r["status"] == "succeeded" for r in runs), [r for r in runs if r["status"] != "succeeded"]
    dues = sorted(due_of(r["id"]) for r in runs)
    assert len(dues) == len(set(dues)) == described["fires"] and described["misses"] == 0
    assert dues == [dues[0] + i for i in range(len(dues))]  # every second, across the restart
    assert sorted(s["id"] for s in json.loads(by_stage.stdout)) == sorted(r["id"] for r in runs)
    assert json.loads(stale.stdout) == []  # the first stage's entries all moved on
    assert problems == []
