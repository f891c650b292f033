"""dsm benchmarks: where dsm stands against the limit of its coordination layer.

    python bench/run.py                 # all nine, one etcd, one run: a table and bench/results/latest.json
    python bench/run.py throughput      # one of: reference throughput naive scale recovery embedded embedded_loop
                                        # run_loop search
    python bench/run.py --quick         # smaller sizes, for a smoke run

Every ratio compares numbers measured in this run, against this etcd, on this machine.
1 reference   raw etcd compare-and-swap transactions/s from one Python process at dsm's concurrency
2 throughput  dsm transitions/s with 1 and 2 worker processes as `dsm worker` runs without options (linear
              and fork/join machines; handlers in processes and in threads), / (1)
3 naive       the seed design (poll all, etcd lock, tick, put, unlock) on the same machine; dsm / naive
4 scale       throughput with 500 vs 50,000 instances waiting in etcd, and worker memory
5 recovery    SIGKILL of a worker holding claims -> its instances moving again (vs the lease TTL)
6 embedded    embedded transitions/s of many instances vs the `transitions` library, same machine
7 embedded_loop  one embedded instance looping through a tick and a guard 20,000 times vs `transitions`
8 run_loop    the same loop as `dsm run` runs it in its own process, stderr to a pipe (and with -q), vs `transitions`
9 search      etcd keys per transition of LINEAR with and without two search attributes that no transition
              changes: what their transitions write for them (their entries are put when an instance starts)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from dsm import codec, compiler  # noqa: E402
from dsm.keys import Keys, WorkInfo  # noqa: E402
from dsm.operations import Operations  # noqa: E402
from dsm.service import serving  # noqa: E402
from dsm.store import prefix_end  # noqa: E402
from dsm.store.etcd import EtcdOptions, EtcdStore  # noqa: E402
from dsm.store.memory import MemoryStore  # noqa: E402
from dsm.testing import EtcdCluster, make_cluster  # noqa: E402
from dsm.worker.defaults import DEFAULT_CONCURRENCY  # noqa: E402

LINEAR = BENCH / "linear.yaml"  # 4 transitions per instance
LOOP = BENCH / "loop.yaml"  # one transition per turn of its loop
FORKJOIN = BENCH / "forkjoin.yaml"  # 6 transitions per instance
SEARCHED = BENCH / "searched.yaml"  # LINEAR with two search attributes, set at submission, that no transition changes
PER_INSTANCE = {LINEAR: 4, FORKJOIN: 6, SEARCHED: 4}
CONCURRENCY = DEFAULT_CONCURRENCY  # `dsm worker`'s, which the throughput runs use (no `--concurrency`)
WARM_UP = 2 * CONCURRENCY  # instances per worker run before a throughput measurement starts
ISOLATIONS = ("process", "thread")  # `dsm worker --isolation`: the default first
REPEAT = {True: 1, False: 3}  # runs per measurement (quick, full); tables show the median
OWN_REFERENCE_S = 2.0  # seconds of the reference run again before each throughput run


def dsm_command() -> list[str]:
    script = Path(sys.executable).parent / "dsm"
    return [str(script)] if script.exists() else [sys.executable, str(ROOT / "cli.py")]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def connect(env: EtcdCluster, namespace: str, timeout: float = 2.0) -> EtcdStore:
    return await EtcdStore.connect(EtcdOptions.build(env.endpoint, namespace=namespace, timeout=timeout))


def start_workers(env: EtcdCluster, count: int, definition: Path, namespace: str, *,
                  concurrency: int | None = None, lease_ttl: int = 10, extra_env: dict[str, str] | None = None,
                  isolation: str = "process", run_ahead: int | None = None) -> list[subprocess.Popen]:
    """`concurrency`, `run_ahead` None: `dsm worker`'s default."""
    procs = []
    flags = [] if concurrency is None else ["--concurrency", str(concurrency)]
    flags += [] if run_ahead is None else ["--run-ahead", str(run_ahead)]
    for _ in range(count):
        procs.append(subprocess.Popen(
            [*dsm_command(), "worker", str(definition), "--etcd", env.endpoint, "--namespace", namespace,
             *flags, "--lease-ttl", str(lease_ttl), "--grace", "2", "--isolation", isolation],
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(extra_env or {})}, start_new_session=True))
    for p in procs:  # wait until each is serving: start-up is not throughput
        while "serving namespace" not in (line := p.stderr.readline()):
            if not line:
                raise RuntimeError(f"worker exited: {p.wait()}")
        threading.Thread(target=drain, args=(p.stderr,), daemon=True).start()
    return procs


