"""Prometheus metrics: `dsm worker --metrics-port` scraped and parsed as Prometheus would, the
numbers checked against what the instances did; several workers in one process, each its own."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from clitools import dsm, spawn
from helpers import until_async
from metricstools import parse, scrape, value, wait_for
from prometheus_client import generate_latest

from dsm import compiler, handlers, metrics
from dsm.definitions import Registry
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.store.memory import MemoryStore
from dsm.version import __version__
from dsm.worker import Worker, running
from dsm.worker.meter import TICK_BUCKETS, Histogram

GOOD = """
machine: good
start: a
states:
  a:
    tick: metered:step
    next: b
  b:
    tick: metered:step
    next: done
  done:
    terminal: true
"""

BAD = """
machine: bad
start: s
states:
  s:
    tick: metered:trouble
    timeout: 300ms
    retry: {max_attempts: 2, backoff: 10ms, non_retryable: [LookupError]}
    next: done
  done:
    terminal: true
"""

HANDLERS = """
import time

def step(payload, ctx):
    payload[ctx.state] = True

def trouble(payload, ctx):
    mode = payload["mode"]
    if mode == "flaky" and ctx.attempt == 1:
        raise ConnectionError("the first attempt fails")
    if mode == "broken":
        raise KeyError("always")            # non-retryable: one attempt, the instance fails
    if mode == "slow":
        time.sleep(5)                       # past the timeout, on both attempts
