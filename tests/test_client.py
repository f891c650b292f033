"""The public client (`dsm.Client`, `dsm.AsyncClient`): one contract run over its three transports,
embedded (an in-process store and worker), etcd (a real etcd) and api (a `dsm api` server over
that etcd), with the same results, the same exceptions and the same messages on each."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from apiserver import ApiServer
from helpers import until

import dsm
from dsm import compiler
from dsm.store.etcd import EtcdOptions

ROOT = Path(__file__).resolve().parent.parent
APPROVAL = ROOT / "definitions" / "approval.yaml"

INSTANT = """
machine: instant
start: done
search:
  n: payload.n
  even: payload.n % 2 == 0
states:
  done:
    terminal: true
"""

FLAKY = """
machine: flaky
start: work
states:
  work:
    tick: flaky_client:work
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

KINDS = ["embedded", "etcd", "api"]
TRANSPORTS = ["embedded", *(pytest.param(kind, marks=pytest.mark.etcd) for kind in KINDS[1:])]  # etcd under both
Connect = Callable[..., dsm.Client]


class Transports:
    """Clients of one kind over definitions served by a worker: `Client.embedded(...)`, or a
    client of etcd or of a `dsm api` server beside an ApiServer whose worker serves them."""

    def __init__(self, request: pytest.FixtureRequest, namespace: str):
        self.request = request
        self.namespace = namespace
        self.servers: list[ApiServer] = []
        self.clients: list[dsm.Client] = []

    def connect(self, kind: str, *paths: Path, token: str | None = None) -> dsm.Client:
        if kind == "embedded":
            client = dsm.Client.embedded(*paths)
        else:
            url = self.request.getfixturevalue("etcd_url")
            srv = ApiServer(etcd=url, namespace=self.namespace, graphs=[compiler.load(p) for p in paths], workers=4,
                            token=token).__enter__()
            self.servers.append(srv)
            client = (dsm.Client(etcd=[url], namespace=self.namespace) if kind == "etcd"
                      else dsm.Client(api=srv.url, token=token))
        self.clients.append(client)
        return client.__enter__()

    def namespace_of(self, kind: str) -> str:
        return "dsm" if kind == "embedded" else self.namespace

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for srv in reversed(self.servers):
            srv.__exit__(None, None, None)


@pytest.fixture
def transports(request: pytest.FixtureRequest, namespace: str) -> Iterator[Transports]:
    made = Transports(request, namespace)
    yield made
    made.close()