def own_cpu(pid: int) -> float:
    """CPU time of one process (all its threads), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu(pid: int) -> float:
    """CPU time of a process's children alive now (a worker's handler processes)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    return sum(own_cpu(int(k)) for k in kids)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children alive now."""
    return own_cpu(pid) + children_cpu(pid)


class CpuProbe:
    """Where the machine's CPU goes during a measurement: the workers (their own process), their
    handler processes, etcd and this process (the benchmark driver: submitting, sampling)."""

    def __init__(self, env: EtcdCluster, procs: Sequence[subprocess.Popen] = ()):
        self.etcd = [m.process.pid for m in env.members if m.process is not None]
        self.workers = [p.pid for p in procs]

    def read(self) -> dict[str, float]:
        return {"workers": sum(own_cpu(p) for p in self.workers),
                "handler_processes": sum(children_cpu(p) for p in self.workers),
                "etcd": sum(own_cpu(p) for p in self.etcd), "driver": time.process_time()}


def cpu_per(before: dict[str, float], after: dict[str, float], count: float) -> dict[str, float]:
    """Microseconds of CPU per unit of work (a transition, a CAS) by process, and their sum."""
    out = {k: round((after[k] - before[k]) / max(count, 1) * 1e6, 1) for k in before}
    out["total"] = round(sum(out.values()), 1)
    return out


def etcd_writes(env: EtcdCluster) -> int:
    """Keys etcd has written or deleted since it started, by its own counters
    (`etcd_mvcc_put_total` + `etcd_mvcc_delete_total`, read from its /metrics; every member applies
    every write, so one member's count is the cluster's)."""
    total = 0.0
    with urllib.request.urlopen(f"{env.members[0].url}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in ("etcd_mvcc_put_total", "etcd_mvcc_delete_total"):
                total += float(value)
    return round(total)


async def settle(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """Wait until the workers and their handler processes are quiet (below a tenth of a CPU over
    half a second): a measurement must not include handler processes still starting."""
    deadline = time.monotonic() + timeout
    before = sum(cpu_seconds(p.pid) for p in procs)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = sum(cpu_seconds(p.pid) for p in procs)
        if now - before < 0.05:
            return
        before = now


def drain(stream: IO[str]) -> None:
    """Read what a worker writes to stderr after start-up, so that a full pipe never stalls it."""
    for _ in stream:
        pass


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


class _Committed:
    """Transitions committed in a namespace, kept by a watch on its records (each says how many it
    has made): one read of them at the start, then the records' puts as they come, so the count
    costs etcd a watch event per commit rather than a read of the whole namespace per sample."""

    def __init__(self, store: EtcdStore, keys: Keys):
        self.store, self.prefix = store, f"{keys.root}inst/"
        self.counts: dict[str, int] = {}
        self.task: asyncio.Task | None = None

    async def total(self) -> int:
        if self.task is None:
            found = await self.store.range(self.prefix, prefix_end(self.prefix))
            for kv in found.kvs:
                self.counts[kv.key] = codec.loads(kv.value)["transitions"]
            watch = await self.store.watch(self.prefix, prefix_end(self.prefix), start_revision=found.revision + 1)
            self.task = asyncio.create_task(self._follow(watch))
        elif self.task.done():
            self.task.result()  # the watch failed: say why
        return sum(self.counts.values())

    async def _follow(self, watch: Any) -> None:
        async for batch in watch:
            for event in batch.events:
                if event.kv.value:  # a deletion keeps what the instance made
                    self.counts[event.kv.key] = codec.loads(event.kv.value)["transitions"]


_COUNTERS: dict[tuple[int, str], _Committed] = {}


async def committed(store: EtcdStore, keys: Keys) -> int:
    """Transitions committed in the namespace of `keys` (watched from the first call on)."""
    counter = _COUNTERS.setdefault((id(store), keys.root), _Committed(store, keys))
    return await counter.total()


async def sample_until(store: EtcdStore, keys: Keys, total: int, timeout: float = 600,
                       probe: CpuProbe | None = None) -> list[tuple[float, int]]:
    """(time, committed transitions) every 100ms until `total` are committed; with a `probe`, each
    sample also carries the CPU seconds it reads: (time, count, cpu)."""
    samples: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = await committed(store, keys)
        samples.append((time.monotonic(), count) if probe is None else (time.monotonic(), count, probe.read()))
        if count >= total:
            return samples
        await asyncio.sleep(0.1)
    raise TimeoutError(f"only {samples[-1][1]} of {total} transitions after {timeout}s")


def window(samples: list, lo: int, hi: int) -> tuple[tuple, tuple]:
    """The first samples at or above `lo` and `hi` committed transitions."""
    return next(s for s in samples if s[1] >= lo), next(s for s in samples if s[1] >= hi)


def window_rate(samples: list, lo: int, hi: int) -> float:
    """Transitions/s between the first samples at or above `lo` and `hi` committed transitions."""
    t0, t1 = window(samples, lo, hi)
    return (t1[1] - t0[1]) / max(t1[0] - t0[0], 1e-9)


async def clear(env: EtcdCluster, namespace: str) -> None:
    store = await connect(env, namespace, timeout=120.0)  # a namespace of 50,000 instances is a large delete
    try:
        root = f"/{namespace}/"
        await store.delete(root, prefix_end(root))
        await store.compact(await store.revision(), physical=True)  # not in the next measurement
    finally:
        await store.close()


# -- 1 reference -------------------------------------------------------------------------------

async def reference(env: EtcdCluster, quick: bool) -> dict[str, Any]:
    """Raw CAS transactions through aetcd's generated gRPC stubs: no dsm code in the loop."""
    seconds = 2.0 if quick else 5.0
    out: dict[str, Any] = {}
    for concurrency in (1, CONCURRENCY):
        out[f"cas_per_s_c{concurrency}"], out[f"cpu_us_per_cas_c{concurrency}"] = await cas_rate(
            env, concurrency, seconds)
    out["cas_per_s"] = out[f"cas_per_s_c{CONCURRENCY}"]
    return out


