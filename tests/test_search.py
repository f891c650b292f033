"""Search attributes (SPEC 10): `search:` in a definition, values kept in the listing index by the
commits that change them, and listings by `where`, on both stores; what they cost a transition."""

from __future__ import annotations

import asyncio
import json

import pytest
from clitools import dsm
from helpers import in_namespace, run_instances
from indexes import inconsistencies

from dsm import compiler, search
from dsm.errors import DefinitionError, InputError
from dsm.keys import Keys, sort_key
from dsm.operations import Operations
from dsm.records import millis
from dsm.store import prefix_end
from dsm.worker.defaults import DEFAULT_RUN_AHEAD

SHOP = """
machine: shop
start: take
search:
  customer: payload.customer
  total: payload.total
  stage: payload.stage
  vip: payload.total > 100
  tags: payload.tags
states:
  take:
    tick: shophandlers:take
    next: pay
  pay:
    tick: shophandlers:pay
    next: ship
  ship:
    tick: shophandlers:same
    next: done
  done:
    terminal: true
"""
HANDLERS = """
def take(payload, ctx):
    payload["stage"] = "taken"
    return payload

def pay(payload, ctx):
    payload["stage"] = "paid"
    payload["total"] = payload["total"] * 2
    return payload

def same(payload, ctx):
    payload["note"] = "shipped"  # no attribute reads it
    return payload
"""
STEADY = """
machine: steady
start: a
search:
  customer: payload.customer
  order: payload.order
states:
  a: {tick: shophandlers:same, next: b}
  b: {tick: shophandlers:same, next: c}
  c: {tick: shophandlers:same, next: d}
  d: {tick: shophandlers:same, next: done}
  done: {terminal: true}
"""


def shop(write, text=SHOP, name="shop.yaml"):
    return compiler.load(write(name, text, shophandlers=HANDLERS))


# -- the language ------------------------------------------------------------------------------------

def test_search_attributes_compile_and_bad_ones_are_reported_at_their_line(write):
    graph = shop(write)
    assert list(graph.search) == ["customer", "total", "stage", "vip", "tags"]
    text = SHOP.replace("  stage: payload.stage\n", "  stage: payload.stage +\n  9bad: payload.x\n  odd: nope.x\n")
    with pytest.raises(DefinitionError) as err:
        compiler.compile_text(text, "shop.yaml", import_handlers=False)
    shown = str(err.value)
    assert "shop.yaml:7:10: error: search.stage: guard 'payload.stage +' does not compile" in shown
    assert "shop.yaml:8:" in shown and "9bad" in shown
    assert "shop.yaml:9:8: error: search.odd: guard 'nope.x' uses unknown name 'nope'" in shown


def test_at_most_32_attributes():
    many = "".join(f"  a{i}: payload.a{i}\n" for i in range(33))
    text = "machine: m\nstart: done\nsearch:\n" + many + "states:\n  done: {terminal: true}\n"
    with pytest.raises(DefinitionError, match="search"):
        compiler.compile_text(text, "m.yaml", import_handlers=False)


@pytest.mark.parametrize("value, text", [
    ("c7", "c7"), (120, "120"), (120.0, "120"), (0.5, "0.5"), (True, "true"), (False, "false"), (-3, "-3"),
    (None, None), ([1], None), ({"a": 1}, None), (float("nan"), None), ("x" * 257, None), ("x" * 256, "x" * 256),
])
def test_a_value_is_indexed_by_its_text(value, text):
    assert search.text(value) == text


def test_where_names_the_attribute_and_the_pair_that_is_wrong():
    assert search.parse_where(["customer=c7", "total=120", "note=a=b"], "=", "--where") == {
        "customer": "c7", "total": "120", "note": "a=b"}
    assert search.check_where({"total": 120.0, "vip": True}) == {"total": "120", "vip": "true"}
    with pytest.raises(InputError, match="--where: expected NAME=VALUE"):
        search.parse_where(["customer"], "=", "--where")
    with pytest.raises(InputError, match="customer is given twice, 'a' and 'b': no instance has both"):
        search.parse_where(["customer=a", "customer=b"], "=", "--where")
    assert search.parse_where(["customer=a", "customer=a"], "=", "--where") == {"customer": "a"}
    with pytest.raises(InputError, match="not an attribute's name"):
        search.check_where({"a/b": "x"})
    with pytest.raises(InputError, match="a value is a string, a number or a boolean"):
        search.check_where({"a": [1]})


# -- the index, on both stores -------------------------------------------------------------------------

