"""Hostile input at every door: generated definitions, payloads, the command line, handler names."""

from __future__ import annotations

import json
import re
import string

import pytest
from clitools import dsm
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dsm import compile_text
from dsm.errors import DefinitionError
from dsm.graph import Graph

LOCATED = re.compile(r"^m\.yaml:(\d+):(\d+): error: \S.*$")

NAMES = st.sampled_from(["a", "b", "c", "done", "fail", "j", "f", "on", "yes", "no", "x-y", "_p", "A1"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.sampled_from(
    ["", "1s", "30x", "m:f", "m.f", "payload.x > 1", "payload.", "{{", "on", "terminal", "a"]), NAMES)
KEYS = st.sampled_from(["tick", "next", "on", "choose", "fork", "join", "merge", "terminal", "status", "timeout",
                        "retry", "catch", "description", "nxt", "when", "max_attempts", "backoff"])


def values(depth: int = 2):
    if depth == 0:
        return SCALARS
    return st.one_of(SCALARS, st.lists(values(depth - 1), max_size=3),
                     st.dictionaries(st.one_of(KEYS, NAMES), values(depth - 1), max_size=3))


STATE = st.dictionaries(KEYS, values(), max_size=4)
DOCUMENT = st.fixed_dictionaries(
    {"machine": st.one_of(st.sampled_from(["order", "m", "Bad Name", ""]), SCALARS),
     "start": st.one_of(NAMES, SCALARS),
     "states": st.one_of(st.dictionaries(NAMES, STATE, max_size=6), SCALARS)},
    optional={"max_transitions": SCALARS, "defaults": values(), "version": SCALARS})


YAML_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def assert_compiles_or_locates(text: str) -> None:
    try:
        graph = compile_text(text, "m.yaml", import_handlers=False)
    except DefinitionError as exc:
        assert exc.problems, "a DefinitionError must say what is wrong"
        lines = len(YAML_LINE_BREAK.split(text))  # YAML breaks lines at \r and NEL too, as editors do
        for problem in exc.problems:
            assert LOCATED.match(str(problem)), str(problem)
            assert 1 <= problem.line <= lines + 1 and problem.col >= 1, str(problem)
    else:
        assert isinstance(graph, Graph)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENT)
def test_generated_definitions_compile_or_fail_with_located_problems(document):
    import yaml

    assert_compiles_or_locates(yaml.safe_dump(document, sort_keys=False))


VALID = """\
machine: order
start: a
states:
  a:
    tick: m:f
    on: {yes: f, no: done}
  f:
    fork: [b, c]
    join: j
  b:
    choose:
      - when: "payload.x > 1"
        next: j
      - next: j
  c:
    next: j
  j:
    next: done
  done:
    terminal: true
"""


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_definitions_compile_or_fail_with_located_problems(data):
    lines = VALID.splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["delete", "duplicate", "insert", "replace", "indent"]))
        i = data.draw(st.integers(0, len(lines) - 1))
        if action == "delete" and len(lines) > 1:
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, lines[i])
        elif action == "insert":
            lines.insert(i, data.draw(st.text(string.printable, max_size=20)) + "\n")
        elif action == "replace":
            j = data.draw(st.integers(0, max(0, len(lines[i]) - 1)))
            ch = data.draw(st.sampled_from(list(":-[]{}&*!|>'\"%@`#, \t")))
            lines[i] = lines[i][:j] + ch + lines[i][j + 1:]
        else:
            lines[i] = "  " + lines[i]
    assert_compiles_or_locates("".join(lines))


@given(st.text(max_size=300))
@example("\r\r\r\rx: [")  # lines broken as YAML breaks them: at a lone \r, NEL, U+2028 and U+2029
@example("\x85\u2028\u2029x: [")
@settings(max_examples=200, deadline=None)
def test_arbitrary_text_never_crashes_the_compiler(text):
    assert_compiles_or_locates(text)


def test_recursive_alias_and_deep_nesting_are_located():
    for text in ("a: &x [*x]\n", "a: " + "[" * 5000 + "]" * 5000 + "\n", "a: " + "{b: " * 300 + "1" + "}" * 300):
        with pytest.raises(DefinitionError) as info:
            compile_text(text, "m.yaml", import_handlers=False)
        assert all(LOCATED.match(str(p)) for p in info.value.problems)


# -- payloads at the command line ---------------------------------------------------------------