async def cas_rate(env: EtcdCluster, concurrency: int, seconds: float) -> tuple[float, dict[str, float]]:
    """`concurrency` loops of raw CAS transactions for `seconds`: the rate, and the CPU a CAS cost."""
    import grpc
    from aetcd import rpc

    channel = grpc.aio.insecure_channel(env.endpoint.split("://")[1])
    kv = rpc.KVStub(channel)
    value = b"x" * 300
    count = 0

    async def loop(i: int, stop_at: float) -> None:
        nonlocal count
        key = f"/reference/{i}".encode()
        rev = (await kv.Put(rpc.PutRequest(key=key, value=value))).header.revision
        while time.monotonic() < stop_at:
            req = rpc.TxnRequest(
                compare=[rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=rev)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))])
            resp = await kv.Txn(req)
            assert resp.succeeded
            rev = resp.header.revision
            count += 1

    probe = CpuProbe(env)
    started, cpu = time.monotonic(), probe.read()
    await asyncio.gather(*(loop(i, started + seconds) for i in range(concurrency)))
    rate, cost = count / (time.monotonic() - started), cpu_per(cpu, probe.read(), count)
    await channel.close()
    return rate, cost


# -- 2 throughput ------------------------------------------------------------------------------

async def throughput_of(env: EtcdCluster, definition: Path, workers: int, instances: int, namespace: str,
                        isolation: str = "process", payload: Callable[[int], dict[str, Any]] = lambda i: {},
                        **worker_kw: Any) -> dict[str, Any]:
    """Steady-state transitions/s: the workers first run WARM_UP instances each (their handler
    processes started, their connections busy) and wait until they are quiet, then the measured
    instances are submitted."""
    graph = compiler.load(definition)
    per = PER_INSTANCE[definition]
    warm = WARM_UP * workers * per
    total = warm + instances * per
    procs = start_workers(env, workers, definition, namespace, isolation=isolation, **worker_kw)
    store = await connect(env, namespace)
    keys = Keys(namespace)
    client = Operations(store, keys)
    try:
        await client.submit_many(graph, ({} for _ in range(WARM_UP * workers)))
        await sample_until(store, keys, warm)
        await settle(procs)
        probe = CpuProbe(env, procs)
        sampler = asyncio.get_running_loop().create_task(sample_until(store, keys, total, probe=probe))
        started, written = time.monotonic(), etcd_writes(env)
        await client.submit_many(graph, (payload(i) for i in range(instances)))
        samples = await sampler
        measured = total - warm
        # every key the measured instances wrote or deleted, from their submission to their last
        # commit (the workers' heartbeats in the same time are counted too: a few keys a second)
        keys_per_transition = (etcd_writes(env) - written) / measured
        lo, hi = warm + measured // 10, warm + measured * 9 // 10
        rate = window_rate(samples, lo, hi)
        first, last = window(samples, lo, hi)
        return {"instances": instances, "transitions": measured, "workers": workers, "isolation": isolation,
                "transitions_per_s": rate, "wall_s": samples[-1][0] - started,
                "worker_rss_mb": max(rss_mb(p.pid) for p in procs), "etcd_keys_per_transition": keys_per_transition,
                "cpu_us_per_transition": cpu_per(first[2], last[2], last[1] - first[1])}
    finally:
        stop_workers(procs)
        await store.close()
        await clear(env, namespace)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, with every rate kept: one 2-core machine is a noisy place.
    Runs measured with a reference of their own (`own_reference_cas_per_s`) also give their rates
    over it, and the median of those."""
    ordered = sorted(runs, key=lambda r: r["transitions_per_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["runs_transitions_per_s"] = [round(r["transitions_per_s"]) for r in runs]
    if all("own_reference_cas_per_s" in r for r in runs):
        ratios = [r["transitions_per_s"] / r["own_reference_cas_per_s"] for r in runs]
        chosen["ratios_to_own_reference"] = [round(x, 3) for x in ratios]
        chosen["ratio_to_own_reference"] = sorted(ratios)[len(ratios) // 2]
    return chosen


async def throughput(env: EtcdCluster, quick: bool) -> dict[str, Any]:
    instances = {LINEAR: 1000 if quick else 5000, FORKJOIN: 600 if quick else 3000}
    out: dict[str, Any] = {}
    for definition in (LINEAR, FORKJOIN):
        for isolation in ISOLATIONS:
            for workers in (1, 2):
                name = f"{definition.stem}_w{workers}" + ("" if isolation == ISOLATIONS[0] else f"_{isolation}")
                runs = []
                for i in range(REPEAT[quick]):
                    # a reference of its own just before: the machine's speed drifts over the minutes
                    # of this benchmark, and a ratio to the reference at the start drifts with it
                    own, _ = await cas_rate(env, CONCURRENCY, OWN_REFERENCE_S)
                    run = await throughput_of(env, definition, workers, instances[definition], f"tp-{name}-{i}",
                                              isolation)
                    runs.append(run | {"own_reference_cas_per_s": own})
                out[name] = median_run(runs) | {"definition": definition.stem}
    return out


# -- 3 naive -----------------------------------------------------------------------------------

async def naive(env: EtcdCluster, quick: bool) -> dict[str, Any]:
    instances = 100 if quick else 300
    total = instances * PER_INSTANCE[LINEAR]
    cmd = [sys.executable, str(BENCH / "naive.py"), str(LINEAR), "--etcd", env.endpoint, "--namespace", "naive"]
    subprocess.run([*cmd, "--submit", str(instances)], check=True)
    started = time.monotonic()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    took = time.monotonic() - started
    assert int(done.stdout.strip()) == total, done.stdout
    await clear(env, "naive")
    return {"instances": instances, "transitions": total, "workers": 1, "transitions_per_s": total / took,
            "wall_s": took}


# -- 4 scale -----------------------------------------------------------------------------------

async def scale_once(env: EtcdCluster, backlog: int, window: int, namespace: str) -> dict[str, Any]:
    """Throughput while `backlog` instances wait: finished instances are replaced as they finish, so
    the queue stays that long for the whole measured window."""
    graph = compiler.load(LINEAR)
    per = PER_INSTANCE[LINEAR]
    store = await connect(env, namespace)
    keys = Keys(namespace)
    client = Operations(store, keys)
    await client.submit_many(graph, ({} for _ in range(backlog)))
    submitted = backlog
    lo, hi = window // 10, window + window // 10
    procs = start_workers(env, 1, LINEAR, namespace)
    samples: list[tuple[float, int]] = []
    try:
        while True:
            count = await committed(store, keys)
            samples.append((time.monotonic(), count))
            if count >= hi:
                break
            missing = backlog - (submitted - count // per)
            if missing > 0:
                await client.submit_many(graph, ({} for _ in range(missing)))
                submitted += missing
            await asyncio.sleep(0.1)
        return {"waiting_instances": backlog, "measured_transitions": hi - lo,
                "transitions_per_s": window_rate(samples, lo, hi), "worker_rss_mb": rss_mb(procs[0].pid)}
    finally:
        stop_workers(procs)
        await store.close()
        await clear(env, namespace)


async def scale(env: EtcdCluster, quick: bool) -> dict[str, Any]:
    """Throughput with a small and a large queue of waiting instances, each held steady."""
    window = 4000 if quick else 20_000
    backlogs = (500, 5000) if quick else (500, 50_000)
    runs: dict[int, list[dict[str, Any]]] = {b: [] for b in backlogs}
    for i in range(REPEAT[quick]):
        for backlog in backlogs:  # interleaved, so that drift in the machine affects both alike
            runs[backlog].append(await scale_once(env, backlog, window, f"scale-{backlog}-{i}"))
    out: dict[str, Any] = {f"backlog_{b}": median_run(r) for b, r in runs.items()}
    small, large = out["backlog_500"], out[next(k for k in out if k != "backlog_500")]
    out["large_over_small"] = large["transitions_per_s"] / small["transitions_per_s"]
    out["rss_large_over_small"] = large["worker_rss_mb"] / small["worker_rss_mb"]
    return out


# -- 5 recovery --------------------------------------------------------------------------------

async def recovery(env: EtcdCluster, quick: bool) -> dict[str, Any]:
    ttl = 5 if quick else 10
    namespace = "recovery"
    graph = compiler.load(LINEAR)
    keys = Keys(namespace)
    slow = {"BENCH_TICK_SECONDS": "0.1"}
    victim, = start_workers(env, 1, LINEAR, namespace, concurrency=16, lease_ttl=ttl, extra_env=slow)
    survivor = None
    store = await connect(env, namespace)
    try:
        client = Operations(store, keys)
        await client.submit_many(graph, ({} for _ in range(60)))
        victim_id = f"{socket.gethostname()}:{victim.pid}"

        async def held_by_victim() -> dict[str, int]:
            page = await store.range(keys.work_prefix, prefix_end(keys.work_prefix))
            held = {ref.instance for kv in page.kvs if (ref := keys.parse_work(kv.key)) is not None
                    and WorkInfo.load(kv.value).owner == victim_id}
            return {iid: (await client.instance(iid)).transitions for iid in held}

        deadline = time.monotonic() + 10
        while len(await held_by_victim()) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        survivor, = start_workers(env, 1, LINEAR, namespace, concurrency=64, lease_ttl=ttl, extra_env=slow)
        before = await held_by_victim()  # what it holds at the moment it dies
        if not before:
            raise RuntimeError("the worker to kill held no claim; nothing to measure")
        held = set(before)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        moved: dict[str, float] = {}
        while len(moved) < len(held) and time.monotonic() - killed < ttl * 4:
            for iid in held - set(moved):
                inst = await client.instance(iid)
                if inst.transitions > before[iid] or inst.finished:
                    moved[iid] = time.monotonic() - killed
            await asyncio.sleep(0.02)
        times = sorted(moved.values())
        return {"lease_ttl_s": ttl, "claims_held_by_killed_worker": len(held), "recovered": len(moved),
                "first_moved_s": times[0] if times else None, "all_moved_s": times[-1] if times else None,
                "within_ttl_plus_1s": bool(times) and len(moved) == len(held) and times[-1] <= ttl + 1}
    finally:
        stop_workers([p for p in (victim, survivor) if p is not None])
        await store.close()
        await clear(env, namespace)


# -- 6 embedded --------------------------------------------------------------------------------

async def embedded_dsm(instances: int) -> dict[str, Any]:
    graph = compiler.load(LINEAR)
    store = MemoryStore()
    keys = Keys()
    finished = asyncio.Event()
    count = 0

    def on_commit(step: Any) -> None:
        nonlocal count
        if step.instance.finished:
            count += 1
            if count == instances:
                finished.set()

    async with serving(store, keys, [graph], concurrency=8, on_commit=on_commit, worker_id="embedded") as service:
        worker = service.worker
        started = time.monotonic()
        await Operations(store, keys).submit_many(graph, ({} for _ in range(instances)))
        await finished.wait()
        took = time.monotonic() - started
    return {"instances": instances, "transitions": worker.stats.transitions,
            "transitions_per_s": worker.stats.transitions / took}


def transitions_library(instances: int) -> dict[str, Any]:
    from bench_handlers import noop
    from transitions import Machine

    class Order:
        def __init__(self) -> None:
            self.payload: dict = {}

        def tick(self) -> None:
            noop(self.payload, None)

    models = [Order() for _ in range(instances)]
    Machine(model=models, states=["s1", "s2", "s3", "s4", "s5"], initial="s1", auto_transitions=False,
            transitions=[{"trigger": "next", "source": f"s{i}", "dest": f"s{i + 1}", "before": "tick"}
                         for i in range(1, 5)])
    started = time.monotonic()
    for model in models:
        for _ in range(4):
            model.next()
    took = time.monotonic() - started
    assert all(m.state == "s5" for m in models)
    return {"instances": instances, "transitions": instances * 4, "transitions_per_s": instances * 4 / took}


async def embedded(env: EtcdCluster | None, quick: bool) -> dict[str, Any]:
    instances = 1000 if quick else 5000
    mine = await embedded_dsm(instances)
    theirs = transitions_library(instances)
    return {"dsm": mine, "transitions_library": theirs,
            "dsm_over_transitions": mine["transitions_per_s"] / theirs["transitions_per_s"]}


# -- 7 embedded_loop ---------------------------------------------------------------------------

async def embedded_loop_dsm(turns: int) -> dict[str, Any]:
    """One instance of `bench/loop.yaml` run to its end as `dsm run` runs it (`embedded.run_graph`):
    what a developer waits for when one instance makes many transitions."""
    from dsm import embedded as embedded_mode

    graph = compiler.load(LOOP)
    started = time.perf_counter()
    result = await embedded_mode.run_graph(graph, {"n": 0, "until": turns})
    took = time.perf_counter() - started
    inst = result.instance
    assert inst.status == "succeeded" and inst.payload["n"] == turns == inst.transitions, inst
    return {"turns": turns, "transitions": inst.transitions, "transitions_per_s": inst.transitions / took}


def transitions_loop(turns: int) -> dict[str, Any]:
    """The same loop in the `transitions` library: the tick as a `prepare` callback (it runs before
    the conditions, as dsm's tick runs before its guard), the guard as a condition."""
    from bench_handlers import count
    from transitions import Machine

    class Counter:
        def __init__(self) -> None:
            self.payload: dict = {"n": 0, "until": turns}

        def tick(self) -> None:
            count(self.payload, None)

        def below(self) -> bool:
            return self.payload["n"] < self.payload["until"]

    model = Counter()
    Machine(model=model, states=["count", "done"], initial="count", auto_transitions=False,
            transitions=[{"trigger": "step", "source": "count", "dest": "count", "prepare": "tick",
                          "conditions": "below"},
                         {"trigger": "step", "source": "count", "dest": "done"}])
    steps = 0
    started = time.perf_counter()
    while model.state == "count":
        model.step()
        steps += 1
    took = time.perf_counter() - started
    assert model.payload["n"] == turns == steps, (model.payload, steps)
    return {"turns": turns, "transitions": steps, "transitions_per_s": steps / took}


async def embedded_loop(env: EtcdCluster | None, quick: bool) -> dict[str, Any]:
    turns = 20_000
    mine, theirs = [], []
    for _ in range(REPEAT[quick]):  # interleaved, so that drift in the machine affects both alike
        mine.append(await embedded_loop_dsm(turns))
        theirs.append(transitions_loop(turns))
    dsm_run, library = median_run(mine), median_run(theirs)
    return {"dsm": dsm_run, "transitions_library": library,
            "dsm_over_transitions": dsm_run["transitions_per_s"] / library["transitions_per_s"]}


# -- 8 run_loop --------------------------------------------------------------------------------

def moment(stamp: str) -> float:
    """Seconds since the epoch of a record's timestamp (`2026-11-28T13:00:00.123Z`)."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def run_loop_cli(turns: int, *flags: str) -> dict[str, Any]:
    """`dsm run bench/loop.yaml --json` in its own process, stderr to a pipe that this process reads,
    as a user's `2>&1 | tee` would. The rate counts from the record's own timestamps (created_at to
    finished_at): the process's start-up (imports, loading the definition) and the --json output
    are not in it; `wall_s` is the whole process. PYTHONUNBUFFERED is left out of its environment,
    as a user's shell has it: with it, Python writes stderr a line at a time however dsm asks."""
    command = [*dsm_command(), "run", str(LOOP), "--payload", json.dumps({"n": 0, "until": turns}), "--json", *flags]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout)
    assert record["status"] == "succeeded" and record["transitions"] == turns, record["status"]
    took = moment(record["finished_at"]) - moment(record["created_at"])
    return {"turns": turns, "flags": list(flags), "transitions": turns, "transitions_per_s": turns / took,
            "instance_s": took, "wall_s": wall, "stderr_lines": done.stderr.count("\n")}


