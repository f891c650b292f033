"""The HTTP API (`dsm api`): every route over HTTP against a real uvicorn, on the memory store and
on a real etcd; its errors, its token and origin checks, its OpenAPI document and its event stream."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from apiserver import ApiServer, finished, waits_for_signal
from clitools import ROOT, dsm, spawn, stop
from helpers import until

from dsm import compiler
from dsm.api import access, openapi
from dsm.api.app import create_app
from dsm.operations import Operations
from dsm.store.memory import MemoryStore

DEFINITIONS = ROOT / "definitions"
ORDER = compiler.load(DEFINITIONS / "order.yaml")
APPROVAL = compiler.load(DEFINITIONS / "approval.yaml")

INSTANT = """
machine: instant
start: done
states:
  done:
    terminal: true
"""

FLAKY = """
machine: flaky
start: work
states:
  work:
    tick: flaky_api:work
    next: done
  done:
    terminal: true
"""

FLAKY_PY = """
import os

def work(payload, ctx):
    if not os.path.exists(payload["flag"]):
        raise ConnectionError("the service is down")
    payload["worked"] = True
"""


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None for a memory store, else the endpoint of the suite's real etcd."""
    if request.param == "memory":
        return None
    return request.getfixturevalue("etcd").endpoint


@pytest.fixture
def server(backend: str | None, namespace: str) -> Iterator[Callable[..., ApiServer]]:
    """server(**options) -> a started ApiServer over this test's store and namespace."""
    started: list[ApiServer] = []

    def make(**options: Any) -> ApiServer:
        srv = ApiServer(etcd=backend, namespace=namespace, **options).__enter__()
        started.append(srv)
        return srv

    yield make
    for srv in reversed(started):
        srv.__exit__(None, None, None)


def error_of(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return body["error"]


def start(srv: ApiServer, machine: str, payload: dict | None = None, **body: Any) -> dict[str, Any]:
    response = srv.post(f"/api/machines/{machine}/instances", {"payload": payload or {}, **body})
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/api/instances/{response.json()['id']}"
    return response.json()


# -- reads ---------------------------------------------------------------------------------------

def test_listing_pages_and_filters_from_the_index(server, write):
    instant = compiler.load(write("instant.yaml", INSTANT))
    srv = server(graphs=[ORDER, instant])
    running = [start(srv, "order", {"n": i}, id=f"order-{i}")["id"] for i in range(3)]
    done = [start(srv, "instant", {"n": i})["id"] for i in range(2)]
    assert srv.record(done[0])["status"] == "succeeded"  # a terminal start state ends at once

    newest_first = sorted(sorted(running + done), key=lambda i: srv.record(i)["created_at"], reverse=True)
    page = srv.get("/api/instances").json()
    assert [i["id"] for i in page["items"]] == newest_first and page["next"] is None
    first = page["items"][0]
    assert "history" not in first and "payload" not in first  # summaries, as dsm list --json
    assert {"id", "machine", "status", "state", "active", "transitions", "waiting"} <= set(first)

    by_status = srv.get("/api/instances", params={"status": "succeeded"}).json()["items"]
    assert sorted(i["id"] for i in by_status) == sorted(done)
    by_machine = srv.get("/api/instances", params={"machine": "order", "status": ""}).json()["items"]
    assert sorted(i["id"] for i in by_machine) == sorted(running)
    both = srv.get("/api/instances", params={"machine": "order", "status": "succeeded"}).json()
    assert both == {"items": [], "next": None}

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2, **({"after": cursor} if cursor else {})}
        page = srv.get("/api/instances", params=params).json()
        seen += [i["id"] for i in page["items"]]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == newest_first and pages == 3

    assert len(srv.get("/api/instances", params={"since": "1h"}).json()["items"]) == 5
    assert srv.get("/api/instances", params={"since": "2999-01-01T00:00:00Z"}).json()["items"] == []


def test_a_record_whole_with_its_history_and_404_for_an_unknown_id(server, write):
    instant = compiler.load(write("instant.yaml", INSTANT))
    srv = server(graphs=[instant])
    iid = start(srv, "instant", {"x": 1}, id="r-1")["id"]
    record = srv.record(iid)
    assert record["id"] == "r-1" and record["payload"] == {"x": 1} and record["history"] == []
    assert record["status"] == "succeeded" and record["state"] == "done"
    assert error_of(srv.get("/api/instances/nope"), 404)["type"] == "NotFound"
    assert "nope" in error_of(srv.get("/api/instances/nope"), 404)["message"]
    assert error_of(srv.get("/api/instances/b%20d"), 400)["type"] == "BadRequest"


def test_machines_are_listed_with_their_newest_definition(server):
    srv = server(graphs=[ORDER, APPROVAL])
    items = srv.get("/api/machines").json()["items"]
    assert [m["machine"] for m in items] == ["approval", "order"]
    assert items[1]["digest"] == ORDER.digest and items[1]["version"] == 1 and items[1]["registered_at"]
    one = srv.get("/api/machines/order").json()
    assert one["digest"] == ORDER.digest and one["mermaid"].startswith("stateDiagram-v2")
    assert {n["state"] for n in one["graph"]["nodes"] if n["kind"] == "state"} == set(ORDER.states)
    assert error_of(srv.get("/api/machines/nothing"), 404)["type"] == "NotFound"


def test_workers_are_listed(server):
    srv = server(graphs=[ORDER], workers=2)
    body = srv.get("/api/workers").json()
    assert body["alarms"] == []
    (worker,) = body["items"]
    assert worker["concurrency"] == 2 and [d["machine"] for d in worker["definitions"]] == ["order"]


# -- actions -------------------------------------------------------------------------------------

