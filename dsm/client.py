"""The client: how an application starts, reads, signals, cancels and waits for instances, and
keeps the schedules that start them.

    import dsm

    with dsm.Client(etcd="http://127.0.0.1:2379") as c:          # or dsm.Client(api=URL, token=...)
        c.start("definitions/order.yaml", payload={"total": 120}, id="order-42")
        record = c.wait("order-42", timeout=60)

`AsyncClient` has the calls as coroutines. `Client` has them as plain calls: it runs an
AsyncClient on an event loop in a thread of its own, so it works from any thread, also one whose
own event loop is running (a notebook, a sync view inside an async server).

One client, two transports with one behaviour (`transport.py`): etcd directly, or a `dsm api`
server over HTTP (`apiclient.py`), for applications that must not hold etcd credentials. Every
input is checked here, before either transport sees it, with the checks the store operations
make, so a refused id, payload, name or filter raises the same `InputError` with the same message
whichever the transport. `Client.embedded(PATH...)` runs the same client over an in-process store
with a worker of this process, for an application's own tests.

Records are the JSON of the instance record (`records.public_record`, what `dsm status --json`
prints) as plain dicts. Errors are dsm's: `NotFound` (unknown id or machine), `InputError` (a
refused id, payload, signal or action; `InstanceExists` for an id taken by another start,
`InvalidSignal` for a signal the instance's machine does not take),
`StoreUnavailable` (etcd or the API unreachable), `AccessDenied` (etcd's user or the API's token
refused), `Timeout` (`wait`).

Schedules (`dsm.schedules`) are plain dicts too, the JSON `/api/schedules` answers. A schedule is
checked here whole (`Spec.of`, as `dsm schedule create` and the API check it), so a bad one is
refused before anything is sent, with a `FieldError` (an InputError) naming the field;
`ScheduleExists` for a name taken, `NotFound` for an unknown schedule or machine.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import os
import re
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from . import compiler, index, loader, payloads, search
from .errors import DsmError, InputError, StoreUnavailable, Timeout
from .graph import Graph
from .keys import MACHINE_NAME, Keys, check_instance_id, check_machine_name, check_signal_name
from .operations import Operations, check_ids
from .records import MAX_REASON, STATUSES
from .schedules import CATCHUP_WINDOW, Spec, check_note, specs_of
from .schedules import check_name as check_schedule_name
from .store import Store
from .transport import EmbeddedTransport, OnHistory, OnUpdate, Record, StoreTransport, Transport

Definition = str | os.PathLike[str] | Graph
Since = str | float | int | datetime | None
Duration = str | float | int | timedelta  # seconds, text as the command line takes it (90s, 10m), or a timedelta
When = str | float | int | datetime  # an aware datetime (naive: UTC), epoch seconds, or text as `since` takes it
T = TypeVar("T")
_OPTION = re.compile(r"--(etcd|namespace|cacert|cert|key|user)\b")


# -- checks: the same for every transport ----------------------------------------------------------

def _payload(payload: Any) -> dict[str, Any]:
    try:
        return payloads.check({} if payload is None else payload)[0]
    except payloads.PayloadError as exc:
        raise InputError(str(exc)) from None


def _since(since: Since, now: float, *, what: str = "since") -> float | None:
    """Epoch seconds from a time (an aware datetime; a naive one is UTC), epoch seconds, or text
    as `dsm list --since` takes it (ISO 8601, or a duration back from now such as 30m). `what`:
    the argument, as messages name it."""
    if since is None:
        return None
    if isinstance(since, datetime):
        return (since if since.tzinfo is not None else since.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(since, (int, float)) and not isinstance(since, bool):
        try:
            datetime.fromtimestamp(since, timezone.utc)  # a time every transport can say
        except (OverflowError, ValueError, OSError):
            raise InputError(f"{what}: {since!r} is not a time (epoch seconds)") from None
        return float(since)
    if isinstance(since, str):
        try:
            return index.parse_since(since, now)
        except InputError as exc:
            raise InputError(str(exc).replace("--since", what)) from None
    raise InputError(f"{what}: a datetime, epoch seconds or text like 30m, not {since!r}")


def _where(where: dict[str, Any] | None) -> dict[str, str] | None:
    """Search attributes and the values they equal, as the texts the index holds (`dsm.search`)."""
    if where is None:
        return None
    if not isinstance(where, dict):
        raise InputError(f"where: a dict of search attributes (name -> value), not {where!r}")
    return search.check_where(where) or None


def _limit(limit: Any, *, most: int | None) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1 or (most is not None and limit > most):
        upto = f"from 1 to {most}" if most is not None else "of at least 1"
        raise InputError(f"limit must be a whole number {upto}, got {limit!r}")
    return limit


def _seconds(timeout: float | timedelta | None) -> float | None:
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise InputError(f"timeout: seconds (a number of at least 0) or a timedelta, not {timeout!r}")
    return float(timeout)


def _reason(reason: Any) -> str | None:
    if reason is not None and not isinstance(reason, str):
        raise InputError(f"reason must be a string, got {payloads.json_kind(reason)}")
    if reason is not None and len(reason) > MAX_REASON:
        raise InputError(f"reason is {len(reason)} characters; at most {MAX_REASON} are kept")
    return reason


def _outcome(outcome: Any) -> str | None:
    if outcome is not None and (not isinstance(outcome, str) or not outcome):
        raise InputError(f"signal outcome must be a non-empty label, got {outcome!r}")
    return outcome


@dataclass(frozen=True, slots=True)
class _Listing:
    """A listing's filters, checked, and how many instances it gives at most (None: all)."""

    status: str | None
    machine: str | None
    since: float | None
    where: dict[str, Any] | None
    total: int | None = None

    @staticmethod
    def of(status: str | None, machine: str | None, since: Since, where: dict[str, Any] | None,
           total: int | None = None) -> _Listing:
        if status is not None and status not in STATUSES:
            raise InputError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        if machine is not None:
            check_machine_name(machine)
        return _Listing(status, machine, _since(since, time.time()), _where(where),
                        None if total is None else _limit(total, most=None))

    def want(self, given: int) -> int:
        """How many instances to ask for next, `given` having been given."""
        return index.PAGE if self.total is None else min(index.PAGE, self.total - given)

    def done(self, given: int, cursor: str | None) -> bool:
        return cursor is None or (self.total is not None and given >= self.total)


