"""Prometheus metrics of a worker: `dsm worker --metrics-port P` serves them on `/metrics`.

The worker counts in plain numbers (`dsm.worker.meter`, its lease keeper, write gate, store and
housekeeper); `WorkerCollector` turns them into metric families when it is scraped, so the hot
path never touches prometheus_client. Each worker has a registry of its own (`registry()`), so
several workers in one process serve their own numbers. The server (`serving()`, `dsm.wsgi`) is
prometheus_client's WSGI server on a thread of its own, bound to 127.0.0.1 unless told otherwise:
a scrape never waits for the worker's event loop, and never holds it up. The same port answers
`/healthz` (`dsm.healthz`), so a probe can use it when there is no health port of its own.

Every metric is described in the README (Metrics), with a sample scrape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import healthz, wsgi
from .histogram import Histogram
from .version import __version__

if TYPE_CHECKING:
    from .worker import Worker

PATH = "/metrics"


class WorkerCollector(Collector):
    """A worker's numbers as metric families, read at scrape time (see the module docstring)."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def collect(self) -> Iterable[Any]:
        w, m = self.worker, self.worker.meter
        info = InfoMetricFamily("dsm_worker", "This worker: its id (as `dsm workers` lists it), namespace and "
                                "dsm's version.")
        info.add_metric([], {"worker": w.id, "namespace": w.keys.namespace, "version": __version__})
        yield info
        yield GaugeMetricFamily("dsm_worker_slots", "Ticks this worker runs at once (--concurrency).",
                                value=w.concurrency)
        yield _by_machine(CounterMetricFamily, "dsm_transitions", "Transitions committed by this worker.",
                          m.transitions)
        ticks = CounterMetricFamily("dsm_ticks", "Tick attempts ended, by outcome: ok, error (the handler raised "
                                    "or returned something invalid), timeout, abandoned (the instance was "
                                    "cancelled or failed elsewhere, the claim was lost, or the worker stopped).",
                                    labels=["machine", "outcome"])
        for (machine, outcome), count in sorted(list(m.ticks.items())):
            ticks.add_metric([machine, outcome], count)
        yield ticks
        yield _histogram("dsm_tick_seconds", "How long tick attempts ran.", m.tick_seconds)
        yield _histogram("dsm_commit_seconds", "Commit latency: from sending a commit's transaction to etcd's "
                         "answer (batching included).", m.commit_seconds)
        yield _by_machine(CounterMetricFamily, "dsm_commit_conflicts",
                          "Commits not applied because the record changed or a claim was lost (then re-read).",
                          m.conflicts)
        yield _by_machine(CounterMetricFamily, "dsm_claims", "Tokens claimed by this worker.", m.claims)
        yield _by_machine(CounterMetricFamily, "dsm_claims_lost",
                          "Claims found gone when their commit was sent (lease expired or revoked, or taken "
                          "back by a peer); another worker runs the tick again.", m.lost)
        yield CounterMetricFamily("dsm_claims_given_back", "Claims under this worker's lease found with no job "
                                  "by the claim audit, and given back.", value=w.stats.given_back)
        yield _by_machine(GaugeMetricFamily, "dsm_ticks_in_flight", "Tick attempts running now.", m.in_flight)
        yield GaugeMetricFamily("dsm_queue_depth", "Runnable tokens this worker knows of and has not claimed "
                                "(due now, or waiting for a timer or a retry's backoff).", value=len(w.queue))
        yield GaugeMetricFamily("dsm_claimed_waiting", "Tokens claimed by this worker (kept from its own "
                                "commits) that wait for a free slot.", value=w.slots.waiting)
        yield _by_machine(CounterMetricFamily, "dsm_instances_started",
                          "Instances that started here: the first commit of their first attempt (succeeded or "
                          "not) was this worker's.", m.started)
        finished = CounterMetricFamily("dsm_instances_finished", "Instances that ended in a commit of this worker, "
                                       "by status (succeeded, failed; cancelling is counted nowhere: any client "
                                       "does it).", labels=["machine", "status"])
        for (machine, status), count in sorted(list(m.finished.items())):
            finished.add_metric([machine, status], count)
        yield finished
        yield CounterMetricFamily("dsm_lease_renewals", "Keep-alives of this worker's lease that went through.",
                                  value=w.lease.renewals)
        yield CounterMetricFamily("dsm_leases_lost", "Leases this worker found gone (expired, revoked) and "
                                  "replaced; every claim under them went with them.", value=w.lease.losses)
        errors = CounterMetricFamily("dsm_etcd_errors", "Errors etcd answered (or the connection gave) to this "
                                     "worker's requests, by type: StoreUnavailable, NoSpace, LeaseLost, Compacted, "
                                     "AccessDenied, TxnRejected, StoreError.", labels=["error"])
        for error, count in sorted(list(getattr(w.store, "errors", {}).items())):  # the etcd store counts them
            errors.add_metric([error], count)
        yield errors
        alarm = GaugeMetricFamily("dsm_etcd_alarm", "1 while etcd refuses this worker's writes for its alarm "
                                  "(NOSPACE: the database is over its quota), else 0.", labels=["alarm"])
        alarm.add_metric(["NOSPACE"], 1 if w.gate.closed else 0)
        yield alarm
        yield CounterMetricFamily("dsm_etcd_writes_refused", "Writes etcd refused for lack of space (NOSPACE).",
                                  value=w.gate.refusals)
        keeper = w.housekeeper
        yield GaugeMetricFamily("dsm_housekeeper", "1 while this worker holds the housekeeping election "
                                "(retention and compaction), else 0.", value=1 if keeper and keeper.leader else 0)
        yield CounterMetricFamily("dsm_instances_expired", "Finished instances this worker deleted past their "
                                  "retention.", value=keeper.stats.deleted if keeper else 0)
        runs = CounterMetricFamily("dsm_schedule_runs", "Due times of schedules this worker handled as "
                                   "housekeeper, by what was done: started (fires), skipped (by the overlap "
                                   "policy), buffered, missed (beyond the catch-up window, while no worker ran).",
                                   labels=["schedule", "action"])
        for (schedule, action), count in sorted(list(keeper.stats.schedules.items()) if keeper else []):
            runs.add_metric([schedule, action], count)
        yield runs
        if keeper is not None:
            yield _histogram("dsm_schedule_lateness_seconds", "How late schedules' runs started after their due "
                             "time (jitter included).", {"": keeper.stats.lateness}, label=None)


