"""Tenants sharing one etcd: its permissions cover keys, not leases.

Any user of the cluster can list every lease and keep any of them alive, and can revoke a lease,
or attach a key of its own to it, while the lease holds no key it may not write (a fresh one).
These tests play such a tenant (user `dsm-b`, limited to `/b/`) against the workers of another
namespace and check that nothing there waits on it: a dead worker whose lease it keeps alive
loses its work to the living all the same, and a worker whose fresh leases it revokes or takes
keeps working, committing every transition once. Real etcd with auth: the memory store has no
users.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from clitools import dsm, spawn
from cluster import MACHINES, audit_all, invocations, load_graph, wait_all_finished
from helpers import until

from dsm.keys import Keys
from dsm.store import prefix_end
from dsm.store.etcd import EtcdOptions, EtcdStore
from dsm.testing import EtcdCluster, etcd_binary, etcdctl_binary, make_cluster

pytestmark = [pytest.mark.etcd, pytest.mark.slow, pytest.mark.long]  # a minute: with the long runs

FANOUT = MACHINES / "fanout.yaml"
ROOT = ("root", "root-Pw-5e1d")
HOSTILE = ("dsm-b", "secret-B-7c2f")
LEASE_TTL = 2
BOUND = 30.0  # a stuck instance never finishes; a healthy run takes a few seconds


class Tenants:
    """An etcd with auth: root, the hostile tenant's user for `/b/`, and a user per namespace."""

    def __init__(self, cluster: EtcdCluster):
        self.cluster = cluster

    @property
    def endpoint(self) -> str:
        return self.cluster.endpoint

    def namespace(self) -> tuple[str, dict[str, str]]:
        """A fresh namespace and the credentials of a user whose role covers only it."""
        ns = "a" + uuid.uuid4().hex[:8]
        user, password = f"dsm-{ns}", f"pw-{uuid.uuid4().hex[:12]}"
        root = f"{ROOT[0]}:{ROOT[1]}"
        self.cluster.etcdctl("role", "add", ns, user=root)
        self.cluster.etcdctl("role", "grant-permission", ns, "readwrite", f"/{ns}/", "--prefix=true", user=root)
        self.cluster.etcdctl("user", "add", user, "--new-user-password", password, user=root)
        self.cluster.etcdctl("user", "grant-role", user, ns, user=root)
        return ns, {"user": user, "password": password}


@pytest.fixture(scope="module")
def tenants():
    if etcd_binary() is None or etcdctl_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("etcd and etcdctl are required in CI")
        pytest.skip("no etcd binary")
    cluster = make_cluster(1)
    cluster.start()
    try:
        ctl = cluster.etcdctl
        ctl("user", "add", ROOT[0], "--new-user-password", ROOT[1])
        ctl("user", "grant-role", ROOT[0], "root")
        ctl("role", "add", "ns-b")
        ctl("role", "grant-permission", "ns-b", "readwrite", "/b/", "--prefix=true")
        ctl("user", "add", HOSTILE[0], "--new-user-password", HOSTILE[1])
        ctl("user", "grant-role", HOSTILE[0], "ns-b")
        ctl("auth", "enable")
        yield Tenants(cluster)
    finally:
        cluster.stop()


