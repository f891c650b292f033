"""The HTTP API: the client's calls as JSON over HTTP, and the dashboard's static files.

`create_app(store, keys)` builds a Starlette application over a store (etcd, or a memory store
with workers beside it). It runs nothing itself: instances are run by workers, wherever they are.
Routes (the OpenAPI document, `openapi.py`, describes each):

    GET    /api/instances?status=&machine=&since=&limit=&after=   a page of summaries, newest first
    GET    /api/instances/{id}                  the whole record, history included
    GET    /api/instances/{id}/graph            its machine drawn, its path and active states marked, and
                                                the signals it takes
    POST   /api/machines/{machine}/instances    start the machine's newest definition (or one by digest)
    POST   /api/instances/{id}/signals/{name}   send a signal
    POST   /api/instances/{id}/cancel           cancel
    POST   /api/instances/{id}/redrive          redrive
    DELETE /api/instances/{id}                  delete a finished instance
    GET    /api/machines                        registered machines
    GET    /api/machines/{machine}              one machine with its drawing
    GET    /api/workers                         live workers
    GET    /api/schedules                       schedules (`dsm.schedules`); POST creates one; PUT applies a list
                                                of them (created or updated to match, as `dsm schedule apply`)
    GET    /api/schedules/{name}                one, with its next due times and last runs; PUT creates or
                                                updates it to match (as `dsm schedule apply`); DELETE
    POST   /api/schedules/{name}/pause|unpause|trigger|backfill
    GET    /api/events                          server-sent events (`events.py`)
    GET    /api/openapi.json                    the OpenAPI document
    GET    /                                    the dashboard (static/index.html), /static/...

Each request is answered by the client's store transport (`transport.StoreTransport`), the code
that answers the client's calls over etcd, so a client over HTTP (`apiclient.py`) and one over
etcd meet the same refusals in the same words; the handlers here check the request and choose
the status. Starting an instance reads the machine's newest definition from the store, or the
definition named by `digest` (a client starting a file it holds: refused with 404 when the
namespace does not hold it, as the API stores no definitions sent to it), and compiles it
without importing its handler modules: the API runs no handler code, ever.
Every error answers `{"error": {"type", "message"}}`; input is checked before anything is
written, and each write is one of the client's transactions, so a refused request writes nothing.
Who may do what: `access.py`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.staticfiles import StaticFiles

from .. import index, payloads, render, search
from ..definitions import machines
from ..errors import InputError, InstanceExists, InvalidSignal, NotFound, ScheduleExists, StoreError
from ..graph import DIGEST, Graph
from ..keys import Keys, check_instance_id, check_machine_name, check_signal_name
from ..operations import Operations
from ..records import CANCELLED, MAX_REASON, STATUSES
from ..schedules import MAX_NOTE, SPEC_FIELDS, FieldError, Spec, specs_of
from ..schedules import check_name as check_schedule_name
from ..store import Store
from ..transport import StoreTransport
from . import events, openapi
from .access import AccessCheck

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_LIMIT = 50  # instances per page when the request does not say
MAX_LIMIT = index.MAX_PAGE
BODY_SLACK = 64 * 1024  # bytes a request body may have beyond the payload limit (its other fields, spacing)


class ApiError(Exception):
    """An answer other than success: its status, its error type and a message saying what is wrong."""

    def __init__(self, status: int, type_: str, message: str):
        self.status = status
        self.type = type_
        super().__init__(message)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def conflict(message: str) -> ApiError:
    return ApiError(409, "Conflict", message)


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclass
class Api:
    """The routes' state: the store, the client's calls over it, and definitions read (never imported)."""

    store: Store
    keys: Keys
    wall: Callable[[], float] = time.time
    heartbeat: float = events.HEARTBEAT
    body_limit: int = field(default_factory=lambda: payloads.default_limit() + BODY_SLACK)
    streams: events.Streams = field(default_factory=events.Streams)
    token_required: bool = False  # actions need the bearer token: the document says so

    def __post_init__(self) -> None:
        self.calls = StoreTransport(Operations(self.store, self.keys, wall=self.wall))
        self.operations = self.calls.operations  # the reads the client has no call for (graph, events, workers)

    def close(self) -> None:
        """End the open event streams (a server that stops waits for open answers)."""
        self.streams.close()

    # -- helpers -----------------------------------------------------------------------------

    async def body(self, request: Request, fields: tuple[str, ...]) -> dict[str, Any]:
        """The request's JSON object (an empty body is `{}`), with no fields but `fields`."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.body_limit:
            raise self._too_large(int(length))
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.body_limit:
                raise self._too_large(len(raw))
        if not raw.strip():
            return {}
        try:
            value = json.loads(bytes(raw), parse_constant=_reject_constant)
        except ValueError as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise bad_request("the request body is nested too deeply") from None
        if not isinstance(value, dict):
            raise bad_request(f"the request body must be a JSON object, got {payloads.json_kind(value)}")
        unknown = sorted(set(value) - set(fields))
        if unknown:
            expected = ", ".join(fields) if fields else "no fields"
            raise bad_request(f"unknown field {unknown[0]!r} in the request body (expected {expected})")
        return value

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, "PayloadTooLarge", f"the request body is {size} bytes or more; the limit is "
                        f"{self.body_limit} bytes (the payload limit, DSM_PAYLOAD_LIMIT, and {BODY_SLACK} more)")

    @staticmethod
    def payload(value: Any, what: str = "payload") -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad_request(f"{what} must be a JSON object, got {payloads.json_kind(value)}")
        try:
            return payloads.check(value)[0]
        except payloads.PayloadError as exc:
            if exc.kind == "PayloadTooLarge":
                raise ApiError(413, "PayloadTooLarge", f"{what}: {exc}") from None
            raise bad_request(f"{what}: {exc}") from None

    @staticmethod
    def path_param(request: Request, name: str, check: Callable[[object], str]) -> str:
        """A path parameter as `check` takes it; 400 saying what it may be otherwise."""
        try:
            return check(request.path_params[name])
        except InputError as exc:
            raise bad_request(str(exc)) from None

    def instance_id(self, request: Request) -> str:
        return self.path_param(request, "id", check_instance_id)

    def machine_name(self, request: Request) -> str:
        return self.path_param(request, "machine", check_machine_name)

    async def graph_of(self, digest: str) -> Graph:
        """A definition by digest, compiled without importing its handlers."""
        return await self.calls.definitions.get(digest)

    # -- reads -------------------------------------------------------------------------------

    async def list_instances(self, request: Request) -> Response:
        q = request.query_params
        unknown = sorted(set(q) - {"status", "machine", "since", "limit", "after", "where"})
        if unknown:
            raise bad_request(f"unknown query parameter {unknown[0]!r} (expected status, machine, since, limit, "
                              "after, where)")
        status = q.get("status") or None
        if status is not None and status not in STATUSES:
            raise bad_request(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        machine = q.get("machine") or None
        try:
            if machine is not None:
                check_machine_name(machine)
            since = index.check_since(q["since"], self.wall()) if q.get("since") else None
            after = index.check_cursor(q["after"]) if q.get("after") else None
        except InputError as exc:
            raise bad_request(str(exc).replace("--since", "since")) from None
        limit = DEFAULT_LIMIT
        if q.get("limit"):
            text = q["limit"]
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
                raise bad_request(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {text!r}")
            limit = int(text)
        try:
            where = search.parse_where([given for given in q.getlist("where") if given], ":", "where")
        except InputError as exc:
            raise bad_request(str(exc)) from None
        page = await self.calls.page(status=status, machine=machine, since=since, where=where or None, after=after,
                                     limit=limit)
        return JSONResponse(page)

    async def get_instance(self, request: Request) -> Response:
        return JSONResponse(await self.calls.get(self.instance_id(request)))

    async def get_graph(self, request: Request) -> Response:
        iid = self.instance_id(request)
        inst = await self.operations.instance(iid)
        history = await self.operations.history(iid, record=inst)
        try:
            graph = await self.graph_of(inst.digest)
        except NotFound as exc:
            raise ApiError(404, "NotFound", f"instance {iid}: its definition cannot be read: {exc}") from None
        trace = render.Trace.of(((h.state, h.next) for h in history), active=inst.active, final=inst.state,
                                failed_at=inst.error.state if inst.error else None)
        return JSONResponse({"id": iid, "status": inst.status, "mermaid": render.mermaid_marked(graph, trace),
                             **render.as_json(graph, trace), "signals": _signals(graph)})

    async def list_machines(self, request: Request) -> Response:
        return JSONResponse({"items": [m.as_dict() for m in await machines(self.store, self.keys)]})

    async def get_machine(self, request: Request) -> Response:
        info, graph = await self.calls.newest(self.machine_name(request))
        return JSONResponse({**info.as_dict(), "mermaid": render.mermaid(graph), "graph": render.as_json(graph),
                             "signals": _signals(graph)})

    async def list_workers(self, request: Request) -> Response:
        found = await self.operations.workers()
        return JSONResponse({"items": [w.as_dict() for w in found], "alarms": await self.operations.alarms()})

    async def get_events(self, request: Request) -> Response:
        unknown = sorted(set(request.query_params) - {"instance"})
        if unknown:
            raise bad_request(f"unknown query parameter {unknown[0]!r} (expected instance)")
        instance = request.query_params.get("instance") or None
        try:
            last_id = events.parse_last_id(request.headers.get("last-event-id"))
            if instance is not None:
                check_instance_id(instance)
        except InputError as exc:  # refused before the stream starts: a 400, not a stream that breaks
            raise bad_request(str(exc)) from None
        if instance is not None:
            await self.operations.instance(instance)  # NotFound: 404 now rather than a silent stream
        body = events.stream(self.store, self.keys, self.streams, instance=instance, last_id=last_id,
                             heartbeat=self.heartbeat,
                             history=lambda iid, after, record: self.operations.history(iid, after=after,
                                                                                       record=record))
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def get_openapi(self, request: Request) -> Response:
        return JSONResponse(openapi.document(token_required=self.token_required))

    # -- actions -----------------------------------------------------------------------------

    async def start(self, request: Request) -> Response:
        machine = self.machine_name(request)
        body = await self.body(request, ("payload", "id", "digest"))
        payload = self.payload(body.get("payload"))
        given = body.get("id")
        if given is not None:
            try:
                check_instance_id(given)
            except InputError as exc:
                raise bad_request(str(exc)) from None
        digest = body.get("digest")
        if digest is not None and (not isinstance(digest, str) or DIGEST.fullmatch(digest) is None):
            raise bad_request(f"digest must be a definition's digest, sha256:<64 hex digits>, got {json.dumps(digest)}")
        try:
            record, created = await self.calls.start(machine, payload, given, digest=digest)
        except InstanceExists as exc:
            raise ApiError(409, "InstanceExists", str(exc)) from None
        iid = record["id"]
        return JSONResponse(record, status_code=201 if created else 200, headers={"location": f"/api/instances/{iid}"})

    async def signal(self, request: Request) -> Response:
        iid = self.instance_id(request)
        try:
            name = check_signal_name(request.path_params["name"])
        except InputError as exc:
            raise bad_request(str(exc)) from None
        body = await self.body(request, ("payload", "outcome"))
        payload = self.payload(body.get("payload"))
        outcome = body.get("outcome")
        if outcome is not None and (not isinstance(outcome, str) or not outcome):
            raise bad_request(f"outcome must be a non-empty label (a string), got {json.dumps(outcome)}")
        try:
            record = await self.calls.signal(iid, name, payload, outcome)
        except InvalidSignal as exc:  # its machine waits for no such signal, or routes on no such outcome
            raise ApiError(422, "InvalidSignal", str(exc)) from None
        except InputError as exc:  # the instance takes no (more) signals: finished, or too many pending
            raise conflict(str(exc)) from None
        return JSONResponse(record, status_code=202)

    async def cancel(self, request: Request) -> Response:
        iid = self.instance_id(request)
        body = await self.body(request, ("reason",))
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise bad_request(f"reason must be a string, got {payloads.json_kind(reason)}")
        if reason is not None and len(reason) > MAX_REASON:
            raise bad_request(f"reason is {len(reason)} characters; at most {MAX_REASON} are kept")
        peer = request.client.host if request.client else "unknown"
        record = await self.calls.cancel(iid, reason, by=f"api@{peer}")
        if record["status"] != CANCELLED:
            raise conflict(f"instance {iid} is {record['status']}: there is nothing to cancel")
        return JSONResponse(record)

    async def redrive(self, request: Request) -> Response:
        iid = self.instance_id(request)
        await self.body(request, ())
        try:
            record = await self.calls.redrive(iid)
        except InputError as exc:
            raise conflict(str(exc)) from None
        return JSONResponse(record)

    async def delete(self, request: Request) -> Response:
        iid = self.instance_id(request)
        try:
            summary = await self.calls.delete(iid)
        except InputError as exc:  # still running
            raise conflict(str(exc)) from None
        return JSONResponse(summary)

    # -- schedules ---------------------------------------------------------------------------

    def schedule_name(self, request: Request) -> str:
        return self.path_param(request, "name", check_schedule_name)

    def spec(self, name: object, fields: dict[str, Any]) -> Spec:
        """The schedule a body asks for; its fields' content wrong (a cron expression, a time zone, a
        duration or time, a bound) is 422, as the document says: JSON of the right shape may still say
        something that is no schedule."""
        try:
            return Spec.of(name, fields)
        except FieldError as exc:
            raise ApiError(422, "InvalidSchedule", str(exc)) from None

    async def list_schedules(self, request: Request) -> Response:
        return JSONResponse({"items": await self.calls.list_schedules()})

    async def create_schedule(self, request: Request) -> Response:
        body = await self.body(request, ("name", *SPEC_FIELDS))
        spec = self.spec(body.pop("name", None), body)
        try:
            described = await self.calls.create_schedule(spec)
        except ScheduleExists as exc:
            raise ApiError(409, "ScheduleExists", str(exc)) from None
        return JSONResponse(described, status_code=201, headers={"location": f"/api/schedules/{spec.name}"})

    async def apply_schedules(self, request: Request) -> Response:
        body = await self.body(request, ("schedules", "prune"))
        prune = body.get("prune", False)
        if not isinstance(body.get("schedules"), list) or not isinstance(prune, bool):
            raise bad_request("schedules is required: a list of schedules, each an object of name and the fields "
                              "create takes; prune: true or false")
        try:
            specs = specs_of(body["schedules"])
        except InputError as exc:
            raise ApiError(422, "InvalidSchedule", str(exc)) from None
        return JSONResponse(await self.calls.apply_schedules(specs, prune))

    async def put_schedule(self, request: Request) -> Response:
        name = self.schedule_name(request)
        spec = self.spec(name, await self.body(request, SPEC_FIELDS))
        done = await self.calls.apply_schedules([spec], False)
        return JSONResponse(await self.calls.describe_schedule(name), status_code=201 if done["created"] else 200)

    async def get_schedule(self, request: Request) -> Response:
        return JSONResponse(await self.calls.describe_schedule(self.schedule_name(request)))

    async def delete_schedule(self, request: Request) -> Response:
        return JSONResponse(await self.calls.delete_schedule(self.schedule_name(request)))

    async def pause_schedule(self, request: Request) -> Response:
        name = self.schedule_name(request)
        note = (await self.body(request, ("note",))).get("note")
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            raise bad_request(f"note must be a string of at most {MAX_NOTE} characters")
        return JSONResponse(await self.calls.pause_schedule(name, note))

    async def unpause_schedule(self, request: Request) -> Response:
        name = self.schedule_name(request)
        await self.body(request, ())
        return JSONResponse(await self.calls.unpause_schedule(name))

    async def trigger_schedule(self, request: Request) -> Response:
        name = self.schedule_name(request)
        await self.body(request, ())
        iid = await self.calls.trigger_schedule(name)
        return JSONResponse({"id": iid}, status_code=201, headers={"location": f"/api/instances/{iid}"})

    async def backfill_schedule(self, request: Request) -> Response:
        name = self.schedule_name(request)
        body = await self.body(request, ("from", "to"))
        now = self.wall()
        span = []
        for key in ("from", "to"):
            value = body.get(key)
            if not isinstance(value, str):
                raise bad_request(f"{key} is required: an RFC 3339 date or date-time, or a duration back from now")
            try:
                span.append(index.check_since(value, now))
            except InputError as exc:
                raise ApiError(422, "InvalidSpan", f"{key}: {exc}") from None
        await self.calls.schedules.get(name)  # 404 first
        try:
            return JSONResponse({"ids": await self.calls.backfill_schedule(name, span[0], span[1])})
        except InputError as exc:  # backwards, or too many due times
            raise ApiError(422, "InvalidSpan", str(exc)) from None


def _signals(graph: Graph) -> list[dict[str, Any]]:
    """The signals a machine's own states wait for, with the outcomes they route on: what a signal
    to one of its instances may be (anything else is refused, 422)."""
    return [routes.as_dict() for routes in graph.signals().values()]


Endpoint = Callable[[Request], Awaitable[Response]]


def _answers(endpoint: Endpoint) -> Endpoint:
    """An endpoint whose dsm errors become JSON errors with their status."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as exc:
            return error_response(exc.status, exc.type, str(exc))
        except NotFound as exc:
            return error_response(404, "NotFound", str(exc))
        except InputError as exc:
            return error_response(400, "BadRequest", str(exc))
        except StoreError as exc:  # etcd unreachable, out of space (NOSPACE), or refusing this user
            return error_response(503, "StoreUnavailable", f"the store cannot serve this request: {exc}")

    answer.__name__ = endpoint.__name__
    answer.__doc__ = endpoint.__doc__
    return answer


def routes(api: Api, static: Path | None) -> list[BaseRoute]:
    """Every route of the app: the API's, then the dashboard's when `static` holds it."""
    api_routes: list[BaseRoute] = [
        Route("/api/instances", _answers(api.list_instances), methods=["GET"], name="list_instances"),
        Route("/api/instances/{id}", _answers(api.get_instance), methods=["GET"], name="get_instance"),
        Route("/api/instances/{id}", _answers(api.delete), methods=["DELETE"], name="delete_instance"),
        Route("/api/instances/{id}/graph", _answers(api.get_graph), methods=["GET"], name="get_graph"),
        Route("/api/instances/{id}/signals/{name}", _answers(api.signal), methods=["POST"], name="signal"),
        Route("/api/instances/{id}/cancel", _answers(api.cancel), methods=["POST"], name="cancel"),
        Route("/api/instances/{id}/redrive", _answers(api.redrive), methods=["POST"], name="redrive"),
        Route("/api/machines", _answers(api.list_machines), methods=["GET"], name="list_machines"),
        Route("/api/machines/{machine}", _answers(api.get_machine), methods=["GET"], name="get_machine"),
        Route("/api/machines/{machine}/instances", _answers(api.start), methods=["POST"], name="start"),
        Route("/api/workers", _answers(api.list_workers), methods=["GET"], name="list_workers"),
        Route("/api/schedules", _answers(api.list_schedules), methods=["GET"], name="list_schedules"),
        Route("/api/schedules", _answers(api.create_schedule), methods=["POST"], name="create_schedule"),
        Route("/api/schedules", _answers(api.apply_schedules), methods=["PUT"], name="apply_schedules"),
        Route("/api/schedules/{name}", _answers(api.get_schedule), methods=["GET"], name="get_schedule"),
        Route("/api/schedules/{name}", _answers(api.put_schedule), methods=["PUT"], name="put_schedule"),
        Route("/api/schedules/{name}", _answers(api.delete_schedule), methods=["DELETE"], name="delete_schedule"),
        Route("/api/schedules/{name}/pause", _answers(api.pause_schedule), methods=["POST"], name="pause_schedule"),
        Route("/api/schedules/{name}/unpause", _answers(api.unpause_schedule), methods=["POST"],
              name="unpause_schedule"),
        Route("/api/schedules/{name}/trigger", _answers(api.trigger_schedule), methods=["POST"],
              name="trigger_schedule"),
        Route("/api/schedules/{name}/backfill", _answers(api.backfill_schedule), methods=["POST"],
              name="backfill_schedule"),
        Route("/api/events", _answers(api.get_events), methods=["GET"], name="events"),
        Route("/api/openapi.json", _answers(api.get_openapi), methods=["GET"], name="openapi"),
    ]
    if static is None or not static.is_dir():
        return api_routes
    index_html = static / "index.html"

    async def front(request: Request) -> Response:
        if index_html.is_file():
            return FileResponse(index_html)
        return JSONResponse({"name": "dsm api", "openapi": "/api/openapi.json"})

    return [*api_routes, Route("/", front, methods=["GET"], name="dashboard"),
            Mount("/static", app=StaticFiles(directory=static), name="static")]


def _allowed(request: Request) -> list[str]:
    """The methods answered at the request's path: those of every route there (one route a
    method), and OPTIONS; none when no route there says (a mount)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods | {"OPTIONS"}) if methods else []


