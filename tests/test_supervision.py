"""A worker either works or exits: a long-lived part that ends (the watch feed, the lease keeper,
the heartbeat, the housekeeper, the dispatcher) ends the process with a non-zero exit and a
one-line reason, after it released what it held, so that a supervisor restarts it. A process
alive with a dead part does nothing and looks healthy, and nothing restarts a live process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import dsm, dsm_env, line_with, spawn

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
KILLER = Path(__file__).resolve().parent / "partkiller.py"
BOUND = 60  # the worker stops within its grace; before the fix it never did


@pytest.mark.parametrize(("task", "part"), [
    ("dsm-feed", "watch feed"),
    ("dsm-keepalive", "lease keeper"),
    ("dsm-presence", "heartbeat"),
    ("dsm-housekeeping", "housekeeper"),
    ("dsm-dispatch", "dispatcher"),
])
def test_a_worker_whose_part_ends_exits_non_zero_with_one_line(etcd_url, namespace, task, part):
    common = ("--etcd", etcd_url, "--namespace", namespace)
    proc = subprocess.run([sys.executable, str(KILLER), task, "worker", "definitions/order.yaml", "--isolation",
                           "thread", "--lease-ttl", "3", "--grace", "2", *common],
                          capture_output=True, text=True, cwd=ROOT, env=dsm_env(), timeout=BOUND)
    lines = proc.stderr.strip().splitlines()
    assert f"partkiller: cancelling {task}" in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert lines[-1].startswith("dsm: worker ") and lines[-1].endswith(f": {part} stopped: was cancelled"), lines
    # it released what it held: its entry among live workers went with its lease
    listed = dsm("workers", "--json", *common)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout


@pytest.mark.parametrize("command", [
    ("run", "definitions/approval.yaml", "--payload", '{"amount": 120}', "--workers", "2"),
    ("api", "definitions/order.yaml", "--workers", "2", "--port", "0"),
])
def test_dsm_run_and_dsm_api_do_not_live_on_with_a_dead_local_worker(etcd_url, namespace, command):
    """`dsm run --etcd` waits for an instance that waits for a signal; `dsm api` serves: each with
    a worker of its own, whose watch feed ends."""
    proc = subprocess.run([sys.executable, str(KILLER), "dsm-feed", *command, "--etcd", etcd_url, "--namespace",
                           namespace], capture_output=True, text=True, cwd=ROOT, env=dsm_env(), timeout=BOUND)
    lines = proc.stderr.strip().splitlines()
    assert "partkiller: cancelling dsm-feed" in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert lines[-1].startswith("dsm: worker ") and lines[-1].endswith(": watch feed stopped: was cancelled"), lines


@pytest.mark.etcd
@pytest.mark.long  # etcd started after the worker
def test_a_worker_started_before_etcd_waits_for_it_saying_so(namespace):
    """Compose and Kubernetes start services in any order: a worker whose etcd is not up yet waits."""
    from dsm.testing import make_cluster

    cluster = make_cluster(1)  # its ports are chosen; nothing listens on them yet
    common = ("--etcd", cluster.endpoint, "--namespace", namespace)
    worker = spawn("worker", "definitions/order.yaml", "--isolation", "thread", *common)
    try:
        assert f"waiting for etcd at {cluster.endpoint}" in line_with(worker, "waiting for etcd")
        cluster.start()
        assert "serving namespace" in line_with(worker, "serving namespace")
        result = dsm("run", "definitions/order.yaml", "--payload", '{"total": 5}', "--workers", "0", "--json",
                     *common)
        assert result.returncode == 0 and json.loads(result.stdout)["status"] == "succeeded", result.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
        cluster.stop()
    assert worker.returncode == 0


def test_a_worker_stopped_while_it_waits_for_etcd_exits_0():
    from dsm.testing import free_port

    worker = spawn("worker", "definitions/order.yaml", "--etcd", f"http://127.0.0.1:{free_port()}")
    assert "waiting for etcd" in line_with(worker, "waiting for etcd")
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