async def run_loop(env: EtcdCluster | None, quick: bool) -> dict[str, Any]:
    turns = 20_000
    piped: list[dict[str, Any]] = []
    quiet: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for _ in range(REPEAT[quick]):  # interleaved, so that drift in the machine affects all three alike
        piped.append(run_loop_cli(turns))
        quiet.append(run_loop_cli(turns, "-q"))
        theirs.append(transitions_loop(turns))
    library = median_run(theirs)
    out: dict[str, Any] = {"rate_from": "the record's created_at to finished_at", "transitions_library": library}
    for name, runs in (("pipe", piped), ("quiet", quiet)):
        out[name] = median_run(runs)
        out[f"{name}_over_transitions"] = out[name]["transitions_per_s"] / library["transitions_per_s"]
    return out


# -- the run -----------------------------------------------------------------------------------

async def search(env: EtcdCluster, quick: bool) -> dict[str, Any]:
    """etcd keys per transition (its own counters, submit included) of LINEAR and of SEARCHED, one
    worker each: SEARCHED's instances start with their two attributes' entries (2 keys an
    instance, 0.5 a transition); what remains beyond LINEAR's is what its transitions write for
    them, which is nothing while no attribute changes."""
    instances = 1000 if quick else 3000
    out: dict[str, Any] = {}
    for definition in (LINEAR, SEARCHED):
        r = await throughput_of(env, definition, 1, instances, f"search-{definition.stem}",
                                payload=lambda i: {"customer": f"c{i % 100}", "order": i})
        out[definition.stem] = {k: r[k] for k in ("transitions_per_s", "etcd_keys_per_transition",
                                                  "cpu_us_per_transition")}
    attributes = len(compiler.load(SEARCHED, import_handlers=False).search)
    at_start = attributes / PER_INSTANCE[SEARCHED]
    extra = out[SEARCHED.stem]["etcd_keys_per_transition"] - out[LINEAR.stem]["etcd_keys_per_transition"]
    out |= {"extra_keys_per_transition": extra, "entries_at_start_per_transition": at_start,
            "extra_keys_per_transition_by_transitions": extra - at_start}
    return out