def test_start_answers_201_and_a_worker_runs_it_to_the_end(server):
    srv = server(graphs=[ORDER], workers=4)
    record = start(srv, "order", {"total": 120}, id="o-1")
    assert record["id"] == "o-1" and record["machine"] == "order" and record["digest"] == ORDER.digest
    assert record["input"] == {"total": 120} and "history" in record
    done = srv.wait_for("o-1", finished)
    assert done["status"] == "succeeded" and done["state"] == "done"
    assert [h["state"] for h in done["history"]][:3] == ["receive", "check", "fulfil"]
    again = srv.post("/api/machines/order/instances", {"payload": {"total": 120}, "id": "o-1"})
    assert again.status_code == 200 and again.json()["status"] == "succeeded"  # the same start: that instance
    generated = start(srv, "order", {"total": 5})
    assert len(generated["id"]) == 36  # a UUIDv7


def test_start_by_digest_starts_that_definition_if_the_namespace_holds_it(server):
    srv = server(graphs=[ORDER, APPROVAL])
    url = "/api/machines/order/instances"
    started = srv.post(url, {"payload": {"total": 5}, "digest": ORDER.digest})
    assert started.status_code == 201 and started.json()["digest"] == ORDER.digest
    before = srv.snapshot()
    unknown = "sha256:" + "0" * 64
    error = error_of(srv.post(url, {"payload": {}, "digest": unknown}), 404)
    assert error["type"] == "NotFound"
    assert f"definition {unknown} of machine 'order' is not registered" in error["message"]
    assert "is a definition of machine 'approval', not 'order'" in error_of(
        srv.post(url, {"payload": {}, "digest": APPROVAL.digest}), 400)["message"]
    assert "digest must be a definition's digest" in error_of(srv.post(url, {"digest": "sha1:x"}), 400)["message"]
    assert srv.snapshot() == before


def test_where_lists_instances_by_their_search_attributes(server):
    srv = server(graphs=[ORDER])
    ids = {customer: start(srv, "order", {"customer": customer, "order_id": f"o-{customer}"})["id"]
           for customer in ("c7", "c8")}
    found = srv.get("/api/instances", params={"where": "customer:c7"}).json()
    assert [item["id"] for item in found["items"]] == [ids["c7"]] and found["next"] is None
    both = srv.get("/api/instances", params=[("where", "customer:c8"), ("where", "order:o-c8"), ("machine", "order")])
    assert [item["id"] for item in both.json()["items"]] == [ids["c8"]]
    assert srv.get("/api/instances", params=[("where", "customer:c8"), ("where", "order:o-c7")]).json()["items"] == []
    assert "where: expected NAME:VALUE" in error_of(srv.get("/api/instances", params={"where": "c7"}), 400)["message"]
    assert "not an attribute's name" in error_of(srv.get("/api/instances", params={"where": "a b:c"}), 400)["message"]


def test_a_signal_wakes_a_waiting_instance(server):
    srv = server(graphs=[APPROVAL], workers=2)
    iid = start(srv, "approval", {"amount": 120})["id"]
    waiting = srv.wait_for(iid, waits_for_signal)
    assert waiting["waiting"][0]["signal"] == "decision" and waiting["active"] == ["decide"]
    response = srv.post(f"/api/instances/{iid}/signals/decision", {"outcome": "approve", "payload": {"by": "ann"}})
    assert response.status_code == 202, response.text
    assert response.json()["id"] == iid and "history" not in response.json()
    done = srv.wait_for(iid, finished)
    assert done["status"] == "succeeded" and done["state"] == "paid"
    assert done["payload"]["by"] == "ann" and done["payload"]["paid"] is True
    decided = next(h for h in done["history"] if h["state"] == "decide")
    assert decided["signal"]["name"] == "decision" and decided["signal"]["outcome"] == "approve"


def test_cancel_then_redrive_then_delete(server):
    srv = server(graphs=[APPROVAL], workers=2)
    iid = start(srv, "approval", {"amount": 1})["id"]
    srv.wait_for(iid, waits_for_signal)
    response = srv.post(f"/api/instances/{iid}/cancel", {"reason": "changed my mind"})
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancel"]["reason"] == "changed my mind" and cancelled["cancel"]["by"] == "api@127.0.0.1"
    assert srv.post(f"/api/instances/{iid}/cancel").json()["status"] == "cancelled"  # again: as it is
    assert srv.get("/api/instances", params={"status": "cancelled"}).json()["items"][0]["id"] == iid

    running = srv.post(f"/api/instances/{iid}/redrive")
    assert running.status_code == 200 and running.json()["status"] == "running" and running.json()["redrives"] == 1
    srv.wait_for(iid, waits_for_signal)
    assert error_of(srv.delete(f"/api/instances/{iid}"), 409)["type"] == "Conflict"  # running: cancel it first
    srv.post(f"/api/instances/{iid}/signals/decision", {"outcome": "reject"})
    done = srv.wait_for(iid, finished)
    assert done["status"] == "failed" and done["state"] == "rejected"  # the machine's failure terminal
    assert "nothing to redrive" in error_of(srv.post(f"/api/instances/{iid}/redrive"), 409)["message"]
    assert "nothing to cancel" in error_of(srv.post(f"/api/instances/{iid}/cancel"), 409)["message"]

    deleted = srv.delete(f"/api/instances/{iid}")
    assert deleted.status_code == 200 and deleted.json()["id"] == iid and deleted.json()["status"] == "failed"
    assert error_of(srv.get(f"/api/instances/{iid}"), 404)
    assert error_of(srv.delete(f"/api/instances/{iid}"), 404)
    assert srv.get("/api/instances").json()["items"] == []


