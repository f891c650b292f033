"""The OpenAPI 3.1 document of the HTTP API, written by hand (GET /api/openapi.json).

Written out rather than generated: the schemas are the contract's record and summary, which no
Python type here spells, and a reader of this file sees the whole API on one page. The tests
check that it is valid OpenAPI and that it lists every route the app serves, and nothing more;
schemathesis checks a live server against it (`tests/test_api_conformance.py`). Each app has its
own document, which asks for the bearer token only when the app has one.
"""

from __future__ import annotations

import re
from typing import Any

from .. import search
from ..graph import DIGEST
from ..index import CURSOR, SINCE_DURATION
from ..keys import INSTANCE_ID, MACHINE_NAME, SIGNAL_NAME
from ..schedules import MAX_NOTE, OVERLAPS
from ..schedules import NAME as SCHEDULE_NAME
from ..version import __version__
from .events import MAX_REVISION


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{description}"}


def _whole(pattern: re.Pattern[str]) -> dict[str, str]:
    """A string matched whole by one of the patterns the server checks with (the same text)."""
    return {"type": "string", "pattern": f"^(?:{pattern.pattern})$"}


ID = {"name": "id", "in": "path", "required": True, "description": "Instance id.", "schema": _whole(INSTANCE_ID)}
MACHINE = {"name": "machine", "in": "path", "required": True, "description": "Machine name.",
           "schema": _whole(MACHINE_NAME)}
SIGNAL = {"name": "name", "in": "path", "required": True, "description": "Signal name.",
          "schema": _whole(SIGNAL_NAME)}
SCHEDULE = {"name": "name", "in": "path", "required": True, "description": "Schedule name.",
            "schema": _whole(SCHEDULE_NAME)}
