"""A worker's health: the judgement alone on a fake clock, /healthz in one process, and
`dsm worker --health-port` against an etcd that goes away and comes back."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any

import pytest
from clitools import dsm, spawn
from helpers import until_async
from metricstools import wait_for

from dsm import healthz, metrics
from dsm.definitions import Registry
from dsm.keys import Keys
from dsm.store.memory import ManualClock, MemoryStore
from dsm.testing import make_cluster
from dsm.worker import Worker, running
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


# -- in one process -------------------------------------------------------------------------------

def get(url: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read()
        return exc.code, json.loads(body) if exc.headers.get("Content-Type") == "application/json" else {}


def test_healthz_says_why_a_worker_that_has_not_started_is_not_healthy():
    store, keys = MemoryStore(), Keys()
    worker = Worker(store, Registry(store, keys), worker_id="idle")
    with healthz.serving(worker) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        status, body = get(server.url("/healthz"))
        assert status == 503 and body["status"] == "unhealthy" and body["worker"] == "idle"
        assert body["reasons"] == ["no lease: not granted yet, or lost and being replaced",
                                   "the watch for work is not open", "heartbeat never written (limit 20s)"]
        assert get(server.url("/metrics"))[0] == 404
        post = urllib.request.Request(server.url("/healthz"), data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(post, timeout=10)
        assert refused.value.code == 405


def test_a_running_worker_is_healthy_until_its_clock_passes_its_lease_ttl():
    """The parts stamp their readings with the worker's clock: a clock moved past the lease TTL
    (nothing renewed meanwhile on it) makes the lease and the heartbeat stale."""
    clock = ManualClock()

    async def main() -> tuple[list, list, list]:
        store, keys = MemoryStore(), Keys()
        async with running(store, Registry(store, keys), worker_id="w", lease_ttl=30.0, clock=clock) as w:
            with healthz.serving(w) as health, metrics.serving(w) as scraped:
                answers = []
                for url in (health.url("/healthz"), scraped.url.replace("/metrics", "/healthz")):
                    async def healthy(url: str = url) -> Any:
                        answer = await asyncio.to_thread(get, url)
                        return answer if answer[0] == 200 else None

                    answers.append(await until_async(healthy, f"{url} answers 200", interval=0.05))
                clock.advance(61)
                late = w.health().reasons
        return answers, list(late), list(w.health().reasons)

    answers, late, stopped = asyncio.run(main())
    assert answers == [(200, {"status": "ok", "worker": "w"})] * 2
    assert [reason.split(" for ")[0] for reason in late] == ["lease not renewed", "heartbeat not written"]
    assert "the worker is stopping" in stopped


# -- dsm worker --health-port against a real etcd -------------------------------------------------

def drain(stream: Any, lines: list[str]) -> threading.Thread:
    """Read a process's stream to its end on a thread (a full pipe would stall the process)."""
    thread = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    thread.start()
    return thread


@pytest.mark.etcd
def test_a_health_port_in_use_is_refused(etcd, namespace):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = dsm("worker", "definitions/order.yaml", "--etcd", etcd.endpoint, "--namespace", namespace,
                     "--isolation", "thread", "--health-port", str(port), timeout=60)
    assert result.returncode == 2
    assert f"--health-port: cannot serve /healthz on 127.0.0.1:{port}" in result.stderr


def test_a_bad_health_port_is_a_usage_error():
    assert dsm("worker", "--etcd", "http://127.0.0.1:1", "--health-port", "70000").returncode == 2


@pytest.mark.etcd
@pytest.mark.slow
@pytest.mark.long  # etcd stopped and started again
def test_healthz_follows_etcd_going_away_and_coming_back():
    ttl = 3
    cluster = make_cluster(1).start()
    member = cluster.members[0]
    proc = spawn("worker", "definitions/order.yaml", "--etcd", cluster.endpoint, "--namespace", "health",
                 "--health-port", "0", "--isolation", "thread", "--lease-ttl", str(ttl), "--dead-after", str(ttl))
    lines: list[str] = []
    try:
        first = proc.stderr.readline()
        found = re.search(r"health on (http://127\.0\.0\.1:\d+/healthz)", first)
        assert found, first
        url = found.group(1)
        reader = drain(proc.stderr, lines)
        assert wait_for(lambda: get(url)[0] == 200, timeout=30), get(url)
        assert get(url)[1]["status"] == "ok"

        cluster.kill_member(member)
        assert wait_for(lambda: get(url)[0] == 503, timeout=ttl), get(url)  # the lease lasts a TTL at most
        # and in a TTL more, with nothing renewed or written, every part says so
        assert wait_for(lambda: len(get(url)[1].get("reasons", [])) == 3, timeout=ttl + 5), get(url)
        reasons = get(url)[1]["reasons"]
        assert reasons[0].startswith("lease not renewed for") and reasons[1] == "the watch for work is not open"
        assert reasons[2].startswith("heartbeat not written for")

        cluster.start_member(member, new=False)
        cluster.wait_ready(members=[member])
        assert wait_for(lambda: get(url)[0] == 200, timeout=30), get(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            cluster.stop()
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)
