"""The client's calls sent to a `dsm api` server over HTTP (the client's `api` transport).

For applications that must not hold etcd credentials: the server holds them, and the client
holds at most the API's token. Each call is one request to the route the API documents
(`api/openapi.py`); the server answers it with the same code as the etcd transport
(`transport.StoreTransport`), and its error answers `{"error": {"type", "message"}}` become the
exceptions that code raises, with their messages:

    404                   NotFound
    400, 409, 413, 422    InputError (409 InstanceExists: InstanceExists; 409 ScheduleExists: ScheduleExists;
                          422 InvalidSignal: InvalidSignal)
    401, 403              AccessDenied (no token, a wrong one, or a Host or origin refused)
    502, 503, 504         StoreUnavailable (the server's store, or the server, is unreachable)

and a server that cannot be reached is StoreUnavailable too.

Starting a definition given by its file sends the machine's name and the definition's digest:
the server starts that very definition if its namespace holds it, and refuses it (NotFound)
otherwise. It never stores definitions sent by clients: which definitions exist is for whoever
runs the workers (`dsm worker FILE`, `dsm submit`, `dsm api PATH` register them).

`wait` follows the instance's server-sent events (`GET /api/events?instance=ID`) rather than
polling its record: one connection, the end seen as it commits, and each committed transition
reported as it comes. A stream that breaks is opened again from the last event seen
(`Last-Event-ID`); the record is read whole once the instance has finished.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from .errors import (
    AccessDenied,
    DsmError,
    InputError,
    InstanceExists,
    InvalidSignal,
    NotFound,
    ScheduleExists,
    StoreUnavailable,
)
from .graph import Graph
from .records import FINISHED, timestamp
from .schedules import Spec
from .transport import OnHistory, OnUpdate, Record

try:
    import httpx
except ImportError:  # pragma: no cover - the client extra is not installed
    httpx = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MISSING = "dsm.Client(api=...) needs httpx: pip install 'dsm-workflow[client]'"
TIMEOUT = 30.0  # seconds a request may take, by default
STREAM_READ = 60.0  # seconds an event stream may stay silent (the server sends a comment every 15 s)
STORE_FAILED = "the store cannot serve this request: "  # how the API prefixes a store's error


def available() -> bool:
    return httpx is not None


def _path(value: str) -> str:
    return quote(value, safe="")


class ApiTransport:
    """The calls as HTTP requests to the `dsm api` server at `url` (see the module docstring)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float | None = None,
                 http: Any = None):
        if httpx is None:
            raise ImportError(MISSING)
        self.url = url.rstrip("/")
        self.timeout = TIMEOUT if timeout is None else timeout
        headers = {"user-agent": "dsm-client", "accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.http = http or httpx.AsyncClient(base_url=self.url, headers=headers, timeout=self.timeout)

    # -- requests ----------------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, body: Any = None, params: Any = None) -> Any:
        """The server's answer to one request; an error answer raised as the exception it stands for."""
        try:
            response = await self.http.request(method, path, json=body, params=params)
        except httpx.TimeoutException as exc:
            raise StoreUnavailable(f"dsm api at {self.url} did not answer in time ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"dsm api unreachable at {self.url}: {exc or type(exc).__name__}") from None
        if not response.is_success:
            raise self._error(response)
        return response

    async def _call(self, method: str, path: str, *, body: Any = None, params: Any = None) -> Any:
        return (await self._request(method, path, body=body, params=params)).json()

    def _error(self, response: Any) -> DsmError:
        """The dsm exception an error answer stands for (see the module docstring)."""
        status = response.status_code
        try:
            error = response.json()["error"]
            kind, message = str(error["type"]), str(error["message"])
        except (ValueError, KeyError, TypeError):  # not the API's JSON: a proxy's page, another server
            kind, message = "", f"dsm api at {self.url} answered {status} {response.reason_phrase}".rstrip()
        if status == 404:
            return NotFound(message)
        if status == 409 and kind == "InstanceExists":
            return InstanceExists(message)
        if status == 409 and kind == "ScheduleExists":
            return ScheduleExists(message)
        if status == 422 and kind == "InvalidSignal":
            return InvalidSignal(message)
        if status in (400, 409, 413, 422):
            return InputError(message)
        if status in (401, 403):
            hint = " (give dsm.Client its token: token=...)" if status == 401 else ""
            return AccessDenied(f"dsm api at {self.url} refused the request: {message}{hint}")
        if status in (502, 503, 504):
            return StoreUnavailable(message.removeprefix(STORE_FAILED))
        return DsmError(f"dsm api at {self.url} answered {status}: {message}")

    # -- calls -------------------------------------------------------------------------------

    async def start(self, machine: str, payload: dict[str, Any], instance_id: str | None, *,
                    graph: Graph | None = None, digest: str | None = None) -> tuple[Record, bool]:
        body: dict[str, Any] = {"payload": payload}
        if instance_id is not None:
            body["id"] = instance_id
        if graph is not None:
            machine, digest = graph.machine, graph.digest
        if digest is not None:
            body["digest"] = digest
        response = await self._request("POST", f"/api/machines/{_path(machine)}/instances", body=body)
        return response.json(), response.status_code == 201

    async def start_many(self, machine: str, payloads: Sequence[dict[str, Any]],
                         ids: Sequence[str | None] | None, *, graph: Graph | None = None) -> list[str]:
        out = []
        for n, payload in enumerate(payloads):
            record, _ = await self.start(machine, payload, ids[n] if ids is not None else None, graph=graph)
            out.append(record["id"])
        return out

    async def get(self, instance_id: str) -> Record:
        return await self._call("GET", f"/api/instances/{_path(instance_id)}")

    async def signal(self, instance_id: str, name: str, payload: dict[str, Any], outcome: str | None) -> Record:
        body: dict[str, Any] = {"payload": payload}
        if outcome is not None:
            body["outcome"] = outcome
        return await self._call("POST", f"/api/instances/{_path(instance_id)}/signals/{_path(name)}", body=body)

    async def cancel(self, instance_id: str, reason: str | None) -> Record:
        try:
            return await self._call("POST", f"/api/instances/{_path(instance_id)}/cancel",
                                    body={"reason": reason} if reason is not None else {})
        except InputError:
            # the API refuses to cancel a finished instance (409); the client answers it as it is,
            # as the store transport does
            record = await self.get(instance_id)
            if record["status"] not in FINISHED:
                raise
            record.pop("history", None)
            return record

    async def redrive(self, instance_id: str) -> Record:
        return await self._call("POST", f"/api/instances/{_path(instance_id)}/redrive", body={})

    async def delete(self, instance_id: str) -> Record:
        return await self._call("DELETE", f"/api/instances/{_path(instance_id)}")

    async def page(self, *, status: str | None, machine: str | None, since: float | None,
                   where: dict[str, Any] | None, after: str | None, limit: int) -> Record:
        params: list[tuple[str, str]] = [("limit", str(limit))]
        if status is not None:
            params.append(("status", status))
        if machine is not None:
            params.append(("machine", machine))
        if since is not None:
            params.append(("since", datetime.fromtimestamp(since, timezone.utc).isoformat()))
        if after is not None:
            params.append(("after", after))
        for name, value in (where or {}).items():
            params.append(("where", f"{name}:{value}"))  # texts already (`search.check_where`)
        return await self._call("GET", "/api/instances", params=params)

    # -- schedules: a spec is sent as its fields (`Spec.dump`, durations in seconds, times in epoch
    # seconds), which the server reads back into the same spec

    async def create_schedule(self, spec: Spec) -> Record:
        return await self._call("POST", "/api/schedules", body=spec.dump())

    async def apply_schedules(self, specs: Sequence[Spec], prune: bool) -> dict[str, list[str]]:
        return await self._call("PUT", "/api/schedules", body={"schedules": [spec.dump() for spec in specs],
                                                               "prune": prune})

    async def list_schedules(self) -> list[Record]:
        return (await self._call("GET", "/api/schedules"))["items"]

    async def describe_schedule(self, name: str) -> Record:
        return await self._call("GET", f"/api/schedules/{_path(name)}")

    async def pause_schedule(self, name: str, note: str | None) -> Record:
        return await self._call("POST", f"/api/schedules/{_path(name)}/pause",
                                body={"note": note} if note is not None else {})

    async def unpause_schedule(self, name: str) -> Record:
        return await self._call("POST", f"/api/schedules/{_path(name)}/unpause", body={})

    async def trigger_schedule(self, name: str) -> str:
        return (await self._call("POST", f"/api/schedules/{_path(name)}/trigger", body={}))["id"]

    async def backfill_schedule(self, name: str, start: float, end: float) -> list[str]:
        return (await self._call("POST", f"/api/schedules/{_path(name)}/backfill",
                                 body={"from": timestamp(start), "to": timestamp(end)}))["ids"]

    async def delete_schedule(self, name: str) -> Record:
        return await self._call("DELETE", f"/api/schedules/{_path(name)}")

    async def wait(self, instance_id: str, *, on_history: OnHistory | None = None,
                   on_update: OnUpdate | None = None) -> Record:
        follow = _Follow(instance_id, on_history, on_update)
        delay = 0.2
        while True:
            try:
                headers = {"last-event-id": follow.last_id} if follow.last_id is not None else {}
                timeout = httpx.Timeout(self.timeout, read=STREAM_READ)
                async with self.http.stream("GET", "/api/events", params={"instance": instance_id},
                                            headers={**headers, "accept": "text/event-stream"},
                                            timeout=timeout) as response:
                    if not response.is_success:
                        await response.aread()
                        raise self._error(response)
                    async for event, data, ident in _events(response):
                        delay = 0.2
                        if follow.take(event, data, ident) or (event == "resync" and follow.resync(
                                await self.get(instance_id))):
                            return await self._finished(follow)
                reason = "the event stream ended"
            except httpx.TransportError as exc:
                reason = str(exc) or type(exc).__name__
            except StoreUnavailable as exc:
                reason = str(exc)
            log.warning("waiting for instance %s: %s; following it again", instance_id, reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _finished(self, follow: _Follow) -> Record:
        record = await self.get(follow.instance_id)
        follow.report_history(record.get("history", []))
        return record

    def check(self) -> None:
        pass

    async def close(self) -> None:
        await self.http.aclose()


class _Follow:
    """What `wait` has seen of an instance's event stream, reporting as the store transport does:
    each committed transition once and in order, then the record that transition made. The
    stream's opening sends the record before the history that led to it, so a record is held
    until its history has come (`pending`)."""

    def __init__(self, instance_id: str, on_history: OnHistory | None, on_update: OnUpdate | None):
        self.instance_id = instance_id
        self.on_history = on_history
        self.on_update = on_update
        self.seen = 0  # the last history entry reported
        self.last_id: str | None = None
        self.pending: Record | None = None

    def take(self, event: str, data: str, ident: str | None) -> bool:
        """Take one event; True once the instance has finished."""
        if ident is not None:
            self.last_id = ident
        if event == "history":
            entry = json.loads(data)
            entry.pop("id", None)
            self.report_history([entry])
            return self.settle(waiting_for_history=True)
        if event == "deleted":
            raise NotFound(f"instance {self.instance_id!r} was deleted")
        finished = self.settle(waiting_for_history=False)
        if event == "instance":
            self.pending = json.loads(data)
            return self.settle(waiting_for_history=True)
        return finished

    def resync(self, record: Record) -> bool:
        """Events were lost: the record as read now stands for them."""
        self.report_history(record.pop("history", []))
        self.pending = record
        return self.settle(waiting_for_history=False)

    def report_history(self, entries: list[Record]) -> None:
        for entry in entries:
            if entry["seq"] > self.seen:
                self.seen = entry["seq"]
                if self.on_history is not None:
                    self.on_history(entry)

    def settle(self, *, waiting_for_history: bool) -> bool:
        """Report the pending record once its history has come (or anyway, when another event
        came first); True when it is finished."""
        record = self.pending
        if record is None or (waiting_for_history and self.seen < record.get("transitions", 0)):
            return False
        self.pending = None
        if self.on_update is not None:
            self.on_update(record)
        return record.get("status") in FINISHED


async def _events(response: Any) -> AsyncIterator[tuple[str, str, str | None]]:
    """(event, data, id) of each server-sent event; a comment alone (keep-alive) is ("", "", None)."""
    event, ident, comment = "", None, False
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event or "message", "\n".join(data), ident
            elif comment:
                yield "", "", None
            event, data, ident, comment = "", [], None, False
            continue
        if line.startswith(":"):
            comment = True
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            ident = value