@pytest.mark.parametrize("payload,words", [
    ('{"x": NaN}', "not valid JSON"),
    ('{"x": Infinity}', "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"deep": ' + "[" * 300 + "]" * 300 + "}", "nested deeper than 253 levels"),
    ('"just a string"', "must be a JSON object, got a string"),
    ("null", "must be a JSON object, got null"),
    ('{"big": "' + "x" * (1024 * 1024 + 10) + '"}', "the limit is 1048576 bytes"),
    ('{"n": [1, -' + "9" * 5000 + "]}", "payload.n[1] is an integer of more than 4300 digits"),
    ('{"s": "a\\ud800"}', "payload.s holds a lone surrogate '\\ud800'"),
], ids=["nan", "infinity", "deep-100000", "deep-300", "string", "null", "over-1MiB", "5000-digits", "lone-surrogate"])
def test_bad_payloads_are_refused_before_anything_runs(payload, words, tmp_path):
    path = tmp_path / "payload.json"
    path.write_text(payload)
    result = dsm("run", "definitions/order.yaml", "--payload-file", str(path))
    assert result.returncode == 2, result.stderr[-500:]
    assert words in result.stderr and "Traceback" not in result.stderr
    assert "started" not in result.stderr


@pytest.mark.etcd
def test_a_bad_line_in_jsonl_writes_nothing(etcd, namespace, tmp_path):
    lines = tmp_path / "many.jsonl"
    lines.write_text('{"total": 1}\n{"total": 2}\n{"total": NaN}\n{"total": 4}\n')
    result = dsm("submit", "definitions/order.yaml", "--jsonl", str(lines), "--etcd", etcd.endpoint,
                 "--namespace", namespace)
    assert result.returncode == 2 and f"{lines}:3" in result.stderr and result.stdout == ""
    listed = dsm("list", "--json", "--etcd", etcd.endpoint, "--namespace", namespace)
    assert json.loads(listed.stdout) == []


@pytest.mark.etcd
def test_oversized_payload_is_refused_by_submit_and_nothing_is_written(etcd, namespace, tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"blob": "x" * (2 * 1024 * 1024)}))
    result = dsm("submit", "definitions/order.yaml", "--payload-file", str(path), "--etcd", etcd.endpoint,
                 "--namespace", namespace)
    assert result.returncode == 2 and "PayloadTooLarge" not in result.stdout and "limit" in result.stderr
    listed = dsm("list", "--json", "--etcd", etcd.endpoint, "--namespace", namespace)
    assert json.loads(listed.stdout) == []


# -- handler names --------------------------------------------------------------------------------

@pytest.mark.parametrize("tick,words", [
    ("builtins:eval", "never allowed"),
    ("os:system", "not in the worker's allowlist"),
    ("subprocess.run", "not in the worker's allowlist"),
    ("orders:_private", "private name '_private'"),
    ("orders._helpers:x", "private name '_helpers'"),
    ("__main__:x", "never allowed"),
])
def test_handlers_outside_the_allowlist_are_refused(tick, words):
    from dsm import handlers

    text = VALID.replace("tick: m:f", f"tick: {tick}")
    with pytest.raises(DefinitionError) as info:
        compile_text(text, "m.yaml", import_handlers=True, allow=handlers.Allowlist(("orders", "m")))
    assert any(words in p.message for p in info.value.problems), info.value.problems


def test_private_names_are_refused_even_without_an_allowlist():
    text = VALID.replace("tick: m:f", "tick: m:_f")
    with pytest.raises(DefinitionError) as info:
        compile_text(text, "m.yaml", import_handlers=False)
    assert "private name '_f'" in str(info.value)


# -- instance ids and namespaces ------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["a/b", "../inst/x", "", "-leading", ".hidden", "x" * 129, "café", "a b",
                                 "a\n", "t1/claim"])
def test_instance_ids_outside_the_contract_are_refused_before_anything_is_written(bad):
    import asyncio

    from dsm.errors import InputError
    from dsm.operations import Operations
    from dsm.store.memory import MemoryStore

    graph = compile_text("machine: m\nstart: a\nstates:\n  a: {terminal: true}\n", "m.yaml", import_handlers=False)

    async def main():
        store = MemoryStore()
        client = Operations(store)
        for attempt in (lambda: client.submit(graph, {}, instance_id=bad), lambda: client.record(bad),
                        lambda: client.cancel(bad), lambda: client.submit_many(graph, [{}, {}], ids=["ok", bad])):
            with pytest.raises(InputError, match="invalid instance id"):
                await attempt()
        written = (await store.range("/", "\0")).kvs
        good = await client.submit(graph, {}, instance_id="A1.b_c:d-" + "e" * 119)
        return written, good

    written, good = asyncio.run(main())
    assert written == [] and len(good) == 128


