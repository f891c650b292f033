"""Soak: dsm workers at full speed for a long time against an etcd with a small quota.

    python bench/soak.py                         # 10 minutes, 256 MB quota, retention and compaction 5s
    python bench/soak.py --minutes 30 --workers 2 --retention 1m --compaction-retention 1m

Instances of the linear benchmark machine (four no-op ticks) with a short `retention` are kept
coming so that `--backlog` of them always wait; worker processes (`dsm worker`, handlers on
threads) run them, and one of them keeps house: it deletes instances past their retention and
compacts etcd's history. Every `--sample` seconds the run records etcd's database size (and the
part in use), instances finished, worker memory and etcd's alarms. Successes are counted exactly,
by watching the listing entries that a finish writes (`idx/sm/succeeded/`), so every instance
submitted is accounted for even after retention deleted it.

Targets (issue 9): no NOSPACE alarm; the database flat once the first retention period has
passed (its size at the end within 1.2x its size at the middle); throughput at the end within 10%
of the start; worker memory flat; every instance accounted for. The run prints a table and its
figures as JSON (also written to bench/results/soak.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

from dsm import compiler  # noqa: E402
from dsm.durations import parse_duration  # noqa: E402
from dsm.errors import NoSpace, StoreError  # noqa: E402
from dsm.keys import Keys  # noqa: E402
from dsm.operations import Operations  # noqa: E402
from dsm.store import PUT, prefix_end  # noqa: E402
from dsm.store.etcd import EtcdOptions, EtcdStore  # noqa: E402
from dsm.testing import EtcdCluster, make_cluster  # noqa: E402

TRANSITIONS = 4  # per instance of bench/linear.yaml
NAMESPACE = "soak"


@dataclass
class Sample:
    t: float  # seconds since the start
    db_bytes: int
    db_in_use_bytes: int
    succeeded: int
    submitted: int
    running: int
    stored: int  # instance records in etcd: running ones and finished ones within their retention
    worker_rss_mb: float
    alarms: list[str]


@dataclass
class Settings:
    seconds: float = 600.0
    quota_mb: int = 256
    retention: str = "5s"
    compaction_retention: str = "5s"
    workers: int = 1
    concurrency: int = 64
    backlog: int = 2000
    sample: float = 5.0
    rate: float = 0.0  # instances started per second; 0: as fast as the workers go (the backlog kept full)


@dataclass
class Soak:
    settings: Settings
    samples: list[Sample] = field(default_factory=list)
    submitted: int = 0
    succeeded: int = 0
    failed_or_cancelled: int = 0
    unaccounted: int = 0
    left_running: int = 0

    def at(self, fraction: float) -> Sample:
        """The sample nearest to this fraction of the run."""
        target = fraction * self.settings.seconds
        return min(self.samples, key=lambda s: abs(s.t - target))

    def rate(self, start: float, end: float) -> float:
        """Transitions/s between two moments (fractions of the run), from successes counted exactly."""
        a, b = self.at(start), self.at(end)
        return (b.succeeded - a.succeeded) * TRANSITIONS / max(b.t - a.t, 1e-9)

    def figures(self) -> dict[str, Any]:
        middle, end = self.at(0.5), self.samples[-1]
        start_rate, end_rate = self.rate(0.1, 0.2), self.rate(0.9, 1.0)
        rss_middle = self.at(0.5).worker_rss_mb
        return {
            "nospace": any("NOSPACE" in s.alarms for s in self.samples),
            "db_mb_middle": middle.db_bytes / 2**20, "db_mb_end": end.db_bytes / 2**20,
            "db_end_over_middle": end.db_bytes / max(middle.db_bytes, 1),
            "db_mb_max": max(s.db_bytes for s in self.samples) / 2**20,
            "db_in_use_mb_middle": middle.db_in_use_bytes / 2**20, "db_in_use_mb_end": end.db_in_use_bytes / 2**20,
            "db_in_use_end_over_middle": end.db_in_use_bytes / max(middle.db_in_use_bytes, 1),
            "db_in_use_mb_max": max(s.db_in_use_bytes for s in self.samples) / 2**20,
            "transitions_per_s_first_tenth": self.rate(0.0, 0.1),
            "transitions_per_s_start": start_rate, "transitions_per_s_end": end_rate,
            "throughput_end_over_start": end_rate / max(start_rate, 1e-9),
            "worker_rss_mb_middle": rss_middle, "worker_rss_mb_end": end.worker_rss_mb,
            "worker_rss_end_over_middle": end.worker_rss_mb / max(rss_middle, 1e-9),
            "instances_submitted": self.submitted, "instances_succeeded": self.succeeded,
            "failed_or_cancelled": self.failed_or_cancelled, "unaccounted": self.unaccounted,
            "left_running": self.left_running,
        }


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def dsm_command() -> list[str]:
    script = Path(sys.executable).parent / "dsm"
    return [str(script)] if script.exists() else [sys.executable, str(ROOT / "cli.py")]


def machine(folder: Path, retention: str) -> Path:
    text = (BENCH / "linear.yaml").read_text().replace("machine: bench-linear",
                                                       f"machine: bench-soak\nretention: {retention}")
    path = folder / "soak.yaml"
    path.write_text(text)
    return path


def start_workers(env: EtcdCluster, settings: Settings, definition: Path, log_dir: Path) -> list[subprocess.Popen]:
    procs = []
    for i in range(settings.workers):
        log = open(log_dir / f"worker{i}.log", "w")
        procs.append(subprocess.Popen(
            [*dsm_command(), "worker", str(definition), "--path", str(BENCH), "--etcd", env.endpoint,
             "--namespace", NAMESPACE, "--concurrency", str(settings.concurrency), "--isolation", "thread",
             "--compaction-retention", settings.compaction_retention, "--grace", "2"],
            stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True))
        log.close()
    for i, p in enumerate(procs):  # serving before the clock starts: start-up is not throughput
        deadline = time.monotonic() + 60
        while "serving namespace" not in (log_dir / f"worker{i}.log").read_text():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker exited: {(log_dir / f'worker{i}.log').read_text()}")
            time.sleep(0.05)
    return procs


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


class Outcomes:
    """Every instance that finished, by watching the listing entries a finish writes (under its status)."""

    def __init__(self, store: EtcdStore, keys: Keys):
        self.store = store
        self.keys = keys
        self.succeeded: set[str] = set()
        self.other: set[str] = set()
        self.error: BaseException | None = None

    async def run(self, revision: int) -> None:
        prefix = self.keys.listings()
        try:
            watch = await self.store.watch(prefix, prefix_end(prefix), start_revision=revision)
            async for batch in watch:
                for event in batch.events:
                    if event.type != PUT:
                        continue
                    status, _, rest = event.kv.key[len(prefix):].partition("/")  # <status>/<machine>/<age>/<id>
                    iid = rest.rpartition("/")[2]
                    if status == "succeeded":
                        self.succeeded.add(iid)
                    elif status != "running":
                        self.other.add(iid)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a watch that fell behind a compaction would miss some: say so
            self.error = exc


async def count_running(store: EtcdStore, keys: Keys) -> int:
    """Running instances: those with work markers (an instance's markers lie together, `keys.py`)."""
    places: set[str] = set()
    start, end = keys.work_prefix, prefix_end(keys.work_prefix)
    while True:
        page = await store.range(start, end, limit=1000, keys_only=True)
        places.update(ref.place for kv in page.kvs if (ref := keys.parse_work(kv.key)) is not None)
        if not page.more or not page.kvs:
            return len(places)
        start = page.kvs[-1].key + "\0"


async def sample(store: EtcdStore, env: EtcdCluster, keys: Keys, started: float, outcomes: Outcomes,
                 submitted: int, procs: list[subprocess.Popen]) -> Sample:
    from aetcd import rpc

    maintenance = rpc.MaintenanceStub(store._channel)
    status = await maintenance.Status(rpc.StatusRequest(), timeout=5)
    running = await count_running(store, keys)
    stored = await store.count(keys.instances, prefix_end(keys.instances))
    return Sample(t=time.monotonic() - started, db_bytes=status.dbSize, db_in_use_bytes=status.dbSizeInUse,
                  succeeded=len(outcomes.succeeded), submitted=submitted, running=running, stored=stored,
                  worker_rss_mb=max(rss_mb(p.pid) for p in procs), alarms=await store.alarms())


async def soak(settings: Settings, *, progress: bool = True) -> Soak:
    result = Soak(settings)
    env = make_cluster(1, extra_args=["--quota-backend-bytes", str(settings.quota_mb * 2**20)]).start()
    folder = Path(tempfile.mkdtemp(prefix="dsm-soak-"))
    keys = Keys(NAMESPACE)
    procs: list[subprocess.Popen] = []
    store = await EtcdStore.connect(EtcdOptions.build(env.endpoint, namespace=NAMESPACE))
    try:
        definition = machine(folder, settings.retention)
        graph = compiler.load(definition, import_handlers=False)
        parse_duration(settings.compaction_retention, what="--compaction-retention")
        client = Operations(store, keys)
        await client.register(graph)
        procs = start_workers(env, settings, definition, folder)
        outcomes = Outcomes(store, keys)
        watcher = asyncio.get_running_loop().create_task(outcomes.run(await store.revision() + 1))
        submitted: list[str] = []
        started = time.monotonic()
        next_sample = started
        while time.monotonic() - started < settings.seconds:
            waiting = len(submitted) - len(outcomes.succeeded) - len(outcomes.other)
            want = settings.backlog - waiting
            if settings.rate:
                want = min(want, int(settings.rate * (time.monotonic() - started)) - len(submitted))
            if want > 0:
                try:
                    submitted += await client.submit_many(graph, ({} for _ in range(want)))
                except NoSpace:  # the run failed its first target; record how the database got there
                    result.samples.append(await sample(store, env, keys, started, outcomes, len(submitted), procs))
                    break
            if time.monotonic() >= next_sample:
                next_sample += settings.sample
                s = await sample(store, env, keys, started, outcomes, len(submitted), procs)
                result.samples.append(s)
                if progress:
                    print(f"{s.t:6.0f}s  db {s.db_bytes / 2**20:6.1f} MB (in use {s.db_in_use_bytes / 2**20:6.1f})"
                          f"  succeeded {s.succeeded:>8}  running {s.running:>5}  stored {s.stored:>6}"
                          f"  worker RSS {s.worker_rss_mb:5.0f} MB  {' '.join(s.alarms)}", file=sys.stderr, flush=True)
                if "NOSPACE" in s.alarms or outcomes.error is not None:
                    break
            await asyncio.sleep(0.05)
        result.samples.append(await sample(store, env, keys, started, outcomes, len(submitted), procs))
        # drain: every instance submitted finishes, and is counted
        deadline = time.monotonic() + 120
        while len(outcomes.succeeded) + len(outcomes.other) < len(submitted) and time.monotonic() < deadline:
            if outcomes.error is not None:
                break
            await asyncio.sleep(0.2)
        watcher.cancel()
        if outcomes.error is not None:
            raise RuntimeError(f"the outcome watch failed: {outcomes.error}")
        result.submitted = len(submitted)
        result.succeeded = len(outcomes.succeeded & set(submitted))
        result.failed_or_cancelled = len(outcomes.other)
        result.unaccounted = len(set(submitted) - outcomes.succeeded - outcomes.other)
        try:
            result.left_running = await count_running(store, keys)
        except StoreError:
            result.left_running = -1
    finally:
        stop_workers(procs)
        await store.close()
        env.stop()
    return result


def table(figures: dict[str, Any], settings: Settings) -> str:
    rows = [
        ("NOSPACE alarm", "raised" if figures["nospace"] else "never", ""),
        ("etcd database, middle -> end", f"{figures['db_mb_middle']:.1f} -> {figures['db_mb_end']:.1f} MB",
         f"{figures['db_end_over_middle']:.2f}x; max {figures['db_mb_max']:.1f} MB"),
        ("etcd database in use, middle -> end",
         f"{figures['db_in_use_mb_middle']:.1f} -> {figures['db_in_use_mb_end']:.1f} MB",
         f"{figures['db_in_use_end_over_middle']:.2f}x (target <= 1.2x); max {figures['db_in_use_mb_max']:.1f} MB"),
        ("throughput, start -> end (transitions/s)",
         f"{figures['transitions_per_s_start']:,.0f} -> {figures['transitions_per_s_end']:,.0f}",
         f"{figures['throughput_end_over_start']:.2f}x (target >= 0.9x); first tenth "
         f"{figures['transitions_per_s_first_tenth']:,.0f}/s"),
        ("worker memory, middle -> end", f"{figures['worker_rss_mb_middle']:.0f} -> "
         f"{figures['worker_rss_mb_end']:.0f} MB", f"{figures['worker_rss_end_over_middle']:.2f}x"),
        ("instances", f"{figures['instances_submitted']:,}",
         f"{figures['instances_succeeded']:,} succeeded, {figures['failed_or_cancelled']} failed or cancelled, "
         f"{figures['unaccounted']} unaccounted, {figures['left_running']} left running"),
    ]
    width = max(len(r[0]) for r in rows)
    head = (f"soak: {settings.seconds / 60:g} min, quota {settings.quota_mb} MB, retention {settings.retention}, "
            f"compaction retention {settings.compaction_retention}, {settings.workers} worker(s) x "
            f"{settings.concurrency}, backlog {settings.backlog}"
            + (f", {settings.rate:g} instances/s" if settings.rate else ", full speed"))
    return "\n".join([head, *(f"{a:<{width}}  {b:>22}  {c}" for a, b, c in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description="dsm soak benchmark", epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--minutes", type=float, default=defaults.seconds / 60)
    parser.add_argument("--quota-mb", type=int, default=defaults.quota_mb, help="etcd --quota-backend-bytes, in MB")
    parser.add_argument("--retention", default=defaults.retention, help="the machine's retention")
    parser.add_argument("--compaction-retention", default=defaults.compaction_retention)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--backlog", type=int, default=defaults.backlog, help="instances kept waiting")
    parser.add_argument("--sample", type=float, default=defaults.sample, help="seconds between samples")
    parser.add_argument("--rate", type=float, default=defaults.rate,
                        help="instances started per second (default: as fast as the workers go)")
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "soak.json")
    args = parser.parse_args()
    settings = Settings(seconds=args.minutes * 60, quota_mb=args.quota_mb, retention=args.retention,
                        compaction_retention=args.compaction_retention, workers=args.workers,
                        concurrency=args.concurrency, backlog=args.backlog, sample=args.sample, rate=args.rate)
    result = asyncio.run(soak(settings))
    figures = result.figures()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": asdict(settings), "figures": figures,
                                     "samples": [asdict(s) for s in result.samples]}, indent=2))
    print(table(figures, settings))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
