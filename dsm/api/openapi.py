"""The OpenAPI 3.1 document of the HTTP API, written by hand (GET /api/openapi.json).

Written out rather than generated: the schemas are the contract's record and summary, which no
Python type here spells, and a reader of this file sees the whole API on one page. The tests
check that it is valid OpenAPI and that it lists every route the app serves, and nothing more.
"""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{description}"}


ID = {"name": "id", "in": "path", "required": True, "description": "Instance id.",
      "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"}}
MACHINE = {"name": "machine", "in": "path", "required": True, "description": "Machine name.",
           "schema": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,63}$"}}
SIGNAL = {"name": "name", "in": "path", "required": True, "description": "Signal name.",
          "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"}}
ACTION: list[dict[str, list[str]]] = [{"bearer": []}]  # actions need the token when the API has one
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
    "Unauthorized": _json(_ref("Error"), "A token is set (DSM_API_TOKEN) and the request has not sent it."),
    "Forbidden": _json(_ref("Error"), "An action from another origin, or a Host this API does not answer to."),
}

ACTION_ERRORS = {"400": _error("BadRequest"), "401": _error("Unauthorized"), "403": _error("Forbidden"),
                 "404": _error("NotFound"), "409": _error("Conflict"), "413": _error("TooLarge")}


def _body(properties: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"required": required, "description": description, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "properties": properties}}}}


PATHS: dict[str, Any] = {
    "/api/instances": {"get": {
        "operationId": "list_instances", "summary": "A page of instances, newest first, read from the index.",
        "parameters": [
            {"name": "status", "in": "query", "schema": {"enum": ["running", "succeeded", "failed", "cancelled"]}},
            {"name": "machine", "in": "query", "schema": {"type": "string"}},
            {"name": "since", "in": "query", "description": "ISO 8601 time or a duration back from now (30m, 7d).",
             "schema": {"type": "string"}},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                         "default": 50}},
            {"name": "after", "in": "query", "description": "The `next` cursor of the previous page.",
             "schema": {"type": "string"}},
            {"name": "where", "in": "query", "description": "NAME:VALUE, a search attribute and the value it "
             "equals (repeatable, all must hold). Refused (400) while this dsm keeps no search attributes.",
             "schema": {"type": "array", "items": {"type": "string"}}, "style": "form", "explode": True}],
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
            "active": {"type": "array", "items": {"type": "string"}}, "failed_at": NULLABLE_STRING}}]},
            "The drawing."), "400": _error("BadRequest"), "404": _error("NotFound")}}},
    "/api/instances/{id}/signals/{name}": {"post": {
        "operationId": "signal", "parameters": [ID, SIGNAL], "security": ACTION,
        "summary": "Send a signal: kept in the record, consumed in order by the state that waits for it.",
        "requestBody": _body({"payload": {"type": "object", "description": "Merged into the payload, key by key."},
                              "outcome": {"type": "string", "description": "Routes a signal state with `on`."}},
                             "An empty body sends the signal without payload or outcome."),
        "responses": {"202": _json(_ref("Record"), "Stored; the record without history."), **ACTION_ERRORS}}},
    "/api/instances/{id}/cancel": {"post": {
        "operationId": "cancel", "parameters": [ID], "security": ACTION,
        "summary": "Cancel a running instance (again: answers it as it is); a finished one is refused (409).",
        "requestBody": _body({"reason": {"type": "string", "maxLength": 4096}}, "Why, kept in the record."),
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
            "mermaid": {"type": "string"}, "graph": _ref("Drawing")}}]}, "The machine."),
            "400": _error("BadRequest"), "404": _error("NotFound")}}},
    "/api/machines/{machine}/instances": {"post": {
        "operationId": "start", "parameters": [MACHINE], "security": ACTION,
        "summary": "Start an instance of the machine's newest registered definition, or of the definition "
                   "`digest` names (a client starting a file it holds; 404 when the namespace does not hold it: "
                   "the API stores no definitions sent to it). Starting an id that exists with the same "
                   "definition and payload answers that instance (200) and creates nothing.",
        "requestBody": _body({"payload": {"type": "object", "default": {}},
                              "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
                              "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$",
                                         "description": "Start this definition of the machine, registered "
                                                        "already, rather than its newest."}},
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
        "parameters": [{"name": "instance", "in": "query", "schema": {"type": "string"},
                        "description": "Follow this instance only."},
                       {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]+$"},
                        "description": "The id of the last event received (EventSource sends it when it "
                                       "reconnects): the stream resumes after that revision. When the revisions "
                                       "after it are compacted, or it is above the store's revision (etcd restored "
                                       "from a backup or replaced), the stream starts with `resync` and goes on "
                                       "from the store's revision now. A whole number from 0 to "
                                       "9223372036854775807 (etcd's revisions are int64); anything else is "
                                       "refused with 400."}],
        "responses": {"200": {"description": "The event stream.",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                      "400": _error("BadRequest"), "404": _error("NotFound")}}},
    "/api/openapi.json": {"get": {
        "operationId": "openapi", "summary": "This document.",
        "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")}}},
}


def document() -> dict[str, Any]:
    from .. import __version__

    return {
        "openapi": "3.1.0",
        "info": {"title": "dsm", "version": __version__,
                 "description": "Instances of dsm state machines: list, read, start, signal, cancel, redrive, "
                                "delete, and follow them live. Errors answer {\"error\": {\"type\", \"message\"}}. "
                                "Actions (POST, DELETE) need 'Authorization: Bearer TOKEN' when the API has a "
                                "token (DSM_API_TOKEN), and are refused from other origins; reads need none."},
        "paths": PATHS,
        "components": {"schemas": SCHEMAS, "responses": RESPONSES,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