def test_redrive_of_a_failed_instance(server, write, tmp_path):
    flaky = compiler.load(write("flaky.yaml", FLAKY, flaky_api=FLAKY_PY))
    srv = server(graphs=[flaky], workers=2)
    flag = tmp_path / "service-is-up"
    iid = start(srv, "flaky", {"flag": str(flag)})["id"]
    failed = srv.wait_for(iid, finished)
    assert failed["status"] == "failed" and failed["error"]["type"] == "ConnectionError"
    flag.touch()
    response = srv.post(f"/api/instances/{iid}/redrive", content=b"{}")
    assert response.status_code == 200, response.text
    done = srv.wait_for(iid, finished)
    assert done["status"] == "succeeded" and done["payload"]["worked"] is True and done["redrives"] == 1


# -- errors: status, a JSON error, and nothing written ------------------------------------------

def test_every_error_answers_json_and_writes_nothing(server, monkeypatch):
    monkeypatch.setenv("DSM_PAYLOAD_LIMIT", "1000")
    srv = server(graphs=[APPROVAL])  # no worker: nothing but the requests writes
    running = start(srv, "approval", {"amount": 1}, id="a-1")["id"]
    finished_id = start(srv, "approval", {"amount": 2}, id="a-2")["id"]
    assert srv.post(f"/api/instances/{finished_id}/cancel").status_code == 200
    before = srv.snapshot()

    start_url = "/api/machines/approval/instances"
    cases: list[tuple[httpx.Response, int, str, str]] = [
        (srv.post(start_url, content=b"{nope"), 400, "BadRequest", "not valid JSON"),
        (srv.post(start_url, content=b'{"payload": NaN}'), 400, "BadRequest", "not valid JSON"),
        (srv.post(start_url, content=b"[1, 2]"), 400, "BadRequest", "got an array"),
        (srv.post(start_url, {"payload": {}, "idd": "x"}), 400, "BadRequest", "'idd'"),
        (srv.post(start_url, {"payload": [1]}), 400, "BadRequest", "payload must be a JSON object"),
        (srv.post(start_url, {"payload": {}, "id": "no/slash"}), 400, "BadRequest", "invalid instance id"),
        (srv.post(start_url, {"payload": {"a": "x" * 2000}}), 413, "PayloadTooLarge", "limit is 1000"),
        (srv.post(start_url, content=b'{"payload": {"a": "' + b"x" * 100_000 + b'"}}'), 413, "PayloadTooLarge",
         "request body"),
        (srv.post(start_url, {"payload": {"amount": 3}, "id": "a-1"}), 409, "InstanceExists", "another payload"),
        (srv.post("/api/machines/nothing/instances", {}), 404, "NotFound", "no machine 'nothing'"),
        (srv.post("/api/machines/Bad!/instances", {}), 400, "BadRequest", "invalid machine name"),
        (srv.post("/api/instances/ghost/signals/decision", {}), 404, "NotFound", "ghost"),
        (srv.post(f"/api/instances/{finished_id}/signals/decision", {}), 409, "Conflict", "no more signals"),
        (srv.post(f"/api/instances/{running}/signals/bad%20name", {}), 400, "BadRequest", "invalid signal name"),
        (srv.post(f"/api/instances/{running}/signals/decision", {"outcome": 3}), 400, "BadRequest", "outcome"),
        (srv.post(f"/api/instances/{running}/signals/decision", {"payload": "x"}), 400, "BadRequest", "payload"),
        (srv.post("/api/instances/ghost/cancel", {}), 404, "NotFound", "ghost"),
        (srv.post(f"/api/instances/{running}/cancel", {"reason": 5}), 400, "BadRequest", "reason must be a string"),
        (srv.post(f"/api/instances/{running}/cancel", {"why": "x"}), 400, "BadRequest", "'why'"),
        (srv.post(f"/api/instances/{running}/redrive"), 409, "Conflict", "is running"),
        (srv.post(f"/api/instances/{running}/redrive", {"x": 1}), 400, "BadRequest", "'x'"),
        (srv.post("/api/instances/ghost/redrive"), 404, "NotFound", "ghost"),
        (srv.delete(f"/api/instances/{running}"), 409, "Conflict", "cancel it first"),
        (srv.delete("/api/instances/ghost"), 404, "NotFound", "ghost"),
        (srv.get("/api/instances/ghost"), 404, "NotFound", "ghost"),
        (srv.get("/api/instances/ghost/graph"), 404, "NotFound", "ghost"),
        (srv.get("/api/instances", params={"status": "sleeping"}), 400, "BadRequest", "status must be one of"),
        (srv.get("/api/instances", params={"limit": "0"}), 400, "BadRequest", "limit"),
        (srv.get("/api/instances", params={"limit": "many"}), 400, "BadRequest", "limit"),
        (srv.get("/api/instances", params={"after": "junk"}), 400, "BadRequest", "invalid cursor"),
        (srv.get("/api/instances", params={"since": "yesterday"}), 400, "BadRequest", "since"),
        (srv.get("/api/instances", params={"since": "2026-02-30"}), 400, "BadRequest", "since"),  # no such day
        (srv.get("/api/instances", params={"since": "2026-11-28T13:00"}), 400, "BadRequest", "RFC 3339"),
        (srv.get("/api/instances", params={"after": "\u0661" * 13 + "/x"}), 400, "BadRequest", "invalid cursor"),
        (srv.get("/api/instances", params={"limit": "\u0661"}), 400, "BadRequest", "limit"),
        (srv.get("/api/instances", params={"machine": "Bad!"}), 400, "BadRequest", "invalid machine name"),
        (srv.post(f"/api/instances/{running}/signals/decision", {"outcome": ""}), 400, "BadRequest", "non-empty"),
        (srv.get("/api/instances", params={"stauts": "running"}), 400, "BadRequest", "'stauts'"),
        (srv.get("/api/events", params={"instance": "ghost"}), 404, "NotFound", "ghost"),
        (srv.get("/api/nothing-here"), 404, "NotFound", "/api/nothing-here"),
        (srv.http.put("/api/instances"), 405, "MethodNotAllowed", "PUT"),
        (srv.http.put(f"/api/instances/{running}"), 405, "MethodNotAllowed", "PUT"),
    ]
    for response, status, kind, words in cases:
        error = error_of(response, status)
        assert error["type"] == kind and words in error["message"], (response.request.url, error)
    assert srv.snapshot() == before


