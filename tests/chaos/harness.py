"""Chaos under load: a 3-member etcd cluster on loopback, dsm worker processes, and faults.

Faults: SIGKILL of a worker (a replacement starts), SIGSTOP of a worker past its lease then
SIGCONT, kill and restart of an etcd member and of the leader, a restart of the whole cluster,
and compaction while watches are open. Afterwards every stored history is audited against its
graph (dsm.audit): every instance terminal, each history a valid path, no transition committed
twice, each join fired once per fork activation after every branch arrived, payloads intact.

    python tests/chaos/run.py --minutes 10 --instances 1000     # the long run
    python -m pytest tests/chaos                                # the short CI version
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TESTS))

from cluster import transitions_committed  # noqa: E402
from indexes import inconsistencies  # noqa: E402

from dsm import compiler  # noqa: E402
from dsm.audit import audit  # noqa: E402
from dsm.errors import StoreError  # noqa: E402
from dsm.keys import Keys, WorkInfo  # noqa: E402
from dsm.operations import Operations  # noqa: E402
from dsm.records import FINISHED, SUCCEEDED  # noqa: E402
from dsm.store import prefix_end  # noqa: E402
from dsm.store.etcd import EtcdOptions, EtcdStore  # noqa: E402
from dsm.testing import EtcdCluster, make_cluster  # noqa: E402

MACHINES = TESTS / "machines"
FANOUT = MACHINES / "fanout.yaml"
LOOPFORK = MACHINES / "loopfork.yaml"
FAULTS = ("kill_worker", "pause_worker", "restart_member", "restart_leader", "compact", "restart_cluster")


def owner_of(kv: Any) -> str | None:
    """The worker a work marker names as holding its claim (the claim is the marker's value)."""
    try:
        claimant = WorkInfo.load(kv.value).claimant
    except (ValueError, KeyError, TypeError):
        return None
    return claimant[0] if claimant is not None else None


@dataclass
class Config:
    members: int = 3
    workers: int = 3
    fanout: int = 40  # fork/join instances
    loopfork: int = 20  # looping fork/join instances
    rounds: int = 3  # loops of each loopfork instance
    lease_ttl: int = 3
    concurrency: int = 8
    tick_seconds: float = 0.05
    fault_every: float = 3.0  # seconds between faults
    minutes: float = 0.0  # keep submitting and faulting this long (0: one pass of every fault)
    timeout: float = 150.0  # after the last fault, to finish everything
    seed: int = 1


@dataclass
class Report:
    instances: int = 0
    transitions: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    invalid_histories: dict[str, list[str]] = field(default_factory=dict)
    payload_problems: dict[str, str] = field(default_factory=dict)
    index_problems: list[str] = field(default_factory=list)  # listing, expiry and search entries vs records
    tick_executions: int = 0
    duplicate_tick_executions: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.instances > 0 and self.statuses == {SUCCEEDED: self.instances}
                and not self.invalid_histories and not self.payload_problems and not self.index_problems)

    def as_dict(self) -> dict[str, Any]:
        by_kind: dict[str, list[float]] = {}
        for f in self.faults:
            if f.get("recovery_s") is not None:
                by_kind.setdefault(f["fault"], []).append(f["recovery_s"])
        return {"ok": self.ok, "instances": self.instances, "transitions": self.transitions,
                "statuses": self.statuses, "faults": Counter(f["fault"] for f in self.faults),
                "recovery_s": {k: {"max": round(max(v), 2), "median": round(sorted(v)[len(v) // 2], 2),
                                   "n": len(v)} for k, v in by_kind.items()},
                "invalid_histories": len(self.invalid_histories), "payload_problems": len(self.payload_problems),
                "index_problems": self.index_problems[:5],
                "tick_executions": self.tick_executions,
                "duplicate_tick_executions": self.duplicate_tick_executions,
                "seconds": round(self.seconds, 1), "examples": dict(list(self.invalid_histories.items())[:3]),
                "payload_examples": dict(list(self.payload_problems.items())[:3])}


def _dsm_command() -> list[str]:
    script = Path(sys.executable).parent / "dsm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dsm"]


class Chaos:
    definitions: tuple[Path, ...] = (FANOUT, LOOPFORK)  # what the workers serve

    def __init__(self, config: Config, workdir: Path | None = None):
        self.config = config
        self.random = random.Random(config.seed)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dsm-chaos-"))
        self.log = self.workdir / "ticks.jsonl"
        self.cluster: EtcdCluster | None = None
        self.workers: list[subprocess.Popen] = []
        loaded = [compiler.load(path) for path in self.definitions]
        # by digest, with the machines they call (a child pins its own digest)
        self.graphs = {g.digest: g for graph in loaded for g in (graph, *graph.children().values())}
        self.report = Report()
        self.namespace = "chaos"
        self.keys = Keys(self.namespace)
        self.expected: dict[str, dict[str, Any]] = {}

    # -- processes ---------------------------------------------------------------------------
    def start_worker(self) -> subprocess.Popen:
        c = self.config
        proc = subprocess.Popen(
            [*_dsm_command(), "worker", *map(str, self.definitions), "--etcd", self.cluster.endpoints,
             "--namespace", self.namespace, "--concurrency", str(c.concurrency), "--lease-ttl", str(c.lease_ttl),
             "--grace", "5"],
            stdout=subprocess.DEVNULL, stderr=open(self.workdir / "workers.log", "ab"),
            env={**os.environ, "DSM_TEST_LOG": str(self.log), "DSM_TEST_TICK": str(c.tick_seconds)},
            start_new_session=True)
        self.workers.append(proc)
        return proc

    def live_workers(self) -> list[subprocess.Popen]:
        return [w for w in self.workers if w.poll() is None]

    # -- the store, through whichever member answers --------------------------------------
    async def connect(self) -> EtcdStore:
        while True:
            try:
                return await EtcdStore.connect(EtcdOptions.build(self.cluster.endpoints, namespace=self.namespace))
            except StoreError:
                await asyncio.sleep(0.2)

    async def retry(self, call: Any) -> Any:
        while True:
            try:
                return await call()
            except StoreError:
                await asyncio.sleep(0.2)

    async def committed(self, store: EtcdStore) -> int:
        return await self.retry(lambda: transitions_committed(store, self.keys))

    async def claims_of(self, store: EtcdStore, proc: subprocess.Popen) -> dict[str, int]:
        """Instances the worker holds claims on, with their transition counts now."""
        worker_id = f"{socket.gethostname()}:{proc.pid}"
        page = await self.retry(lambda: store.range(self.keys.work_prefix, prefix_end(self.keys.work_prefix)))
        held = {ref.instance for kv in page.kvs
                if (ref := self.keys.parse_work(kv.key)) is not None and owner_of(kv) == worker_id}
        client = Operations(store, self.keys)
        out = {}
        for iid in held:
            inst = await self.retry(lambda iid=iid: client.instance(iid))
            out[iid] = inst.transitions
        return out

    async def claims_appear(self, store: EtcdStore, timeout: float = 15.0) -> None:
        """Wait until workers hold claims on the new work (they are busy), or `timeout` passes."""
        work = self.keys.work_prefix
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            page = await self.retry(lambda: store.range(work, prefix_end(work)))
            if sum(1 for kv in page.kvs if owner_of(kv) is not None) >= self.config.workers:
                return
            await asyncio.sleep(0.05)

    async def moved(self, store: EtcdStore, before: dict[str, int], started: float, limit: float) -> float | None:
        """Seconds until every instance in `before` committed another transition (or finished)."""
        client = Operations(store, self.keys)
        waiting = dict(before)
        while waiting and time.monotonic() - started < limit:
            for iid, count in list(waiting.items()):
                inst = await self.retry(lambda iid=iid: client.instance(iid))
                if inst.transitions > count or inst.finished:
                    del waiting[iid]
            await asyncio.sleep(0.05)
        return None if waiting else time.monotonic() - started

    async def progress_after(self, store: EtcdStore, started: float, base: int, limit: float = 60) -> float | None:
        """Seconds from `started` until commits are seen to advance past `base`: the stall a fault
        caused (0 when work never stopped)."""
        while time.monotonic() - started < limit:
            if await self.committed(store) > base:
                return time.monotonic() - started
            if await self.all_finished(store):
                return None
            await asyncio.sleep(0.05)
        return None

    async def all_finished(self, store: EtcdStore) -> bool:
        work = self.keys.work_prefix
        return await self.retry(lambda: store.count(work, prefix_end(work))) == 0

    async def leader(self) -> Any:
        import grpc
        from aetcd import rpc

        for member in self.cluster.members:
            if member.process is None or member.process.poll() is not None:
                continue
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{member.client_port}")
            try:
                status = await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=2)
                if status.leader and status.leader == status.header.member_id:
                    return member
            except grpc.aio.AioRpcError:
                pass
            finally:
                await channel.close()
        return None

    async def members_agree(self, login: tuple[str, str] | None = None) -> dict[str, Any]:
        """Whether every etcd member holds the same data: each one's hash of its key-value store at
        one revision that all have applied. They may not: etcd 3.5.0 to 3.5.2 can lose writes a
        member had acknowledged when it is killed under load (etcd issue 13766), and the members
        then disagree, which no client can make up for. `login`: root's name and password, when
        auth is on (etcd answers HashKV to root only)."""
        import grpc
        from aetcd import rpc

        channels = {m.name: grpc.aio.insecure_channel(f"127.0.0.1:{m.client_port}") for m in self.cluster.members}
        try:
            metadata = None
            if login is not None:
                token = (await rpc.AuthStub(channels[self.cluster.members[0].name]).Authenticate(
                    rpc.AuthenticateRequest(name=login[0], password=login[1]), timeout=5)).token
                metadata = (("token", token),)
            status = {name: await rpc.MaintenanceStub(ch).Status(rpc.StatusRequest(), timeout=5, metadata=metadata)
                      for name, ch in channels.items()}
            revision = min(s.header.revision for s in status.values())
            request = rpc.HashKVRequest(revision=revision)
            hashes = {name: (await rpc.MaintenanceStub(ch).HashKV(request, timeout=30, metadata=metadata)).hash
                      for name, ch in channels.items()}
            return {"agree": len(set(hashes.values())) == 1, "revision": revision, "hashes": hashes,
                    "versions": sorted({s.version for s in status.values()})}
        except grpc.aio.AioRpcError as exc:
            return {"agree": None, "error": str(exc.details())}
        finally:
            for ch in channels.values():
                await ch.close()

    # -- faults ------------------------------------------------------------------------------
    async def fault(self, store: EtcdStore, kind: str) -> dict[str, Any]:
        started = time.monotonic()
        record: dict[str, Any] = {"fault": kind, "at": round(started, 2)}
        c = self.config
        if kind in ("kill_worker", "pause_worker"):
            # strike a worker in the middle of work: one holding claims, if any does
            holdings = [(w, await self.claims_of(store, w)) for w in self.live_workers()]
            busy = [(w, h) for w, h in holdings if h] or holdings
            victim, held = self.random.choice(busy)
            record["claims_held"] = len(held)
            started = time.monotonic()
            if kind == "kill_worker":
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                self.start_worker()
                record["recovery_s"] = await self.moved(store, held, started, c.lease_ttl * 6)
            else:
                victim.send_signal(signal.SIGSTOP)
                record["recovery_s"] = await self.moved(store, held, started, c.lease_ttl * 6)
                await asyncio.sleep(max(0.0, c.lease_ttl + 1 - (time.monotonic() - started)))
                victim.send_signal(signal.SIGCONT)  # its stale commits must be refused
        elif kind in ("restart_member", "restart_leader", "restart_cluster", "compact"):
            watcher = await self.etcd_fault(store, kind, record)
            record["recovery_s"] = await watcher
        return record

    async def watch_progress(self, store: EtcdStore, base: int | None = None) -> asyncio.Task:
        """Right after a fault struck: measure how long until commits advance again (past `base`,
        sampled now unless given: with every member down nothing can be sampled)."""
        started = time.monotonic()
        if base is None:
            base = await self.committed(store)
        return asyncio.get_running_loop().create_task(self.progress_after(store, started, base))

    async def etcd_fault(self, store: EtcdStore, kind: str, record: dict[str, Any],
                         sig: int = signal.SIGKILL) -> asyncio.Task:
        """Strike etcd; `sig` stops the members of a restart (SIGTERM: a clean shutdown)."""
        if kind in ("restart_member", "restart_leader"):
            leader = await self.leader()
            if kind == "restart_leader" and leader is not None:
                member = leader
            else:
                member = self.random.choice([m for m in self.cluster.members if m is not leader]
                                            or self.cluster.members)
            record["member"] = member.name
            record["leader"] = member is leader
            self.cluster.kill_member(member, sig)
            watcher = await self.watch_progress(store)
            await asyncio.sleep(1.0)
            self.cluster.start_member(member, new=False)
            await asyncio.get_running_loop().run_in_executor(None, self.cluster.wait_ready, 30.0, [member])
        elif kind == "restart_cluster":
            base = await self.committed(store)
            for member in self.cluster.members:
                self.cluster.kill_member(member, sig)
            watcher = await self.watch_progress(store, base)
            await asyncio.sleep(1.0)
            for member in self.cluster.members:
                self.cluster.start_member(member, new=False)
            await asyncio.get_running_loop().run_in_executor(None, self.cluster.wait_ready, 60.0)
        elif kind == "compact":
            revision = await self.retry(store.revision)
            await self.retry(lambda: store.compact(revision))
            record["revision"] = revision
            watcher = await self.watch_progress(store)
        return watcher

    # -- load --------------------------------------------------------------------------------
    async def submit(self, store: EtcdStore, fanout: int, loopfork: int) -> None:
        client = Operations(store, self.keys)
        fan, loop = compiler.load(FANOUT), compiler.load(LOOPFORK)
        fan_payloads = [{"n": self.random.randrange(1000)} for _ in range(fanout)]
        loop_payloads = [{"target": self.config.rounds} for _ in range(loopfork)]
        for graph, payloads in ((fan, fan_payloads), (loop, loop_payloads)):
            if payloads:
                ids = await self.retry(lambda g=graph, p=payloads: client.submit_many(g, p))
                for iid, payload in zip(ids, payloads):
                    self.expected[iid] = payload

    def check_payload(self, inst: Any) -> str | None:
        p = inst.payload
        given = self.expected.get(inst.id, {})
        if inst.machine == "fanout":
            if p.get("n") != given.get("n") or p.get("gathered") != ["left", "middle2", "right"]:
                return f"fanout payload {p}"
        elif inst.machine == "loopfork":
            t = given.get("target")
            if (p.get("rounds"), p.get("a"), p.get("b")) != (t, t, 2 * t):
                return f"loopfork payload {p}, expected rounds={t} a={t} b={2 * t}"
        return None

    # -- the run -----------------------------------------------------------------------------
    async def run(self) -> Report:
        c = self.config
        began = time.monotonic()
        self.cluster = make_cluster(c.members)
        self.cluster.start()
        store = None
        try:
            for _ in range(c.workers):
                self.start_worker()
            store = await self.connect()
            await self.submit(store, c.fanout, c.loopfork)
            plan = list(FAULTS)
            deadline = time.monotonic() + c.minutes * 60
            while plan or time.monotonic() < deadline:
                await asyncio.sleep(c.fault_every)
                # strike with work in flight: a fault on an idle system proves nothing
                await self.submit(store, max(1, c.fanout // 4), max(1, c.loopfork // 4))
                await self.claims_appear(store)
                kind = plan.pop(0) if plan else self.random.choice(FAULTS)
                self.report.faults.append(await self.fault(store, kind))
            await self.until_all_finished(store, c.timeout)
            await self.collect(store)
        finally:
            await self.tear_down(store)
        self.report.seconds = time.monotonic() - began
        return self.report

    async def until_all_finished(self, store: EtcdStore, timeout: float) -> None:
        finish = time.monotonic() + timeout
        while not await self.all_finished(store) and time.monotonic() < finish:
            await asyncio.sleep(0.3)

    async def tear_down(self, store: EtcdStore | None) -> None:
        """Kill every worker (a stopped one too), close the store, stop etcd."""
        for w in self.live_workers():
            w.send_signal(signal.SIGCONT)
            w.send_signal(signal.SIGKILL)
        for w in self.workers:
            w.wait()
        if store is not None:
            await store.close()
        self.cluster.stop()

    async def collect(self, store: EtcdStore) -> None:
        client = Operations(store, self.keys)
        instances = await self.retry(client.list)
        r = self.report
        r.instances = len(instances)
        r.statuses = dict(Counter(i.status for i in instances))
        for inst in instances:
            history = await self.retry(lambda inst=inst: client.history(inst.id))
            r.transitions += len(history)
            problems = audit(self.graphs[inst.digest], inst, history)
            if problems:
                r.invalid_histories[inst.id] = problems
            if inst.status in FINISHED:
                bad = self.check_payload(inst)
                if bad:
                    r.payload_problems[inst.id] = bad
        r.index_problems = await self.retry(lambda: inconsistencies(store, self.keys))
        for target in sorted({i.payload.get("target") for i in instances if i.machine == "loopfork"}):
            want = sorted(i.id for i in instances if i.machine == "loopfork" and i.payload.get("rounds") == target)
            found = sorted(i.id for i in await self.retry(lambda t=target: client.list(where={"rounds": t})))
            if found != want:
                r.index_problems.append(f"where rounds={target}: {len(found)} listed, {len(want)} have it")
        ticks = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()] \
            if self.log.exists() else []
        per_visit = Counter(t["key"] for t in ticks)
        r.tick_executions = len(ticks)
        r.duplicate_tick_executions = sum(n - 1 for n in per_visit.values() if n > 1)


def run(config: Config) -> Report:
    return asyncio.run(Chaos(config).run())
