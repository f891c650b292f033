"""End to end through the CLI on a real etcd: worker processes, kills, pauses, restarts, versions."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from clitools import dsm, line_with
from cluster import MACHINES, Workers, audit_all, invocations, leased_keys, load_graph, wait_all_finished
from helpers import one_tick_machine, until
from metricstools import Samples, scrape

from dsm.testing import free_port, make_cluster

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

FANOUT = MACHINES / "fanout.yaml"


def submit_jsonl(url: str, namespace: str, path: Path, count: int, tmp_path: Path) -> list[str]:
    lines = tmp_path / "instances.jsonl"
    lines.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(count)))
    result = dsm("submit", str(path), "--jsonl", str(lines), "--etcd", url, "--namespace", namespace)
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == count and len(set(ids)) == count
    return ids


@pytest.mark.long  # chaos: a worker killed mid-run
def test_three_workers_fifty_instances_one_killed(etcd, namespace, tmp_path):
    log = tmp_path / "ticks.jsonl"
    workers = Workers(etcd.endpoint, namespace, log, tick=0.1)
    procs = [workers.start(FANOUT, concurrency=4) for _ in range(3)]
    try:
        ids = submit_jsonl(etcd.endpoint, namespace, FANOUT, 50, tmp_path)
        until(lambda: len(invocations(log)) >= 60, "60 ticks", timeout=30)
        killed = procs[0]
        killed.send_signal(signal.SIGKILL)  # mid-run: it holds claims on several instances
        results = wait_all_finished(etcd.endpoint, namespace, 50, timeout=120)
    finally:
        workers.stop_all()
    graph = load_graph(FANOUT)
    assert sorted(inst.id for inst, _ in results) == sorted(ids)
    assert Counter(inst.status for inst, _ in results) == {"succeeded": 50}
    problems = audit_all(results, {graph.digest: graph})
    assert all(not p for p in problems.values()), {k: v for k, v in problems.items() if v}
    for inst, history in results:
        joins = [h for h in history if h.state == "gather"]
        assert len(joins) == 1  # the join fired once, the state after it ran once
        assert inst.payload["gathered"] == ["left", "middle2", "right"]
        assert inst.state == "done" and inst.transitions == len(history) == (8 if inst.payload["n"] % 2 == 0 else 7)
    # every transition committed once; ticks ran at least once (more only where the killed worker was busy)
    ticks = invocations(log)
    committed = sum(len(h) for _, h in results)
    assert len(ticks) >= committed - 2 * 50  # "split" and "even" have no tick
    by_visit = Counter(t["key"] for t in ticks)
    repeated = {k: n for k, n in by_visit.items() if n > 1}
    pids = {t["pid"] for t in ticks}
    assert killed.pid in pids and len(pids) == 3  # the killed worker was busy before it died
    for key in repeated:  # a visit runs twice only when the killed worker had started it
        assert killed.pid in {t["pid"] for t in ticks if t["key"] == key}, key


@pytest.mark.long  # chaos: a worker paused past its lease
def test_a_paused_worker_cannot_commit_after_its_lease(etcd, namespace, tmp_path):
    log = tmp_path / "ticks.jsonl"
    workers = Workers(etcd.endpoint, namespace, log, tick=2.0, lease_ttl=2)
    port = free_port()
    first = workers.start(FANOUT, concurrency=8, extra=("--metrics-port", str(port)))
    try:
        ids = submit_jsonl(etcd.endpoint, namespace, FANOUT, 1, tmp_path)
        until(lambda: invocations(log), "the first tick", timeout=20)
        first.send_signal(signal.SIGSTOP)  # mid-tick, holding its claim
        until(lambda: not leased_keys(etcd.endpoint, namespace), "the paused worker's lease expired", timeout=20)
        workers.env["DSM_TEST_TICK"] = "0.05"
        workers.start(FANOUT, concurrency=8)
        wait_all_finished(etcd.endpoint, namespace, 1, timeout=60)
        first.send_signal(signal.SIGCONT)  # its tick finishes now and tries to commit
        until(lambda: gave_up(scrape(f"http://127.0.0.1:{port}/metrics")), "the resumed worker settled its tick",
              timeout=20, retry_on=(OSError,))
        results = wait_all_finished(etcd.endpoint, namespace, 1, timeout=60)  # as they are now
    finally:
        outputs = workers.stop_all()
    (inst, history), = results
    assert inst.id == ids[0] and inst.status == "succeeded"
    graph = load_graph(FANOUT)
    assert audit_all(results, {graph.digest: graph}) == {inst.id: []}
    first_pid_commits = [h for h in history if h.worker.endswith(f":{first.pid}")]
    assert first_pid_commits == []
    # the paused worker learned it lost its claim and did not commit
    first_err = outputs[0][1]
    assert "lost" in first_err


def gave_up(samples: Samples) -> bool:
    """Whether the worker ended a tick without committing it: abandoned when it found its lease
    gone, or its commit refused for a claim that was gone."""
    return any(value > 0 and ((name == "dsm_ticks_total" and ("outcome", "abandoned") in labels)
                              or name == "dsm_claims_lost_total")
               for (name, labels), value in samples.items())


@pytest.mark.long  # chaos: etcd restarted mid-run
def test_etcd_restart_mid_run_loses_nothing(tmp_path):
    cluster = make_cluster(1)
    cluster.start()
    namespace = "restart"
    log = tmp_path / "ticks.jsonl"
    workers = Workers(cluster.endpoint, namespace, log, tick=0.1)
    try:
        workers.start(FANOUT, concurrency=6)
        workers.start(FANOUT, concurrency=6)
        ids = submit_jsonl(cluster.endpoint, namespace, FANOUT, 20, tmp_path)
        until(lambda: len(invocations(log)) >= 20, "20 ticks", timeout=30)
        member = cluster.members[0]
        cluster.kill_member(member)
        time.sleep(2.0)  # paces the fault: etcd stays down for two seconds, the workers' calls fail meanwhile
        cluster.start_member(member, new=False)
        cluster.wait_ready()
        results = wait_all_finished(cluster.endpoint, namespace, 20, timeout=120)
        graph = load_graph(FANOUT)
        assert sorted(i.id for i, _ in results) == sorted(ids)
        assert Counter(i.status for i, _ in results) == {"succeeded": 20}
        problems = audit_all(results, {graph.digest: graph})
        assert all(not p for p in problems.values()), problems
    finally:
        workers.stop_all()
        cluster.stop()


def test_new_version_leaves_running_instances_on_their_digest(etcd, namespace, tmp_path):
    folder = tmp_path / "defs"
    folder.mkdir()
    shutil.copy(MACHINES / "fanout_handlers.py", folder)
    v1 = (MACHINES / "fanout.yaml").read_text()
    path = folder / "fanout.yaml"
    path.write_text(v1)
    log = tmp_path / "ticks.jsonl"
    workers = Workers(etcd.endpoint, namespace, log, tick=0.5)
    workers.start(path, concurrency=8)
    try:
        old_ids = submit_jsonl(etcd.endpoint, namespace, path, 3, tmp_path)
        # v2 while v1 instances run: version 2, and even numbers no longer go through "even"
        path.write_text(v1.replace("version: 1", "version: 2").replace('"payload.n % 2 == 0"',
                                                                     '"payload.n > 1000"'))
        new = dsm("submit", str(path), "--payload", '{"n": 0}', "--etcd", etcd.endpoint, "--namespace", namespace)
        assert new.returncode == 0, new.stderr
        new_id = new.stdout.strip()
        results = {i.id: (i, h) for i, h in wait_all_finished(etcd.endpoint, namespace, 4, timeout=60)}
    finally:
        workers.stop_all()
    old_digests = {results[i][0].digest for i in old_ids}
    assert len(old_digests) == 1 and results[new_id][0].digest not in old_digests
    assert {results[i][0].version for i in old_ids} == {1} and results[new_id][0].version == 2
    assert [h.state for h in results[old_ids[0]][1]][-1] == "even"  # n=0 on v1 goes through "even"
    assert "even" not in [h.state for h in results[new_id][1]]  # n=0 on v2 does not


def test_cli_status_list_cancel_and_run_on_etcd(etcd, namespace, tmp_path, write):
    url = etcd.endpoint
    common = ("--etcd", url, "--namespace", namespace)
    result = dsm("run", "definitions/order.yaml", "--payload", '{"total": 150}', "--json", *common)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "succeeded" and record["transitions"] == 7 and len(record["history"]) == 7
    status = dsm("status", record["id"], "--json", *common)
    assert status.returncode == 0 and json.loads(status.stdout) == record
    human = dsm("status", record["id"], *common)
    assert "status:      succeeded at done" in human.stdout
    # a slow machine, no workers: it waits, we cancel it
    slow = one_tick_machine(write, "slowmod", "pass")
    submitted = dsm("submit", str(slow), "--payload", '{"a": 1}', *common)
    slow_id = submitted.stdout.strip()
    listed = json.loads(dsm("list", "--json", *common).stdout)
    assert {r["id"] for r in listed} == {record["id"], slow_id}
    assert all("history" not in r for r in listed)
    running = json.loads(dsm("list", "--json", "--status", "running", *common).stdout)
    assert [r["id"] for r in running] == [slow_id] and running[0]["active"] == ["s"]
    by_machine = json.loads(dsm("list", "--json", "--machine", "order", *common).stdout)
    assert [r["id"] for r in by_machine] == [record["id"]]
    cancel = dsm("cancel", slow_id, *common)
    assert cancel.returncode == 0 and "cancelled" in cancel.stderr
    assert json.loads(dsm("status", slow_id, "--json", *common).stdout)["status"] == "cancelled"
    waited = dsm("run", str(slow), "--workers", "0", "--timeout", "1s", "--json", *common)
    assert waited.returncode == 4  # nobody works on it
    missing = dsm("status", "no-such-id", *common)
    assert missing.returncode == 2 and "no instance 'no-such-id'" in missing.stderr


def test_worker_allowlist_refuses_other_modules(etcd, namespace, tmp_path, write):
    url = etcd.endpoint
    common = ("--etcd", url, "--namespace", namespace)
    evil = write("evil.yaml", """
        machine: evil
        start: s
        states:
          s:
            tick: evilmod:run
            next: done
          done:
            terminal: true
        """, evilmod="import os\n\ndef run(payload, ctx):\n    payload['pid'] = os.getpid()\n")
    submitted = dsm("submit", str(evil), *common)
    assert submitted.returncode == 0
    log = tmp_path / "ticks.jsonl"
    workers = Workers(url, namespace, log)
    proc = workers.start(FANOUT, extra=("--path", str(evil.parent)))
    try:
        refused = line_with(proc, "not in the worker's allowlist")  # it met the instance, and refused it
        status = json.loads(dsm("status", submitted.stdout.strip(), "--json", *common).stdout)
    finally:
        (_, err), = workers.stop_all()
    assert status["status"] == "running" and status["transitions"] == 0
    assert "not in the worker's allowlist (fanout_handlers)" in refused + err
    assert proc.returncode == 0  # SIGTERM: a graceful stop