def _definition_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            files.append(path)
            continue
        machines, _ = loader.definitions_in(path)
        if not machines:
            raise InputError(f"{path}: no machine definitions in this folder")
        files.extend(machines)
    return files


# -- the async client ------------------------------------------------------------------------------

class AsyncClient:
    """dsm's client, its calls as coroutines (see the module docstring; `Client` for plain calls).

    `AsyncClient(etcd=URLS, namespace="dsm", cacert=, cert=, key=, user=, password=, timeout=)`
    talks to etcd (URLS: one comma-separated string or a list; `password` defaults to
    DSM_ETCD_PASSWORD; `timeout`: seconds per etcd request). `AsyncClient(api=URL, token=,
    timeout=)` talks to a `dsm api` server (`timeout`: seconds per HTTP request). It connects on
    first use (or on `async with`) and belongs to the event loop it first ran on."""

    def __init__(self, etcd: str | Sequence[str] | None = None, namespace: str | None = None, *,
                 cacert: str | os.PathLike[str] | None = None, cert: str | os.PathLike[str] | None = None,
                 key: str | os.PathLike[str] | None = None, user: str | None = None, password: str | None = None,
                 api: str | None = None, token: str | None = None, timeout: float | None = None):
        if (etcd is None) == (api is None):
            raise InputError("give dsm's client etcd=URLS (etcd's endpoints) or api=URL (a dsm api server), "
                             "one of them")
        if api is not None:
            etcd_only = {"namespace": namespace, "cacert": cacert, "cert": cert, "key": key, "user": user,
                         "password": password}
            given = [name for name, value in etcd_only.items() if value is not None]
            if given:
                raise InputError(f"{', '.join(given)}: etcd's options; a client of a dsm api server serves the "
                                 "server's namespace with the server's credentials")
            from .apiclient import MISSING, available

            if not available():
                raise ImportError(MISSING)
            self._setup(functools.partial(_open_api, _api_url(api), token, timeout), where=f"api={api!r}")
            return
        from .store.etcd import EtcdOptions

        assert etcd is not None
        try:
            options = EtcdOptions.build(
                etcd, namespace=namespace if namespace is not None else "dsm",
                cacert=Path(cacert) if cacert is not None else None, cert=Path(cert) if cert is not None else None,
                key=Path(key) if key is not None else None, user=user,
                password=password if password is not None else (os.environ.get("DSM_ETCD_PASSWORD") if user else None),
                **({"timeout": float(timeout)} if timeout is not None else {}))
        except InputError as exc:  # said as the command line's options: say it as this call's arguments
            raise InputError(_OPTION.sub(r"\1", str(exc))) from None
        self._setup(functools.partial(_open_etcd, options),
                    where=f"etcd={options.display!r}, namespace={options.namespace!r}")

    def _setup(self, open_: Callable[[], Awaitable[Transport]], *, where: str, imports: bool = False) -> None:
        self._open = open_
        self._where = where
        self._imports = imports  # whether definitions given by file are compiled with their handlers
        self._transport: Transport | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self._compiled: dict[tuple[str, int, int], Graph] = {}

    @classmethod
    def embedded(cls, *paths: str | os.PathLike[str], workers: int = 4) -> AsyncClient:
        """A client over an in-process store, with a worker of this process running the instances
        (`workers` ticks at once): for an application's own tests. PATHs are definition files or
        folders of them (compiled now, with their handlers); `start` also takes other files, and
        machines by name. Nothing outlives the client."""
        graphs = [compiler.load(path) for path in _definition_files(paths)]
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"workers: a whole number of at least 1, not {workers!r}")
        client = cls.__new__(cls)
        client._setup(functools.partial(_open_embedded, graphs, workers), where="embedded", imports=True)
        return client

    @classmethod
    def over(cls, store: Store, keys: Keys | None = None, *, wall: Callable[[], float] = time.time) -> AsyncClient:
        """A client over a store the caller has opened, and closes (dsm's command line, tests)."""
        transport = StoreTransport(Operations(store, keys, wall=wall))
        client = cls.__new__(cls)
        client._setup(functools.partial(_ready, transport), where=f"namespace={transport.namespace!r}")
        client._transport = transport
        return client

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where})"

    @property
    def operations(self) -> Operations:
        """The store-level operations under a client over etcd or an in-process store, for dsm's
        own command line (operator views such as `dsm status`); not over the api transport."""
        if not isinstance(self._transport, StoreTransport):
            raise InputError(f"{self!r} has no store-level operations: it is not connected to a store")
        return self._transport.operations

    async def _connected(self) -> Transport:
        if self._transport is None:
            if self._closed:
                raise DsmError(f"{self!r} is closed")
            if self._connecting is None:
                self._connecting = asyncio.Lock()
            async with self._connecting:
                if self._transport is None:
                    self._transport = await self._open()
        self._transport.check()
        return self._transport

    async def _target(self, definition: Definition) -> tuple[str, Graph | None]:
        """(the machine, its definition compiled here when given by file; None: by name)."""
        if isinstance(definition, Graph):
            return definition.machine, definition
        if isinstance(definition, str) and MACHINE_NAME.fullmatch(definition):
            return definition, None
        if not isinstance(definition, (str, os.PathLike)):
            raise InputError(f"definition: a YAML file's path or a machine's name, not {definition!r}")
        path = Path(definition)
        if self._imports:  # handler modules are imported on the loop's thread, as the worker's are
            graph = self._compile(path)
        else:
            graph = await asyncio.to_thread(self._compile, path)
        return graph.machine, graph

    def _compile(self, path: Path) -> Graph:
        """A definition file compiled, once per version of the file (its size and modification time)."""
        try:
            stat = path.stat()
            key: tuple[str, int, int] | None = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = None  # the compiler says what is wrong with it
        graph = self._compiled.get(key) if key is not None else None
        if graph is None:
            graph = compiler.load(path, import_handlers=self._imports)
            if key is not None:
                self._compiled[key] = graph
        return graph

    # -- calls -------------------------------------------------------------------------------

    async def start(self, definition: Definition, payload: dict[str, Any] | None = None,
                    id: str | None = None) -> Record:
        """Start an instance; return its record. `definition`: a YAML file (registered, then
        started; any string that is not a machine's name is a path), or a machine's name (its
        newest registered definition). Starting an id that exists with the same definition and
        payload returns that instance and creates nothing (safe to retry); with another definition
        or payload it is refused (InstanceExists)."""
        checked = _payload(payload)
        if id is not None:
            check_instance_id(id)
        machine, graph = await self._target(definition)
        record, _ = await (await self._connected()).start(machine, checked, id, graph=graph)
        return record

    async def start_many(self, definition: Definition, payloads: Sequence[dict[str, Any]],
                         ids: Sequence[str | None] | None = None) -> builtins.list[str]:
        """Start one instance per payload (in batches, over etcd); return their ids, in order.
        `ids` names each (None: generated); an id that exists is handled as `start` does."""
        checked = [_payload(p) for p in payloads]
        if ids is not None:
            check_ids(ids, len(checked))
        machine, graph = await self._target(definition)
        return await (await self._connected()).start_many(machine, checked, ids, graph=graph)

    async def get(self, id: str) -> Record:
        """The instance's whole record, its history included (NotFound for an unknown id)."""
        check_instance_id(id)
        return await (await self._connected()).get(id)

    async def wait(self, id: str, timeout: float | timedelta | None = None, *,
                   on_history: OnHistory | None = None, on_update: OnUpdate | None = None) -> Record:
        """The whole record once the instance has finished (succeeded, failed or cancelled);
        `Timeout` when `timeout` seconds pass first (None: wait as long as it takes). Each
        committed transition goes to `on_history` (a history entry) as it commits, in order, then
        each new version of the record (without history) to `on_update`. Rides out a store or API
        that is briefly unreachable."""
        check_instance_id(id)
        seconds = _seconds(timeout)
        transport = await self._connected()
        try:
            return await asyncio.wait_for(transport.wait(id, on_history=on_history, on_update=on_update), seconds)
        except asyncio.TimeoutError:
            raise Timeout(f"instance {id!r} did not finish within {seconds:g}s") from None

    async def signal(self, id: str, name: str, payload: dict[str, Any] | None = None,
                     outcome: str | None = None) -> Record:
        """Send a signal: stored in the record at once (durable), consumed in the order sent by
        the state that waits for it; `payload` is merged into the instance's payload, `outcome`
        routes a signal state with `on`. Returns the record (without history). A finished or
        unknown instance is refused (InputError, NotFound) and nothing is written."""
        check_instance_id(id)
        check_signal_name(name)
        checked = _payload(payload)
        return await (await self._connected()).signal(id, name, checked, _outcome(outcome))

    async def cancel(self, id: str, reason: str | None = None) -> Record:
        """Cancel a running instance; the record (returned, without history) keeps who, when and
        why. An instance that has finished is returned as it is: look at its `status`."""
        check_instance_id(id)
        return await (await self._connected()).cancel(id, _reason(reason))

    async def redrive(self, id: str) -> Record:
        """Continue a failed or cancelled instance from the states that did not finish; returns
        the record (without history). One that succeeded, or ended in a failure terminal state, is
        refused (InputError)."""
        check_instance_id(id)
        return await (await self._connected()).redrive(id)

    async def delete(self, id: str) -> Record:
        """Delete a finished instance now (record, history and index entries); returns its
        summary. A running instance is refused (InputError): cancel it first."""
        check_instance_id(id)
        return await (await self._connected()).delete(id)

    async def page(self, status: str | None = None, machine: str | None = None, since: Since = None,
                   where: dict[str, Any] | None = None, after: str | None = None,
                   limit: int = index.PAGE) -> Record:
        """One page of the listing, for a paged view: `{"items": [summaries, newest first],
        "next": cursor or None}`; give `next` as `after` for the page that follows."""
        listing = _Listing.of(status, machine, since, where)
        return await self._page(listing, after, _limit(limit, most=index.MAX_PAGE))

    async def _page(self, listing: _Listing, after: str | None, limit: int) -> Record:
        if after is not None:
            if not isinstance(after, str):
                raise InputError(f"after: a cursor (the `next` of a page), not {after!r}")
            index.check_cursor(after)
        return await (await self._connected()).page(status=listing.status, machine=listing.machine,
                                                     since=listing.since, where=listing.where, after=after,
                                                     limit=limit)

    def list(self, status: str | None = None, machine: str | None = None, since: Since = None,
             where: dict[str, Any] | None = None, limit: int | None = None) -> AsyncIterator[Record]:
        """The summaries of the instances that match (records without history and payload),
        newest first, read page by page as the iteration goes: `async for s in client.list(...)`.
        `since`: a datetime, epoch seconds, or text (`2026-11-28T13:00:00Z`, `30m`); `where`:
        search attributes that must all equal their values; `limit`: at most this many."""
        return self._listing(_Listing.of(status, machine, since, where, limit))

    async def _listing(self, listing: _Listing) -> AsyncIterator[Record]:
        given, cursor = 0, None
        while True:
            page = await self._page(listing, cursor, listing.want(given))
            for item in page["items"]:
                yield item
                given += 1
            cursor = page["next"]
            if listing.done(given, cursor):
                return

    # -- schedules ---------------------------------------------------------------------------

    async def create_schedule(self, name: str, machine: str, *, cron: str | None = None,
                              every: Duration | None = None, timezone: str = "UTC",
                              payload: dict[str, Any] | None = None, overlap: str = "skip",
                              catchup_window: Duration = CATCHUP_WINDOW, jitter: Duration = 0,
                              start_at: When | None = None, end_at: When | None = None, paused: bool = False,
                              note: str | None = None) -> Record:
        """Create a schedule that starts `machine` (its newest registered definition) at each due
        time: `cron` (five fields or @daily and the like, read in `timezone`) or `every` (an
        interval), with `payload`, under the `overlap` policy (skip, buffer_one, allow_all,
        cancel_other); see the README's Schedules. Returns it as `describe_schedule` does.
        ScheduleExists when the name is taken, NotFound when the machine is not registered."""
        spec = Spec.of(name, {
            "machine": machine, "cron": cron, "every": every, "timezone": timezone, "payload": payload,
            "overlap": overlap, "catchup_window": catchup_window, "jitter": jitter, "start_at": start_at,
            "end_at": end_at, "paused": paused, "note": note})
        return await (await self._connected()).create_schedule(spec)

    async def apply_schedules(self, schedules: Sequence[dict[str, Any]], *,
                              prune: bool = False) -> dict[str, builtins.list[str]]:
        """Make the namespace's schedules match a list (as `dsm schedule apply`): each a dict of
        `name` and the fields `create_schedule` takes. All are checked, and their machines found,
        before any is written; then each is created, updated (its runs and counts kept) or left
        alone, and with `prune` the schedules the list does not name are deleted. Returns the
        names by what was done: {"created", "updated", "unchanged", "deleted"}."""
        checked = specs_of(schedules)
        if not isinstance(prune, bool):
            raise InputError(f"prune: True or False, not {prune!r}")
        return await (await self._connected()).apply_schedules(checked, prune)

    async def list_schedules(self) -> builtins.list[Record]:
        """The namespace's schedules, by name, each with its next due times and last runs."""
        return await (await self._connected()).list_schedules()

    async def describe_schedule(self, name: str) -> Record:
        """A schedule: what it is, its next 5 due times, its last 10 runs with their instances'
        statuses, and its counts (fires, skips, misses, triggers). NotFound for an unknown name."""
        check_schedule_name(name)
        return await (await self._connected()).describe_schedule(name)

    async def pause_schedule(self, name: str, note: str | None = None) -> Record:
        """Stop firing until unpaused (the due times between are not run); `note` says why.
        Returns the schedule as `describe_schedule` does."""
        check_schedule_name(name)
        return await (await self._connected()).pause_schedule(name, check_note(note))

    async def unpause_schedule(self, name: str) -> Record:
        """Fire again, from the next due time after now. Returns the schedule as described."""
        check_schedule_name(name)
        return await (await self._connected()).unpause_schedule(name)

    async def trigger_schedule(self, name: str) -> str:
        """Start one run now, whatever runs already; returns its instance id
        (`NAME-YYYYMMDDTHHMMSSZ-manual-N`: its own, never a due time's)."""
        check_schedule_name(name)
        return await (await self._connected()).trigger_schedule(name)

    async def backfill_schedule(self, name: str, start: When, end: When) -> builtins.list[str]:
        """Start now a run for every due time from `start` to `end` (both included; at most
        1,000); a due time whose run exists starts nothing. Returns the runs' ids, in order."""
        check_schedule_name(name)
        now = time.time()
        first, last = _since(start, now, what="start"), _since(end, now, what="end")
        if first is None or last is None:
            raise InputError("backfill: give start and end, the span of due times to run")
        if last < first:
            raise InputError(f"backfill of {name!r}: end is before start")
        return await (await self._connected()).backfill_schedule(name, first, last)

    async def delete_schedule(self, name: str) -> Record:
        """Delete a schedule (the instances it started stay); returns it as it was."""
        check_schedule_name(name)
        return await (await self._connected()).delete_schedule(name)

    async def close(self) -> None:
        """Close the connection (and stop an embedded client's worker); the client is done."""
        self._closed = True
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()

    async def __aenter__(self) -> AsyncClient:
        await self._connected()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def _ready(transport: Transport) -> Transport:
    return transport