def test_one_id_given_twice_in_a_batch_is_refused():
    import asyncio

    from dsm.errors import InputError
    from dsm.operations import Operations
    from dsm.store.memory import MemoryStore

    graph = compile_text("machine: m\nstart: a\nstates:\n  a: {terminal: true}\n", "m.yaml", import_handlers=False)
    with pytest.raises(InputError, match="'x' is given twice"):
        asyncio.run(Operations(MemoryStore()).submit_many(graph, [{}, {}], ids=["x", "x"]))


@pytest.mark.etcd
def test_the_command_line_refuses_an_invalid_instance_id_with_exit_2(etcd, namespace):
    for command in ("status", "cancel"):
        result = dsm(command, "a/b", "--etcd", etcd.endpoint, "--namespace", namespace)
        assert result.returncode == 2 and "invalid instance id 'a/b'" in result.stderr, result.stderr


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=6), st.lists(st.text(max_size=8), max_size=8))
def test_prefix_end_bounds_exactly_the_keys_with_the_prefix_in_string_and_utf8_order(prefix, keys):
    from dsm.store import prefix_end

    prefix, keys = _no_surrogates(prefix), [_no_surrogates(k) for k in keys]
    end = prefix_end(prefix)
    for key in keys + [prefix, prefix + "\U0010ffff", prefix + "\x00"]:
        inside = key >= prefix and (end == "\0" or key < end)
        inside_bytes = key.encode() >= prefix.encode() and (end == "\0" or key.encode() < end.encode())
        assert inside == inside_bytes == key.startswith(prefix), (prefix, key, end)


def _no_surrogates(text: str) -> str:
    return "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)


@pytest.mark.parametrize("namespace_name", ["café", "ünï", "名前", "x\U0001f600"])
def test_a_non_ascii_namespace_runs_its_instances(store_factory, namespace_name, namespace):
    import asyncio

    from helpers import run_instances

    from dsm.keys import Keys
    from dsm.operations import Operations

    graph = compile_text("machine: m\nstart: a\nstates:\n  a: {next: done}\n  done: {terminal: true}\n",
                         "m.yaml", import_handlers=False)
    keys = Keys(f"{namespace_name}-{namespace}")

    async def main():
        store = await store_factory()
        try:
            done, _, _ = await run_instances(store, graph, [{}, {}], keys=keys, timeout=30)
            return done, await Operations(store, keys).list()
        finally:
            await store.close()

    done, listed = asyncio.run(main())
    assert [i.status for i in done] == ["succeeded", "succeeded"] and len(listed) == 2


# -- batches of large payloads --------------------------------------------------------------------

def test_submit_many_splits_large_payloads_into_requests_etcd_accepts(store_factory, namespace):
    import asyncio

    from dsm.keys import Keys
    from dsm.operations import Operations

    graph = compile_text("machine: m\nstart: a\nstates:\n  a: {next: done}\n  done: {terminal: true}\n",
                         "m.yaml", import_handlers=False)
    bodies = [{"blob": "x" * 600_000, "n": i} for i in range(3)] + [{"n": i} for i in range(3, 70)]

    async def main():
        store = await store_factory()
        try:
            client = Operations(store, Keys(namespace))
            ids = await client.submit_many(graph, bodies)  # one request of 1.8 MB was refused by etcd
            return [(await client.instance(i)).payload for i in ids]
        finally:
            await store.close()

    assert asyncio.run(main()) == bodies


@pytest.mark.etcd
def test_submit_jsonl_of_large_payloads_each_fine_alone(etcd, namespace, tmp_path):
    lines = tmp_path / "big.jsonl"
    lines.write_text("".join(json.dumps({"total": i, "blob": "y" * 600_000}) + "\n" for i in range(3)))
    result = dsm("submit", "definitions/order.yaml", "--jsonl", str(lines), "--etcd", etcd.endpoint,
                 "--namespace", namespace)
    assert result.returncode == 0, result.stderr[-500:]
    assert len(result.stdout.split()) == 3 and "too large" not in result.stderr
    listed = dsm("list", "--json", "--etcd", etcd.endpoint, "--namespace", namespace)
    assert len(json.loads(listed.stdout)) == 3


def test_validate_refuses_a_handler_imported_into_its_module_at_its_line(write):
    path = write("m.yaml", """
        machine: m
        start: a
        states:
          a:
            tick: shellish:run
            next: done
          done:
            terminal: true
        """, shellish="from subprocess import run\n")
    result = dsm("validate", str(path))
    assert result.returncode == 2
    assert result.stdout.startswith(f"{path}:5:11: error: states.a.tick: shellish:run is defined in 'subprocess'")