async def _http_error(request: Request, exc: Exception) -> Response:
    """A JSON error; at a path that does not take the method, every method it takes in `Allow`
    (a route answers with its own only), and OPTIONS answered 204 with them."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    allowed = _allowed(request) if exc.status_code == 405 else []
    if allowed:
        headers = {name: value for name, value in headers.items() if name.lower() != "allow"}
        headers["allow"] = ", ".join(allowed)
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=headers)
    kinds = {404: "NotFound", 405: "MethodNotAllowed"}
    return error_response(exc.status_code, kinds.get(exc.status_code, "HTTPError"),
                          f"{request.method} {request.url.path}: {exc.detail}", headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc, exc_info=exc)
    return error_response(500, "InternalError", f"{type(exc).__name__}: {exc}")


def create_app(store: Store, keys: Keys | None = None, *, token: str | None = None,
               allowed_hosts: Collection[str] | None = None, static: Path | None = STATIC,
               wall: Callable[[], float] = time.time, heartbeat: float = events.HEARTBEAT) -> Starlette:
    """The API (and the dashboard in `static`) over a store, for one namespace (`keys`).

    `token`: actions need `Authorization: Bearer TOKEN` (None: no token needed; the command line
    passes DSM_API_TOKEN). `allowed_hosts`: the only `Host` names answered (None: any; the command
    line passes the loopback names when it listens on loopback). The caller owns the store and
    closes it; `app.state.api.close()` ends open event streams before a server stops.
    """
    api = Api(store, keys or Keys(), wall=wall, heartbeat=heartbeat, token_required=bool(token))
    served = routes(api, static)
    app = Starlette(routes=served,
                    middleware=[Middleware(AccessCheck, token=token, allowed_hosts=allowed_hosts, routes=served)],
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.api = api
    return app