def _by_machine(kind: Any, name: str, documentation: str, counts: dict[str, int]) -> Any:
    family = kind(name, documentation, labels=["machine"])
    for machine, count in sorted(list(counts.items())):
        family.add_metric([machine], count)
    return family


def _histogram(name: str, documentation: str, histograms: dict[str, Histogram],
               label: str | None = "machine") -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label] if label else [])
    for machine, histogram in sorted(list(histograms.items())):
        counts, total = list(histogram.counts), histogram.sum
        buckets, seen = [], 0
        for bound, count in zip((*histogram.bounds, float("inf")), counts):
            seen += count
            buckets.append((floatToGoString(bound), seen))
        family.add_metric([machine] if label else [], buckets, sum_value=total)
    return family


def registry(worker: Worker) -> CollectorRegistry:
    """A registry of the worker's metrics and its process's (CPU, memory, Python version)."""
    reg = CollectorRegistry()
    reg.register(WorkerCollector(worker))
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    return reg


@dataclass
class MetricsServer:
    host: str
    port: int  # the port bound (the one asked for, or the one given for 0)

    @property
    def url(self) -> str:
        return wsgi.Address(self.host, self.port).url(PATH)


@contextmanager
def serving(worker: Worker, host: str = "127.0.0.1", port: int = 0) -> Iterator[MetricsServer]:
    """Serve the worker's metrics on http://HOST:PORT/metrics, and its health on /healthz (port 0:
    any free port) while the block runs. OSError when the address cannot be bound."""
    metrics = make_wsgi_app(registry(worker))
    health = healthz.app(worker)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO")
        if path == PATH:
            return metrics(environ, start_response)
        if path == healthz.PATH:
            return health(environ, start_response)
        return wsgi.plain(start_response, "404 Not Found",
                          f"dsm serves its metrics on {PATH} and its health on {healthz.PATH}\n")

    with wsgi.serving(app, host, port, name=f"dsm-metrics-{worker.id}") as address:
        yield MetricsServer(address.host, address.port)
