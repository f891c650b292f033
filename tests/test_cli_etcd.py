"""The dsm command against a real etcd: list, status, submit, closed pipes and connection errors."""

from __future__ import annotations

import json

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