ACTION: list[dict[str, list[str]]] = [{"bearer": []}]  # actions need the token when the API has one
# a `where` pair as the API takes it: empty (ignored), or an attribute's name, ':' and a text
WHERE_PAIR = f"^(|(?:{search.NAME.pattern}):[\\s\\S]{{0,{search.MAX_TEXT}}})$"
NULLABLE_STRING = {"type": ["string", "null"]}
TIME = {"type": ["string", "null"], "format": "date-time", "description": "ISO 8601 UTC with milliseconds."}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["type", "message"], "properties": {
            "type": {"type": "string", "description": "BadRequest, NotFound, Conflict, InstanceExists, "
                                                      "PayloadTooLarge, Unauthorized, Forbidden, ..."},
            "message": {"type": "string", "description": "What is wrong, naming the field or the instance."}}}},
    },
    "ErrorInfo": {
        "type": ["object", "null"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}, "state": {"type": "string"},
                       "attempts": {"type": "integer"}, "traceback": NULLABLE_STRING},
    },
    "Waiting": {
        "type": "object",
        "properties": {"state": {"type": "string"}, "branch": {"type": "array", "items": {"type": "string"}},
                       "kind": {"enum": ["timer", "signal", "child", "retry"]}, "until": TIME,
                       "signal": NULLABLE_STRING, "child": NULLABLE_STRING, "attempt": {"type": "integer"},
                       "last_error": {"type": ["object", "null"]}},
    },
    "Summary": {
        "type": "object", "description": "An instance record without history and payload (as `dsm list --json`).",
        "required": ["id", "machine", "digest", "status", "state", "active", "transitions"],
        "properties": {
            "id": {"type": "string"}, "machine": {"type": "string"},
            "version": {"type": ["integer", "string", "null"]}, "digest": {"type": "string"},
            "status": {"enum": ["running", "succeeded", "failed", "cancelled"]},
            "state": NULLABLE_STRING, "active": {"type": "array", "items": {"type": "string"}},
            "error": _ref("ErrorInfo"), "created_at": TIME, "finished_at": TIME,
            "transitions": {"type": "integer"}, "input": {"type": ["object", "null"]},
            "waiting": {"type": "array", "items": _ref("Waiting")}, "redrives": {"type": "integer"},
            "cancel": {"type": ["object", "null"]}, "expires_at": TIME,
            "signals": {"type": "array", "items": {"type": "object"}}, "parent": {"type": ["object", "null"]},
        },
    },
    "HistoryEntry": {
        "type": "object",
        "properties": {"seq": {"type": "integer"}, "state": {"type": "string"},
                       "next": {"type": "array", "items": {"type": "string"}},
                       "branch": {"type": "array", "items": {"type": "string"}}, "attempt": {"type": "integer"},
                       "outcome": NULLABLE_STRING, "worker": {"type": "string"}, "at": TIME, "started_at": TIME,
                       "duration_ms": {"type": "integer"}, "failures": {"type": "array", "items": {"type": "object"}},
                       "signal": {"type": "object"}, "child": {"type": "string"}},
    },
    "Record": {
        "description": "The whole instance record (as `dsm status ID --json`); `history` only where said.",
        "allOf": [_ref("Summary"), {"type": "object", "properties": {
            "payload": {"type": "object"}, "history": {"type": "array", "items": _ref("HistoryEntry")}}}],
    },
    "Page": {
        "type": "object", "required": ["items", "next"],
        "properties": {"items": {"type": "array", "items": _ref("Summary")},
                       "next": {"type": ["string", "null"], "description": "Cursor for `after`; null: no more."}},
    },
    "Worker": {
        "type": "object",
        "properties": {"id": {"type": "string"}, "host": {"type": "string"}, "pid": {"type": "integer"},
                       "definitions": {"type": "array", "items": {"type": "object"}},
                       "allow": {"type": ["array", "null"], "items": {"type": "string"}},
                       "functions": {"type": "array", "items": {"type": "string"}},
                       "refused": {"type": "array", "items": {"type": "object"}},
                       "concurrency": {"type": "integer"}, "in_flight": {"type": "integer"},
                       "started_at": TIME, "updated_at": TIME},
    },
    "Machine": {
        "type": "object", "required": ["machine", "digest"],
        "properties": {"machine": {"type": "string"}, "version": {"type": ["integer", "string", "null"]},
                       "digest": {"type": "string"}, "description": {"type": "string"}, "registered_at": TIME},
    },
    "Event": {
        "type": "object", "required": ["event", "data"],
        "description": "One event of the stream, as EventSource hands it over (the schema of a "
                       "`text/event-stream` describes each event). `data` is one line of JSON: `ready` and "
                       "`resync` carry `{\"revision\"}`, `instance` a summary (with `instance=ID`: the record, "
                       "without history), `deleted` `{\"id\"}`, `history` an entry with the instance's `id`.",
        "properties": {
            "event": {"enum": ["ready", "resync", "instance", "deleted", "history"]},
            "data": {"type": "string", "contentMediaType": "application/json"},
            "id": {"type": "string", "pattern": "^[0-9]+$",
                   "description": "A store revision, on the last event of each: send it back as Last-Event-ID."},
            "retry": {"type": "integer", "minimum": 0}},
    },
    "Signal": {
        "type": "object", "required": ["name", "states", "outcomes", "outcome_required"],
        "description": "A signal the machine's own states wait for: a signal to one of its instances must be one "
                       "of these, with one of its outcomes (or none, unless one is required); else 422.",
        "properties": {"name": {"type": "string"}, "states": {"type": "array", "items": {"type": "string"}},
                       "outcomes": {"type": "array", "items": {"type": "string"},
                                    "description": "The labels the states that route with `on` route on."},
                       "outcome_required": {"type": "boolean",
                                            "description": "Every state waiting for it routes with `on`."}},
    },
    "Schedule": {
        "type": "object", "description": "A schedule as `dsm schedule describe --json` shows it: what it is, its "
                                         "next due times, its last runs (with their instances' statuses) and counts.",
        "required": ["name", "machine", "overlap", "paused", "next", "runs", "fires", "skips", "misses"],
        "properties": {
            "name": {"type": "string"}, "machine": {"type": "string"}, "cron": NULLABLE_STRING,
            "every": {"type": ["number", "null"], "description": "Seconds."}, "timezone": {"type": "string"},
            "payload": {"type": "object"}, "overlap": {"enum": list(OVERLAPS)},
            "catchup_window": {"type": "number"}, "jitter": {"type": "number"}, "start_at": TIME, "end_at": TIME,
            "paused": {"type": "boolean"}, "note": NULLABLE_STRING,
            "next": {"type": "array", "items": {"type": "string", "format": "date-time"}},
            "runs": {"type": "array", "items": {"type": "object", "properties": {
                "due": TIME, "id": NULLABLE_STRING, "at": TIME, "count": {"type": "integer"},
                "action": {"enum": ["started", "skipped", "buffered", "missed", "triggered", "backfilled"]},
                "status": NULLABLE_STRING}}},
            "buffered": TIME, "fires": {"type": "integer"}, "skips": {"type": "integer"},
            "misses": {"type": "integer"}, "triggers": {"type": "integer", "description": "Runs started by trigger."},
            "created_at": TIME, "updated_at": TIME},
    },
    "Drawing": {
        "type": "object", "description": "A machine as nodes and edges; the ids are the Mermaid text's.",
        "properties": {
            "machine": {"type": "string"}, "version": {"type": ["integer", "string", "null"]},
            "digest": {"type": "string"}, "start": {"type": "string"},
            "nodes": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "string"}, "kind": {"enum": ["start", "state", "fork", "join"]},
                "state": NULLABLE_STRING, "visited": {"type": "boolean"}, "visits": {"type": "integer"},
                "active": {"type": "boolean"}, "failed": {"type": "boolean"}}}},
            "edges": {"type": "array", "items": {"type": "object", "properties": {
                "source": {"type": "string"}, "target": {"type": "string"}, "label": NULLABLE_STRING,
                "catch": {"type": "boolean"}, "dashed": {"type": "boolean"}, "taken": {"type": "boolean"}}}},
        },
    },
}

