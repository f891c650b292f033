"""The dsm command against a real etcd: list, status, submit, closed pipes and connection errors."""

from __future__ import annotations

import json
import re

import pytest

from clitools import dsm

pytestmark = pytest.mark.etcd

ORDER = "definitions/order.yaml"


@pytest.fixture
def at(etcd_url, namespace):
    return ("--etcd", etcd_url, "--namespace", namespace)


def submit(at, *args, **kw):
    result = dsm("submit", *args, *at, **kw)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_payload_file_dash_reads_stdin_for_submit(at):
    (iid,) = submit(at, ORDER, "--payload-file", "-", input='{"total": 42}')
    record = json.loads(dsm("status", iid, "--json", *at).stdout)
    assert record["payload"]["total"] == 42


def test_etcd_run_timeout_says_the_instance_keeps_running(at):
    result = dsm("run", ORDER, "--workers", "0", "--timeout", "300ms", *at)
    assert result.returncode == 4
    assert "still running" in result.stderr and "dsm status" in result.stderr


def test_status_of_a_machine_without_version(at, write):
    path = write("nover.yaml", """
        machine: nover
        start: a
        states:
          a:
            next: done
          done:
            terminal: true
        """)
    (iid,) = submit(at, str(path))
    result = dsm("status", iid, *at)
    assert result.returncode == 0, result.stderr
    assert "None" not in result.stdout
    assert re.search(r"^machine:\s+nover \(sha256:", result.stdout, re.M)
    versioned = dsm("status", submit(at, ORDER)[0], *at)
    assert re.search(r"^machine:\s+order \(version 1, sha256:", versioned.stdout, re.M)