BENCHMARKS: dict[str, Callable[..., Any]] = {"reference": reference, "throughput": throughput, "naive": naive,
                                             "scale": scale, "recovery": recovery, "embedded": embedded,
                                             "embedded_loop": embedded_loop, "run_loop": run_loop,
                                             "search": search}
IN_PROCESS = {"embedded", "embedded_loop", "run_loop"}  # need no etcd


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_mb": mem, "python": platform.python_version(),
            "platform": platform.platform()}


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    ref = results.get("reference", {}).get("cas_per_s")

    def ratio(value: float | None) -> str:
        return f"{value / ref:.2f}x ref" if ref and value else ""

    if "reference" in results:
        r = results["reference"]
        rows.append(("raw etcd CAS txn/s, 1 in flight", f"{r['cas_per_s_c1']:,.0f}", ""))
        rows.append((f"raw etcd CAS txn/s, {CONCURRENCY} in flight (ref)", f"{r['cas_per_s']:,.0f}", "1.00x ref"))
        cpu = r.get(f"cpu_us_per_cas_c{CONCURRENCY}")
        if cpu:
            rows.append(("  CPU us per reference CAS: client + etcd", f"{cpu['total']:,.0f}",
                         f"{cpu['driver']:.0f} + {cpu['etcd']:.0f}"))
            cores = results.get("machine", {}).get("cpus") or os.cpu_count() or 1
            rows.append((f"  CPU us per transition at 1.00x ref on {cores} cores", f"{cores * 1e6 / ref:,.0f}",
                         "what every process together may spend"))
    for r in results.get("throughput", {}).values():
        where = "threads" if r["isolation"] == "thread" else "processes"
        where += f", concurrency {r.get('concurrency', CONCURRENCY)}"
        own = f" ({r['ratio_to_own_reference']:.2f}x its own)" if "ratio_to_own_reference" in r else ""
        rows.append((f"dsm {r['definition']}, workers={r['workers']} ({where}) transitions/s",
                     f"{r['transitions_per_s']:,.0f}", ratio(r["transitions_per_s"]) + own))
        cpu = r.get("cpu_us_per_transition")
        if cpu:
            handlers = f" + {cpu['handler_processes']:.0f}" if r["isolation"] != "thread" else ""
            rows.append((f"  CPU us per transition: worker{' + handlers' if handlers else ''} + etcd + driver",
                         f"{cpu['total']:,.0f}", f"{cpu['workers']:.0f}{handlers} + {cpu['etcd']:.0f} + "
                         f"{cpu['driver']:.0f}"))
        if "etcd_keys_per_transition" in r:
            rows.append(("  etcd keys written or deleted per transition (submit included)",
                         f"{r['etcd_keys_per_transition']:.2f}", "etcd's own counters"))
    if "naive" in results:
        r = results["naive"]
        best = results.get("throughput", {}).get("linear_w1", {}).get("transitions_per_s")
        extra = f"dsm/naive {best / r['transitions_per_s']:.1f}x" if best else ""
        rows.append(("naive poll+lock transitions/s (linear, 1 worker)", f"{r['transitions_per_s']:,.0f}", extra))
    if "scale" in results:
        s = results["scale"]
        for key, r in s.items():
            if key.startswith("backlog_"):
                rows.append((f"dsm with {r['waiting_instances']:,} instances waiting, transitions/s",
                             f"{r['transitions_per_s']:,.0f}", f"worker RSS {r['worker_rss_mb']:.0f} MB"))
        rows.append(("large backlog / small backlog, throughput", f"{s['large_over_small']:.2f}",
                     f"memory {s['rss_large_over_small']:.2f}"))
    if "recovery" in results:
        r = results["recovery"]
        rows.append((f"recovery after SIGKILL (lease TTL {r['lease_ttl_s']}s), all moved", f"{r['all_moved_s']:.2f}s",
                     f"first {r['first_moved_s']:.2f}s, {r['recovered']}/{r['claims_held_by_killed_worker']}"))
    if "embedded" in results:
        e = results["embedded"]
        rows.append(("embedded dsm transitions/s", f"{e['dsm']['transitions_per_s']:,.0f}",
                     f"{e['dsm_over_transitions']:.3f}x transitions lib"))
        rows.append(("`transitions` library, same machine", f"{e['transitions_library']['transitions_per_s']:,.0f}",
                     ""))
    if "embedded_loop" in results:
        e = results["embedded_loop"]
        turns = e["dsm"]["turns"]
        rows.append((f"embedded dsm, one instance looping {turns:,} times, transitions/s",
                     f"{e['dsm']['transitions_per_s']:,.0f}", f"{e['dsm_over_transitions']:.3f}x transitions lib"))
        rows.append(("`transitions` library, same loop", f"{e['transitions_library']['transitions_per_s']:,.0f}", ""))
    if "run_loop" in results:
        e = results["run_loop"]
        turns = e["pipe"]["turns"]
        for name, how in (("pipe", "stderr to a pipe"), ("quiet", "-q")):
            ratio = e[f"{name}_over_transitions"]
            rows.append((f"dsm run, {turns:,} turns, {how}, transitions/s (created_at to finished_at)",
                         f"{e[name]['transitions_per_s']:,.0f}",
                         f"{ratio:.3f}x transitions lib, process {e[name]['wall_s']:.2f}s"))
        rows.append(("`transitions` library, same loop", f"{e['transitions_library']['transitions_per_s']:,.0f}", ""))
    if "search" in results:
        r = results["search"]
        for stem in (LINEAR.stem, SEARCHED.stem):
            rows.append((f"etcd keys per transition, {stem} (1 worker)", f"{r[stem]['etcd_keys_per_transition']:.2f}",
                         "etcd's own counters, submit included"))
        rows.append(("  search entries put at start, per transition", f"{r['entries_at_start_per_transition']:.2f}",
                     "2 attributes / 4 transitions"))
        rows.append(("  keys the transitions write for unchanged attributes",
                     f"{r['extra_keys_per_transition_by_transitions']:.2f}", "searched - linear - put at start"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'benchmark':<{width}}  {'value':>12}  note", "-" * (width + 30)]
    lines += [f"{a:<{width}}  {b:>12}  {c}" for a, b, c in rows]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description="dsm benchmarks", epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "latest.json", help="where to write JSON")
    args = parser.parse_args()
    names = args.names or list(BENCHMARKS)
    if any(n not in IN_PROCESS for n in names) and "reference" not in names:
        names = ["reference", *names]  # every ratio is against a reference of this run
    env = None if set(names) <= IN_PROCESS else make_cluster(1)
    if env is not None:
        env.start()
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                                  time.gmtime())}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = await BENCHMARKS[name](env, args.quick)
            args.json.write_text(json.dumps(results, indent=2))  # what is done survives a later failure
    finally:
        if env is not None:
            env.stop()
    print(table(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