def test_every_path_says_which_methods_it_takes(server):
    """405 and OPTIONS list every method of the path in `Allow`, though each route serves one."""
    srv = server(token="s3cret")
    assert srv.http is not None
    for path, methods in (("/api/instances", "GET, HEAD, OPTIONS"), ("/api/instances/x", "DELETE, GET, HEAD, OPTIONS"),
                          ("/api/instances/x/cancel", "OPTIONS, POST")):
        options = srv.http.options(path)
        assert options.status_code == 204 and options.headers["allow"] == methods, (path, options.headers)
        assert "access-control-allow-origin" not in options.headers  # no CORS, as for every answer
        refused = srv.http.request("PATCH", path)
        assert error_of(refused, 405)["type"] == "MethodNotAllowed" and refused.headers["allow"] == methods
    # a method no route takes runs nothing: its 405, not a request for the token
    assert error_of(srv.http.request("TRACE", "/api/instances"), 405)["type"] == "MethodNotAllowed"
    assert srv.http.options("/api/nothing-here").status_code == 404


def test_null_for_an_optional_field_is_leaving_it_out(server):
    srv = server(graphs=[APPROVAL])
    started = srv.post("/api/machines/approval/instances", {"payload": None, "id": None})
    assert started.status_code == 201 and started.json()["payload"] == {}, started.text
    iid = start(srv, "approval", {"amount": 1}, id="n-1")["id"]
    # an outcome of null is no outcome: this machine routes on one, so the signal is refused as without one
    assert error_of(srv.post(f"/api/instances/{iid}/signals/decision", {"outcome": None}), 422)["type"] == \
        "InvalidSignal"
    signalled = srv.post(f"/api/instances/{iid}/signals/decision", {"payload": None, "outcome": "approve"})
    assert signalled.status_code == 202, signalled.text
    assert signalled.json()["signals"][-1]["outcome"] == "approve"
    cancelled = srv.post(f"/api/instances/{iid}/cancel", {"reason": None})
    assert cancelled.status_code == 200 and cancelled.json()["cancel"]["reason"] is None
    nullable = openapi.document(token_required=False)["paths"]["/api/machines/{machine}/instances"]["post"]
    properties = nullable["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "null" in properties["id"]["type"] and "null" in properties["payload"]["type"]


def test_a_signal_the_machine_does_not_take_answers_422_naming_what_it_takes(server):
    srv = server(graphs=[APPROVAL])  # no worker: nothing but the requests writes
    running = start(srv, "approval", {"amount": 1}, id="s-1")["id"]
    before = srv.snapshot()
    misspelled = error_of(srv.post(f"/api/instances/{running}/signals/decison", {"outcome": "approve"}), 422)
    assert misspelled["type"] == "InvalidSignal", misspelled
    assert "'decision'" in misspelled["message"] and "'approve'" in misspelled["message"], misspelled
    outcome = error_of(srv.post(f"/api/instances/{running}/signals/decision", {"outcome": "maybe"}), 422)
    assert outcome["type"] == "InvalidSignal" and "'maybe'" in outcome["message"], outcome
    assert "'approve'" in outcome["message"] and "'reject'" in outcome["message"], outcome
    assert srv.snapshot() == before
    takes = [{"name": "decision", "states": ["decide", "final_decision"], "outcomes": ["approve", "reject"],
              "outcome_required": True}]
    assert srv.get(f"/api/instances/{running}/graph").json()["signals"] == takes  # what a form offers
    assert srv.get("/api/machines/approval").json()["signals"] == takes
    paths = openapi.document(token_required=False)["paths"]
    described = paths["/api/instances/{id}/signals/{name}"]["post"]["responses"]
    assert "422" in described and "409" in described


# -- who may do what -----------------------------------------------------------------------------

def test_actions_need_the_token_and_reads_do_not(server):
    srv = server(graphs=[APPROVAL], token="s3cret")
    before = srv.snapshot()
    url = "/api/machines/approval/instances"
    missing = srv.post(url, {"payload": {}})
    assert error_of(missing, 401)["type"] == "Unauthorized" and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in error_of(missing, 401)["message"]
    assert error_of(srv.post(url, {}, headers={"authorization": "Bearer wrong"}), 401)
    assert error_of(srv.post(url, {}, headers={"authorization": "Basic czNjcmV0"}), 401)
    assert error_of(srv.delete("/api/instances/x"), 401)
    assert srv.snapshot() == before
    assert srv.get("/api/instances").status_code == 200 and srv.get("/api/machines").status_code == 200
    ok = srv.post(url, {"payload": {}, "id": "t-1"}, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 201, ok.text
    cancel = srv.post("/api/instances/t-1/cancel", headers={"Authorization": "bearer s3cret"})
    assert cancel.status_code == 200


def test_actions_from_another_origin_are_refused(server):
    srv = server(graphs=[APPROVAL], token="s3cret")
    before = srv.snapshot()
    host = srv.url.removeprefix("http://")
    auth = {"authorization": "Bearer s3cret"}
    url = "/api/machines/approval/instances"
    for headers in ({"origin": "https://evil.example"}, {"origin": "null"},
                    {"origin": f"http://{host.split(':')[0]}:1"}, {"sec-fetch-site": "cross-site"},
                    {"sec-fetch-site": "same-site"}, {"origin": srv.url, "sec-fetch-site": "cross-site"}):
        error = error_of(srv.post(url, {}, headers={**auth, **headers}), 403)
        assert error["type"] == "Forbidden", headers
    assert srv.snapshot() == before
    same = srv.post(url, {"payload": {}}, headers={**auth, "origin": srv.url, "sec-fetch-site": "same-origin"})
    assert same.status_code == 201, same.text
    assert srv.get("/api/instances", headers={"origin": "https://evil.example"}).status_code == 200  # a read
    assert "access-control-allow-origin" not in srv.get("/api/instances").headers  # which no other site can read


def test_only_the_hosts_allowed_are_answered(server):
    srv = server(allowed_hosts=["127.0.0.1", "localhost"])
    assert srv.get("/api/instances").status_code == 200
    assert srv.get("/api/instances", headers={"host": "localhost:8080"}).status_code == 200
    error = error_of(srv.get("/api/instances", headers={"host": "rebound.example:8080"}), 403)
    assert "rebound.example" in error["message"]


@pytest.mark.parametrize("origin, host, same", [
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("http://example.com", "example.com", True),
    ("http://example.com", "example.com:80", True),
    ("https://example.com", "example.com", True),  # a proxy that ends TLS forwards the Host as it is
    ("https://example.com", "example.com:80", False),
    ("http://[::1]:8080", "[::1]:8080", True),
    ("http://EXAMPLE.com", "example.COM", True),
    ("http://example.com:8081", "example.com:8080", False),
    ("http://example.com.evil", "example.com", False),
    ("null", "example.com", False),
    ("file://", "example.com", False),
])
def test_same_origin(origin, host, same):
    assert access.same_origin(origin, host) is same


def test_security_headers_on_every_answer(server):
    srv = server()
    for response in (srv.get("/api/instances"), srv.get("/api/instances/ghost"), srv.get("/")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"


# -- the drawing, the document, the dashboard ----------------------------------------------------

def test_graph_marks_the_path_and_the_active_states(server):
    srv = server(graphs=[APPROVAL], workers=1)
    iid = start(srv, "approval", {"amount": 1})["id"]
    srv.wait_for(iid, waits_for_signal)
    drawing = srv.get(f"/api/instances/{iid}/graph").json()
    assert drawing["id"] == iid and drawing["machine"] == "approval" and drawing["status"] == "running"
    assert drawing["path"] == ["request"] and drawing["active"] == ["decide"]
    nodes = {n["state"]: n for n in drawing["nodes"] if n["kind"] == "state"}
    assert nodes["request"]["visited"] and nodes["request"]["visits"] == 1 and not nodes["request"]["active"]
    assert nodes["decide"]["active"] and nodes["decide"]["waits"] == "signal"
    assert not nodes["pay"]["visited"] and nodes["rejected"]["status"] == "failed"
    taken = {(e["source"], e["target"]) for e in drawing["edges"] if e["taken"]}
    assert taken == {("__start", "request"), ("request", "decide")}
    assert "class request visited" in drawing["mermaid"] and "class decide active" in drawing["mermaid"]

    srv.post(f"/api/instances/{iid}/signals/decision", {"outcome": "approve"})
    srv.wait_for(iid, finished)
    done = srv.get(f"/api/instances/{iid}/graph").json()
    assert done["path"] == ["request", "decide", "pay", "paid"] and done["active"] == []
    assert ("decide", "pay") in {(e["source"], e["target"]) for e in done["edges"] if e["taken"]}


def test_the_openapi_document_is_valid_and_lists_every_route():
    from openapi_spec_validator import validate

    with ApiServer() as srv:
        document = srv.get("/api/openapi.json").json()
    validate(document)
    assert document == openapi.document(token_required=False)
    with ApiServer(token="s3cret") as srv:
        secured = srv.get("/api/openapi.json").json()
    validate(secured)
    assert secured == openapi.document(token_required=True)
    # the bearer token is asked for on the actions, and only when the API has one
    for (_, method), operation in operations(secured).items():
        action = method in ("post", "put", "delete")
        assert (operation.get("security") == [{"bearer": []}]) is action and ("401" in operation["responses"]) is action
    assert not any("security" in op or "401" in op["responses"] for op in operations(document).values())
    assert "securitySchemes" not in document["components"] and "bearer" in secured["components"]["securitySchemes"]
    app = create_app(MemoryStore())
    served = {(route.path, method.lower()) for route in app.routes
              if route.path.startswith("/api/") for method in getattr(route, "methods", ()) if method != "HEAD"}
    described = {(path, method) for path, item in document["paths"].items()
                 for method in item if method != "parameters"}
    assert served == described


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(path, method): operation for path, item in document["paths"].items()
            for method, operation in item.items() if method != "parameters"}


def test_the_dashboard_is_served_from_the_package():
    with ApiServer() as srv:
        front = srv.get("/")
        assert front.status_code == 200 and front.headers["content-type"].startswith("text/html")
        assert srv.get("/static/index.html").text == front.text
        assert srv.get("/static/missing.js").status_code == 404
        # what the page loads comes from the package, and nothing from elsewhere (no CDN)
        assets = re.findall(r'(?:src|href)="([^"#]+)"', front.text)
        assert "static/dashboard.js" in assets and "static/dashboard.css" in assets
        texts = [front.text]
        for asset in [a for a in assets if not a.startswith("data:")] + ["static/vendor/mermaid.min.js"]:
            answer = srv.get("/" + asset)
            assert answer.status_code == 200, asset
            texts.append(answer.text)
        script = srv.get("/static/dashboard.js").text
        assert "/api/instances" in script and "/api/events" in script and "static/vendor/mermaid.min.js" in script
        assert not any(re.search(r"(?:src|href)=\"?https?://|import\s*\(?[\"']https?://", text) for text in texts[:3])


# -- server-sent events --------------------------------------------------------------------------

class Events:
    """The events of a server-sent event stream, read as they come."""

    def __init__(self, response: httpx.Response):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        self.lines = response.iter_lines()

    def until(self, until: Callable[[str, Any], bool], timeout: float = 60) -> list:
        """(event, data, id) of each event until `until(event, data)` holds."""
        return read_events(self.lines, until, timeout)


def read_events(lines: Iterator[str], until: Callable[[str, Any], bool], timeout: float) -> list:
    out: list[tuple[str, Any, str | None]] = []
    event, data, ident = "message", "", None
    deadline = time.monotonic() + timeout
    for line in lines:
        if time.monotonic() > deadline:
            raise AssertionError(f"no such event within {timeout}s: {out}")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line.startswith("id: "):
            ident = line[4:]
        elif line == "" and data:
            out.append((event, json.loads(data), ident))
            if until(event, out[-1][1]):
                return out
            event, data, ident = "message", "", None
    raise AssertionError(f"the stream ended: {out}")


def test_events_stream_each_change_of_a_started_instance(server):
    srv = server(graphs=[ORDER], workers=2, heartbeat=0.2)
    assert srv.http is not None
    with srv.http.stream("GET", "/api/events") as response:
        stream = Events(response)
        stream.until(lambda event, data: event == "ready")
        iid = start(srv, "order", {"total": 120})["id"]
        events = stream.until(lambda event, data: event == "instance" and data["status"] == "succeeded")
    mine = [data for event, data, _ in events if event == "instance" and data["id"] == iid]
    assert mine[0]["status"] == "running" and mine[-1]["state"] == "done" and mine[-1]["transitions"] == 7
    assert set(mine[-1]) >= {"id", "machine", "status", "state", "active", "transitions", "waiting"}
    revisions = [int(ident) for _, _, ident in events if ident is not None]
    assert revisions == sorted(revisions) and len(revisions) >= len(mine)


def test_events_follow_one_instance_and_resume_after_the_last_id(server):
    srv = server(graphs=[APPROVAL], workers=1, heartbeat=0.2)
    assert srv.http is not None
    other = start(srv, "approval", {"amount": 2})["id"]
    iid = start(srv, "approval", {"amount": 1})["id"]
    srv.wait_for(iid, waits_for_signal)
    with srv.http.stream("GET", "/api/events", params={"instance": iid}) as response:
        stream = Events(response)
        first = stream.until(lambda event, data: event == "history" and data["state"] == "request")
        assert [e for e, _, _ in first[:2]] == ["ready", "instance"] and first[1][1]["payload"]["amount"] == 1
        srv.post(f"/api/instances/{other}/cancel")
        srv.post(f"/api/instances/{iid}/signals/decision", {"outcome": "approve"})
        rest = stream.until(lambda event, data: event == "instance" and data["status"] == "succeeded")
    assert {data["id"] for _, data, _ in first + rest if "id" in data} == {iid}
    assert [data["state"] for event, data, _ in rest if event == "history"] == ["decide", "pay"]
    last_id = rest[-1][2]

    srv.post(f"/api/instances/{other}/redrive")  # after the stream above ended
    with srv.http.stream("GET", "/api/events", headers={"last-event-id": last_id}) as response:
        resumed = Events(response).until(lambda event, data: event == "instance" and data["id"] == other)
    assert resumed[-1][1]["status"] == "running" and int(resumed[-1][2]) > int(last_id)


def test_events_resync_when_the_revisions_asked_for_are_compacted(server):
    srv = server(graphs=[APPROVAL], heartbeat=0.2)
    assert srv.http is not None
    start(srv, "approval", {"amount": 1})
    start(srv, "approval", {"amount": 2})

    async def compact(store, keys):
        revision = await store.revision()
        await store.compact(revision)
        return revision

    compacted = srv.call(compact)
    with srv.http.stream("GET", "/api/events", headers={"last-event-id": "1"}) as response:
        stream = Events(response)
        events = stream.until(lambda event, data: event == "resync")
        assert events[-1][1]["revision"] >= compacted
        start(srv, "approval", {"amount": 3}, id="after")  # the stream goes on from there
        stream.until(lambda event, data: event == "instance" and data["id"] == "after")


def test_events_resync_when_the_last_id_is_ahead_of_the_store(server):
    """A Last-Event-ID above the store's revision (etcd restored from a backup, or replaced): the
    events after it will never come as such, so the stream says `resync` and goes on from now."""
    srv = server(graphs=[APPROVAL], heartbeat=0.2)
    assert srv.http is not None
    start(srv, "approval", {"amount": 1})
    current = srv.call(lambda store, keys: store.revision())
    for n, ahead in enumerate((current + 1000, 2**63 - 1)):  # the largest revision etcd can hold, too
        with srv.http.stream("GET", "/api/events", headers={"last-event-id": str(ahead)}) as response:
            stream = Events(response)
            events = stream.until(lambda event, data: event == "resync", timeout=10)
            assert current <= events[-1][1]["revision"] < ahead and int(events[-1][2]) < ahead
            after = start(srv, "approval", {"amount": 2}, id=f"after-{n}")["id"]  # the stream goes on from there
            stream.until(lambda event, data, after=after: event == "instance" and data["id"] == after, timeout=10)


def test_events_refuse_a_last_id_that_is_not_a_revision(server, caplog):
    """Beyond etcd's int64, negative, or not a number: 400 with the API's error, before any stream,
    and nothing in the server's log."""
    srv = server(heartbeat=0.2)
    assert srv.http is not None
    caplog.set_level("WARNING")
    # each sent as HTTP carries it (latin-1): "\u00b9\u00b2" is a digit string to Python, and no number to int()
    for last_id in ("99999999999999999999", "9223372036854775808", "-1", "-0", "abc", "1.5", "12x", "0x10",
                    "\u00b9\u00b2", ""):
        headers = {"last-event-id": last_id.encode("latin-1")}
        with srv.http.stream("GET", "/api/events", headers=headers) as response:
            assert response.status_code == 400, (last_id, response.status_code, response.headers["content-type"])
            response.read()
        error = error_of(response, 400)
        assert error["type"] == "BadRequest" and "Last-Event-ID" in error["message"], (last_id, error)
    assert srv.get("/api/workers").status_code == 200  # still serving
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
    described = openapi.document(token_required=False)["paths"]["/api/events"]["get"]
    assert "400" in described["responses"]
    assert any(p["name"] == "Last-Event-ID" and p["in"] == "header" for p in described["parameters"])


def test_client_and_api_agree_on_the_namespace(server):
    """The API lists what the Python client started in the same namespace, and the other way round."""
    srv = server(graphs=[APPROVAL])

    async def submit(store, keys):
        return await Operations(store, keys).submit(APPROVAL, {"amount": 3}, instance_id="py-1")

    srv.call(submit)
    start(srv, "approval", {"amount": 4}, id="http-1")

    async def listed(store, keys):
        return sorted(inst.id for inst in await Operations(store, keys).list())

    assert srv.call(listed) == ["http-1", "py-1"]
    assert sorted(i["id"] for i in srv.get("/api/instances").json()["items"]) == ["http-1", "py-1"]


# -- the command ---------------------------------------------------------------------------------

def serving(proc: subprocess.Popen) -> str:
    """The URL a `dsm api` process says it serves at (its first line on stderr)."""
    line = proc.stderr.readline()
    assert "dsm api serving" in line, line + proc.stderr.read()
    return line.split("serving ")[1].split()[0]


def test_dsm_api_in_memory_runs_the_definitions_given():
    proc = spawn("api", "definitions/order.yaml", "definitions/approval.yaml", "--port", "0")
    try:
        url = serving(proc)
        with httpx.Client(base_url=url, timeout=30) as http:
            started = http.post("/api/machines/approval/instances", json={"payload": {"amount": 1}, "id": "m-1"})
            assert started.status_code == 201, started.text
            until(lambda: http.get("/api/instances/m-1").json()["waiting"], "m-1 waits for its signal", timeout=60)
            assert http.post("/api/instances/m-1/signals/decision", json={"outcome": "approve"}).status_code == 202
            until(lambda: http.get("/api/instances/m-1").json()["status"] != "running", "m-1 ended", timeout=60)
            assert http.get("/api/instances/m-1").json()["state"] == "paid"
            assert http.get("/").status_code == 200
            rebound = http.get("/api/instances", headers={"host": "rebound.example"})
            assert rebound.status_code == 403  # on loopback, only loopback names are answered
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr


def test_dsm_api_usage_errors(tmp_path):
    nothing = dsm("api", "--port", "0")
    assert nothing.returncode == 2 and "give PATH... or --etcd" in nothing.stderr
    no_workers = dsm("api", "definitions/order.yaml", "--workers", "0", "--port", "0")
    assert no_workers.returncode == 2 and "--workers 0 needs --etcd" in no_workers.stderr
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = dsm("api", "definitions/order.yaml", "--port", str(port))
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    blocked = tmp_path / "blocked" / "starlette"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed here')\n")
    missing = dsm("api", "definitions/order.yaml", "--port", "0", PYTHONPATH=str(blocked.parent))
    assert missing.returncode == 2 and "pip install 'dsm-workflow[api]'" in missing.stderr


def test_dsm_api_beyond_loopback_needs_a_token_or_no_token():
    """Listening on every interface with no DSM_API_TOKEN would let anyone who reaches the port act:
    refused (exit 2) unless --no-token says so, and then each start warns."""
    refused = dsm("api", "definitions/order.yaml", "--host", "0.0.0.0", "--port", "0", DSM_API_TOKEN="",
                  timeout=60)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.splitlines()
    assert "DSM_API_TOKEN" in line and "--no-token" in line and "0.0.0.0" in line, line

    proc = spawn("api", "definitions/order.yaml", "--host", "0.0.0.0", "--port", "0", "--no-token",
                 DSM_API_TOKEN="")
    try:
        url = serving(proc).replace("0.0.0.0", "127.0.0.1")
        with httpx.Client(base_url=url, timeout=30) as http:  # open to anyone: no token asked
            assert http.post("/api/machines/order/instances", json={"payload": {}}).status_code == 201
    finally:
        stderr = stop(proc)
    assert proc.returncode == 0, stderr
    (warning,) = [line for line in stderr.splitlines() if "warning" in line]
    assert "--no-token" in warning and "anyone" in warning, warning


def test_dsm_api_ignores_no_token_when_a_token_is_set():
    """--no-token with DSM_API_TOKEN set: the token is kept (the safer reading) and a note says so."""
    proc = spawn("api", "definitions/order.yaml", "--host", "0.0.0.0", "--port", "0", "--no-token",
                 DSM_API_TOKEN="s3cret")
    try:
        url = serving(proc).replace("0.0.0.0", "127.0.0.1")
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/api/machines/order/instances", json={"payload": {}}).status_code == 401
            started = http.post("/api/machines/order/instances", json={"payload": {}},
                                headers={"authorization": "Bearer s3cret"})
            assert started.status_code == 201, started.text
    finally:
        stderr = stop(proc)
    assert proc.returncode == 0 and "warning" not in stderr, stderr
    assert "note: --no-token is ignored: DSM_API_TOKEN is set" in stderr, stderr


@pytest.mark.etcd
def test_the_api_does_not_import_handlers(write, etcd, namespace):
    """`dsm api --etcd` registers the definitions given and starts them without importing their modules."""
    path = write("loud.yaml", """
        machine: loud
        start: a
        states:
          a:
            tick: loud_api:a
            next: done
          done:
            terminal: true
        """, loud_api="raise SystemExit('imported!')\n")
    proc = spawn("api", str(path), "--etcd", etcd.endpoint, "--namespace", namespace, "--port", "0")
    try:
        url = serving(proc)
        response = httpx.post(f"{url}/api/machines/loud/instances", json={"payload": {}}, timeout=30)
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "running" and response.json()["active"] == ["a"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "imported!" not in stderr, stderr



def test_readme_curl_examples_name_real_routes():
    from dsm.api.app import routes

    text = (ROOT / "README.md").read_text()
    paths = {route.path for route in routes(create_app(MemoryStore()).state.api, None)}
    shown = {line.split("/api/", 1)[1].split()[0].split("?")[0].rstrip("'\"") for line in text.splitlines()
             if line.lstrip().startswith("curl") and "/api/" in line}
    assert shown
    for path in shown:
        parts = path.split("/")
        assert any(len(p.split("/")) == len(parts) + 2 and all(
            a == b or a.startswith("{") for a, b in zip(p.split("/")[2:], parts)) for p in paths), path


def test_the_drawing_follows_forks_and_joins():
    """An order run to its end: the fork bar, both branches and the join bar are on its path."""
    import dsm
    from dsm import render

    record = dsm.run(ORDER, {"total": 120})
    trace = render.Trace.of(((h["state"], h["next"]) for h in record["history"]), active=record["active"],
                            final=record["state"], failed_at=None)
    drawing = render.as_json(ORDER, trace)
    taken = {(e["source"], e["target"]) for e in drawing["edges"] if e["taken"]}
    assert {("fulfil", "fulfil__fork"), ("fulfil__fork", "pick"), ("fulfil__fork", "bill"), ("pick", "ship__join"),
            ("bill", "ship__join"), ("ship__join", "ship"), ("ship", "insured"), ("insured", "done")} <= taken
    assert not taken & {("ship", "done"), ("ship", "refund"), ("check", "cancelled")}
    visited = {n["state"] for n in drawing["nodes"] if n.get("visited")}
    assert visited == {"receive", "check", "fulfil", "pick", "bill", "ship", "insured", "done"}
    assert drawing["path"][-1] == "done" and drawing["active"] == []
    assert {n["id"] for n in drawing["nodes"]} >= {e["source"] for e in drawing["edges"]} | {
        e["target"] for e in drawing["edges"]}


def test_schedules_through_the_api(server):
    srv = server(graphs=[ORDER])
    body = {"name": "nightly", "machine": "order", "cron": "30 2 * * *", "timezone": "Europe/Berlin",
            "payload": {"total": 5}, "overlap": "buffer_one"}
    created = srv.post("/api/schedules", body)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/api/schedules/nightly"
    schedule = created.json()
    assert schedule["next"] and schedule["next"][0].endswith(("T01:30:00.000Z", "T00:30:00.000Z"))
    assert error_of(srv.post("/api/schedules", body), 409)["type"] == "ScheduleExists"
    bad = error_of(srv.post("/api/schedules", {**body, "name": "b", "cron": "61 * * * *", "timezone": "Mars/X"}),
                   422)
    assert bad["type"] == "InvalidSchedule" and "cron" in bad["message"] and "timezone" in bad["message"]
    assert error_of(srv.post("/api/schedules", {**body, "name": "c", "machine": "nope"}), 404)["type"] == "NotFound"
    assert error_of(srv.post("/api/schedules", {**body, "name": "d", "cadence": 1}), 400)["type"] == "BadRequest"
    listed = srv.get("/api/schedules").json()["items"]
    assert [s["name"] for s in listed] == ["nightly"]
    updated = srv.http.put("/api/schedules/nightly", json={"machine": "order", "every": "1h"})
    assert updated.status_code == 200 and updated.json()["every"] == 3600 and updated.json()["cron"] is None
    assert srv.http.put("/api/schedules/hourly", json={"machine": "order", "cron": "@hourly"}).status_code == 201
    paused = srv.post("/api/schedules/nightly/pause", {"note": "quiet week"})
    assert paused.status_code == 200 and paused.json()["paused"] and paused.json()["note"] == "quiet week"
    assert srv.post("/api/schedules/nightly/unpause").json()["paused"] is False
    triggered = srv.post("/api/schedules/nightly/trigger")
    assert triggered.status_code == 201 and triggered.json()["id"].startswith("nightly-")
    filled = srv.post("/api/schedules/nightly/backfill", {"from": "2026-11-01T00:00:00Z", "to": "2026-11-01T02:00:00Z"})
    assert filled.json() == {"ids": ["nightly-20261101T000000Z", "nightly-20261101T010000Z",
                                     "nightly-20261101T020000Z"]}
    span = error_of(srv.post("/api/schedules/nightly/backfill", {"from": "2026-11-02", "to": "2026-11-01"}), 422)
    assert span["type"] == "InvalidSpan"
    described = srv.get("/api/schedules/nightly").json()
    assert [r["action"] for r in described["runs"]] == ["triggered", "backfilled", "backfilled", "backfilled"]
    assert srv.delete("/api/schedules/nightly").status_code == 200
    assert error_of(srv.get("/api/schedules/nightly"), 404)["type"] == "NotFound"
    assert error_of(srv.get("/api/schedules/no%20such"), 400)["type"] == "BadRequest"

    listing = [{"name": "hourly", "machine": "order", "every": "1h"}, {"name": "daily", "machine": "order",
                                                                      "cron": "@daily"}]
    applied = srv.http.put("/api/schedules", json={"schedules": listing, "prune": True})
    assert applied.status_code == 200, applied.text
    assert applied.json() == {"created": ["daily"], "updated": ["hourly"], "unchanged": [], "deleted": []}
    twice = error_of(srv.http.put("/api/schedules", json={"schedules": [{"name": "x", "machine": "order",
                                                                         "every": "1m"}] * 2}), 422)
    assert twice["type"] == "InvalidSchedule" and "given twice" in twice["message"]
    assert error_of(srv.http.put("/api/schedules", json={"schedules": {"name": "x"}}), 400)["type"] == "BadRequest"
    assert [s["name"] for s in srv.get("/api/schedules").json()["items"]] == ["daily", "hourly"]