@pytest.fixture(params=TRANSPORTS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def connect(kind: str, transports: Transports) -> Connect:
    """connect(*paths) -> a client of this test's transport, with a worker serving the definitions."""
    return lambda *paths, **options: transports.connect(kind, *paths, **options)


def record_when(client: dsm.Client, instance_id: str, predicate: Callable[[dict], bool]) -> dict:
    """The record once `predicate` holds for it (read again as it changes)."""
    def there() -> dict | None:
        record = client.get(instance_id)
        return record if predicate(record) else None

    return until(there, f"instance {instance_id} to get there")


def waits_for_signal(record: dict) -> bool:
    return any(w["kind"] == "signal" for w in record["waiting"])


# -- the contract, on each transport ---------------------------------------------------------------

def test_start_a_file_or_a_machine_signal_and_wait(connect):
    c = connect(APPROVAL)
    started = c.start(APPROVAL, payload={"amount": 120}, id="order-42")
    assert started["id"] == "order-42" and started["machine"] == "approval" and started["input"] == {"amount": 120}
    assert started["digest"] == compiler.load(APPROVAL).digest and "history" in started
    assert c.start(str(APPROVAL), {"amount": 120}, "order-42")["id"] == "order-42"  # the same start: that one
    parked = record_when(c, "order-42", waits_for_signal)
    assert parked["status"] == "running" and parked["waiting"][0]["signal"] == "decision"

    signalled = c.signal("order-42", "decision", payload={"by": "ann"}, outcome="approve")
    assert signalled["id"] == "order-42" and "history" not in signalled
    seen: list[dict] = []
    done = c.wait("order-42", timeout=30, on_history=seen.append)
    assert done["status"] == "succeeded" and done["state"] == "paid" and done["payload"]["by"] == "ann"
    assert [h["state"] for h in done["history"]] == ["request", "decide", "pay"]
    assert [h["seq"] for h in seen] == [1, 2, 3] and seen == done["history"]
    assert c.get("order-42") == done
    assert c.wait("order-42", timeout=5) == done  # a finished instance: at once

    by_name = c.start("approval", {"amount": 5})
    assert len(by_name["id"]) == 36 and by_name["digest"] == started["digest"]  # a UUIDv7, the newest definition


def test_cancel_redrive_and_delete(connect, write, tmp_path):
    flaky = write("flaky.yaml", FLAKY, flaky_client=FLAKY_PY)
    c = connect(APPROVAL, flaky)
    iid = c.start("approval", {"amount": 1})["id"]
    record_when(c, iid, waits_for_signal)
    cancelled = c.cancel(iid, reason="changed my mind")
    assert cancelled["status"] == "cancelled" and cancelled["cancel"]["reason"] == "changed my mind"
    assert c.cancel(iid)["cancel"] == cancelled["cancel"]  # again: as it is
    assert c.wait(iid, timeout=5)["status"] == "cancelled"

    running = c.redrive(iid)
    assert running["status"] == "running" and running["redrives"] == 1
    record_when(c, iid, waits_for_signal)
    with pytest.raises(dsm.InputError, match="cancel it first"):
        c.delete(iid)
    c.signal(iid, "decision", outcome="reject")
    failed = c.wait(iid, timeout=30)
    assert failed["status"] == "failed" and failed["state"] == "rejected"
    assert c.cancel(iid)["status"] == "failed"  # finished: returned as it is, nothing written
    with pytest.raises(dsm.InputError, match="nothing to redrive"):
        c.redrive(iid)
    deleted = c.delete(iid)
    assert deleted["id"] == iid and deleted["status"] == "failed" and "payload" not in deleted
    with pytest.raises(dsm.NotFound, match=iid):
        c.get(iid)

    flag = tmp_path / "service-is-up"
    broken = c.wait(c.start(flaky, {"flag": str(flag)})["id"], timeout=30)
    assert broken["status"] == "failed" and broken["error"]["type"] == "ConnectionError"
    flag.touch()
    assert c.redrive(broken["id"])["status"] == "running"
    fixed = c.wait(broken["id"], timeout=30)
    assert fixed["status"] == "succeeded" and fixed["payload"]["worked"] is True and fixed["redrives"] == 1


def test_the_listing_pages_by_itself(connect, write):
    instant = write("instant.yaml", INSTANT)
    c = connect(APPROVAL, instant)
    done = [c.start(instant, {"n": n}, id=f"done-{n}")["id"] for n in range(5)]
    waiting = [c.start("approval", {"n": n}, id=f"wait-{n}")["id"] for n in range(2)]
    everything = list(c.list())
    assert sorted(s["id"] for s in everything) == sorted(done + waiting)
    assert [s["created_at"] for s in everything] == sorted((s["created_at"] for s in everything), reverse=True)
    assert all("payload" not in s and "history" not in s for s in everything)
    assert sorted(s["id"] for s in c.list(status="succeeded")) == sorted(done)
    assert sorted(s["id"] for s in c.list(machine="approval")) == sorted(waiting)
    assert [s["id"] for s in c.list(limit=3)] == [s["id"] for s in everything[:3]]
    assert list(c.list(since="2999-01-01T00:00:00Z")) == [] and len(list(c.list(since="1h"))) == 7

    ids, cursor, pages = [], None, 0
    while True:
        page = c.page(limit=2, after=cursor)
        ids += [s["id"] for s in page["items"]]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert ids == [s["id"] for s in everything] and pages == 4
    # by search attributes: a value as the payload has it, or its text
    assert [s["id"] for s in c.list(where={"n": 3})] == ["done-3"] == [s["id"] for s in c.list(where={"n": "3"})]
    assert sorted(s["id"] for s in c.list(where={"even": True}, machine="instant")) == ["done-0", "done-2", "done-4"]
    assert [s["id"] for s in c.list(where={"even": True, "n": 2})] == ["done-2"]
    assert c.page(where={"n": 1}, status="running")["items"] == [] and list(c.list(where={"customer": "c7"})) == []


def test_refusals(connect, write):
    instant = write("instant.yaml", INSTANT)
    c = connect(APPROVAL, instant)
    c.start(instant, {"n": 1}, id="done-1")
    with pytest.raises(dsm.NotFound, match="'ghost'"):
        c.get("ghost")
    for call in (lambda: c.signal("ghost", "decision"), lambda: c.cancel("ghost"), lambda: c.redrive("ghost"),
                 lambda: c.delete("ghost"), lambda: c.wait("ghost", timeout=5)):
        with pytest.raises(dsm.NotFound, match="ghost"):
            call()
    with pytest.raises(dsm.NotFound, match="no machine 'nothing'"):
        c.start("nothing")
    with pytest.raises(dsm.InputError, match="invalid instance id"):
        c.start("approval", {}, id="no/slash")
    with pytest.raises(dsm.InputError, match="JSON object"):
        c.start("approval", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(dsm.InputError, match="payload.x is nan, which JSON cannot represent"):
        c.start("approval", {"x": float("nan")})
    with pytest.raises(dsm.InstanceExists, match="another payload"):
        c.start(instant, {"n": 2}, id="done-1")
    with pytest.raises(dsm.InputError, match="no more signals"):
        c.signal("done-1", "decision")
    with pytest.raises(dsm.InputError, match="invalid signal name"):
        c.signal("done-1", "bad name")
    iid = c.start("approval", {"amount": 1})["id"]
    with pytest.raises(dsm.Timeout, match=f"instance '{iid}' did not finish within 0.3s"):
        c.wait(iid, timeout=0.3)


def test_schedules_create_pause_trigger_backfill_and_delete(connect):
    c = connect(APPROVAL)
    created = c.create_schedule("nightly", "approval", cron="30 2 * * *", timezone="Europe/Berlin",
                                payload={"amount": 5}, catchup_window=timedelta(minutes=10), jitter="30s")
    assert (created["name"], created["machine"], created["cron"], created["catchup_window"], created["jitter"]) == (
        "nightly", "approval", "30 2 * * *", 600, 30)
    assert len(created["next"]) == 5 and created["runs"] == [] and created["paused"] is False
    beat = c.create_schedule("beat", "approval", every=timedelta(hours=1), paused=True, note="not yet",
                             start_at=datetime(2026, 1, 1, tzinfo=timezone.utc), end_at="2099-01-01T00:00:00Z")
    assert beat["every"] == 3600 and beat["start_at"] == "2026-01-01T00:00:00.000Z" and beat["note"] == "not yet"
    assert [(s["name"], s["paused"]) for s in c.list_schedules()] == [("beat", True), ("nightly", False)]

    paused = c.pause_schedule("nightly", note="maintenance")
    assert paused["paused"] is True and paused["note"] == "maintenance" and paused["next"] == []
    unpaused = c.unpause_schedule("nightly")
    assert unpaused["paused"] is False and unpaused["note"] is None and len(unpaused["next"]) == 5

    first, second = c.trigger_schedule("nightly"), c.trigger_schedule("nightly")
    assert first.startswith("nightly-") and first.endswith("-manual-1") and second.endswith("-manual-2")
    assert c.get(first)["input"] == {"amount": 5}
    filled = c.backfill_schedule("nightly", "2026-11-01T00:00:00Z", datetime(2026, 11, 3, tzinfo=timezone.utc))
    assert filled == ["nightly-20261101T013000Z", "nightly-20261102T013000Z"]  # 02:30 in Berlin, in UTC
    described = c.describe_schedule("nightly")
    assert [(r["action"], r["id"]) for r in described["runs"]] == [
        ("triggered", first), ("triggered", second), ("backfilled", filled[0]), ("backfilled", filled[1])]
    assert {r["status"] for r in described["runs"]} <= {"running"} and described["triggers"] == 2
    assert record_when(c, filled[1], waits_for_signal)["input"] == {"amount": 5}

    deleted = c.delete_schedule("nightly")
    assert deleted["name"] == "nightly" and deleted["triggers"] == 2
    with pytest.raises(dsm.NotFound, match="no schedule 'nightly'"):
        c.describe_schedule("nightly")
    assert c.get(first)["status"] == "running"  # its runs stay
    assert [s["name"] for s in c.list_schedules()] == ["beat"]


def test_apply_schedules_creates_updates_and_prunes(connect):
    c = connect(APPROVAL)
    c.create_schedule("old", "approval", every="1h")
    a = {"name": "a", "machine": "approval", "every": "10m"}
    b = {"name": "b", "machine": "approval", "cron": "@daily", "payload": {"amount": 1},
         "start_at": datetime(2026, 1, 1, tzinfo=timezone.utc), "catchup_window": timedelta(minutes=5)}
    assert c.apply_schedules([a, b]) == {"created": ["a", "b"], "updated": [], "unchanged": [], "deleted": []}
    changed = c.apply_schedules([{**a, "every": "20m"}, b], prune=True)
    assert changed == {"created": [], "updated": ["a"], "unchanged": ["b"], "deleted": ["old"]}
    listed = [(s["name"], s["every"], s["cron"]) for s in c.list_schedules()]
    assert listed == [("a", 1200, None), ("b", None, "@daily")]
    with pytest.raises(dsm.NotFound, match="no machine 'nope'"):
        c.apply_schedules([{**a, "name": "c"}, {"name": "d", "machine": "nope", "every": "1m"}], prune=True)
    assert [s["name"] for s in c.list_schedules()] == ["a", "b"]  # nothing was written


def test_a_bad_schedule_is_refused_naming_its_field(connect):
    c = connect(APPROVAL)
    with pytest.raises(dsm.InputError, match="cron: '61 \\* \\* \\* \\*' is not a cron expression") as caught:
        c.create_schedule("s", "approval", cron="61 * * * *")
    assert caught.value.field == "cron"  # type: ignore[attr-defined]
    with pytest.raises(dsm.InputError, match="catchup_window: must be at most 366d") as caught:
        c.apply_schedules([{"name": "s", "machine": "approval", "every": "1m", "catchup_window": timedelta(days=400)}])
    assert caught.value.field == "catchup_window"  # type: ignore[attr-defined]
    for call in (lambda: c.describe_schedule("ghost"), lambda: c.pause_schedule("ghost"),
                 lambda: c.unpause_schedule("ghost"), lambda: c.trigger_schedule("ghost"),
                 lambda: c.backfill_schedule("ghost", "1h", "0s"), lambda: c.delete_schedule("ghost")):
        with pytest.raises(dsm.NotFound, match="no schedule 'ghost'"):
            call()
    assert c.list_schedules() == []


def test_the_sync_client_works_in_a_thread_whose_event_loop_runs(connect, write):
    c = connect(write("instant.yaml", INSTANT))

    async def a_view() -> dict:  # a sync call inside async code, as a notebook cell or a sync view makes it
        return c.start("instant", {"from": "a loop"}, id="in-a-loop")

    assert asyncio.run(a_view())["status"] == "succeeded"
    results: list[Any] = []

    def worker(n: int) -> None:
        results.append(c.start("instant", {"n": n})["status"])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["succeeded"] * 8 and len(list(c.list())) == 9


# -- one behaviour: the same exceptions, with the same messages, on every transport ---------------

def refusals(c: dsm.Client, instant: Path) -> list[tuple[str, str]]:
    """What each refused call raises: its exception's type and message."""
    calls: list[Callable[[], Any]] = [
        lambda: c.get("ghost"), lambda: c.signal("ghost", "decision"), lambda: c.cancel("ghost"),
        lambda: c.redrive("ghost"), lambda: c.delete("ghost"), lambda: c.wait("ghost"),
        lambda: c.start("nothing"), lambda: c.start("approval", id="no/slash"),
        lambda: c.start("approval", [1]),  # type: ignore[arg-type]
        lambda: c.start("approval", {"x": float("inf")}), lambda: c.start(instant, {"n": 2}, id="done-1"),
        lambda: c.start(42),  # type: ignore[arg-type]
        lambda: c.signal("done-1", "decision"), lambda: c.signal("run-1", "bad name"),
        lambda: c.signal("run-1", "decision", outcome=""), lambda: c.signal("run-1", "nope"),
        lambda: c.signal("run-1", "decision", outcome="maybe"), lambda: c.cancel("run-1", reason="x" * 5000),
        lambda: c.redrive("done-1"), lambda: c.redrive("run-1"), lambda: c.delete("run-1"),
        lambda: list(c.list(status="sleeping")), lambda: list(c.list(since="yesterday")),
        lambda: list(c.list(machine="Bad!")), lambda: list(c.list(where={"bad name": "c7"})),
        lambda: list(c.list(since=float("nan"))), lambda: list(c.list(where={"customer": ["c7"]})),
        lambda: c.page(after="junk"), lambda: c.page(limit=0),
        lambda: c.wait("run-1", timeout=0.1), lambda: c.wait("run-1", timeout=-1),
        # schedules
        lambda: c.create_schedule("s", "approval", cron="61 * * * *"),
        lambda: c.create_schedule("s", "approval", every="1m", timezone="Mars/Base", overlap="sometimes"),
        lambda: c.create_schedule("bad name", "approval", every="1m"),
        lambda: c.create_schedule("s", "nothing", every="1m"),
        lambda: c.create_schedule("sched-1", "approval", every="1m"),
        lambda: c.describe_schedule("ghost"), lambda: c.pause_schedule("ghost"), lambda: c.unpause_schedule("ghost"),
        lambda: c.trigger_schedule("ghost"), lambda: c.delete_schedule("ghost"),
        lambda: c.backfill_schedule("ghost", "2026-11-01", "2026-11-02"),
        lambda: c.pause_schedule("sched-1", note=5),  # type: ignore[arg-type]
        lambda: c.backfill_schedule("sched-1", "2026-11-02", "2026-11-01"),
        lambda: c.backfill_schedule("sched-1", "2026-01-01", "yesterday"),
        lambda: c.backfill_schedule("sched-1", "2026-01-01", "2026-12-31"),  # more than 1,000 hours
        lambda: c.apply_schedules([{"name": "x", "machine": "approval", "every": "1m"}] * 2),
        lambda: c.apply_schedules("schedules.yaml"),  # type: ignore[arg-type]
        lambda: c.apply_schedules([{"name": "x", "machine": "nothing", "every": "1m"}]),
    ]
    out = []
    for call in calls:
        with pytest.raises(dsm.DsmError) as caught:
            call()
        out.append((type(caught.value).__name__, str(caught.value)))
    return out


@pytest.mark.etcd
def test_every_transport_refuses_in_the_same_words(transports, write):
    instant = write("instant.yaml", INSTANT)
    seen: dict[str, list[tuple[str, str]]] = {}
    for kind in KINDS:
        c = transports.connect(kind, APPROVAL, instant)
        c.start(instant, {"n": 1}, id="done-1")
        c.start("approval", {"n": 1}, id="run-1")
        # etcd and api share a namespace: apply, not create
        c.apply_schedules([{"name": "sched-1", "machine": "approval", "every": "1h", "paused": True}])
        namespace = repr(transports.namespace_of(kind))
        seen[kind] = [(name, message.replace(namespace, "NS")) for name, message in refusals(c, instant)]
    assert seen["etcd"] == seen["embedded"]
    assert seen["api"] == seen["embedded"]
    assert {name for name, _ in seen["embedded"]} == {"NotFound", "InputError", "InstanceExists", "InvalidSignal",
                                                      "Timeout", "FieldError", "ScheduleExists"}


# -- what only one transport has -------------------------------------------------------------------

@pytest.mark.etcd  # the API server it starts serves a namespace on etcd
def test_the_api_transport_needs_the_token_and_starts_only_registered_definitions(transports, write):
    instant = write("instant.yaml", INSTANT)
    c = transports.connect("api", APPROVAL, token="s3cret")
    assert c.start("approval", {"amount": 1})["status"] == "running"
    without = dsm.Client(api=transports.servers[0].url)
    try:
        assert without.get(c.list(limit=1).__next__()["id"])["machine"] == "approval"  # reads need no token
        with pytest.raises(dsm.AccessDenied, match="token"):
            without.start("approval", {"amount": 1})
    finally:
        without.close()
    with pytest.raises(dsm.NotFound, match="is not registered in namespace"):
        c.start(instant, {})  # the server holds no definition of it, and stores none sent to it


def test_unreachable_is_store_unavailable(write):
    with pytest.raises(dsm.StoreUnavailable, match="unreachable"):
        dsm.Client(etcd="http://127.0.0.1:9", timeout=1).__enter__()
    with dsm.Client(api="http://127.0.0.1:9", timeout=2) as c, pytest.raises(dsm.StoreUnavailable, match="unreachable"):
        c.get("x")


def test_the_async_client_has_the_same_calls_as_coroutines(write):
    instant = write("instant.yaml", INSTANT)

    async def main() -> tuple[dict, list[str]]:
        async with dsm.AsyncClient.embedded(APPROVAL, instant) as c:
            ids = await c.start_many(instant, [{"n": n} for n in range(3)], ids=["a", "b", None])
            assert ids[:2] == ["a", "b"]
            done = await c.wait("a", timeout=10)
            return done, [s["id"] async for s in c.list(machine="instant")]

    done, listed = asyncio.run(main())
    assert done["status"] == "succeeded" and {"a", "b"} <= set(listed) and len(listed) == 3


def test_a_client_is_given_one_transport():
    with pytest.raises(dsm.InputError, match="etcd=URLS .* or api=URL"):
        dsm.Client()
    with pytest.raises(dsm.InputError, match="one of them"):
        dsm.Client(etcd="http://127.0.0.1:2379", api="http://127.0.0.1:8080")
    with pytest.raises(dsm.InputError, match="namespace: etcd's options"):
        dsm.Client(api="http://127.0.0.1:8080", namespace="dsm")
    with pytest.raises(dsm.InputError, match="not a dsm api server's URL"):
        dsm.Client(api="127.0.0.1:8080")
    with pytest.raises(dsm.InputError, match="^etcd: 'ftp://x' is not an endpoint"):
        dsm.Client(etcd="ftp://x")
    with pytest.raises(dsm.InputError, match="^cert and key go together"):
        dsm.Client(etcd="http://127.0.0.1:2379", cert=__file__)


def test_the_api_transport_without_httpx_says_what_to_install(monkeypatch):
    from dsm import apiclient

    monkeypatch.setattr(apiclient, "httpx", None)
    with pytest.raises(ImportError, match=r"pip install 'dsm-workflow\[client\]'"):
        dsm.Client(api="http://127.0.0.1:8080")


def test_etcd_endpoints_are_a_comma_separated_string_or_a_list():
    joined = EtcdOptions.build("http://127.0.0.1:2379,http://127.0.0.2:2380")
    listed = EtcdOptions.build(["http://127.0.0.1:2379", "http://127.0.0.2:2380"])
    assert listed == joined and listed.display == "http://127.0.0.1:2379,http://127.0.0.2:2380"
    with pytest.raises(dsm.InputError, match="mix of http and https"):
        EtcdOptions.build(("127.0.0.1", "https://h:1"))
    with pytest.raises(dsm.InputError, match="no endpoint"):
        EtcdOptions.build([])
    with pytest.raises(dsm.InputError, match="a string or a list of strings"):
        EtcdOptions.build([2379])  # type: ignore[list-item]


def test_the_readme_test_example_runs(monkeypatch):
    """The README's example of an application's own test, run as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text.index("**In an application's own tests**")
    start = text.index("```python\n", after) + len("```python\n")
    code = text[start:text.index("```", start)]
    monkeypatch.chdir(ROOT)
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    make = scope["client"]
    fixture = getattr(make, "__wrapped__", make)()  # the pytest fixture's own function
    client = next(fixture)
    try:
        scope["test_an_approved_expense_is_paid"](client)
    finally:
        fixture.close()