async def _ids(ops: Operations, limit: int = 2, **filters) -> list[str]:
    out: list[str] = []
    after = None
    while True:
        page = await ops.page(limit=limit, after=after, **filters)
        out += [inst.id for inst in page.items]
        if page.next is None:
            return out
        after = page.next


def test_a_listing_by_where_finds_instances_by_their_attributes_as_commits_change_them(store_factory, write):
    graph = shop(write)
    payloads = [{"customer": f"c{i % 3}", "total": 40 + 40 * (i % 2), "tags": ["x"]} for i in range(9)]

    async def body(store, keys):
        done, _, _ = await run_instances(store, graph, payloads, keys=keys)
        ops = Operations(store, keys)
        newest = [x.id for x in sorted(done, key=lambda x: sort_key(millis(x.created_at), x.id))]  # as listed
        by = {
            "c1": await _ids(ops, where={"customer": "c1"}),
            "c1 doubled 80": await _ids(ops, where={"customer": "c1", "total": "160"}),
            "paid": await _ids(ops, where={"stage": "paid"}),
            "taken": await _ids(ops, where={"stage": "taken"}),
            "total 40 (its first value)": await _ids(ops, where={"total": "40"}),
            "vip": await _ids(ops, where={"vip": "true"}),
            "tags (a list)": await _ids(ops, where={"tags": "['x']"}),
            "succeeded c2": await _ids(ops, status="succeeded", where={"customer": "c2"}),
            "failed c2": await _ids(ops, status="failed", where={"customer": "c2"}),
            "other machine": await _ids(ops, machine="other", where={"customer": "c2"}),
        }
        return done, newest, by, await inconsistencies(store, keys)

    done, newest, by, problems = in_namespace(store_factory, body)
    assert all(inst.status == "succeeded" for inst in done)
    assert problems == []
    assert all(inst.search["stage"] == "paid" for inst in done)
    c1 = [i for i in newest if next(x for x in done if x.id == i).payload["customer"] == "c1"]
    assert by["c1"] == c1 and len(c1) == 3
    assert by["c1 doubled 80"] == [i for i in c1 if next(x for x in done if x.id == i).payload["total"] == 160]
    assert by["paid"] == newest
    assert by["taken"] == [] and by["total 40 (its first value)"] == []  # moved by the commits that changed them
    assert by["vip"] == [i for i in newest if next(x for x in done if x.id == i).payload["total"] > 100]
    assert by["tags (a list)"] == []
    assert by["succeeded c2"] == [i for i in newest if next(x for x in done if x.id == i).payload["customer"] == "c2"]
    assert by["failed c2"] == [] and by["other machine"] == []


async def _attribute_writes(store, keys: Keys, start_revision: int) -> list[tuple[str, str]]:
    """(PUT|DELETE, key) of every write to search entries since `start_revision`, in order: what
    a watch from there delivers until it has nothing more for a second."""
    prefix = f"{keys.root}idx/attr/"
    watch = await store.watch(prefix, prefix_end(prefix), start_revision=start_revision)
    batches = aiter(watch)
    seen: list[tuple[str, str]] = []
    try:
        while True:
            try:
                batch = await asyncio.wait_for(anext(batches), 1.0)
            except TimeoutError:
                return seen
            seen += [(e.type.upper(), e.kv.key[len(prefix):]) for e in batch.events]
    finally:
        await watch.cancel()


@pytest.mark.parametrize("run_ahead", [1, DEFAULT_RUN_AHEAD], ids=["a commit a tick", "runs ahead"])
def test_a_transition_that_changes_no_attribute_writes_no_search_entry(store_factory, write, run_ahead):
    steady = shop(write, STEADY, "steady.yaml")
    changing = shop(write)

    async def body(store, keys):
        start = await store.revision() + 1
        await run_instances(store, steady, [{"customer": "c7", "order": 42}], keys=keys, run_ahead=run_ahead)
        steady_writes = await _attribute_writes(store, keys, start)
        start = await store.revision() + 1
        await run_instances(store, changing, [{"customer": "c7", "total": 60}], keys=keys, run_ahead=run_ahead)
        changing_writes = await _attribute_writes(store, keys, start)
        return steady_writes, changing_writes

    steady_writes, changing_writes = in_namespace(store_factory, body)
    # created with its two entries; four transitions later, not one write more
    assert sorted(kind for kind, _ in steady_writes) == ["PUT", "PUT"]
    assert sorted(key.split("/")[0] for _, key in steady_writes) == ["customer", "order"]
    moved = [(kind, key.rsplit("/", 2)[0]) for kind, key in changing_writes]
    # created: customer, total, vip (stage has no value yet)
    created = [("PUT", "customer/c7"), ("PUT", "total/60"), ("PUT", "vip/false")]
    if run_ahead == 1:  # take: stage; pay: stage, total and vip move
        assert moved == [*created, ("PUT", "stage/taken"), ("DELETE", "stage/taken"), ("PUT", "stage/paid"),
                         ("DELETE", "total/60"), ("PUT", "total/120"), ("DELETE", "vip/false"), ("PUT", "vip/true")]
    else:  # take, pay and ship in one commit: where stage, total and vip end
        assert moved == [*created, ("PUT", "stage/paid"), ("DELETE", "total/60"), ("PUT", "total/120"),
                         ("DELETE", "vip/false"), ("PUT", "vip/true")]


