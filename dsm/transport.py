"""How the client's calls reach dsm, and how a store answers them.

A client (`dsm.client`) sends each call over one of two transports, which behave as one:

- `StoreTransport`: the instance operations (`dsm.operations`) and the schedules
  (`dsm.schedules`) over a store, etcd directly or the in-process store of an embedded client
  (`EmbeddedTransport`, which also runs a worker).
- `ApiTransport` (`apiclient.py`): HTTP requests to a `dsm api` server. The server answers each
  request with a `StoreTransport` of its own, and the client turns its error answers back into
  the exceptions that class raises, with their messages. So a call refused over HTTP is refused
  by the very code, in the very words, that refuse it over etcd.

Both speak the public JSON of the instance record (`records.public_record`): records, summaries
and history entries are plain dicts; a schedule is the JSON `/api/schedules` answers
(`Schedule.public`, with its runs' statuses where it is described). Input is checked by the
client before either transport sees it (`dsm.client`), so a refused id, payload, name or schedule
costs no round trip and reads the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from . import handlers, index
from .definitions import MachineInfo, Registry, newest
from .errors import InputError, NotFound
from .graph import Graph
from .housekeeping import HousekeepingOptions
from .keys import Keys
from .operations import Operations
from .records import public_record
from .schedules import Schedules, Spec
from .service import serving
from .store import Store
from .store.memory import MemoryStore

log = logging.getLogger(__name__)

Record = dict[str, Any]
OnHistory = Callable[[Record], None]
OnUpdate = Callable[[Record], None]


class Transport(Protocol):
    """What a client asks of dsm, in the public JSON. Inputs arrive checked (`dsm.client`)."""

    async def start(self, machine: str, payload: dict[str, Any], instance_id: str | None, *,
                    graph: Graph | None = None, digest: str | None = None) -> tuple[Record, bool]:
        """Start an instance of `graph` (a definition compiled here), of the definition `digest`
        of `machine` stored already, or else of the machine's newest definition; return its
        record and whether it was created (False: the id held this very start already)."""
        ...

    async def start_many(self, machine: str, payloads: Sequence[dict[str, Any]],
                         ids: Sequence[str | None] | None, *, graph: Graph | None = None) -> list[str]: ...

    async def get(self, instance_id: str) -> Record: ...

    async def wait(self, instance_id: str, *, on_history: OnHistory | None = None,
                   on_update: OnUpdate | None = None) -> Record:
        """The whole record once the instance has finished; each committed transition reported to
        `on_history` in order, then each new version of the record (without history) to `on_update`."""
        ...

    async def signal(self, instance_id: str, name: str, payload: dict[str, Any], outcome: str | None) -> Record: ...

    async def cancel(self, instance_id: str, reason: str | None) -> Record: ...

    async def redrive(self, instance_id: str) -> Record: ...

    async def delete(self, instance_id: str) -> Record: ...

    async def page(self, *, status: str | None, machine: str | None, since: float | None,
                   where: dict[str, Any] | None, after: str | None, limit: int) -> Record: ...

    # schedules (`dsm.schedules`): described as `describe_schedule` answers, unless said otherwise

    async def create_schedule(self, spec: Spec) -> Record: ...

    async def apply_schedules(self, specs: Sequence[Spec], prune: bool) -> dict[str, list[str]]:
        """The names by what was done: created, updated, unchanged, deleted (`prune`)."""
        ...

    async def list_schedules(self) -> list[Record]:
        """Every schedule of the namespace, by name (without its runs' statuses)."""
        ...

    async def describe_schedule(self, name: str) -> Record: ...

    async def pause_schedule(self, name: str, note: str | None) -> Record: ...

    async def unpause_schedule(self, name: str) -> Record: ...

    async def trigger_schedule(self, name: str) -> str:
        """The id of the run started."""
        ...

    async def backfill_schedule(self, name: str, start: float, end: float) -> list[str]:
        """The ids of the runs of the due times from `start` to `end`, started now or before."""
        ...

    async def delete_schedule(self, name: str) -> Record:
        """The schedule deleted, without next due times or runs' statuses."""
        ...

    def check(self) -> None:
        """Raise what stopped this transport for good (an embedded worker that failed)."""
        ...

    async def close(self) -> None: ...


class StoreTransport:
    """The client's calls answered by the instance operations over a store; `dsm api` answers
    each HTTP request with one of these too. `owned`: close the store with the transport."""

    def __init__(self, operations: Operations, *, owned: bool = False):
        self.operations = operations
        self.owned = owned
        # definitions read from the store are compiled without importing their handlers: starting
        # an instance runs no handler code (only workers import handlers)
        self.definitions = operations.definitions
        self.schedules = Schedules(operations, wall=operations.wall)

    @property
    def namespace(self) -> str:
        return self.operations.keys.namespace

    # -- definitions ---------------------------------------------------------------------------

    async def newest(self, machine: str) -> tuple[MachineInfo, Graph]:
        """The newest definition registered for a machine, compiled (NotFound when there is none)."""
        info = await newest(self.operations.store, self.operations.keys, machine)
        if info is None:
            raise NotFound(f"no machine {machine!r} is registered in namespace {self.namespace!r}")
        try:
            graph = await self.definitions.get(info.digest)
        except NotFound as exc:
            raise NotFound(f"machine {machine!r}: its newest definition cannot be read: {exc}") from None
        if graph.machine != machine:
            raise NotFound(f"machine {machine!r}: its pointer names a definition of machine {graph.machine!r} "
                           f"({info.digest})")
        return info, graph

    async def definition(self, machine: str, digest: str) -> Graph:
        """The definition `digest` of `machine`, as registered in the namespace. A digest that is
        not there is NotFound: it is never remembered as missing, so registering it later helps."""
        if await self.operations.store.get(self.operations.keys.definition(digest)) is None:
            raise NotFound(f"definition {digest} of machine {machine!r} is not registered in namespace "
                           f"{self.namespace!r}: the API starts only definitions stored there (a worker given "
                           "the file registers it, as 'dsm submit' and 'dsm api PATH' do)")
        try:
            graph = await self.definitions.get(digest)
        except NotFound as exc:
            raise NotFound(f"machine {machine!r}: definition {digest} cannot be read: {exc}") from None
        if graph.machine != machine:
            raise InputError(f"definition {digest} is a definition of machine {graph.machine!r}, not {machine!r}")
        return graph

    async def _graph(self, machine: str, graph: Graph | None, digest: str | None) -> Graph:
        if graph is not None:
            return graph
        if digest is not None:
            return await self.definition(machine, digest)
        return (await self.newest(machine))[1]

    # -- calls ---------------------------------------------------------------------------------

    async def start(self, machine: str, payload: dict[str, Any], instance_id: str | None, *,
                    graph: Graph | None = None, digest: str | None = None) -> tuple[Record, bool]:
        graph = await self._graph(machine, graph, digest)
        iid, created = await self.operations.start(graph, payload, instance_id=instance_id)
        if created:
            log.info("started instance %s of %s (%s)", iid, graph.machine, graph.digest)
        try:
            record = await self.operations.record(iid)
        except NotFound:  # it finished and its retention (0) deleted it already
            record = {"id": iid, "machine": graph.machine, "digest": graph.digest, "status": "deleted"}
        return record, created

    async def start_many(self, machine: str, payloads: Sequence[dict[str, Any]],
                         ids: Sequence[str | None] | None, *, graph: Graph | None = None) -> list[str]:
        graph = await self._graph(machine, graph, None)
        return await self.operations.submit_many(graph, payloads, ids=list(ids) if ids is not None else None)

    async def get(self, instance_id: str) -> Record:
        return await self.operations.record(instance_id)

    async def wait(self, instance_id: str, *, on_history: OnHistory | None = None,
                   on_update: OnUpdate | None = None) -> Record:
        inst = await self.operations.wait(
            instance_id, on_history=(lambda entry: on_history(entry.as_dict())) if on_history else None,
            on_update=(lambda now: on_update(public_record(now))) if on_update else None)
        return public_record(inst, await self.operations.history(instance_id, record=inst))

    async def signal(self, instance_id: str, name: str, payload: dict[str, Any], outcome: str | None) -> Record:
        return public_record(await self.operations.signal(instance_id, name, payload, outcome=outcome))

    async def cancel(self, instance_id: str, reason: str | None, *, by: str | None = None) -> Record:
        return public_record(await self.operations.cancel(instance_id, reason=reason, by=by))

    async def redrive(self, instance_id: str) -> Record:
        return public_record(await self.operations.redrive(instance_id))

    async def delete(self, instance_id: str) -> Record:
        return index.summary(await self.operations.delete(instance_id))

    async def page(self, *, status: str | None = None, machine: str | None = None, since: float | None = None,
                   where: dict[str, Any] | None = None, after: str | None = None, limit: int = index.PAGE) -> Record:
        page = await self.operations.page(status=status, machine=machine, since=since, where=where, after=after,
                                          limit=limit)
        return {"items": [index.summary(inst) for inst in page.items], "next": page.next}

    async def create_schedule(self, spec: Spec) -> Record:
        await self.schedules.create(spec)
        return await self.schedules.describe(spec.name)

    async def apply_schedules(self, specs: Sequence[Spec], prune: bool) -> dict[str, list[str]]:
        return await self.schedules.apply(list(specs), prune=prune)

    async def list_schedules(self) -> list[Record]:
        now = self.operations.wall()
        return [sched.public(now) for sched in await self.schedules.all()]

    async def describe_schedule(self, name: str) -> Record:
        return await self.schedules.describe(name)

    async def pause_schedule(self, name: str, note: str | None) -> Record:
        await self.schedules.pause(name, note)
        return await self.schedules.describe(name)

    async def unpause_schedule(self, name: str) -> Record:
        await self.schedules.unpause(name)
        return await self.schedules.describe(name)

    async def trigger_schedule(self, name: str) -> str:
        return await self.schedules.trigger(name)

    async def backfill_schedule(self, name: str, start: float, end: float) -> list[str]:
        return await self.schedules.backfill(name, start, end)

    async def delete_schedule(self, name: str) -> Record:
        return (await self.schedules.delete(name)).public(self.operations.wall(), upcoming=0)

    def check(self) -> None:
        pass

    async def close(self) -> None:
        if self.owned:
            await self.operations.store.close()


class EmbeddedTransport(StoreTransport):
    """The calls over an in-process store, with a worker of this process running the instances
    (`dsm.worker.running`): an application's own tests, with the client they use in production.
    Handlers are the application's own code, so definitions given to `start` by their file are
    compiled with their handlers and served by the worker at once."""

    def __init__(self, operations: Operations, stop: asyncio.Event):
        super().__init__(operations, owned=True)
        self.registry: Registry | None = None  # the worker's, once it runs
        self._stop = stop
        self._worker: asyncio.Task | None = None

    @classmethod
    async def open(cls, graphs: Sequence[Graph], *, workers: int = 4) -> EmbeddedTransport:
        store: Store = MemoryStore()
        keys = Keys()
        transport = cls(Operations(store, keys), asyncio.Event())
        started = asyncio.get_running_loop().create_future()

        async def serve() -> None:
            async with serving(store, keys, graphs, concurrency=max(1, workers), allow=handlers.ANY, grace=5,
                               stop=transport._stop, housekeeping=HousekeepingOptions(),
                               offload_guards=False) as service:
                transport.registry = service.registry
                started.set_result(None)
                await transport._stop.wait()

        transport._worker = asyncio.get_running_loop().create_task(serve(), name="dsm-embedded-worker")
        transport._worker.add_done_callback(lambda task: None if started.done() else started.set_result(None))
        await started
        transport.check()
        return transport

    async def start(self, machine: str, payload: dict[str, Any], instance_id: str | None, *,
                    graph: Graph | None = None, digest: str | None = None) -> tuple[Record, bool]:
        if graph is not None and self.registry is not None:
            self.registry.add(graph)
        return await super().start(machine, payload, instance_id, graph=graph, digest=digest)

    async def start_many(self, machine: str, payloads: Sequence[dict[str, Any]],
                         ids: Sequence[str | None] | None, *, graph: Graph | None = None) -> list[str]:
        if graph is not None and self.registry is not None:
            self.registry.add(graph)
        return await super().start_many(machine, payloads, ids, graph=graph)

    def check(self) -> None:
        task = self._worker
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def close(self) -> None:
        self._stop.set()
        try:
            if self._worker is not None:
                await asyncio.gather(self._worker, return_exceptions=True)
        finally:
            await super().close()