async def _open_etcd(options: Any) -> Transport:
    from .store.etcd import EtcdStore

    try:
        store = await EtcdStore.connect(options)
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"etcd unreachable at {options.display}: {exc}") from None
    return StoreTransport(Operations(store, options.keys), owned=True)


async def _open_api(url: str, token: str | None, timeout: float | None) -> Transport:
    from .apiclient import ApiTransport

    return ApiTransport(url, token=token, timeout=timeout)


async def _open_embedded(graphs: builtins.list[Graph], workers: int) -> Transport:
    return await EmbeddedTransport.open(graphs, workers=workers)


def _api_url(url: Any) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"api: {url!r} is not a dsm api server's URL like http://127.0.0.1:8080")
    return url


# -- the sync client -------------------------------------------------------------------------------

class _LoopThread:
    """An event loop running in a daemon thread of its own, and calls into it from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="dsm-client", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a dsm.Client is called from its own event loop (in a wait callback?): the call "
                               "would wait for itself; call it from another thread, or use dsm.AsyncClient")
        if self.loop.is_closed():
            coro.close()
            raise DsmError("this dsm.Client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt and the like: the call stops too
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(30)
            if not self.thread.is_alive():
                self.loop.close()


class Client:
    """dsm's client, its calls as plain (blocking) calls; the same signatures as `AsyncClient`.

    `Client(etcd=URLS, namespace="dsm", cacert=, cert=, key=, user=, password=, timeout=)` or
    `Client(api=URL, token=, timeout=)`; `Client.embedded(PATH..., workers=4)` for tests. Runs
    an AsyncClient on an event loop in a thread of its own (one per Client), so it can be called
    from any thread, one with a running event loop included; calls from several threads at once
    share its connection. Use it as a context manager, or `close()` it."""

    def __init__(self, etcd: str | Sequence[str] | None = None, namespace: str | None = None, *,
                 cacert: str | os.PathLike[str] | None = None, cert: str | os.PathLike[str] | None = None,
                 key: str | os.PathLike[str] | None = None, user: str | None = None, password: str | None = None,
                 api: str | None = None, token: str | None = None, timeout: float | None = None):
        self._wrap(AsyncClient(etcd, namespace, cacert=cacert, cert=cert, key=key, user=user, password=password,
                               api=api, token=token, timeout=timeout))

    def _wrap(self, client: AsyncClient) -> None:
        self._async = client
        self._loop = _LoopThread()
        self._stop = weakref.finalize(self, self._loop.stop)  # a client dropped unclosed ends its thread

    @classmethod
    def embedded(cls, *paths: str | os.PathLike[str], workers: int = 4) -> Client:
        """A client over an in-process store, with a worker of this process running the instances
        (see `AsyncClient.embedded`): for an application's own tests."""
        client = cls.__new__(cls)
        client._wrap(AsyncClient.embedded(*paths, workers=workers))
        return client

    def __repr__(self) -> str:
        return f"Client({self._async._where})"

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)

    def start(self, definition: Definition, payload: dict[str, Any] | None = None, id: str | None = None) -> Record:
        return self._run(self._async.start(definition, payload, id))

    def start_many(self, definition: Definition, payloads: Sequence[dict[str, Any]],
                   ids: Sequence[str | None] | None = None) -> builtins.list[str]:
        return self._run(self._async.start_many(definition, payloads, ids))

    def get(self, id: str) -> Record:
        return self._run(self._async.get(id))

    def wait(self, id: str, timeout: float | timedelta | None = None, *, on_history: OnHistory | None = None,
             on_update: OnUpdate | None = None) -> Record:
        """As `AsyncClient.wait`; the callbacks run on the client's own thread."""
        return self._run(self._async.wait(id, timeout, on_history=on_history, on_update=on_update))

    def signal(self, id: str, name: str, payload: dict[str, Any] | None = None, outcome: str | None = None) -> Record:
        return self._run(self._async.signal(id, name, payload, outcome))

    def cancel(self, id: str, reason: str | None = None) -> Record:
        return self._run(self._async.cancel(id, reason))

    def redrive(self, id: str) -> Record:
        return self._run(self._async.redrive(id))

    def delete(self, id: str) -> Record:
        return self._run(self._async.delete(id))

    def page(self, status: str | None = None, machine: str | None = None, since: Since = None,
             where: dict[str, Any] | None = None, after: str | None = None, limit: int = index.PAGE) -> Record:
        return self._run(self._async.page(status, machine, since, where, after, limit))

    def list(self, status: str | None = None, machine: str | None = None, since: Since = None,
             where: dict[str, Any] | None = None, limit: int | None = None) -> Iterator[Record]:
        """As `AsyncClient.list`: a plain iterator that reads the next page when it needs it."""
        return self._listing(_Listing.of(status, machine, since, where, limit))

    def _listing(self, listing: _Listing) -> Iterator[Record]:
        given, cursor = 0, None
        while True:
            page = self._run(self._async._page(listing, cursor, listing.want(given)))
            for item in page["items"]:
                yield item
                given += 1
            cursor = page["next"]
            if listing.done(given, cursor):
                return

    def create_schedule(self, name: str, machine: str, *, cron: str | None = None, every: Duration | None = None,
                        timezone: str = "UTC", payload: dict[str, Any] | None = None, overlap: str = "skip",
                        catchup_window: Duration = CATCHUP_WINDOW, jitter: Duration = 0,
                        start_at: When | None = None, end_at: When | None = None, paused: bool = False,
                        note: str | None = None) -> Record:
        return self._run(self._async.create_schedule(
            name, machine, cron=cron, every=every, timezone=timezone, payload=payload, overlap=overlap,
            catchup_window=catchup_window, jitter=jitter, start_at=start_at, end_at=end_at, paused=paused, note=note))

    def apply_schedules(self, schedules: Sequence[dict[str, Any]], *,
                        prune: bool = False) -> dict[str, builtins.list[str]]:
        return self._run(self._async.apply_schedules(schedules, prune=prune))

    def list_schedules(self) -> builtins.list[Record]:
        return self._run(self._async.list_schedules())

    def describe_schedule(self, name: str) -> Record:
        return self._run(self._async.describe_schedule(name))

    def pause_schedule(self, name: str, note: str | None = None) -> Record:
        return self._run(self._async.pause_schedule(name, note))

    def unpause_schedule(self, name: str) -> Record:
        return self._run(self._async.unpause_schedule(name))

    def trigger_schedule(self, name: str) -> str:
        return self._run(self._async.trigger_schedule(name))

    def backfill_schedule(self, name: str, start: When, end: When) -> builtins.list[str]:
        return self._run(self._async.backfill_schedule(name, start, end))

    def delete_schedule(self, name: str) -> Record:
        return self._run(self._async.delete_schedule(name))

    def close(self) -> None:
        """Close the connection (and stop an embedded client's worker) and end the client's thread."""
        if not self._stop.alive:
            return
        try:
            self._run(self._async.close())
        finally:
            self._stop()

    def __enter__(self) -> Client:
        try:
            self._run(self._async._connected())
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
