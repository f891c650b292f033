"""NOSPACE: when etcd's database is full, workers stop writing, say so once, lose nothing, show it in
`dsm status`, and go on by themselves once an operator has made room and disarmed the alarm."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess

import pytest
from clitools import dsm, dsm_command, dsm_env
from helpers import until, until_async
from metricstools import parse, scrape, value
from prometheus_client import generate_latest

from dsm import compiler, metrics
from dsm.errors import NoSpace
from dsm.keys import Keys
from dsm.operations import Operations
from dsm.service import serving
from dsm.store.etcd import EtcdOptions, EtcdStore
from dsm.store.memory import MemoryStore
from dsm.testing import free_port, make_cluster

STEPS = """
machine: steps
start: a
states:
  a:
    tick: nosp:nap
    next: b
  b:
    tick: nosp:nap
    next: c
  c:
    tick: nosp:nap
    next: done
  done:
    terminal: true
"""
NAP = "import time\n\ndef nap(payload, ctx):\n    time.sleep({seconds})\n"


class Refusals:
    """A memory store that counts the writes it refused, and the times it was asked for its alarms."""

    def __init__(self, store: MemoryStore):
        self.store = store
        self.refused = 0
        self.probes = 0

    async def alarms(self):
        self.probes += 1
        return await self.store.alarms()

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def txn(self, compare, success=(), failure=()):
        try:
            return await self.store.txn(compare, success, failure)
        except NoSpace:
            self.refused += 1
            raise


def test_a_worker_waits_out_nospace_without_spinning_and_goes_on(write, caplog):
    graph = compiler.load(write("steps.yaml", STEPS, nosp=NAP.format(seconds=0.05)))

    async def go():
        memory = MemoryStore()
        store = Refusals(memory)
        keys = Keys()
        client = Operations(store, keys)
        ids = await client.submit_many(graph, [{}] * 8)
        async with serving(store, keys, [graph], concurrency=4, run_ahead=1) as service:  # a commit a tick
            worker = service.worker
            worker.gate.interval = 0.1
            await until_async(lambda: worker.stats.transitions >= 4, "four transitions")
            memory.raise_alarm("NOSPACE")
            await until_async(lambda: worker.gate.closed, "the gate closed")
            probed = store.probes
            # ten probes of the alarm (a second): a worker that retried its writes meanwhile would refuse hundreds
            await until_async(lambda: store.probes >= probed + 10, "ten probes of the alarm")
            refused, paused = store.refused, [await client.instance(i) for i in ids]
            during = parse(generate_latest(metrics.registry(worker)).decode())
            memory.disarm("NOSPACE")
            done = await asyncio.gather(*(client.wait(i, timeout=30) for i in ids))
            after = parse(generate_latest(metrics.registry(worker)).decode())
        return refused, paused, done, worker.gate.pauses, during, after

    with caplog.at_level(logging.WARNING, logger="dsm.worker"):
        refused, paused, done, pauses, during, after = asyncio.run(go())
    assert 1 <= refused <= 8  # each job tried once, then waited (no claim was even tried)
    assert all(inst.status == "running" for inst in paused)
    assert all(inst.status == "succeeded" and inst.transitions == 3 for inst in done)
    said = [r.getMessage() for r in caplog.records]
    assert pauses == 1 and sum("NOSPACE alarm is raised" in m for m in said) == 1, said
    assert sum("NOSPACE alarm is disarmed" in m for m in said) == 1, said
    # the metrics say so while it lasts
    assert value(during, "dsm_etcd_alarm", alarm="NOSPACE") == 1
    assert value(after, "dsm_etcd_alarm", alarm="NOSPACE") == 0
    assert value(during, "dsm_etcd_writes_refused_total") >= 1


def metric(port: int, sample: str, *labels: tuple[str, str]) -> float:
    """A sample of a worker's /metrics, summed over the labels not given (the machines)."""
    return sum(v for (name, have), v in scrape(f"http://127.0.0.1:{port}/metrics").items()
               if name == sample and set(labels) <= set(have))