RESPONSES: dict[str, Any] = {
    "BadRequest": _json(_ref("Error"), "Invalid input: bad JSON, an unknown field, a bad id, name or value."),
    "NotFound": _json(_ref("Error"), "No such instance, machine or definition."),
    "Conflict": _json(_ref("Error"), "The instance's state refuses the action (id taken with another payload, "
                                     "redrive of a succeeded instance, signal to a finished one ...)."),
    "TooLarge": _json(_ref("Error"), "The request body or the payload is over the limit."),
    "InvalidSignal": _json(_ref("Error"), "The instance's machine does not take this signal: no state waits for "
                                          "the name, or none that waits for it routes on the outcome (or one is "
                                          "needed). The message names the signals and outcomes it takes; "
                                          "nothing was stored."),
    "InvalidSchedule": _json(_ref("Error"), "The schedule's fields are of the right shape but say no schedule: "
                                            "a cron expression, time zone, duration or time that is not one, or "
                                            "out of bounds. The message names each field; nothing was stored."),
    "InvalidSpan": _json(_ref("Error"), "`from` or `to` is no time, `to` is before `from`, or the span holds "
                                        "more than 1,000 due times; nothing was started."),
    "Unauthorized": _json(_ref("Error"), "A token is set (DSM_API_TOKEN) and the request has not sent it."),
    "Forbidden": _json(_ref("Error"), "An action from another origin, or a Host this API does not answer to."),
}

