"""The compiler against hostile machine files: nothing but DefinitionError may come out of it, and
each of its problems is one `file:line:col: error: ...` line.

Three sources of files, each written beside a copy of the examples (so that `call:` paths lead to
real files) and compiled as `dsm validate` compiles them:

* every odd value (NUL, lone surrogates, integers of thousands of digits, numbers beyond a float,
  deep nesting, paths the OS refuses) at every key of a machine that uses the whole language: a
  grid, since a random search rarely puts one given value at one given key;
* documents generated from our own JSON Schema, so that they pass it and reach the checks behind
  it (references, structure, calls, handlers);
* the example definitions, mutated: keys dropped or renamed, values swapped, odd values put in.

The random parts are short by default (a few seconds); raise DSM_FUZZ_EXAMPLES to search longer.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from clitools import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from dsm import compiler, handlers, loader
from dsm.errors import DefinitionError
from dsm.graph import Graph

EXAMPLES = ROOT / "definitions"
MACHINES = sorted(p for p in EXAMPLES.glob("*.yaml") if loader.looks_like_machine(p))
SCHEMA = json.loads((ROOT / "schemas" / "machine.schema.json").read_text(encoding="utf-8"))
ALLOW = handlers.Allowlist(tuple(p.stem for p in EXAMPLES.glob("*.py")))  # a generated tick imports nothing else
LOCATED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: \S.*$")
EXAMPLES_RUN = int(os.environ.get("DSM_FUZZ_EXAMPLES", "100"))

# PyYAML cannot write integers that Python will not turn into text: these stand for them
HUGE, HUGE_HEX = "HUGE_INTEGER_PLACEHOLDER", "HUGE_HEX_INTEGER_PLACEHOLDER"
ODD = [
    "", "a\x00b.yaml", "x\ud800y\n", "a/" * 3000, "9" * 400 + "d", HUGE, HUGE_HEX, 10 ** 400, float("nan"),
    float("inf"), True, None, [], {"k": [[]]},
]
# Every key of the language, in use: the grid puts each odd value at each of its paths.
SINK = """\
machine: sink
version: 1
description: every key of the language
start: a
max_transitions: 100
retention: 1d
defaults:
  timeout: 30s
  retry: {max_attempts: 2, backoff: 1s, multiplier: 2, max_backoff: 1m, jitter: true, non_retryable: [KeyError]}
