"""Refused auth tokens: etcd forgets every simple token when it restarts, when auth is turned off
and on, and after `--auth-token-ttl`. Every call that meets a refused token, streams included
(watches, lease keep-alives), authenticates again and goes on; only a refusal that survives a fresh
token is AccessDenied."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
from helpers import until

from dsm.errors import AccessDenied, StoreError
from dsm.store import Put
from dsm.store.etcd import EtcdOptions, EtcdStore
from dsm.testing import EtcdCluster, etcd_binary, etcdctl_binary, make_cluster

pytestmark = [pytest.mark.etcd]

ROOT = ("root", "root-Pw-3a9e")


class Auth:
    """An etcd with auth on: root, and a user per namespace whose role covers only its prefix."""

    def __init__(self, cluster: EtcdCluster):
        self.cluster = cluster

    def ctl(self, *args: str) -> str:
        return self.cluster.etcdctl(*args, user=f"{ROOT[0]}:{ROOT[1]}")

    def user(self) -> tuple[str, str, str]:
        """A fresh namespace, and a user (name, password) limited to it."""
        ns = "a" + uuid.uuid4().hex[:8]
        user, password = f"dsm-{ns}", f"pw-{uuid.uuid4().hex[:12]}"
        self.ctl("role", "add", ns)
        self.ctl("role", "grant-permission", ns, "readwrite", f"/{ns}/", "--prefix=true")
        self.ctl("user", "add", user, "--new-user-password", password)
        self.ctl("user", "grant-role", user, ns)
        return ns, user, password

    def forget_tokens(self) -> None:
        """etcd drops every simple token it gave when auth is turned off (as when it restarts)."""
        self.ctl("auth", "disable")
        self.cluster.etcdctl("auth", "enable")

    async def store(self, ns: str, user: str, password: str) -> EtcdStore:
        return await EtcdStore.connect(EtcdOptions.build(self.cluster.endpoint, namespace=ns, user=user,
                                                         password=password))


@pytest.fixture(scope="module")
def auth():
    if etcd_binary() is None or etcdctl_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("etcd and etcdctl are required in CI")
        pytest.skip("no etcd binary")
    cluster = make_cluster(1)
    cluster.start()
    try:
        cluster.etcdctl("user", "add", ROOT[0], "--new-user-password", ROOT[1])
        cluster.etcdctl("user", "grant-role", ROOT[0], "root")
        cluster.etcdctl("auth", "enable")
        yield Auth(cluster)
    finally:
        cluster.stop()


def test_a_watch_opened_with_a_refused_token_authenticates_again(auth):
    ns, user, password = auth.user()

    async def go() -> list[str]:
        store = await auth.store(ns, user, password)
        try:
            await store.revision()  # the token works
            auth.forget_tokens()
            watch = await store.watch(f"/{ns}/", f"/{ns}0")
            await store.put(f"/{ns}/k", b"v")
            async for batch in watch:
                await watch.cancel()
                return [e.kv.key for e in batch.events]
            return []
        finally:
            await store.close()

    assert asyncio.run(go()) == [f"/{ns}/k"]


def test_a_lease_keep_alive_with_a_refused_token_authenticates_again(auth):
    ns, user, password = auth.user()

    async def go() -> float:
        store = await auth.store(ns, user, password)
        try:
            lease = await store.lease_grant(10)
            await store.put(f"/{ns}/held", b"", lease=lease)
            auth.forget_tokens()
            return await store.lease_keepalive(lease)
        finally:
            await store.close()

    assert asyncio.run(go()) > 0


def test_many_calls_meeting_one_refused_token_authenticate_once(auth):
    """Authenticating costs etcd a password hash: a worker's hundred calls in flight when its token
    is refused must not each ask for a new one."""
    ns, user, password = auth.user()

    async def go() -> int:
        store = await auth.store(ns, user, password)
        try:
            await store.revision()
            auth.forget_tokens()
            before = store.authentications
            await asyncio.gather(*(store.put(f"/{ns}/k{i}", b"v") for i in range(50)),
                                 *(store.watch(f"/{ns}/w{i}") for i in range(5)))
            return store.authentications - before
        finally:
            await store.close()

    assert asyncio.run(go()) == 1


def test_a_refusal_that_survives_a_fresh_token_is_access_denied(auth):
    ns, user, password = auth.user()
    other, _, _ = auth.user()

    async def go() -> None:
        store = await auth.store(ns, user, password)
        try:
            with pytest.raises(AccessDenied, match="permission denied"):
                await store.watch(f"/{other}/", f"/{other}0")
            with pytest.raises(AccessDenied, match="permission denied"):
                await store.txn([], [Put(f"/{other}/k", b"v")])
        finally:
            await store.close()

    asyncio.run(go())


NAPPER = """
machine: napper
start: first
states:
  first:
    tick: napmod:tick
    next: nap
  nap:
    wait: 1s
    next: second
  second:
    tick: napmod:tick
    next: done
  done:
    terminal: true
"""


@pytest.mark.long  # real seconds: run by the long step
@pytest.mark.slow
def test_workers_go_on_after_etcd_restarts_and_forgets_their_tokens(auth, write, tmp_path):
    """As a review found: with auth on, etcd killed -9 and started again (twice, with instances
    waiting on timers), the workers must go on, or exit for a supervisor to restart them; none may
    live on doing nothing while instances submitted afterwards wait for ever."""
    from cluster import Workers, audit_all, load_graph, wait_all_finished

    from dsm.keys import Keys
    from dsm.operations import Operations

    ns, user, password = auth.user()
    path = write("napper.yaml", NAPPER, napmod="def tick(payload, ctx):\n    payload['n'] = payload.get('n', 0) + 1\n")
    graph = load_graph(path)
    workers = Workers(auth.cluster.endpoint, ns, tmp_path / "log.jsonl", lease_ttl=4)
    workers.env["DSM_ETCD_PASSWORD"] = password
    for _ in range(2):
        workers.start(path, extra=("--user", user, "--dead-after", "8", "--isolation", "thread"))

    async def submit(count: int) -> None:
        store = await auth.store(ns, user, password)
        try:
            client = Operations(store, Keys(ns))
            for _ in range(count):
                await client.start(graph, {})
        finally:
            await store.close()

    async def timers_waiting() -> bool:
        store = await auth.store(ns, user, password)
        try:
            listed = await Operations(store, Keys(ns)).list()
        finally:
            await store.close()
        return any(token.waits == "timer" for inst in listed for token in inst.tokens.values())

    try:
        member = auth.cluster.members[0]
        for _ in range(2):  # each fault with work in flight: instances waiting on their timers
            asyncio.run(submit(10))
            until(lambda: asyncio.run(timers_waiting()), "an instance waiting on its timer", timeout=60,
                  interval=0.1, retry_on=(StoreError,))
            auth.cluster.kill_member(member)
            time.sleep(2)  # pacing: etcd stays down for two seconds, the workers' calls fail meanwhile
            auth.cluster.start_member(member, new=False)
            auth.cluster.wait_ready()
        asyncio.run(submit(20))
        results = wait_all_finished(auth.cluster.endpoint, ns, 40, timeout=90, user=user, password=password)
        alive = [p for p in workers.procs if p.poll() is None]
    finally:
        ended = workers.stop_all()
    assert {inst.status for inst, _ in results} == {"succeeded"}
    assert all(inst.payload["n"] == 2 for inst, _ in results)
    assert audit_all(results, {graph.digest: graph}) == {inst.id: [] for inst, _ in results}
    assert alive, [err[-2000:] for _, err in ended]  # at least one worker lived and did the work