class Background:
    """Runs `body(stop)` on an event loop of its own, in a thread, for the duration of a with-block."""

    def __init__(self, body: Callable[[asyncio.Event], Awaitable[None]]):
        self.body = body
        self.started = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.started.set()
            await self.body(self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by __exit__
            self.error = exc
            self.started.set()

    def __enter__(self) -> Background:
        self._thread.start()
        self.started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self.error is not None and exc[0] is None:
            raise self.error


class HostileTenant:
    """Tenant b: lists the cluster's leases over and over and does `attack` to every one of them.

    `keep-alive` refreshes it, `revoke` revokes it, `attach` puts a key of b's own under it. etcd
    refuses the last two on a lease that holds a key b may not write, so they only succeed on a
    lease that holds no key yet; but a transaction may put b's key under any lease, after which
    only a user who may write that key can revoke it: `keep-alive-and-attach` does that, and keeps
    the lease alive. `done[lease]` is when the attack last succeeded on it."""

    def __init__(self, endpoint: str, attack: str, period: float = 0.0):
        import aetcd

        host, port = endpoint.rsplit("//", 1)[1].rsplit(":", 1)
        self.client = aetcd.Client(host, int(port), username=HOSTILE[0], password=HOSTILE[1], timeout=2)
        self.attack = attack
        self.period = period
        self.rounds = 0
        self.done: dict[int, float] = {}
        self.background = Background(self._run)

    async def _run(self, stop: asyncio.Event) -> None:
        from aetcd import rpc

        await self.client.connect()
        try:
            while not stop.is_set():
                listed = await self.client.leasestub.LeaseLeases(rpc.LeaseLeasesRequest(), timeout=2,
                                                                 metadata=self.client.metadata)
                for lease in (status.ID for status in listed.leases):
                    if await self._hit(lease):
                        self.done[lease] = time.monotonic()
                self.rounds += 1
                await asyncio.sleep(self.period or 0.002)  # pacing: the hostile tenant's load
        finally:
            await self.client.close()

    async def _hit(self, lease: int) -> bool:
        from aetcd.exceptions import ClientError

        try:
            if self.attack.startswith("keep-alive"):
                if self.attack == "keep-alive-and-attach":
                    put = self.client.transactions.put(f"/b/{lease:x}".encode(), b"mine", lease=lease)
                    await self.client.transaction(compare=[], success=[put], failure=[])
                reply = await self.client.refresh_lease(lease)
                return reply is not None and reply.TTL > 0
            if self.attack == "revoke":
                await self.client.revoke_lease(lease)
            else:
                await self.client.put(f"/b/{lease:x}".encode(), b"mine", lease=lease)
            return True
        except ClientError:  # permission denied, or the lease is gone
            return False

    def __enter__(self) -> HostileTenant:
        self.background.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.background.__exit__(*exc)


async def worker_leases(endpoint: str, namespace: str, credentials: dict[str, str]) -> dict[str, int]:
    """The namespace's workers (its live-worker entries) and the lease each entry is under."""
    store = await EtcdStore.connect(EtcdOptions.build(endpoint, namespace=namespace, **credentials))
    try:
        start = f"{Keys(namespace).root}workers/"
        found = await store.range(start, prefix_end(start))
        return {kv.key[len(start):]: kv.lease for kv in found.kvs}
    finally:
        await store.close()


async def housekeeper(endpoint: str, namespace: str, credentials: dict[str, str]) -> str | None:
    """The worker that holds the namespace's housekeeping election."""
    store = await EtcdStore.connect(EtcdOptions.build(endpoint, namespace=namespace, **credentials))
    try:
        kv = await store.get(Keys(namespace).housekeeper)
        return kv.value.decode() if kv is not None else None
    finally:
        await store.close()


def start_worker(tenants: Tenants, namespace: str, credentials: dict[str, str], log: Path, tick: float):
    """A worker logging everything (-v) to a file beside `log`: in a pipe that nobody reads before
    it stops, its log would fill the pipe within seconds of lost leases, and the worker would block
    in its next line, living on and doing nothing."""
    err = log.with_name(f"worker-{len(list(log.parent.glob('worker-*.err')))}.err")
    proc = spawn("-v", "worker", str(FANOUT), "--etcd", tenants.endpoint, "--namespace", namespace,
                 "--user", credentials["user"], "--lease-ttl", str(LEASE_TTL), "--isolation", "thread",
                 "--concurrency", "4", "--grace", "1", stderr=err, DSM_ETCD_PASSWORD=credentials["password"],
                 DSM_TEST_LOG=str(log), DSM_TEST_TICK=str(tick))
    proc.err_path = err  # type: ignore[attr-defined]
    return proc


def submit(tenants: Tenants, namespace: str, credentials: dict[str, str], count: int, tmp_path: Path) -> list[str]:
    lines = tmp_path / "instances.jsonl"
    lines.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(count)))
    result = dsm("submit", str(FANOUT), "--jsonl", str(lines), "--etcd", tenants.endpoint, "--namespace", namespace,
                 "--user", credentials["user"], DSM_ETCD_PASSWORD=credentials["password"])
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def stop(*procs) -> list[str]:
    """SIGTERM each worker still running (SIGKILL if it lingers); their stderr."""
    out = []
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        out.append(proc.err_path.read_text(encoding="utf-8", errors="replace"))
    return out


