"""The worker: claim runnable tokens under a lease, tick, commit, repeat.

`Worker` is a facade: it builds parts that each own one thing, starts them and stops them. The
lease (`lease.py`), the work feed and its candidate queue (`feed.py`, `queue.py`), slots
(`slots.py`), the record cache (`cache.py`), what it admits (`admission.py`), the claims and their
audit (`claims.py`, `claiming.py`), the jobs that run ticks on the executor (`jobrunner.py`,
`jobs.py`, `dsm.executors`, `isolation/`), the committer (`committing.py`, over the pure
`dsm.commits`), its entry and heartbeat among live workers (`presence.py`) and the watch on the
other workers' heartbeats (`peers.py`). Whether it works (`health()`) is judged from what its
parts say of themselves (`health.py`, pure). Its options are one typed value (`WorkerConfig`).

Every commit is one transaction (batched with other instances' commits) that compares the
record's mod revision, its tokens' markers' mod revisions (a claim is the marker's value: any
other claim rewrites it) and the worker's own entry's lease, so a worker that lost its lease,
paused past it, or was overtaken never commits. When a claim or commit's answer is lost, the
worker re-reads and never blindly repeats; a claim applied after that re-read, with no job here,
is found by the claim audit (the markers that name us, from the feed's index) and given back. A
worker that stops revokes its lease, and its entry goes with it: the markers it still held are
orphaned work for the others at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .. import payloads
from ..definitions import Registry
from ..errors import PartFailed
from ..executors import Executor, ThreadExecutor
from ..housekeeping import Housekeeper
from ..keys import Keys, TokenRef
from ..markers import SYNC
from ..store import Store
from ..transition import Step
from .admission import Admission
from .cache import RecordCache
from .claiming import Claimer
from .claims import Claims
from .committing import Committer, HandOn
from .config import WorkerConfig
from .feed import WorkFeed
from .health import Health, Signs, judge
from .jobrunner import JobRunner
from .jobs import JobTable
from .lease import LeaseKeeper, release
from .meter import Meter
from .nospace import WriteGate
from .peers import Peers
from .presence import Presence
from .queue import CandidateQueue
from .slots import Slots
from .stats import WorkerStats

log = logging.getLogger("dsm.worker")
STOP_WAIT = 5.0  # seconds a stopping worker waits for its parts' tasks to end

# the worker's long-lived tasks, by name, as a line about one that stopped names them
PARTS = {"dsm-keepalive": "lease keeper", "dsm-feed": "watch feed", "dsm-dispatch": "dispatcher",
         "dsm-audit": "claim audit", "dsm-presence": "heartbeat", "dsm-peers": "peer watch"}
KEPT_WHILE_STOPPING = ("dsm-keepalive", "dsm-presence")  # alive, and seen so, while ticks finish


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """Runs ticks for every instance in a namespace that its registry can serve."""

    def __init__(self, store: Store, registry: Registry, config: WorkerConfig | None = None, *,
                 keys: Keys | None = None, executor: Executor | None = None, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic, on_commit: Callable[[Step], None] | None = None,
                 serves: Callable[[str], bool] | None = None, **options: Any):
        """`options`: fields of `WorkerConfig`, over `config` (or its defaults). `serves(instance id)`:
        which instances this worker may run (None: every one of the namespace)."""
        self.config = config = replace(config or WorkerConfig(), **options) if options else config or WorkerConfig()
        self.store = store
        self.registry = registry
        self.keys = keys = keys or registry.keys
        self.id = name = config.worker_id or default_worker_id()
        self.wall = wall
        self.clock = clock
        self.stats = WorkerStats()
        self.meter = Meter()  # by machine, for `dsm.metrics`
        self.stopping = False
        self.slots: Slots[TokenRef] = Slots(config.concurrency, config.waiting_room)
        self.lease = LeaseKeeper(store, config.lease_ttl, name=name, on_lost=self._lose_all, attach=self._attach,
                                 release=functools.partial(release, store, keys), clock=clock)
        self.queue: CandidateQueue[TokenRef] = CandidateQueue(clock, config.candidate_cap)
        self.records = RecordCache()
        self.jobs = JobTable()
        self.admission = Admission(registry, serves)
        self.feed = WorkFeed(store, keys, self.queue, name=name, admits=self.admission.admits, held=self.jobs.held,
                             wall=wall, page_size=config.page_size)
        self.gate = WriteGate(store, name=name)  # closed while etcd refuses writes (NOSPACE)
        self.executor: Executor = executor or ThreadExecutor(config.concurrency)
        self.claims = Claims(store, keys, name=name, records=self.records, queue=self.queue, feed=self.feed,
                             jobs=self.jobs, wall=wall, max_txn_ops=config.max_txn_ops)

        def committer(hand_on: HandOn) -> Committer:  # the tick runner's: its commits hand tokens on to it
            return Committer(store, keys, self.claims, config=config, name=name, hand_on=hand_on,
                             records=self.records, slots=self.slots, lease=self.lease, gate=self.gate,
                             meter=self.meter, stats=self.stats, wall=wall, clock=clock, on_commit=on_commit)

        limit = config.payload_limit if config.payload_limit is not None else payloads.default_limit()
        self.runner = JobRunner(store, keys, registry, self.executor, self.claims, name=name, commits=committer,
                                 jobs=self.jobs, admission=self.admission, records=self.records, slots=self.slots,
                                 queue=self.queue, wake=self.feed.changed, meter=self.meter, stats=self.stats,
                                 payload_limit=limit, run_ahead=config.run_ahead,
                                 offload_guards=config.offload_guards, wall=wall, clock=clock)
        self.claimer = Claimer(store, self.claims, self.runner, config=config, name=name, queue=self.queue,
                               slots=self.slots, feed=self.feed, gate=self.gate, lease=self.lease,
                               records=self.records, meter=self.meter, stats=self.stats, clock=clock)
        self.presence = Presence(store, keys, self.lease, registry, worker_id=name, concurrency=config.concurrency,
                                 in_flight=self.jobs.__len__, interval=config.presence_interval,
                                 heartbeat=config.lease_ttl / 3, stale_after=config.stale_after, wall=wall,
                                 clock=clock)
        self.peers = Peers(store, keys, name=name, own_key=self.presence.key, own_lease=lambda: self.lease.id,
                           healthy=self.presence.healthy, interval=config.lease_ttl / 2, clock=clock)
        self.housekeeper: Housekeeper | None = None  # when it stands in the housekeeping election (`running`)
        self._tasks: list[asyncio.Task] = []

    @property
    def concurrency(self) -> int:
        return self.config.concurrency

    @property
    def lease_id(self) -> int | None:
        return self.lease.id

    def health(self) -> Health:
        """Whether this worker works: its lease, its watch for work and its heartbeat are current
        (`health.py`). Only reads its parts, so any thread may ask (`dsm.healthz`)."""
        signs = Signs(lease_ready=self.lease.ready.is_set(), lease_renewed_at=self.lease.renewed_at,
                      lease_ttl=self.lease.ttl, watching=self.feed.watching,
                      heartbeat_at=self.presence.written_at,
                      heartbeat_window=self.presence.stale_after or self.lease.ttl, stopping=self.stopping)
        return judge(signs, self.clock())

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None, *, grace: float = 30.0) -> None:
        """Work until `stop` is set, then finish or release what is held and revoke the lease."""
        stop = stop or asyncio.Event()
        await self.lease.grant()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.lease.keep(), name="dsm-keepalive"),
                       loop.create_task(self.feed.run(), name="dsm-feed"),
                       loop.create_task(self.claimer.dispatch(), name="dsm-dispatch"),
                       loop.create_task(self.claimer.audit(), name="dsm-audit"),
                       loop.create_task(self.presence.run(), name="dsm-presence"),
                       loop.create_task(self.peers.run(), name="dsm-peers")]
        stopper = loop.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            ended = [task for task in self._tasks if task in done]
            if ended and not stop.is_set():  # a part ended by itself: the worker cannot go on without it
                task = ended[0]
                cause = asyncio.CancelledError() if task.cancelled() else task.exception()
                raise PartFailed(f"worker {self.id}", PARTS.get(task.get_name(), task.get_name()), cause) from cause
        finally:
            stopper.cancel()
            await self._shutdown(grace)

    async def _shutdown(self, grace: float) -> None:
        self.stopping = True
        self.lease.stop()
        self.claims.stop()
        self.claimer.stop()
        self.runner.stop()
        for task in self._tasks:
            if task.get_name() not in KEPT_WHILE_STOPPING:
                task.cancel()
        if self.jobs:
            log.info("worker %s: stopping, finishing %d tick(s) (up to %.0fs)", self.id, len(self.jobs), grace)
            try:
                await asyncio.wait_for(self.slots.idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("worker %s: %d tick(s) still running after %.0fs; releasing their claims",
                            self.id, len(self.jobs), grace)
        self.runner.cancel_all()
        await self.feed.close()  # a gRPC read may not pass a cancellation on: its stream is closed first
        for task in self._tasks:
            task.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=STOP_WAIT)
        if stuck:  # never let one part hold up the end of the worker (and the revoke of its lease)
            log.warning("worker %s: %s did not stop within %.0fs; going on", self.id,
                        ", ".join(sorted(t.get_name() for t in stuck)), STOP_WAIT)
        self.gate.close()
        await self.lease.revoke()
        self.executor.close()

    # -- what the lease asks of parts built after it ---------------------------------------------
    def _lose_all(self) -> None:
        """The lease is gone, and every claim with it."""
        self.runner.lose_all()

    async def _attach(self, lease: int) -> None:
        """A new lease carries the worker's entry before any claim (`lease.py`)."""
        await self.presence.attach(lease)


__all__ = ["SYNC", "Worker", "WorkerConfig", "WorkerStats", "default_worker_id"]