states:
  a:
    tick: orders:receive
    timeout: 5s
    retry: {max_attempts: 3, backoff: 1s, multiplier: 1.5, max_backoff: 10s, jitter: false, non_retryable: [E]}
    catch: failed
    on: {ok: f, "no": failed}
  f:
    fork: [b, c]
    join: j
    merge: keys
  b:
    wait: 1s
    next: j
  c:
    signal: go
    timeout: 1m
    next: j
  j:
    map: {items: payload.xs, branch: m, max_concurrency: 2, with: [k], collect: out}
    join: sub
  m:
    choose:
      - when: "payload.item > 1"
        next: w
      - next: w
  w:
    wait: {until: payload.at}
    next: sub
  sub:
    call: child.yaml
    timeout: 1h
    retry: {max_attempts: 2}
    catch: failed
    next: done
  done:
    terminal: true
    status: succeeded
    description: the end
  failed:
    terminal: true
    status: failed
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the examples (machines and their modules), where the generated file is written."""
    where = tmp_path_factory.mktemp("fuzz")
    for source in EXAMPLES.iterdir():
        if source.suffix in (".yaml", ".py"):
            shutil.copy(source, where / source.name)
    (where / "child.yaml").write_text("machine: child\nstart: s\nstates:\n  s: {terminal: true}\n", encoding="utf-8")
    return where


def _text(document: Any) -> str:
    try:  # libyaml's writer is ten times faster, but cannot write lone surrogates
        text = yaml.dump(document, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=False, width=200)
    except (AttributeError, UnicodeEncodeError):
        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=False, width=200)
    return text.replace(HUGE_HEX, "0x" + "F" * 5000).replace(HUGE, "9" * 5000)


def located_or_compiled(folder: Path, text: str, *, raw: bool = False, import_handlers: bool = False) -> str | None:
    """Compile `text` as a file; None when it compiles or fails with located one-line problems,
    else what went wrong. `raw` writes lone surrogates as the bytes no UTF-8 decoder accepts."""
    path = folder / "fuzzed.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if raw else text.encode("ascii", "backslashreplace"))
    try:
        graph = compiler.load(path, import_handlers=import_handlers, allow=ALLOW)
    except DefinitionError as exc:
        if not exc.problems:
            return "a DefinitionError without problems"
        for problem in exc.problems:
            line = str(problem)
            if len(line.splitlines()) != 1 or not LOCATED.match(line) or problem.line < 1 or problem.col < 1:
                return f"not one located line: {line!r}"
    except Exception as exc:  # noqa: BLE001 - what the test is looking for
        return f"{type(exc).__name__}: {exc}"[:300]
    else:
        if not isinstance(graph, Graph):
            return f"compiled to {graph!r}"
    return None


# -- the grid ---------------------------------------------------------------------------------------

def _paths(value: Any, at: tuple = ()) -> list[tuple]:
    """Every path into a document: mapping keys and list positions."""
    out = [at]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, at + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _paths(child, at + (i,))
    return out


def _get(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value


def test_the_machine_of_every_key_compiles(folder: Path) -> None:
    """The grid starts from a machine that compiles: what fails there is the value put in."""
    assert located_or_compiled(folder, SINK) is None
    assert isinstance(compiler.load(folder / "fuzzed.yaml", import_handlers=False), Graph)


def _kind(path: tuple) -> str:
    """What a path holds, as the language names it: `timeout`, `fork[]`, `states.*` (a state)."""
    if len(path) == 2 and path[0] == "states":
        return "states.*"
    if path[-2:-1] == ("on",):
        return "on.*"
    if isinstance(path[-1], int):
        return f"{path[-2]}[]"
    return str(path[-1])


def test_every_odd_value_at_every_key_compiles_or_is_located(folder: Path) -> None:
    """Each odd value goes, at once, everywhere one kind of key is (every timeout, every fork
    branch), and the file is compiled: a few hundred files check every key of the language."""
    base = loader.parse(SINK).data
    kinds: dict[str, list[tuple]] = {}
    for path in _paths(base)[1:]:
        kinds.setdefault(_kind(path), []).append(path)
    failures = []
    for kind, paths in kinds.items():
        for value in ODD:
            document = copy.deepcopy(base)
            for path in paths:
                _get(document, path[:-1])[path[-1]] = copy.deepcopy(value)
            wrong = located_or_compiled(folder, _text(document))
            if wrong is not None:
                failures.append(f"{kind} = {str(value)[:40]!r}: {wrong}")
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} in all)"


def test_odd_names_of_states_keys_and_labels_are_located(folder: Path) -> None:
    base = loader.parse(SINK).data
    failures = []
    for path in [("states", "a"), ("states", "a", "tick"), ("states", "a", "on", "ok"), ("machine",),
                 ("states", "j", "map", "items"), ("defaults", "retry", "backoff")]:
        for name in [v for v in ODD if isinstance(v, str)]:
            document = copy.deepcopy(base)
            parent = _get(document, path[:-1])
            parent[name] = parent.pop(path[-1])
            wrong = located_or_compiled(folder, _text(document))
            if wrong is not None:
                failures.append(f"{loader.dotted(path)} renamed {name[:40]!r}: {wrong}")
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} in all)"


# -- documents from the schema ---------------------------------------------------------------------

def _narrowed(schema: dict[str, Any]) -> dict[str, Any]:
    """Our schema with constraints added, so that generation is quick and names meet: state names
    from a short list (references resolve, so the checks behind the schema run), a few states with
    a few keys, short lists and strings. Whatever it admits, the schema admits."""
    out = copy.deepcopy(schema)
    defs, state = out["definitions"], out["definitions"]["state"]["properties"]
    defs["stateName"]["enum"] = ["a", "b", "c", "j", "done", "_x", "on"]
    defs["handler"]["enum"] = ["orders:receive", "orders:check", "orders.nope", "approval:request", "m:f", "os.getcwd"]
    defs["retry"]["maxProperties"] = 3
    defs["retry"]["properties"]["non_retryable"]["maxItems"] = 2
    defs["state"]["maxProperties"] = 4
    out["maxProperties"] = 5
    out["properties"]["states"]["maxProperties"] = 6
    for key in ("fork", "choose"):
        state[key]["maxItems"] = 4
    state["call"]["anyOf"] = [{"enum": ["approval.yaml", "onboarding.yaml", "fuzzed.yaml", "nope.yaml", "a\0b.yaml",
                                        "../x.yaml", ".", "x" * 300]},
                              {"maxLength": 8}]
    state["on"]["propertyNames"]["maxLength"] = 8
    state["signal"]["maxLength"] = 8
    state["map"]["properties"]["with"]["maxItems"] = 2
    for text in (out["properties"]["description"], state["description"], state["map"]["properties"]["items"],
                 state["choose"]["items"]["properties"]["when"]):
        text["maxLength"] = 16
    return out


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    """The schema with every `$ref` replaced by what it refers to (ours has no recursive ones)."""
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _inline(definitions[node["$ref"].rpartition("/")[2]], definitions)
        return {**target, **_inline({k: v for k, v in node.items() if k != "$ref"}, definitions)}
    return {k: _inline(v, definitions) for k, v in node.items() if k != "definitions"}


def _values(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of a schema node. Objects, and choices between types, are put together here from the
    strategies of their parts: hypothesis-jsonschema works those out afresh for every draw, which
    costs a hundred times more."""
    if "oneOf" in node:  # ours are of different types each (a number or a string, a duration or an object)
        rest = {k: v for k, v in node.items() if k != "oneOf"}
        return st.one_of([_values({**rest, **branch}) for branch in node["oneOf"]])
    if node.get("type") != "object" or "anyOf" in node:
        return from_schema(node)
    properties = {key: _values(value) for key, value in node.get("properties", {}).items()}
    if node.get("additionalProperties") is False:
        required = {k: v for k, v in properties.items() if k in node.get("required", ())}
        optional = sorted(k for k in properties if k not in required)
        if not optional:
            return st.fixed_dictionaries(required)
        most = node.get("maxProperties", len(properties)) - len(required)
        return st.lists(st.sampled_from(optional), unique=True, max_size=most).flatmap(
            lambda chosen: st.fixed_dictionaries({**required, **{k: properties[k] for k in chosen}}))
    return st.dictionaries(from_schema({"type": "string", **node.get("propertyNames", {})}),
                           _values(node["additionalProperties"]), min_size=node.get("minProperties", 0),
                           max_size=node.get("maxProperties", 8))