DURATION = {"type": ["string", "number"], "description": "Seconds, or text such as 90s, 10m, 1h30m."}
SPEC_PROPERTIES: dict[str, Any] = {
    "machine": _whole(MACHINE_NAME),
    "cron": {"type": ["string", "null"], "description": "Five cron fields, or @hourly, @daily, @weekly, @monthly, "
                                                        "@yearly; one of cron and every."},
    "every": {**DURATION, "type": ["string", "number", "null"], "description": "An interval, at least 1s."},
    "timezone": {"type": ["string", "null"], "description": "IANA time zone cron is read in (default UTC)."},
    "payload": {"type": ["object", "null"]}, "overlap": {"enum": [*OVERLAPS, None]},
    "catchup_window": {**DURATION, "type": ["string", "number", "null"]},
    "jitter": {**DURATION, "type": ["string", "number", "null"]},
    "start_at": {"type": ["string", "number", "null"], "description": "ISO 8601 time, or seconds since the epoch."},
    "end_at": {"type": ["string", "number", "null"]}, "paused": {"type": ["boolean", "null"]},
    "note": {"type": ["string", "null"], "maxLength": MAX_NOTE},
}

ACTION_ERRORS = {"400": _error("BadRequest"), "401": _error("Unauthorized"), "403": _error("Forbidden"),
                 "404": _error("NotFound"), "409": _error("Conflict"), "413": _error("TooLarge")}


def _query(name: str, schema: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    """An optional query parameter; given empty, it is as if not given."""
    return {"name": name, "in": "query", "schema": schema, "allowEmptyValue": True,
            **({"description": description} if description else {})}


def _body(properties: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"required": required, "description": description, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "properties": properties}}}}