def check_runs(results: list, ids: list[str]) -> None:
    """Every instance succeeded and its history is a valid run: no transition committed twice."""
    graph = load_graph(FANOUT)
    assert sorted(inst.id for inst, _ in results) == sorted(ids)
    assert Counter(inst.status for inst, _ in results) == {"succeeded": len(ids)}
    problems = audit_all(results, {graph.digest: graph})
    assert all(not p for p in problems.values()), {k: v for k, v in problems.items() if v}
    for inst, history in results:
        assert inst.transitions == len(history) == (8 if inst.payload["n"] % 2 == 0 else 7)


@pytest.mark.parametrize("attack", ["keep-alive", "keep-alive-and-attach"])
def test_a_dead_worker_whose_lease_another_tenant_keeps_alive_loses_its_work(tenants, tmp_path, attack):
    namespace, credentials = tenants.namespace()
    log = tmp_path / "ticks.jsonl"
    first = start_worker(tenants, namespace, credentials, log, tick=30.0)  # it dies in the middle of its ticks
    second = None
    try:
        ids = submit(tenants, namespace, credentials, 3, tmp_path)
        until(lambda: len(invocations(log)) >= 3, "three ticks", timeout=20)  # it holds a claim on each instance
        ((first_id, lease),) = asyncio.run(worker_leases(tenants.endpoint, namespace, credentials)).items()
        assert asyncio.run(housekeeper(tenants.endpoint, namespace, credentials)) == first_id
        with HostileTenant(tenants.endpoint, attack, period=0.2) as hostile:
            until(lambda: lease in hostile.done, "the hostile tenant hit the lease", timeout=20)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
            killed_at = time.monotonic()
            second = start_worker(tenants, namespace, credentials, log, tick=0.05)
            results = wait_all_finished(tenants.endpoint, namespace, 3, timeout=BOUND, **credentials)
            workers = asyncio.run(worker_leases(tenants.endpoint, namespace, credentials))
            (second_id,) = workers
            # housekeeping passed to the living worker too: the dead one's election key went with its lease
            until(lambda: asyncio.run(housekeeper(tenants.endpoint, namespace, credentials)) == second_id,
                  "the second worker elected housekeeper", timeout=20)
        kept_for = hostile.done[lease] - killed_at
    finally:
        errors = stop(*(p for p in (first, second) if p is not None))
    check_runs(results, ids)
    assert kept_for > LEASE_TTL + 1  # the dead worker's lease outlived its TTL: tenant b kept it alive
    assert lease not in workers.values() and second_id != first_id  # its entry went with it
    assert "taken for dead" in errors[-1], errors[-1]
    if attack == "keep-alive-and-attach":  # etcd refused to revoke it: its keys here were deleted one by one
        assert "deleted its" in errors[-1], errors[-1]


@pytest.mark.parametrize("attack", ["revoke", "attach"])
def test_a_worker_keeps_working_while_another_tenant_revokes_or_takes_its_fresh_leases(tenants, tmp_path, attack):
    namespace, credentials = tenants.namespace()
    log = tmp_path / "ticks.jsonl"
    worker = start_worker(tenants, namespace, credentials, log, tick=0.3)
    revoked: list[int] = []

    async def lose_leases(stop: asyncio.Event) -> None:
        """Now and then the worker's lease is revoked by a user of its own namespace (as a peer does
        to a worker it takes for dead): each time, it takes a fresh lease, which tenant b goes for."""
        store = await EtcdStore.connect(EtcdOptions.build(tenants.endpoint, namespace=namespace, **credentials))
        start = f"{Keys(namespace).root}workers/"
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                for kv in (await store.range(start, prefix_end(start))).kvs:
                    await store.lease_revoke(kv.lease)
                    revoked.append(kv.lease)
        finally:
            await store.close()

    try:
        with HostileTenant(tenants.endpoint, attack) as hostile:
            until(lambda: hostile.rounds > 0, "a round of the hostile tenant", timeout=20)
            ids = submit(tenants, namespace, credentials, 8, tmp_path)
            with Background(lose_leases):
                results = wait_all_finished(tenants.endpoint, namespace, 8, timeout=BOUND, **credentials)
    finally:
        stop(worker)
    check_runs(results, ids)
    # Leases are found through the worker's entry: every lease it took carried it (else its peers
    # could not have found its lease, had it died under it), so it was lost again and again.
    assert len(revoked) >= 3, revoked
