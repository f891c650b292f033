"""A worker's options: one frozen value, read by the parts that each need a few of them.

Temporal's worker takes a typed config beside its collaborators; so does `Worker`: the store,
the registry, the executor, the clocks and the callbacks are things it talks to and are passed
as such; everything here is plain data, with its default.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..markers import MAX_TXN_OPS
from .defaults import DEFAULT_CONCURRENCY, DEFAULT_RUN_AHEAD


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    concurrency: int = DEFAULT_CONCURRENCY  # ticks in flight at once
    lease_ttl: float = 10.0  # seconds: the lease every claim is bound to
    worker_id: str | None = None  # default: host:pid
    payload_limit: int | None = None  # bytes of a tick's payload (default: `payloads.default_limit()`)
    max_record_bytes: int = 1_400_000  # an instance record larger than this fails its commit
    candidate_cap: int = 10_000  # candidates the queue holds; the rest wait in the store (`queue.py`)
    page_size: int = 1000  # markers read a page when the feed scans the store
    sweep_interval: float = 30.0  # seconds idle before a look over every marker (a safety net)
    run_ahead: int = DEFAULT_RUN_AHEAD  # ticks a token runs along a line before one commit (1: a commit each)
    batch_ops: int = 64  # operations of claims, or of commits, sent in one batch (`batching.py`)
    prefetch: int | None = None  # tokens claimed by commits that may wait for a slot (default: concurrency)
    audit_interval: float | None = None  # seconds between claim audits (default: lease_ttl)
    max_txn_ops: int = MAX_TXN_OPS  # operations etcd takes in one transaction
    # Guards are definition code: each evaluation is budgeted (dsm.guards), but a commit may
    # evaluate many, so commits of machines with guards are planned on a thread, off the loop
    # that keeps the lease. Embedded runs, whose definitions are the user's own, skip the hop.
    offload_guards: bool = True
    presence_interval: float = 5.0  # seconds between looks at whether the worker's entry changed
    dead_after: float | None = None
    """`dead_after`: seconds this worker's heartbeat may go unwritten before the other workers
    take it for dead, whatever its lease says (default twice `lease_ttl`; 0: never, trust the
    lease alone). It is rewritten every third of `lease_ttl` (`presence.py`, `peers.py`)."""

    @property
    def waiting_room(self) -> int:
        """Claimed tokens that may wait for a slot: `prefetch`, or `concurrency`."""
        return self.concurrency if self.prefetch is None else self.prefetch

    @property
    def audit_every(self) -> float:
        return self.audit_interval if self.audit_interval is not None else self.lease_ttl

    @property
    def stale_after(self) -> float | None:
        """What the worker's entry promises: seconds it may go unwritten (None: no promise)."""
        dead_after = 2 * self.lease_ttl if self.dead_after is None else self.dead_after
        return dead_after or None