def test_delete_and_retention_remove_the_search_entries(store_factory, write):
    text = SHOP.replace("start: take\n", "start: take\nretention: 0s\n")
    graph = shop(write, text)

    async def body(store, keys):
        from dsm.housekeeping import delete_expired

        done, _, _ = await run_instances(store, graph, [{"customer": "gone", "total": 1}] * 2, keys=keys)
        ops = Operations(store, keys)
        before = await _ids(ops, where={"customer": "gone"})
        await ops.delete(done[0].id)
        after_delete = await _ids(ops, where={"customer": "gone"})
        await delete_expired(store, keys, now=done[1].finished_at + 1)
        left = await store.range(f"{keys.root}idx/attr/", prefix_end(f"{keys.root}idx/attr/"))
        return done, before, after_delete, [kv.key for kv in left.kvs], await inconsistencies(store, keys)

    done, before, after_delete, left, problems = in_namespace(store_factory, body)
    assert sorted(before) == sorted(inst.id for inst in done)
    assert after_delete == [done[1].id]
    assert left == [] and problems == []


def test_the_record_keeps_its_attributes_texts_and_its_public_json_is_unchanged(store_factory, write):
    graph = shop(write)

    async def body(store, keys):
        done, _, _ = await run_instances(store, graph, [{"customer": "c9", "total": 7}], keys=keys)
        return done[0], await Operations(store, keys).record(done[0].id)

    inst, record = in_namespace(store_factory, body)
    assert dict(inst.search) == {"customer": "c9", "total": "14", "stage": "paid", "vip": "false"}
    assert "search" not in record  # SPEC's record JSON: the texts are the index's, not the record's


def test_a_page_by_where_reads_its_range_not_thein_namespace(store_factory, write):
    """Many instances of other customers: a page for one customer reads that customer's entries
    (and the records of the page), whatever else is stored."""
    text = "machine: many\nstart: done\nsearch:\n  customer: payload.customer\nstates:\n  done: {terminal: true}\n"
    graph = compiler.compile_text(text, "many.yaml", import_handlers=False)

    async def body(store, keys):
        ops = Operations(store, keys)
        await ops.submit_many(graph, [{"customer": "bulk"}] * 300)
        mine = [await ops.submit(graph, {"customer": "c7"}) for _ in range(3)]
        await ops.submit_many(graph, [{"customer": "bulk"}] * 300)
        reads: list[tuple[str, str | None, int]] = []
        real = store.txn

        async def counting(compare, success=(), failure=()):
            reads.extend((op.key, op.end, op.limit) for op in success if type(op).__name__ == "Get")
            return await real(compare, success, failure)

        store.txn = counting
        try:
            found = await _ids(ops, limit=50, where={"customer": "c7"})
        finally:
            store.txn = real
        return mine, found, reads

    mine, found, reads = in_namespace(store_factory, body)
    assert sorted(found) == sorted(mine)  # newest first: two made in one millisecond are in id order
    ranges = [key for key, end, _ in reads if end is not None]
    assert ranges and all("/idx/attr/customer/c7/" in key for key in ranges), ranges
    assert len([r for r in reads if r[1] is None]) == 3  # the records of the page, and no other


# -- the command line, against etcd ---------------------------------------------------------------

WAITS = """
machine: waits
start: a
search:
  customer: payload.customer
  order: payload.order
states:
  a:
    tick: nowhere:tick
    next: done
  done:
    terminal: true
"""