@pytest.mark.etcd
@pytest.mark.slow
@pytest.mark.long  # a real etcd filled to its quota (the memory store's NOSPACE tests stay in the default run)
def test_nospace_on_a_real_etcd_with_a_tiny_quota(tmp_path, write):
    cluster = make_cluster(1, extra_args=["--quota-backend-bytes", str(8 * 1024 * 1024)]).start()
    path = write("steps.yaml", STEPS, nosp=NAP.format(seconds=0.3))
    at = ("--etcd", cluster.endpoint, "--namespace", "full")
    log_path = tmp_path / "worker.log"
    port = free_port()
    with open(log_path, "w") as log:
        worker = subprocess.Popen([*dsm_command(), "worker", str(path), "--concurrency", "8", "--lease-ttl", "3",
                                   "--isolation", "thread", "--metrics-port", str(port), *at],
                                  stderr=log, env=dsm_env(), start_new_session=True)
    try:
        ids = dsm("submit", str(path), "--jsonl", "-", *at, input="{}\n" * 16).stdout.split()
        assert len(ids) == 16

        async def fill() -> None:
            store = await EtcdStore.connect(EtcdOptions.build(cluster.endpoint, namespace="filler"))
            try:
                for n in range(1000):
                    await store.put(f"/filler/{n}", b"x" * 200_000)
            except NoSpace:
                return
            finally:
                await store.close()
            raise AssertionError("etcd never ran out of space")

        until(lambda: metric(port, "dsm_ticks_total", ("outcome", "ok")), "the worker's first ticks",
              retry_on=(OSError,))
        asyncio.run(fill())
        until(lambda: "NOSPACE" in log_path.read_text(), "the worker said NOSPACE")
        status = dsm("status", ids[0], *at)
        assert status.returncode == 0 and "alarm:" in status.stdout and "NOSPACE" in status.stdout
        as_json = dsm("status", ids[0], "--json", *at)
        assert as_json.returncode == 0 and "NOSPACE" in as_json.stderr
        workers = dsm("workers", *at)
        assert workers.returncode == 0 and "NOSPACE" in workers.stderr and workers.stdout.startswith("ID")
        refused = dsm("submit", str(path), *at)
        assert refused.returncode == 3 and "NOSPACE" in refused.stderr and "Traceback" not in refused.stderr
        # the commits of the ticks in flight come due and wait
        until(lambda: metric(port, "dsm_ticks_in_flight") == 0, "the ticks in flight ended")
        during = dsm("list", "--json", *at)  # reads pass while writes do not
        assert during.returncode == 0, during.stderr
        assert len(json.loads(during.stdout)) == 16
        assert all(s["status"] in ("running", "succeeded") for s in json.loads(during.stdout))
        # what an operator does: make room, compact, defragment, disarm
        cluster.etcdctl("del", "--prefix", "/filler/")
        revision = cluster.etcdctl("endpoint", "status", "-w", "json")
        cluster.etcdctl("compact", str(json.loads(revision)[0]["Status"]["header"]["revision"]))
        cluster.etcdctl("defrag")
        cluster.etcdctl("alarm", "disarm")
        def all_succeeded() -> list | None:
            found = json.loads(dsm("list", "--json", *at).stdout)
            return found if len(found) == 16 and all(s["status"] == "succeeded" for s in found) else None

        listed = until(all_succeeded, "all sixteen succeeded", timeout=60, interval=0.3)
        assert sorted(s["id"] for s in listed) == sorted(ids)
        assert all(s["status"] == "succeeded" and s["transitions"] == 3 for s in listed)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        cluster.stop()
    said = log_path.read_text()
    assert said.count("NOSPACE alarm is raised") == 1, said
    assert said.count("NOSPACE alarm is disarmed") == 1, said
    assert "Traceback" not in said and "internal error" not in said, said