NARROWED = _narrowed(SCHEMA)
SCHEMA_DOCUMENTS = _values(_inline(NARROWED, NARROWED["definitions"]))
FUZZ = settings(max_examples=EXAMPLES_RUN, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(document=SCHEMA_DOCUMENTS, import_handlers=st.booleans())
def test_definitions_the_schema_admits_compile_or_fail_with_located_problems(folder: Path, document: Any,
                                                                             import_handlers: bool) -> None:
    assert located_or_compiled(folder, _text(document), import_handlers=import_handlers) is None


# -- mutated examples ------------------------------------------------------------------------------

def _property_names(node: Any) -> set[str]:
    """Every key the schema knows, at any depth."""
    if isinstance(node, list):
        return set().union(*map(_property_names, node))
    if not isinstance(node, dict):
        return set()
    return set(node.get("properties", {})).union(*map(_property_names, node.values()))


KEYS = sorted(_property_names(SCHEMA))


@st.composite
def mutated(draw: st.DrawFn, documents: st.SearchStrategy[Any]) -> Any:
    """A document with a few keys dropped, renamed or added, values swapped or replaced by odd ones."""
    document = draw(documents)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(document)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["drop", "rename", "swap", "odd", "nest", "key"]))
        value = copy.deepcopy(draw(st.one_of(st.sampled_from(ODD), st.text(max_size=8), st.integers())))
        target = _get(document, path)
        if action == "key" and isinstance(target, dict):  # a key the language knows, somewhere
            target[draw(st.sampled_from(KEYS))] = value
            continue
        if not path:
            continue
        parent, last = _get(document, path[:-1]), path[-1]
        if action == "drop":
            del parent[last]
        elif action == "rename" and isinstance(parent, dict) and isinstance(value, str):
            parent[value] = parent.pop(last)
        elif action == "swap":
            other = draw(st.sampled_from(paths))
            if other and other[:len(path)] != path and path[:len(other)] != other:  # neither holds the other
                holder = _get(document, other[:-1])
                parent[last], holder[other[-1]] = holder[other[-1]], parent[last]
        elif action == "odd":
            parent[last] = value
        elif action == "nest":
            for _ in range(draw(st.integers(100, 160))):  # around the loader's limit of 128 levels
                target = [target] if draw(st.booleans()) else {"k": target}
            parent[last] = target
    return document


EXAMPLE_DOCUMENTS = st.sampled_from(MACHINES).map(lambda path: loader.read(path).data)


@FUZZ
@given(document=mutated(st.one_of(EXAMPLE_DOCUMENTS, SCHEMA_DOCUMENTS)), raw=st.booleans(),
       import_handlers=st.booleans())
def test_mutated_definitions_compile_or_fail_with_located_problems(folder: Path, document: Any, raw: bool,
                                                                   import_handlers: bool) -> None:
    assert located_or_compiled(folder, _text(document), raw=raw, import_handlers=import_handlers) is None