def _required_fields(body: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    body["content"]["application/json"]["schema"]["required"] = fields
    return body


PATHS: dict[str, Any] = {
    "/api/instances": {"get": {
        "operationId": "list_instances", "summary": "A page of instances, newest first, read from the index.",
        "description": "A query parameter given empty (`status=`) is as if not given.",
        "parameters": [
            _query("status", {"enum": ["running", "succeeded", "failed", "cancelled"]}),
            _query("machine", _whole(MACHINE_NAME)),
            _query("since", {"anyOf": [_whole(SINCE_DURATION), {"type": "string", "format": "date-time"},
                                       {"type": "string", "format": "date"}]},
                   "Created since: a duration back from now (30m, 2h, 7d, 1h30m, or seconds) or an RFC 3339 "
                   "date or date-time."),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),
            _query("after", _whole(CURSOR), "The `next` cursor of the previous page."),
            {**_query("where", {"type": "array", "items": {"type": "string", "pattern": WHERE_PAIR}},
                      "Search attributes, NAME:VALUE each (repeatable, all must hold): instances whose attribute "
                      "NAME has the text VALUE (a number as JSON writes it, whole ones without a fraction; a "
                      "boolean true or false). One given empty is as if not given; a NAME given twice with two "
                      "values is refused (400)."),
             "style": "form", "explode": True}],
        "responses": {"200": _json(_ref("Page"), "Summaries and the cursor of the next page."),
                      "400": _error("BadRequest")}}},
    "/api/instances/{id}": {
        "parameters": [ID],
        "get": {"operationId": "get_instance", "summary": "The whole record, history included.",
                "responses": {"200": _json(_ref("Record"), "The record."), "400": _error("BadRequest"),
                              "404": _error("NotFound")}},
        "delete": {"operationId": "delete_instance", "summary": "Delete a finished instance now (record, history, "
                   "index entries). A running one is refused (409): cancel it first.", "security": ACTION,
                   "responses": {"200": _json(_ref("Summary"), "The instance deleted."), **ACTION_ERRORS}}},
    "/api/instances/{id}/graph": {"get": {
        "operationId": "get_graph", "parameters": [ID],
        "summary": "The instance's machine drawn (Mermaid and nodes/edges) with its path and active states marked.",
        "responses": {"200": _json({"allOf": [_ref("Drawing"), {"type": "object", "properties": {
            "id": {"type": "string"}, "status": {"type": "string"}, "mermaid": {"type": "string"},
            "path": {"type": "array", "items": {"type": "string"}},
            "active": {"type": "array", "items": {"type": "string"}}, "failed_at": NULLABLE_STRING,
            "signals": {"type": "array", "items": _ref("Signal")}}}]},
            "The drawing, and the signals the instance's machine takes."), "400": _error("BadRequest"),
            "404": _error("NotFound")}}},
    "/api/instances/{id}/signals/{name}": {"post": {
        "operationId": "signal", "parameters": [ID, SIGNAL], "security": ACTION,
        "summary": "Send a signal: kept in the record, consumed in order by the state that waits for it.",
        "requestBody": _body({"payload": {"type": ["object", "null"],
                                          "description": "Merged into the payload, key by key."},
                              "outcome": {"type": ["string", "null"], "minLength": 1,
                                          "description": "Routes a signal state with `on`: a label, not empty."}},
                             "An empty body sends the signal without payload or outcome."),
        "responses": {"202": _json(_ref("Record"), "Stored; the record without history."), **ACTION_ERRORS,
                      "422": _error("InvalidSignal")}}},
    "/api/instances/{id}/cancel": {"post": {
        "operationId": "cancel", "parameters": [ID], "security": ACTION,
        "summary": "Cancel a running instance (again: answers it as it is); a finished one is refused (409).",
        "requestBody": _body({"reason": {"type": ["string", "null"], "maxLength": 4096}}, "Why, kept in the record."),
        "responses": {"200": _json(_ref("Record"), "Cancelled; the record without history."), **ACTION_ERRORS}}},
    "/api/instances/{id}/redrive": {"post": {
        "operationId": "redrive", "parameters": [ID], "security": ACTION,
        "summary": "Continue a failed or cancelled instance from the states that did not finish.",
        "responses": {"200": _json(_ref("Record"), "Running again; the record without history."),
                      **ACTION_ERRORS}}},
    "/api/machines": {"get": {
        "operationId": "list_machines", "summary": "Registered machines, each with its newest definition.",
        "responses": {"200": _json({"type": "object", "properties": {
            "items": {"type": "array", "items": _ref("Machine")}}}, "The machines, by name.")}}},
    "/api/machines/{machine}": {"get": {
        "operationId": "get_machine", "parameters": [MACHINE],
        "summary": "A machine's newest definition, drawn.",
        "responses": {"200": _json({"allOf": [_ref("Machine"), {"type": "object", "properties": {
            "mermaid": {"type": "string"}, "graph": _ref("Drawing"),
            "signals": {"type": "array", "items": _ref("Signal")}}}]}, "The machine."),
            "400": _error("BadRequest"), "404": _error("NotFound")}}},
    "/api/machines/{machine}/instances": {"post": {
        "operationId": "start", "parameters": [MACHINE], "security": ACTION,
        "summary": "Start an instance of the machine's newest registered definition, or of the definition "
                   "`digest` names (a client starting a file it holds; 404 when the namespace does not hold it: "
                   "the API stores no definitions sent to it). Starting an id that exists with the same "
                   "definition and payload answers that instance (200) and creates nothing.",
        "requestBody": _body({"payload": {"type": ["object", "null"], "default": {}},
                              "id": {**_whole(INSTANCE_ID), "type": ["string", "null"],
                                     "description": "The instance's id; none (or null): a new one is made."},
                              "digest": {**_whole(DIGEST), "type": ["string", "null"],
                                         "description": "Start this definition of the machine, registered "
                                                        "already, rather than its newest; none (or null): the "
                                                        "newest."}},
                             "The payload and, optionally, the instance's id and the definition's digest."),
        "responses": {"201": _json(_ref("Record"), "Started: its record."),
                      "200": _json(_ref("Record"), "The id existed with this definition and payload."),
                      **ACTION_ERRORS}}},
    "/api/workers": {"get": {
        "operationId": "list_workers", "summary": "Live workers, and the store's raised alarms (NOSPACE).",
        "responses": {"200": _json({"type": "object", "properties": {
            "items": {"type": "array", "items": _ref("Worker")},
            "alarms": {"type": "array", "items": {"type": "string"}}}}, "The workers.")}}},
    "/api/events": {"get": {
        "operationId": "events",
        "summary": "Server-sent events: `instance` (a summary, on every change of a record), `deleted`, "
                   "`resync` (events were lost: read again), `ready`; with `instance=ID`, that instance's "
                   "record (`instance`) and each committed transition (`history`). Each event's id is a store "
                   "revision: `Last-Event-ID` resumes after it.",
        "parameters": [_query("instance", _whole(INSTANCE_ID), "Follow this instance only (empty: all)."),
                       {"name": "Last-Event-ID", "in": "header",
                        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_REVISION},
                        "description": "The id of the last event received (EventSource sends it when it "
                                       "reconnects): the stream resumes after that revision. When the revisions "
                                       "after it are compacted, or it is above the store's revision (etcd restored "
                                       "from a backup or replaced), the stream starts with `resync` and goes on "
                                       "from the store's revision now. A whole number from 0 to "
                                       "9223372036854775807 (etcd's revisions are int64); anything else, an "
                                       "empty one included, is refused with 400."}],
        "responses": {"200": {"description": "The event stream, one event after another, until the client goes.",
                              "content": {"text/event-stream": {"schema": _ref("Event")}}},
                      "400": _error("BadRequest"), "404": _error("NotFound")}}},
    "/api/schedules": {
        "get": {"operationId": "list_schedules", "summary": "Schedules, by name, each with its next due time.",
                "responses": {"200": _json({"type": "object", "properties": {
                    "items": {"type": "array", "items": _ref("Schedule")}}}, "The schedules.")}},
        "post": {"operationId": "create_schedule", "security": ACTION,
                 "summary": "Create a schedule of a registered machine (409 when one of the name exists).",
                 "requestBody": _body({"name": _whole(SCHEDULE_NAME), **SPEC_PROPERTIES},
                                      "The schedule: its name, machine, cron or every, and the rest.", required=True),
                 "responses": {"201": _json(_ref("Schedule"), "Created."), **ACTION_ERRORS,
                               "422": _error("InvalidSchedule")}},
        "put": {"operationId": "apply_schedules", "security": ACTION,
                "summary": "Create or update schedules to match a list (as `dsm schedule apply`): every entry is "
                           "checked, and every machine found, before any is written; with `prune`, the namespace's "
                           "schedules the list does not name are deleted.",
                "requestBody": _required_fields(_body({
                    "schedules": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["name", "machine"],
                        "properties": {"name": _whole(SCHEDULE_NAME), **SPEC_PROPERTIES}}},
                    "prune": {"type": "boolean", "default": False}},
                    "The schedules, each its name and the fields create takes.", required=True), ["schedules"]),
                "responses": {"200": _json({"type": "object", "properties": {
                    what: {"type": "array", "items": {"type": "string"}}
                    for what in ("created", "updated", "unchanged", "deleted")}}, "The names, by what was done."),
                    **ACTION_ERRORS, "422": _error("InvalidSchedule")}}},
    "/api/schedules/{name}": {
        "parameters": [SCHEDULE],
        "get": {"operationId": "get_schedule", "summary": "One schedule: its next 5 due times, its last 10 runs.",
                "responses": {"200": _json(_ref("Schedule"), "The schedule."), "400": _error("BadRequest"),
                              "404": _error("NotFound")}},
        "put": {"operationId": "put_schedule", "security": ACTION,
                "summary": "Create the schedule, or update it to match (as `dsm schedule apply`): its runs and "
                           "counts kept, its due times afresh from now when its timing changed.",
                "requestBody": _body(SPEC_PROPERTIES, "The schedule's fields.", required=True),
                "responses": {"200": _json(_ref("Schedule"), "Updated, or unchanged."),
                              "201": _json(_ref("Schedule"), "Created."), **ACTION_ERRORS,
                              "422": _error("InvalidSchedule")}},
        "delete": {"operationId": "delete_schedule", "security": ACTION,
                   "summary": "Delete the schedule (the instances it started stay).",
                   "responses": {"200": _json(_ref("Schedule"), "The schedule deleted."), **ACTION_ERRORS}}},
    "/api/schedules/{name}/pause": {"post": {
        "operationId": "pause_schedule", "parameters": [SCHEDULE], "security": ACTION,
        "summary": "Pause: nothing fires until unpaused (the due times between are not run).",
        "requestBody": _body({"note": {"type": ["string", "null"], "maxLength": MAX_NOTE}}, "Why, shown with it."),
        "responses": {"200": _json(_ref("Schedule"), "Paused."), **ACTION_ERRORS}}},
    "/api/schedules/{name}/unpause": {"post": {
        "operationId": "unpause_schedule", "parameters": [SCHEDULE], "security": ACTION,
        "summary": "Unpause: it goes on from its next due time after now.",
        "responses": {"200": _json(_ref("Schedule"), "Unpaused."), **ACTION_ERRORS}}},
    "/api/schedules/{name}/trigger": {"post": {
        "operationId": "trigger_schedule", "parameters": [SCHEDULE], "security": ACTION,
        "summary": "Start one run now, whatever runs already; its id is named by now and numbered "
                   "(NAME-YYYYMMDDTHHMMSSZ-manual-N), never a due time's.",
        "responses": {"201": _json({"type": "object", "properties": {"id": {"type": "string"}}}, "Started."),
                      **ACTION_ERRORS}}},
    "/api/schedules/{name}/backfill": {"post": {
        "operationId": "backfill_schedule", "parameters": [SCHEDULE], "security": ACTION,
        "summary": "Start now a run for every due time from `from` to `to` (at most 1,000); one whose run exists "
                   "starts nothing.",
        "requestBody": _required_fields(_body({"from": {"type": "string"}, "to": {"type": "string"}},
                                              "RFC 3339 dates or date-times, or durations back from now.",
                                              required=True), ["from", "to"]),
        "responses": {"200": _json({"type": "object", "properties": {
            "ids": {"type": "array", "items": {"type": "string"}}}}, "The runs, started now or before."),
            **ACTION_ERRORS, "422": _error("InvalidSpan")}}},
    "/api/openapi.json": {"get": {
        "operationId": "openapi", "summary": "This document.",
        "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")}}},
}