@pytest.mark.etcd
def test_dsm_list_where(etcd_url, namespace, write):
    at = ("--etcd", etcd_url, "--namespace", namespace)
    path = write("waits.yaml", WAITS)
    lines = "".join(json.dumps({"customer": f"c{i % 2}", "order": i}) + "\n" for i in range(6))
    submitted = dsm("submit", str(path), "--no-import", "--jsonl", "-", *at, input=lines)
    assert submitted.returncode == 0, submitted.stderr
    ids = submitted.stdout.split()

    def listed(*args: str) -> tuple[list[str], str]:
        result = dsm("list", "--json", *args, *at)
        assert result.returncode == 0, result.stderr
        return [s["id"] for s in json.loads(result.stdout)], result.stderr

    found, _ = listed("--where", "customer=c1")
    assert sorted(found) == sorted(ids[1::2])
    assert listed("--where", "customer=c1", "--where", "order=3")[0] == [ids[3]]
    assert listed("--where", "customer=c1", "--status", "running", "--machine", "waits")[0] == found
    assert listed("--where", "customer=c1", "--status", "succeeded")[0] == []
    first, err = listed("--where", "customer=c0", "--limit", "2")
    cursor = err.strip().removeprefix("next: ")
    rest, _ = listed("--where", "customer=c0", "--after", cursor)
    assert first + rest == listed("--where", "customer=c0")[0] and len(first + rest) == 3
    none = dsm("list", "--where", "customer=zz", *at)
    assert none.returncode == 0 and "where customer=zz" in none.stderr
    bad = dsm("list", "--where", "customer", *at)
    assert bad.returncode == 2 and "--where: expected NAME=VALUE" in bad.stderr


# -- what a commit holds ---------------------------------------------------------------------------

def _wide(name: str) -> str:
    attributes = "".join(f"  p{i}: payload.p{i}\n" for i in range(32))
    return f"machine: {name}\nstart: a\nsearch:\n{attributes}"


WIDE_HANDLERS = """
def bump(payload, ctx):
    return {key: value + 1 for key, value in payload.items()}

def same(payload, ctx):
    return payload
"""


def test_a_commit_that_moves_every_attribute_and_starts_children_with_as_many_fits_in_one_transaction(
        store_factory, write):
    """A parent whose tick changes its 32 attributes (64 operations) and forks into two call
    states, whose children have 32 attributes each (34 operations to create one): the children
    folded into the commit must leave room for the parent's own entries, else etcd refuses the
    transaction (more than 128 operations) and the instance fails with StoreRejected."""
    write("kid.yaml", _wide("kid") + "states:\n  a: {tick: widehandlers:same, next: done}\n  done: {terminal: true}\n")
    graph = compiler.load(write("wide.yaml", _wide("wide") + """states:
  a: {tick: widehandlers:bump, fork: [c1, c2], join: j}
  c1: {call: kid.yaml, next: j}
  c2: {call: kid.yaml, next: j}
  j: {tick: widehandlers:same, next: done}
  done: {terminal: true}
""", widehandlers=WIDE_HANDLERS))

    async def body(store, keys):
        done, _, _ = await run_instances(store, graph, [{f"p{i}": i for i in range(32)}], keys=keys)
        ops = Operations(store, keys)
        return done[0], await _ids(ops, where={"p0": "1", "p31": "32"}), await inconsistencies(store, keys)

    inst, found, problems = in_namespace(store_factory, body)
    assert inst.status == "succeeded", inst.error
    assert inst.id in found and len(found) == 3  # the parent and its two children (a copy of its payload)
    assert problems == []


# -- values that are no text -------------------------------------------------------------------------

SURROGATE = r"""
machine: odd
start: a
search:
  odd: "'\\ud800' ~ payload.stage if payload.stage else 'none'"
  customer: payload.customer
states:
  a: {tick: shophandlers:take, next: done}
  done: {terminal: true}
"""


def test_a_value_with_a_lone_surrogate_indexes_nothing_and_a_where_with_one_is_refused(store_factory, write):
    """A lone surrogate is not a character: no key, no record can hold it (etcd keys and JSON are
    UTF-8). An attribute whose expression gives one indexes nothing, as any other value that is no
    text; the instance runs on. A `where` holding one (`dsm list --where` given bytes that are not
    UTF-8 reads them so) is refused as the input error it is."""
    graph = shop(write, SURROGATE, "odd.yaml")
    assert search.text("\ud800") is None and search.text("a\udcffb") is None

    async def body(store, keys):
        done, _, _ = await run_instances(store, graph, [{"customer": "c1"}], keys=keys, timeout=10)
        ops = Operations(store, keys)
        refused = []
        for value in ("\udcff", "x\ud800"):
            with pytest.raises(InputError, match="where: odd"):
                await ops.page(where={"odd": value})
            refused.append(value)
        return done[0], await _ids(ops, where={"customer": "c1"}), refused, await inconsistencies(store, keys)

    inst, found, refused, problems = in_namespace(store_factory, body)
    assert inst.status == "succeeded" and dict(inst.search) == {"customer": "c1"}
    assert found == [inst.id] and len(refused) == 2 and problems == []
    with pytest.raises(InputError, match="where: odd"):
        search.parse_where(["odd=\udcff"], "=", "--where")
