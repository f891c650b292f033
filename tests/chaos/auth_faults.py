"""Chaos on an etcd with auth: faults that leave clients holding tokens etcd no longer accepts.

A 3-member etcd cluster with auth enabled: root, and users `dsm-a` and `dsm-b` whose roles cover
only `/a/` and `/b/`. Worker processes of namespace `a` (as `dsm-a`) and one of namespace `b` (as
`dsm-b`), all `--lease-ttl 4 --dead-after 8 --isolation thread`, serve `relay` (a tick, a
one-second timer, a tick, a wait for the signal `go`, a tick); each instance gets its signal
0 to 3 s after it is submitted, so timers and signals are in flight when a fault strikes. A
`dsm api` process of namespace `a` serves event streams (`GET /api/events`, and `?instance=ID`
for a few instances) read here, reconnecting with `Last-Event-ID` as EventSource does, and
`dsm status ID --follow` processes follow a few instances.

Faults, each under load (a batch is submitted before each):

- `kill_cluster`: kill -9 of every etcd member (with `majority`, of all but one), restarted on
  the same data `down` seconds later: every token etcd issued is gone;
- `kill_leader`: kill -9 of the leader, restarted a second later;
- `auth_reset`: as root, `auth disable` then `auth enable` (etcd drops every token it issued,
  without a restart), and right after a kill -9 and restart of the member every client is
  connected to (the first endpoint: gRPC's pick_first), so that every watch stream must be opened
  again, with a token etcd refuses;
- `compact_loop`: as root, a compaction at the current revision every second for
  `compaction_seconds`, with the first member restarted in the middle, so that the streams
  that reconnect find their revision compacted.

With `token_ttl` the cluster runs with `--auth-token-ttl` (seconds): tokens also expire while
the run goes on (a token unused on a member for that long is dropped there).

A supervisor restarts any worker or `dsm api` process that exits, as `restart: unless-stopped`
would, and counts the restarts; the contract (SPEC 4, Supervision) is that a process either
works or exits. It also watches every worker process's heartbeat (its entry among live
workers, `dsm.worker.presence`): a process alive whose heartbeat has not been written for
`idle_after` seconds while etcd was up is a worker alive doing nothing.

Checked after the run: every instance of both namespaces succeeded (those submitted after the
last fault too), every history passes the audit (no transition committed twice), each signal
was consumed exactly once and none is left, every payload went through the three ticks once; no
worker was alive doing nothing; each `status --follow` exited 0 when its instance finished,
having printed its whole history; each instance stream delivered the instance's end and its
whole history, and the namespace's stream delivered the end of every instance submitted after
the last fault.

    python tests/chaos/run.py --auth --minutes 5        # the long run
    python -m pytest tests/chaos -m long -k auth        # the short version, in the suite (marked long)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cluster import transitions_committed
from harness import MACHINES, Chaos, Config, _dsm_command

from dsm import compiler
from dsm.audit import audit
from dsm.errors import StoreError
from dsm.keys import Keys
from dsm.membership import live
from dsm.operations import Operations
from dsm.records import SUCCEEDED, new_id
from dsm.store import prefix_end
from dsm.store.etcd import EtcdOptions, EtcdStore
from dsm.testing import free_port, make_cluster

RELAY = MACHINES / "relay.yaml"
ROOT_USER = ("root", "root-Pw-3b8e1")
USERS = {"a": ("dsm-a", "secret-A-61c7d"), "b": ("dsm-b", "secret-B-f09a2")}
FAULTS = ("kill_cluster", "kill_leader", "auth_reset", "compact_loop")
STEPS = ["begin", "middle", "finish"]


@dataclass
class AuthConfig(Config):
    workers: int = 3  # of namespace a
    workers_b: int = 1  # of namespace b
    lease_ttl: int = 4
    dead_after: int = 8
    concurrency: int = 8
    tick_seconds: float = 0.05
    initial: int = 60  # instances of namespace a submitted at the start
    top_up: int = 20  # before each fault
    late: int = 40  # after the last fault
    per_b: int = 5  # instances of namespace b with each batch
    signal_delay: tuple[float, float] = (0.0, 3.0)  # each instance's signal, after its submission
    token_ttl: int | None = 3  # etcd's --auth-token-ttl (None: etcd's default, 300 s)
    bcrypt_cost: int | None = None  # etcd's --bcrypt-cost (None: etcd's, 10): what a token costs etcd to issue
    down: float = 2.5  # seconds the members stay dead in kill_cluster
    majority: bool = False  # kill_cluster kills all members but one (etcd issue 13766: see docs/chaos.md)
    compaction_seconds: float = 8.0
    follows: int = 3  # `dsm status --follow` processes, and instance streams, per round (two per cycle)
    stream_hold: tuple[float, float] = (2.0, 5.0)  # an event stream is dropped and resumed after this long
    idle_after: float = 15.0  # a worker process whose heartbeat is this stale while etcd is up does nothing
    recover_limit: float = 20.0  # seconds to wait, after a fault, for commits and heartbeats to resume
    restart_after: float = 1.0  # the supervisor restarts an exited process this long after
    fault_every: float = 2.0
    stop_when_stuck: bool = True  # no more faults once workers did not come back after one
    minutes: float = 0.0  # repeat the faults this long (0: each once)
    timeout: float = 45.0  # after the last fault, for everything to finish


@dataclass
class AuthReport:
    instances: dict[str, int] = field(default_factory=dict)  # namespace -> count
    submitted: dict[str, int] = field(default_factory=dict)  # namespace -> count
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    transitions: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    invalid_histories: dict[str, list[str]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    exits: list[dict[str, Any]] = field(default_factory=list)  # processes that exited, with their reason
    restarts: Counter[str] = field(default_factory=Counter)  # by role
    idle: dict[int, dict[str, Any]] = field(default_factory=dict)  # pid -> a worker alive doing nothing
    late: dict[str, int] = field(default_factory=dict)  # submitted after the faults, and finished
    signals: dict[str, int] = field(default_factory=dict)
    follows: list[dict[str, Any]] = field(default_factory=list)
    streams: dict[str, Any] = field(default_factory=dict)
    etcd: dict[str, Any] = field(default_factory=dict)
    tick_executions: int = 0
    duplicate_tick_executions: int = 0
    seconds: float = 0.0
    logs: str = ""  # the folder of every process's log, etcd's included

    def problem(self, kind: str, message: str) -> None:
        self.problems.setdefault(kind, []).append(message)

    @property
    def ok(self) -> bool:
        return (sum(self.instances.values()) > 0 and not self.problems and not self.invalid_histories
                and not self.idle)

    def as_dict(self) -> dict[str, Any]:
        recovery: dict[str, dict[str, list[float]]] = {}
        for f in self.faults:
            for what in ("commits_s", "workers_s", "token_s"):
                if f.get(what) is not None:
                    recovery.setdefault(f["fault"], {}).setdefault(what, []).append(f[what])
        return {"ok": self.ok, "instances": self.instances, "submitted": self.submitted, "statuses": self.statuses,
                "transitions": self.transitions, "faults": Counter(f["fault"] for f in self.faults),
                "recovery_s": {k: {w: {"median": round(sorted(v)[len(v) // 2], 2), "max": round(max(v), 2),
                                       "n": len(v)} for w, v in kinds.items()} for k, kinds in recovery.items()},
                "late": self.late, "signals": self.signals, "restarts": dict(self.restarts),
                "exits": self.exits, "idle_workers": list(self.idle.values()),
                "invalid_histories": len(self.invalid_histories),
                "invalid_examples": dict(list(self.invalid_histories.items())[:3]),
                "problems": {k: v[:5] + ([f"... {len(v) - 5} more"] if len(v) > 5 else [])
                             for k, v in self.problems.items()},
                "follows": self.follows, "streams": self.streams, "etcd": self.etcd, "logs": self.logs,
                "tick_executions": self.tick_executions,
                "duplicate_tick_executions": self.duplicate_tick_executions, "fault_log": self.faults,
                "seconds": round(self.seconds, 1)}


@dataclass
class Proc:
    """A process the run started: a worker (`worker-a`, `worker-b`), `api`, or a `follow`."""

    role: str
    popen: subprocess.Popen
    log: Path
    started: float  # monotonic
    instance: str | None = None  # what a follow follows
    ended: float | None = None  # monotonic, when it was seen to exit
    ended_wall: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 4) -> list[str]:
        try:
            return [line[:300] for line in self.log.read_text(errors="replace").splitlines()[-lines:]]
        except OSError:
            return []


@dataclass
class EventStream:
    """One server-sent event stream of `dsm api`, read as EventSource reads it: reconnecting with
    `Last-Event-ID` whenever it ends."""

    name: str
    path: str
    instance: str | None = None
    last_id: str | None = None
    connects: int = 0
    failures: list[str] = field(default_factory=list)  # connections refused or answered with an error
    events: Counter[str] = field(default_factory=Counter)
    seqs: set[int] = field(default_factory=set)  # ?instance=: history entries seen
    finished: dict[str, str] = field(default_factory=dict)  # instance -> the terminal status seen
    last_event: float = 0.0  # monotonic
    dropped: int = 0  # connections this side closed, to reconnect with Last-Event-ID
    done: bool = False


class AuthChaos(Chaos):
    definitions = (RELAY,)

    def __init__(self, config: AuthConfig):
        super().__init__(config)
        self.config: AuthConfig = config
        self.random = random.Random(config.seed)
        self.namespace = "a"
        self.keys = Keys("a")
        self.graph = compiler.load(RELAY)
        self.graphs = {self.graph.digest: self.graph}
        self.areport = AuthReport()
        self.procs: list[Proc] = []
        self.stores: dict[str, EtcdStore] = {}  # "root", "a", "b"
        self.submitted: dict[str, list[str]] = {"a": [], "b": []}
        self.late_ids: list[str] = []
        self.sends: list[asyncio.Task] = []
        self.sending = asyncio.Semaphore(20)
        self.signalled: Counter[str] = Counter()
        self.streams: list[EventStream] = []
        self.stream_tasks: list[asyncio.Task] = []
        self.api_port = free_port()
        self.etcd_up_since: float = float("inf")  # monotonic; inf while a fault has members down
        self.fresh: dict[int, float] = {}  # worker pid -> when its heartbeat was last seen current
        self.stopping = False
        self.began = time.monotonic()
        self.areport.logs = str(self.workdir)

    # -- etcd with auth ------------------------------------------------------------------------
    def set_up_auth(self) -> None:
        ctl = self.cluster.etcdctl
        ctl("user", "add", ROOT_USER[0], "--new-user-password", ROOT_USER[1])
        ctl("user", "grant-role", ROOT_USER[0], "root")
        for ns, (user, password) in USERS.items():
            ctl("role", "add", f"ns-{ns}")
            ctl("role", "grant-permission", f"ns-{ns}", "readwrite", f"/{ns}/", "--prefix=true")
            ctl("user", "add", user, "--new-user-password", password)
            ctl("user", "grant-role", user, f"ns-{ns}")
        ctl("auth", "enable")

    async def as_root(self, *args: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.cluster.etcdctl(*args, user=f"{ROOT_USER[0]}:{ROOT_USER[1]}"))

    async def open_store(self, ns: str, user: str, password: str) -> EtcdStore:
        """The run's own client of etcd, as `user`. Its requests wait up to 10 s, not dsm's 2 s: the
        harness observes, and must not join a storm of authentications it is there to measure."""
        deadline = time.monotonic() + 60
        while True:
            try:
                options = dataclasses.replace(EtcdOptions.build(self.cluster.endpoints, namespace=ns, user=user,
                                                                password=password), timeout=10.0)
                return await EtcdStore.connect(options)
            except StoreError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def retry(self, call: Any, limit: float = 90.0) -> Any:
        """A call through a store, again until it goes through (`limit` seconds at most: a client
        that never gets through again is a finding, not a hang)."""
        deadline = time.monotonic() + limit
        while True:
            try:
                return await call()
            except StoreError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def members_agree(self, login: tuple[str, str] | None = ROOT_USER) -> dict[str, Any]:
        """As the harness's, with a root token: etcd answers HashKV to root only when auth is on."""
        return await super().members_agree(login)

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, role: str, args: list[str], user: tuple[str, str], *, instance: str | None = None,
               stdout: Any = subprocess.DEVNULL) -> Proc:
        log = self.workdir / f"{role}-{len([p for p in self.procs if p.role == role])}.log"
        with open(log, "ab") as err:
            popen = subprocess.Popen(
                [*_dsm_command(), *args, "--etcd", self.cluster.endpoints, "--user", user[0]],
                stdout=stdout, stderr=err, start_new_session=True,
                env={**os.environ, "DSM_ETCD_PASSWORD": user[1], "DSM_TEST_LOG": str(self.log),
                     "DSM_TEST_TICK": str(self.config.tick_seconds)})
        proc = Proc(role, popen, log, time.monotonic(), instance)
        self.procs.append(proc)
        return proc

    def start_worker(self, ns: str = "a") -> Proc:  # type: ignore[override]  # a namespace, and a Proc
        c = self.config
        return self._spawn(f"worker-{ns}", [
            "worker", str(RELAY), "--namespace", ns, "--concurrency", str(c.concurrency), "--lease-ttl",
            str(c.lease_ttl), "--dead-after", str(c.dead_after), "--isolation", "thread", "--grace", "5"], USERS[ns])

    def start_api(self) -> Proc:
        return self._spawn("api", ["api", "--namespace", "a", "--port", str(self.api_port)], USERS["a"])

    def start_follow(self, iid: str) -> Proc:
        with open(self.workdir / f"follow-{iid}.jsonl", "wb") as out:
            return self._spawn("follow", ["status", iid, "--follow", "--json", "--namespace", "a"], USERS["a"],
                               instance=iid, stdout=out)

    def workers_of(self, ns: str | None = None) -> list[Proc]:
        return [p for p in self.procs if p.role.startswith("worker-") and (ns is None or p.role == f"worker-{ns}")]

    def live_workers(self) -> list[subprocess.Popen]:  # the harness's name: the processes alive now
        return [p.popen for p in self.workers_of() if p.popen.poll() is None]

    async def supervise(self) -> None:
        """Restart whatever worker or api process exits (as compose's `restart: unless-stopped`), and
        watch every live worker's heartbeat: one alive whose heartbeat is stale for `idle_after`
        seconds while etcd is up is doing nothing."""
        c = self.config
        while not self.stopping:
            now = time.monotonic()
            for p in list(self.procs):
                if p.ended is None and p.popen.poll() is not None:
                    p.ended, p.ended_wall = now, time.time()
                    if p.role == "follow":
                        continue
                    self.areport.exits.append({"role": p.role, "pid": p.pid, "code": p.popen.returncode,
                                               "at_s": round(now - self.began, 1), "log": p.tail(3)})
                    self.areport.restarts[p.role] += 1
                    asyncio.get_running_loop().call_later(c.restart_after, self._restart, p.role)
            await self.sample_heartbeats()
            await asyncio.sleep(0.5)

    def _restart(self, role: str) -> None:
        if self.stopping:
            return
        if role == "api":
            self.start_api()
        else:
            self.start_worker(role.removeprefix("worker-"))

    async def sample_heartbeats(self) -> None:
        root = self.stores.get("root")
        if root is None:
            return
        entries: dict[int, float] = {}
        for ns in ("a", "b"):
            try:
                found = await asyncio.wait_for(live(root, Keys(ns)), 3)
            except (StoreError, asyncio.TimeoutError):
                return  # etcd does not answer: nothing to judge by
            entries.update({w.pid: w.updated_at for w in found})
        now, wall = time.monotonic(), time.time()
        for p in self.workers_of():
            if p.ended is not None or p.popen.poll() is not None:
                continue
            if p.pid in entries and wall - entries[p.pid] <= self.config.dead_after:
                self.fresh[p.pid] = now
            stale = now - max(self.fresh.get(p.pid, p.started), self.etcd_up_since, p.started)
            if stale > self.config.idle_after:
                seen = self.areport.idle.get(p.pid)
                self.areport.idle[p.pid] = {
                    "role": p.role, "pid": p.pid, "stale_s": round(stale, 1),
                    "since_s": seen["since_s"] if seen else round(now - stale - self.began, 1),
                    "entry": "none" if p.pid not in entries else f"written {wall - entries[p.pid]:.1f}s ago",
                    "log": p.tail(4)}

    async def heartbeats_after(self, wall: float, started: float) -> tuple[float | None, list[dict[str, Any]]]:
        """Seconds from `started` until every worker process alive wrote its heartbeat after `wall`
        (one that exited meanwhile counts when its replacement has): the workers are back. Else
        None, with the processes alive that did not write it."""
        root = self.stores["root"]
        wanted = {"worker-a": self.config.workers, "worker-b": self.config.workers_b}
        behind: list[dict[str, Any]] = []
        while time.monotonic() - started < self.config.recover_limit:
            found: dict[int, float] = {}
            try:
                for ns in ("a", "b"):
                    found.update({w.pid: w.updated_at for w in await asyncio.wait_for(live(root, Keys(ns)), 3)})
            except (StoreError, asyncio.TimeoutError):
                await asyncio.sleep(0.2)
                continue
            alive = [p for p in self.workers_of() if p.popen.poll() is None]
            behind = [{"role": p.role, "pid": p.pid, "entry": "none" if p.pid not in found else
                       f"written {time.time() - found[p.pid]:.1f}s ago"} for p in alive if found.get(p.pid, 0) <= wall]
            per_role = Counter(p.role for p in alive)
            if not behind and all(per_role[r] >= n for r, n in wanted.items()):
                return round(time.monotonic() - started, 2), []
            await asyncio.sleep(0.2)
        return None, behind

    # -- load ----------------------------------------------------------------------------------
    async def submit_batch(self, n: int, *, late: bool = False,
                           signal_delay: tuple[float, float] | None = None) -> list[str]:
        c = self.config
        out = []
        for ns, count in (("a", n), ("b", c.per_b)):
            if not count:
                continue
            client = Operations(self.stores[ns], Keys(ns))
            given: list[str | None] = [new_id() for _ in range(count)]  # a retried submission creates nothing twice
            ids = await self.retry(lambda client=client, given=given: client.submit_many(
                self.graph, [{} for _ in given], ids=given))
            self.submitted[ns].extend(ids)
            if ns == "a":
                out = ids
                if late:
                    self.late_ids.extend(ids)
            for iid in ids:
                delay = self.random.uniform(*(signal_delay or c.signal_delay))
                self.sends.append(asyncio.get_running_loop().create_task(self.send_later(ns, iid, delay)))
        return out

    async def send_later(self, ns: str, iid: str, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self.sending:
            await self.send(ns, iid)

    async def send(self, ns: str, iid: str) -> None:
        """The signal `go`, exactly once: after an error that leaves it in doubt, look whether it
        was stored before sending again."""
        client = Operations(self.stores[ns], Keys(ns))
        while True:
            try:
                await client.signal(iid, "go", {"go": 1})
                break
            except StoreError:
                await asyncio.sleep(0.2)
                inst = await self.retry(lambda: client.instance(iid))
                history = await self.retry(lambda: client.history(iid))
                if len(inst.signals) + sum(1 for h in history if h.signal is not None):
                    break
        self.signalled[iid] += 1

    async def committed(self, store: Any = None) -> int:
        root = self.stores["root"]
        total = 0
        for ns in ("a", "b"):
            total += await self.retry(lambda ns=ns: transitions_committed(root, Keys(ns)))
        return total

    async def all_finished(self, store: Any = None) -> bool:
        root = self.stores["root"]
        for ns in ("a", "b"):
            work = Keys(ns).work_prefix
            if await self.retry(lambda work=work: root.count(work, prefix_end(work))):
                return False
        return True

    async def commits_after(self, started: float, base: int) -> float | None:
        while time.monotonic() - started < self.config.recover_limit:
            if await self.committed() > base:
                return round(time.monotonic() - started, 2)
            if await self.all_finished():
                return None
            await asyncio.sleep(0.1)
        return None

    # -- streams and follows -------------------------------------------------------------------
    async def read_stream(self, s: EventStream) -> None:
        """Read the stream, reconnecting with Last-Event-ID when it ends, and also, on purpose,
        after `stream_hold` seconds at most (as a proxy that drops connections would make
        EventSource do): the api must then open a watch from that revision, on whatever token it has."""
        url = f"http://127.0.0.1:{self.api_port}{s.path}"
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=40.0)) as http:
            while not s.done and not self.stopping:
                try:
                    hold = self.random.uniform(*self.config.stream_hold)
                    await asyncio.wait_for(self.connect_stream(http, url, s), hold)
                except asyncio.TimeoutError:
                    s.dropped += 1
                    continue
                if not s.done:
                    await asyncio.sleep(0.5)  # EventSource waits `retry`; the stream said 2 s

    async def connect_stream(self, http: httpx.AsyncClient, url: str, s: EventStream) -> None:
        headers = {"Last-Event-ID": s.last_id} if s.last_id else {}
        try:
            async with http.stream("GET", url, headers=headers) as resp:
                if resp.status_code != 200:
                    s.failures.append(f"{resp.status_code} at {time.monotonic() - self.began:.1f}s")
                else:
                    s.connects += 1
                    await self.read_events(s, resp)
        except httpx.HTTPError as exc:
            if "ConnectError" not in type(exc).__name__:  # the api process restarting: said by the supervisor
                s.failures.append(f"{type(exc).__name__} at {time.monotonic() - self.began:.1f}s")

    async def read_events(self, s: EventStream, resp: httpx.Response) -> None:
        event, data, ident = "message", [], None
        async for line in resp.aiter_lines():
            if line == "":
                if data:
                    self.on_event(s, event, json.loads("\n".join(data)))
                    if ident is not None:
                        s.last_id = ident
                if s.done:
                    return
                event, data, ident = "message", [], None
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    ident = value

    def on_event(self, s: EventStream, event: str, data: dict[str, Any]) -> None:
        s.events[event] += 1
        s.last_event = time.monotonic()
        if event == "history":
            s.seqs.add(data["seq"])
        elif event == "instance" and data.get("status") in ("succeeded", "failed", "cancelled"):
            s.finished[data["id"]] = data["status"]
            if s.instance is not None and data.get("transitions") is not None and \
                    set(range(1, data["transitions"] + 1)) <= s.seqs:
                s.done = True

    def open_stream(self, name: str, instance: str | None = None) -> EventStream:
        s = EventStream(name, f"/api/events?instance={instance}" if instance else "/api/events", instance)
        self.streams.append(s)
        self.stream_tasks.append(asyncio.get_running_loop().create_task(self.read_stream(s)))
        return s

    async def watch_instances(self, ids: list[str], timeout: float = 15.0) -> None:
        """Follow some of `ids` with `dsm status --follow`, and with their event streams; return
        once each follow has printed an entry (it is watching: a follow that cannot reach etcd
        when it starts exits 3, by design, and a fault must strike follows that were working)."""
        follows = []
        for iid in self.random.sample(ids, min(self.config.follows, len(ids))):
            follows.append(self.start_follow(iid))
            self.open_stream(f"instance {iid}", iid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.popen.poll() is not None or (self.workdir / f"follow-{p.instance}.jsonl").stat().st_size
                   for p in follows):
                return
            await asyncio.sleep(0.1)

    async def api_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                try:
                    if (await http.get(f"http://127.0.0.1:{self.api_port}/api/openapi.json")).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        return False

    # -- faults --------------------------------------------------------------------------------
    async def restart(self, members: list[Any], down: float) -> None:
        await asyncio.sleep(down)
        for m in members:
            self.cluster.start_member(m, new=False)
        await asyncio.get_running_loop().run_in_executor(None, self.cluster.wait_ready, 60.0, members)

    async def token_after(self, started: float) -> float | None:
        """Seconds from `started` until etcd issues a token again (to root, on a channel of its own,
        with a deadline of 10 s rather than dsm's 2 s): how long etcd itself took to serve auth."""
        import grpc
        from aetcd import rpc

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.cluster.members[0].client_port}")
        try:
            while time.monotonic() - started < self.config.recover_limit * 3:
                try:
                    await rpc.AuthStub(channel).Authenticate(
                        rpc.AuthenticateRequest(name=ROOT_USER[0], password=ROOT_USER[1]), timeout=10)
                    return round(time.monotonic() - started, 2)
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.2)
            return None
        finally:
            await channel.close()

    async def etcd_status(self) -> dict[str, Any]:
        """Each member's view (leader, raft term and index, errors), without auth: for a slow recovery."""
        import grpc
        from aetcd import rpc

        out: dict[str, Any] = {}
        for m in self.cluster.members:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{m.client_port}")
            try:
                st = await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=5)
                out[m.name] = {"leader": st.leader == st.header.member_id, "term": st.raftTerm,
                               "index": st.raftIndex, "applied": st.raftAppliedIndex, "errors": list(st.errors)}
            except grpc.aio.AioRpcError as exc:
                out[m.name] = {"error": exc.code().name}
            finally:
                await channel.close()
        return out

    async def strike(self, kind: str) -> dict[str, Any]:
        c = self.config
        record: dict[str, Any] = {"fault": kind, "at_s": round(time.monotonic() - self.began, 1)}
        base = await self.committed()
        started = time.monotonic()
        restart: asyncio.Task | None = None  # compact_loop: commits after the member restart in its middle
        if kind == "kill_cluster":
            members = self.cluster.members[:-1] if c.majority else list(self.cluster.members)
            self.etcd_up_since = float("inf")
            for m in members:
                self.cluster.kill_member(m)
            record["members"] = [m.name for m in members]
            record["down_s"] = c.down
            await self.restart(members, c.down)
        elif kind == "kill_leader":
            leader = await self.leader() or self.cluster.members[0]
            record["member"] = leader.name
            self.cluster.kill_member(leader)
            await self.restart([leader], 1.0)
        elif kind == "auth_reset":
            first = self.cluster.members[0]  # every client's connection: pick_first takes the first endpoint
            record["member"] = first.name
            record["leader"] = (await self.leader()) is first
            await self.as_root("auth", "disable")
            await self.as_root("auth", "enable")  # every token issued so far is refused from now on
            self.cluster.kill_member(first)
            await self.restart([first], 1.0)
        elif kind == "compact_loop":
            root = self.stores["root"]
            compactions = 0
            while time.monotonic() - started < c.compaction_seconds:
                try:
                    await root.compact(await root.revision())
                    compactions += 1
                except StoreError:
                    pass
                if restart is None and time.monotonic() - started > c.compaction_seconds / 3:
                    # every client's member: streams reconnect, from revisions compacted meanwhile
                    restart = asyncio.get_running_loop().create_task(
                        self.commits_after(time.monotonic(), await self.committed()))
                    self.cluster.kill_member(self.cluster.members[0])
                    await self.restart([self.cluster.members[0]], 1.0)
                await asyncio.sleep(1.0)
            record["compactions"] = compactions
            record["commits_during"] = await self.committed() - base
        restarted_at = time.time()
        if kind == "kill_cluster":  # the only fault without a quorum: the idle clocks start again
            self.etcd_up_since = time.monotonic()
        progress = restart if restart is not None else self.commits_after(started, base)
        now = time.monotonic()
        record["commits_s"], (record["workers_s"], behind), record["token_s"] = await asyncio.gather(
            progress, self.heartbeats_after(restarted_at, now), self.token_after(now))
        if behind or record["workers_s"] is None:
            record["workers_not_back"] = behind or "not known: the workers' entries could not be read"
        if record["workers_s"] is None or record["commits_s"] is None or record["commits_s"] > c.recover_limit / 2:
            record["etcd_status"] = await self.etcd_status()
        return record

    # -- the run -------------------------------------------------------------------------------
    async def run_auth(self) -> AuthReport:
        c = self.config
        extra = ["--auth-token-ttl", str(c.token_ttl)] if c.token_ttl else []
        if c.bcrypt_cost:
            extra += ["--bcrypt-cost", str(c.bcrypt_cost)]
        self.cluster = make_cluster(c.members, extra_args=extra)
        self.cluster.start()
        self.etcd_up_since = time.monotonic()
        supervisor = None
        try:
            self.set_up_auth()
            self.stores["root"] = await self.open_store("a", *ROOT_USER)
            for ns in ("a", "b"):
                self.stores[ns] = await self.open_store(ns, *USERS[ns])
            for _ in range(c.workers):
                self.start_worker("a")
            for _ in range(c.workers_b):
                self.start_worker("b")
            self.start_api()
            supervisor = asyncio.get_running_loop().create_task(self.supervise())
            if not await self.api_ready():
                self.areport.problem("start", "dsm api did not answer within 30 s of its start; processes: "
                                     + "; ".join(f"{p.role} {p.pid}: {p.tail(1)}" for p in self.procs))
                return self.areport
            await self.exercise()
            await self.check()
        except StoreError as exc:  # the run's own client, after 90 s of trying
            self.areport.problem("etcd", f"the run's own client of etcd got nothing through for 90 s: {exc}")
        finally:
            self.stopping = True
            if supervisor is not None:
                await asyncio.gather(supervisor, return_exceptions=True)
            await self.tear_down_all()
            self.areport.seconds = time.monotonic() - self.began
        return self.areport

    async def exercise(self) -> None:
        """The load and the faults, then the wait for every instance, follow and stream to end."""
        c = self.config
        self.open_stream("namespace a")
        ids = await self.submit_batch(c.initial)
        await self.watch_instances(ids)
        plan = list(FAULTS)
        deadline = time.monotonic() + c.minutes * 60
        while plan or time.monotonic() < deadline:
            if not plan:
                plan = list(FAULTS)
            kind = plan.pop(0)
            await asyncio.sleep(c.fault_every)
            if kind == "compact_loop":  # followed while compaction goes on: their signals come late
                late_signals = (c.compaction_seconds / 2, c.compaction_seconds + 4)
                await self.watch_instances(await self.submit_batch(c.top_up, signal_delay=late_signals))
            await self.submit_batch(c.top_up)  # strike with work in flight
            await self.claims_appear(self.stores["root"], timeout=5)
            fault = await self.strike(kind)
            self.areport.faults.append(fault)
            if fault["workers_s"] is None and c.stop_when_stuck:
                break  # found: workers did not come back; the rest would only wait on them
        await self.submit_batch(c.late, late=True)  # the issue: work submitted after the faults never ran
        done = await self.until_all_finished(None, c.timeout)
        if self.sends:
            await asyncio.wait(self.sends, timeout=30 if done else 1)
        await self.until_streams_end(15.0 if done else 2.0)
        await self.sample_heartbeats()

    async def until_all_finished(self, store: Any, timeout: float) -> bool:
        """Until every instance finished, `timeout` passed, or nothing committed for `recover_limit`
        seconds (stalled: whatever is still running waits on something that will not come)."""
        finish = time.monotonic() + timeout
        count, moved = -1, time.monotonic()
        while time.monotonic() < finish and time.monotonic() - moved < self.config.recover_limit:
            try:
                if await self.all_finished():
                    return True
                now = await self.committed()
                if now != count:
                    count, moved = now, time.monotonic()
            except StoreError:
                pass
            await asyncio.sleep(0.3)
        return False

    async def until_streams_end(self, timeout: float) -> None:
        """Give follows and streams time to deliver the ends they have yet to deliver."""
        deadline = time.monotonic() + timeout
        late = set(self.late_ids)
        while time.monotonic() < deadline:
            follows = all(p.popen.poll() is not None for p in self.procs if p.role == "follow")
            streams = all(s.done for s in self.streams if s.instance)
            whole = all(late <= set(s.finished) for s in self.streams if s.instance is None)
            if follows and streams and whole:
                return
            await asyncio.sleep(0.2)

    async def tear_down_all(self) -> None:
        for task in self.sends + self.stream_tasks:
            task.cancel()
        await asyncio.gather(*self.sends, *self.stream_tasks, return_exceptions=True)
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.popen.wait()
        for store in self.stores.values():
            await store.close()
        for m in self.cluster.members:  # kept with the processes' logs: the cluster's folder goes with it
            shutil.copy(m.log_path, self.workdir / f"etcd-{m.name}.log")
        self.cluster.stop()

    # -- the checks ----------------------------------------------------------------------------
    async def check(self) -> None:
        r = self.areport
        c = self.config
        r.etcd = await self.members_agree()
        if r.etcd.get("agree") is False:
            r.problem("etcd", f"the etcd members disagree (etcd {r.etcd.get('versions')}, issue 13766): {r.etcd}")
        finished: dict[str, Any] = {}
        sent = consumed = left = 0
        for ns in ("a", "b"):
            client = Operations(self.stores["root"], Keys(ns))
            instances = await self.retry(client.list)
            r.instances[ns] = len(instances)
            r.statuses[ns] = dict(Counter(i.status for i in instances))
            for inst in instances:
                finished[inst.id] = inst
                history = await self.retry(lambda inst=inst, client=client: client.history(inst.id))
                r.transitions += len(history)
                problems = audit(self.graphs[inst.digest], inst, history)
                if problems:
                    r.invalid_histories[inst.id] = problems
                if inst.status != SUCCEEDED:
                    r.problem("unfinished", f"{ns}/{inst.id} is {inst.status} at "
                                             f"{sorted(t.state for t in inst.tokens.values())}")
                    continue
                signalled = [h for h in history if h.signal is not None]
                sent += self.signalled[inst.id]
                consumed += len(signalled)
                left += len(inst.signals)
                if len(signalled) != 1 or self.signalled[inst.id] != 1 or inst.signals:
                    r.problem("signals", f"{ns}/{inst.id}: sent {self.signalled[inst.id]}, consumed "
                                         f"{len(signalled)}, left {len(inst.signals)}")
                if inst.payload.get("steps") != STEPS or inst.payload.get("go") != 1:
                    r.problem("payload", f"{ns}/{inst.id}: {inst.payload}")
            missing = set(self.submitted[ns]) - {i.id for i in instances}
            for iid in sorted(missing):
                r.problem("lost", f"{ns}/{iid} was submitted and is not stored")
        r.signals = {"sent": sent, "consumed": consumed, "left": left}
        r.submitted = {ns: len(ids) for ns, ids in self.submitted.items()}
        late_done = sum(1 for iid in self.late_ids if finished.get(iid) is not None
                        and finished[iid].status == SUCCEEDED)
        r.late = {"submitted": len(self.late_ids), "succeeded": late_done}
        for f in r.faults:
            if f["workers_s"] is None:
                r.problem("not_back", f"{f['fault']} at {f['at_s']}s: worker processes alive without a heartbeat "
                                      f"{c.recover_limit:g}s after it: {f.get('workers_not_back')}")
        for pid, idle in r.idle.items():
            r.problem("idle", f"worker {pid} ({idle['role']}) alive, its heartbeat stale for {idle['stale_s']}s "
                              f"(entry: {idle['entry']})")
        for p in self.procs:
            if p.role != "follow":
                continue
            inst = finished.get(p.instance or "")
            rc = p.popen.poll()
            lines = (self.workdir / f"follow-{p.instance}.jsonl").read_text().splitlines()
            seqs = [json.loads(line).get("seq") for line in lines if line.startswith("{")]
            lag = round(p.ended_wall - inst.finished_at, 2) if p.ended_wall and inst and inst.finished_at else None
            r.follows.append({"instance": p.instance, "exit": rc, "entries": len(seqs), "after_end_s": lag})
            if rc != 0:
                r.problem("follow", f"status --follow {p.instance}: exit {rc} (instance "
                                    f"{inst.status if inst else '?'}): {p.tail(2)}")
            elif inst is None or seqs != list(range(1, inst.transitions + 1)):
                r.problem("follow", f"status --follow {p.instance}: printed entries {seqs}, "
                                    f"expected 1..{inst.transitions if inst else '?'}")
        late = set(self.late_ids)
        for s in self.streams:
            summary = {"connects": s.connects, "dropped": s.dropped, "events": dict(s.events),
                       "failures": s.failures[:5]}
            if s.instance is None:
                seen = len(late & set(s.finished))
                summary["late_ends_seen"] = f"{seen}/{len(late)}"
                if seen != len(late):
                    r.problem("stream", f"{s.name}: delivered the end of {seen} of the {len(late)} instances "
                                        f"submitted after the faults ({summary})")
            else:
                inst = finished.get(s.instance)
                summary["done"] = s.done
                if not s.done:
                    r.problem("stream", f"{s.name}: no end delivered (status {inst.status if inst else '?'}, "
                                        f"history entries {sorted(s.seqs)}; {summary})")
            r.streams[s.name] = summary
        ticks = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()] \
            if self.log.exists() else []
        per_visit = Counter(t["key"] for t in ticks)
        r.tick_executions = len(ticks)
        r.duplicate_tick_executions = sum(n - 1 for n in per_visit.values() if n > 1)
        if not r.instances.get("a") or r.instances["a"] != len(self.submitted["a"]) or \
                r.instances.get("b", 0) != len(self.submitted["b"]):
            r.problem("lost", f"stored {r.instances}, submitted "
                              f"{ {ns: len(ids) for ns, ids in self.submitted.items()} }")


def run_auth(config: AuthConfig) -> AuthReport:
    return asyncio.run(AuthChaos(config).run_auth())
