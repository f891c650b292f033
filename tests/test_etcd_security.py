"""etcd with TLS (client certificates) and users whose roles cover only their namespace prefix."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from clitools import dsm, line_with, spawn

from dsm.testing import etcd_binary, etcdctl_binary, make_cluster

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

PASSWORDS = {"root": "root-Pw-71c2", "dsm-a": "secret-A-9f31e", "dsm-b": "secret-B-44d0a"}


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory):
    if etcd_binary() is None or etcdctl_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("etcd and etcdctl are required in CI")
        pytest.skip("no etcd binary")
    from tls import make_certificates

    certs = make_certificates(tmp_path_factory.mktemp("certs"))
    cluster = make_cluster(1, tls=certs)
    cluster.start()
    ctl = cluster.etcdctl
    ctl("user", "add", "root", "--new-user-password", PASSWORDS["root"])
    ctl("user", "grant-role", "root", "root")
    for user, ns in (("dsm-a", "a"), ("dsm-b", "b")):
        ctl("role", "add", f"ns-{ns}")
        ctl("role", "grant-permission", f"ns-{ns}", "readwrite", f"/{ns}/", "--prefix=true")
        ctl("user", "add", user, "--new-user-password", PASSWORDS[user])
        ctl("user", "grant-role", user, f"ns-{ns}")
    ctl("auth", "enable")
    yield cluster, certs
    cluster.stop()


def tls_args(certs, namespace: str, user: str) -> tuple[str, ...]:
    return ("--namespace", namespace, "--user", user, "--cacert", str(certs.ca), "--cert", str(certs.client_cert),
            "--key", str(certs.client_key))


def test_worker_and_client_over_tls_with_a_namespace_user(secure_etcd, tmp_path):
    cluster, certs = secure_etcd
    env = {"DSM_ETCD_PASSWORD": PASSWORDS["dsm-a"]}
    common = ("--etcd", cluster.endpoint, *tls_args(certs, "a", "dsm-a"))
    worker = spawn("-v", "worker", "definitions/order.yaml", "--concurrency", "4", *common, **env)
    try:
        assert "serving namespace 'a'" in line_with(worker, "serving namespace")
        cmdline = Path(f"/proc/{worker.pid}/cmdline").read_bytes().decode(errors="replace")
        result = dsm("-v", "run", "definitions/order.yaml", "--payload", '{"total": 150}', "--workers", "0",
                     "--json", *common, **env)
        listed = dsm("list", "--json", *common, **env)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, worker_err = worker.communicate(timeout=60)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "succeeded" and record["transitions"] == 7
    assert [r["id"] for r in json.loads(listed.stdout)] == [record["id"]]
    assert worker.returncode == 0
    for text in (cmdline, worker_err, result.stderr, result.stdout, listed.stderr):
        assert PASSWORDS["dsm-a"] not in text


def test_a_user_of_namespace_a_cannot_read_or_write_namespace_b(secure_etcd, tmp_path):
    cluster, certs = secure_etcd
    env = {"DSM_ETCD_PASSWORD": PASSWORDS["dsm-a"]}
    into_b = ("--etcd", cluster.endpoint, *tls_args(certs, "b", "dsm-a"))
    listed = dsm("list", *into_b, **env)
    assert listed.returncode == 2 and "permission denied" in listed.stderr
    submitted = dsm("submit", "definitions/order.yaml", *into_b, **env)
    assert submitted.returncode == 2 and "permission denied" in submitted.stderr
    worker = dsm("worker", "definitions/order.yaml", *into_b, timeout=30, **env)
    assert worker.returncode == 2 and "permission denied" in worker.stderr
    # and namespace b, seen by its own user, holds nothing that a wrote
    own_b = ("--etcd", cluster.endpoint, *tls_args(certs, "b", "dsm-b"))
    mine = dsm("list", "--json", *own_b, DSM_ETCD_PASSWORD=PASSWORDS["dsm-b"])
    assert mine.returncode == 0 and json.loads(mine.stdout) == []
    for text in (listed.stderr, submitted.stderr, worker.stderr):
        assert PASSWORDS["dsm-a"] not in text


def test_wrong_password_and_missing_client_certificate(secure_etcd):
    cluster, certs = secure_etcd
    wrong = dsm("list", "--etcd", cluster.endpoint, *tls_args(certs, "a", "dsm-a"), DSM_ETCD_PASSWORD="nope")
    assert wrong.returncode == 2 and "refused user 'dsm-a'" in wrong.stderr and "nope" not in wrong.stderr
    no_cert = dsm("list", "--etcd", cluster.endpoint, "--namespace", "a", "--user", "dsm-a", "--cacert",
                  str(certs.ca), DSM_ETCD_PASSWORD=PASSWORDS["dsm-a"])
    assert no_cert.returncode == 3 and "etcd unreachable" in no_cert.stderr
    assert "TLS handshake failed" in no_cert.stderr and "--cert" in no_cert.stderr, no_cert.stderr
    without_ca = tls_args(certs, "a", "dsm-a")[:4] + ("--cert", str(certs.client_cert), "--key", str(certs.client_key))
    no_ca = dsm("list", "--etcd", cluster.endpoint, *without_ca, DSM_ETCD_PASSWORD=PASSWORDS["dsm-a"])
    assert no_ca.returncode == 3 and "TLS handshake failed" in no_ca.stderr and "--cacert" in no_ca.stderr
    plain = dsm("list", "--etcd", cluster.endpoint.replace("https://", "http://"))
    assert plain.returncode == 3 and "may expect TLS" in plain.stderr, plain.stderr
    assert "Handshake failed" not in no_cert.stderr + no_ca.stderr  # gRPC's own log lines stay out
    no_password = dsm("list", "--etcd", cluster.endpoint, *tls_args(certs, "a", "dsm-a"))
    assert no_password.returncode == 2 and "DSM_ETCD_PASSWORD" in no_password.stderr