def _without_token(paths: dict[str, Any]) -> dict[str, Any]:
    """The paths of an API without a token: no operation asks for one, none answers 401."""
    def operation(item: Any) -> Any:
        if not isinstance(item, dict) or "responses" not in item:
            return item
        responses = {status: answer for status, answer in item["responses"].items() if status != "401"}
        return {**{key: value for key, value in item.items() if key != "security"}, "responses": responses}

    return {path: {method: operation(item) for method, item in methods.items()} for path, methods in paths.items()}


def document(*, token_required: bool) -> dict[str, Any]:
    """The document of one app: `token_required` when it has a token (DSM_API_TOKEN), so that its
    actions ask for the bearer token only then."""
    if token_required:
        access = ("Actions (POST, PUT, DELETE) need 'Authorization: Bearer TOKEN' (the API's DSM_API_TOKEN), and are "
                  "refused from other origins; reads need no token.")
        components = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    else:
        access = ("This API has no token (DSM_API_TOKEN): actions (POST, PUT, DELETE) need none, and are refused from "
                  "other origins.")
        components = {}
    return {
        "openapi": "3.1.0",
        "info": {"title": "dsm", "version": __version__,
                 "description": "Instances of dsm state machines: list, read, start, signal, cancel, redrive, "
                                "delete, and follow them live; schedules that start them. "
                                "Errors answer {\"error\": {\"type\", \"message\"}}. "
                                + access},
        "paths": PATHS if token_required else _without_token(PATHS),
        "components": {"schemas": SCHEMAS, "responses": RESPONSES, **components},
    }