"""


def write_machines(write: Any) -> tuple[Path, Path]:
    return write("good.yaml", GOOD, metered=HANDLERS), write("bad.yaml", BAD)


def start_worker(*args: str, cwd: Path, **env: str) -> tuple[Any, str, str]:
    """A `dsm worker` with metrics on a free loopback port: (process, metrics url, worker id)."""
    proc = spawn("worker", *args, "--metrics-port", "0", cwd=cwd, **env)
    line = proc.stderr.readline()
    found = re.search(r"worker (\S+) serving .* metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
    assert found, line + proc.stderr.read() if proc.poll() is not None else line
    return proc, found.group(2), found.group(1)


def stop(proc: Any) -> str:
    proc.send_signal(signal.SIGTERM)
    _, errors = proc.communicate(timeout=60)
    assert proc.returncode == 0, errors
    return errors


def summaries(env: dict[str, str], cwd: Path) -> list[dict]:
    listed = dsm("list", "--json", cwd=cwd, **env)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


@pytest.mark.etcd
def test_a_worker_serves_its_numbers_on_metrics(etcd, namespace, write, tmp_path):
    good, bad = write_machines(write)
    env = {"DSM_ETCD": etcd.endpoint, "DSM_NAMESPACE": namespace}
    proc, url, worker_id = start_worker(str(good), str(bad), "--concurrency", "4", "--lease-ttl", "2",
                                        "--isolation", "thread", cwd=tmp_path, **env)
    try:
        (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"mode": m}) + "\n"
                                                    for m in ("flaky", "flaky", "broken", "slow")))
        assert dsm("submit", str(good), "--jsonl", "-", input="{}\n" * 3, cwd=tmp_path, **env).returncode == 0
        assert dsm("submit", str(bad), "--jsonl", str(tmp_path / "bad.jsonl"), cwd=tmp_path, **env).returncode == 0
        assert wait_for(lambda: all(s["status"] != "running" for s in summaries(env, tmp_path)), timeout=60)
        records = summaries(env, tmp_path)
        expected = {m: sum(s["transitions"] for s in records if s["machine"] == m) for m in ("good", "bad")}
        # the worker counts a commit once etcd has answered it, maybe a moment after a client saw it
        assert wait_for(lambda: all(value(scrape(url), "dsm_transitions_total", machine=m) == n
                                    for m, n in expected.items()), timeout=10), scrape(url)
        assert wait_for(lambda: value(scrape(url), "dsm_lease_renewals_total") >= 1, timeout=10)
        samples = scrape(url)
    finally:
        stop(proc)

    assert expected["good"] == 6
    assert value(samples, "dsm_worker_info", worker=worker_id, namespace=namespace, version=__version__) == 1
    assert value(samples, "dsm_worker_slots") == 4
    # ticks by outcome, by machine: good 3 x 2 ok; bad: flaky error+ok (x2), broken error, slow timeout x2
    assert value(samples, "dsm_ticks_total", machine="good", outcome="ok") == 6
    assert value(samples, "dsm_ticks_total", machine="bad", outcome="ok") == 2
    assert value(samples, "dsm_ticks_total", machine="bad", outcome="error") == 3
    assert value(samples, "dsm_ticks_total", machine="bad", outcome="timeout") == 2
    assert value(samples, "dsm_ticks_total", machine="good", outcome="error") == 0
    # the tick histogram counts every attempt; the timed-out ones lasted past 0.25 s
    assert value(samples, "dsm_tick_seconds_count", machine="good") == 6
    assert value(samples, "dsm_tick_seconds_count", machine="bad") == 7
    assert value(samples, "dsm_tick_seconds_bucket", machine="bad", le="+Inf") == 7
    assert value(samples, "dsm_tick_seconds_bucket", machine="bad", le="0.25") <= 5
    assert value(samples, "dsm_tick_seconds_sum", machine="bad") >= 0.6
    # commits: at least one per instance, at most one per attempt (a failed one schedules its retry or
    # fails the instance; outcomes of one instance fold into one commit)
    for machine, instances in (("good", 3), ("bad", 4)):
        commits = value(samples, "dsm_commit_seconds_count", machine=machine)
        assert instances <= commits <= value(samples, "dsm_tick_seconds_count", machine=machine), (machine, commits)
        assert value(samples, "dsm_commit_seconds_bucket", machine=machine, le="+Inf") == commits
        assert value(samples, "dsm_claims_total", machine=machine) >= instances
        assert value(samples, "dsm_instances_started_total", machine=machine) == instances
        assert value(samples, "dsm_ticks_in_flight", machine=machine) == 0
    assert value(samples, "dsm_instances_finished_total", machine="good", status="succeeded") == 3
    assert value(samples, "dsm_instances_finished_total", machine="bad", status="succeeded") == 2
    assert value(samples, "dsm_instances_finished_total", machine="bad", status="failed") == 2
    assert value(samples, "dsm_claims_lost_total", machine="good") == 0
    assert value(samples, "dsm_queue_depth") == 0
    assert value(samples, "dsm_etcd_alarm", alarm="NOSPACE") == 0
    assert value(samples, "dsm_etcd_writes_refused_total") == 0
    assert value(samples, "dsm_leases_lost_total") == 0
    assert value(samples, "dsm_housekeeper") == 1  # the only worker of its namespace keeps house
    assert ("process_cpu_seconds_total", ()) in samples


@pytest.mark.etcd
def test_metrics_are_served_on_metrics_only_and_a_busy_port_is_refused(etcd, namespace, write, tmp_path):
    good, _ = write_machines(write)
    env = {"DSM_ETCD": etcd.endpoint, "DSM_NAMESPACE": namespace}
    proc, url, _ = start_worker(str(good), cwd=tmp_path, **env)
    try:
        with pytest.raises(urllib.error.HTTPError) as elsewhere:
            urllib.request.urlopen(url.removesuffix("/metrics") + "/", timeout=10)
        assert elsewhere.value.code == 404
        port = url.rsplit(":", 1)[1].split("/")[0]
        busy = dsm("worker", str(good), "--metrics-port", port, timeout=60, cwd=tmp_path, **env)
    finally:
        stop(proc)
    assert busy.returncode == 2
    assert f"--metrics-port: cannot serve metrics on 127.0.0.1:{port}" in busy.stderr


def test_a_bad_metrics_port_is_a_usage_error():
    result = dsm("worker", "--etcd", "http://127.0.0.1:1", "--metrics-port", "70000")
    assert result.returncode == 2


# -- in one process ---------------------------------------------------------------------------------

def test_several_workers_in_one_process_each_serve_their_own(write):
    """Each worker has its own registry: two serve at once, and their counts add up to the work."""
    graph = compiler.load(write_machines(write)[0])

    async def main() -> tuple[list[dict], list[str]]:
        store, keys = MemoryStore(), Keys()
        registry = Registry(store, keys, allow=handlers.Allowlist(graph.modules()))
        registry.add(graph)
        client = Operations(store, keys)
        async with running(store, registry, worker_id="w1", concurrency=2) as w1, \
                running(store, registry, worker_id="w2", concurrency=2) as w2:
            with metrics.serving(w1) as s1, metrics.serving(w2) as s2:
                ids = await client.submit_many(graph, [{} for _ in range(20)])
                for iid in ids:
                    await client.wait(iid, timeout=30)
                async def counted() -> Any:  # a commit is counted once its answer is in
                    scraped = await asyncio.gather(*(asyncio.to_thread(scrape, s.url) for s in (s1, s2)))
                    return sum(value(s, "dsm_transitions_total", machine="good") for s in scraped) >= 40 and scraped

                scraped = await until_async(counted, "40 transitions counted", interval=0.05)
                texts = [generate_latest(metrics.registry(w)).decode() for w in (w1, w2)]
        return scraped, texts

    scraped, texts = asyncio.run(main())
    assert [value(s, "dsm_worker_info", worker=w, namespace="dsm", version=__version__)
            for s, w in zip(scraped, ("w1", "w2"))] == [1, 1]
    assert sum(value(s, "dsm_transitions_total", machine="good") for s in scraped) == 40
    assert sum(value(s, "dsm_instances_finished_total", machine="good", status="succeeded") for s in scraped) == 20
    assert [parse(t)[("dsm_worker_info", (("namespace", "dsm"), ("version", __version__), ("worker", w)))]
            for t, w in zip(texts, ("w1", "w2"))] == [1, 1]


def test_the_server_binds_loopback_by_default_and_any_free_port():
    store, keys = MemoryStore(), Keys()
    worker = Worker(store, Registry(store, keys), worker_id="idle")  # not running: nothing counted
    with metrics.serving(worker) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        samples = scrape(server.url)
    assert value(samples, "dsm_queue_depth") == 0
    with socket.socket() as probe:  # closed with the block: nothing listens there any more
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: past TIME_WAIT
        probe.bind(("127.0.0.1", server.port))


def test_histogram_buckets_count_each_observation_once_at_its_upper_bound():
    h = Histogram(TICK_BUCKETS)
    for v in (0.0005, 0.0006, 0.001, 1000.0):
        h.observe(v)
    assert h.counts[0] == 1 and h.counts[1] == 2 and h.counts[-1] == 1  # le is inclusive
    assert sum(h.counts) == 4 and h.sum == pytest.approx(1000.0021)



@pytest.mark.etcd
def test_the_etcd_store_counts_the_errors_etcd_answers(etcd):
    from dsm.store import Put, TxnRejected
    from dsm.store.etcd import EtcdOptions, EtcdStore

    async def main() -> dict[str, int]:
        store = await EtcdStore.connect(EtcdOptions.build(etcd.endpoint))
        try:
            with pytest.raises(TxnRejected):  # etcd takes at most 128 operations in a transaction
                await store.txn([], [Put(f"/errors-test/{i}", b"x") for i in range(200)])
            return dict(store.errors)
        finally:
            await store.close()

    assert asyncio.run(main()) == {"TxnRejected": 1}
