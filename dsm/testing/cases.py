"""The `dsm test` file: one machine and its cases, checked strictly, every problem at file:line:col.

    machine: ../definitions/order.yaml        # relative to this file
    cases:
      - name: a big order is insured          # unique in the file
        payload: {total: 120}                 # default {}
        mock:                                 # handler -> results of its successive calls
          orders:bill: [{raise: TimeoutError}, {return: {charge_id: c1}}]
        signals: [{name: approve, outcome: yes, payload: {by: ann}}]
        expect: {status: succeeded, path: [receive, check, ...], payload: {charge_id: c1}, error: null}

Loading a test file compiles its machine too (importing its handlers, as `dsm validate` does), so
that every reference of a case is checked against the machine before anything runs: a mock of a
handler the machine does not use, a path through a state it does not have, a signal nothing
waits for. A file with any problem runs no case at all: a typo in a test must not pass as a test
that fails for a reason of its own.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from .. import compiler, handlers, loader, payloads, schema
from ..errors import DefinitionError, Problem
from ..graph import Graph, Handler
from ..loader import Document

STATUSES = ("succeeded", "failed", "cancelled", "running")


@dataclass(frozen=True, slots=True)
class MockResult:
    """One call's result: raise an exception of class `error` with `message`, or return `value`."""

    kind: Literal["raise", "return"]
    error: str | None = None
    message: str | None = None
    value: Any = None


@dataclass(frozen=True, slots=True)
class Mock:
    """A handler replaced in one case: `ref` as the test file writes it, the results of its calls."""

    ref: str
    results: tuple[MockResult, ...]


@dataclass(frozen=True, slots=True)
class Signal:
    name: str
    outcome: str | None = None
    payload: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class ExpectedError:
    """`expect.error`: the instance's error has these fields (a subset of type, message, state,
    attempts), or, when `fields` is None, the instance has no error."""

    fields: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Expect:
    """What a case checks; None: not checked."""

    status: str | None = None
    path: tuple[str, ...] | None = None
    payload: Mapping[str, Any] | None = None
    error: ExpectedError | None = None


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    number: int  # its position in the file, from 1
    instance_id: str
    payload: Mapping[str, Any]
    mocks: Mapping[str, Mock]  # by handler_key
    signals: tuple[Signal, ...]
    expect: Expect
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class TestFile:
    """A checked test file with its compiled machine."""

    __test__ = False  # not a pytest test class, wherever it is imported

    file: str
    machine: Graph
    cases: tuple[Case, ...]


def handler_key(ref: str | Handler) -> str:
    """One spelling for one handler: `orders:bill` and `orders.bill` are the same function."""
    if isinstance(ref, Handler):
        return f"{ref.module}:{ref.function}"
    module, function = handlers.split_ref(ref)
    return f"{module}:{function}"


def load_test_file(path: str | Path) -> TestFile:
    """Read, check and compile a test file and its machine; raise DefinitionError listing every
    problem (those of the machine at the machine file's own lines)."""
    doc = loader.read(path, what="test suite")
    return _Checker(doc).check()


class _Checker:
    def __init__(self, doc: Document):
        self.doc = doc
        self.problems: list[Problem] = []

    def report(self, at: tuple, message: str, *, key: bool = False) -> None:
        self.problems.append(self.doc.problem(at, message, key=key))

    def check(self) -> TestFile:
        self.problems.extend(schema.validate(self.doc, schema.TEST_FILE))
        data = self.doc.data if isinstance(self.doc.data, dict) else {}
        graph = self.machine(data.get("machine"))
        raw_cases = data.get("cases")
        cases: list[Case] = []
        names: dict[str, int] = {}
        for i, body in enumerate(raw_cases if isinstance(raw_cases, list) else ()):
            if isinstance(body, dict):
                case = self.case(i, body, graph, names)
                if case is not None:
                    cases.append(case)
        if self.problems or graph is None:
            raise DefinitionError(self.problems or [self.doc.problem((), "test file could not be checked")])
        return TestFile(file=self.doc.file, machine=graph, cases=tuple(cases))

    # -- the machine -------------------------------------------------------------------------
    def machine(self, ref: Any) -> Graph | None:
        if not isinstance(ref, str) or not ref:
            return None  # the schema reported it
        path = Path(self.doc.file).parent / ref
        if not path.is_file():
            self.report(("machine",), f"machine: no file {ref!r} (looked for {path}); the path is relative to "
                        "the test file")
            return None
        try:
            return compiler.load(path)
        except DefinitionError as exc:
            self.problems.extend(exc.problems)
            self.report(("machine",), f"machine: {ref!r} is not a valid definition ({len(exc.problems)} "
                        "problem(s), reported at its own lines)")
            return None

    # -- one case ----------------------------------------------------------------------------
    def case(self, i: int, body: dict[str, Any], graph: Graph | None, names: dict[str, int]) -> Case | None:
        at = ("cases", i)
        before = len(self.problems)
        name = body.get("name")
        if isinstance(name, str):
            if name in names:
                self.report(at + ("name",), f"case name {name!r} is used twice (first at line {names[name]}): "
                            "results are reported by name")
            else:
                names[name] = self.doc.where(at + ("name",))[0]
        payload = self.payload(at + ("payload",), body.get("payload", {}))
        mocks = self.mocks(at + ("mock",), body.get("mock"), graph)
        signals = self.signals(at + ("signals",), body.get("signals"), graph)
        expect = self.expect(at + ("expect",), body.get("expect"), graph)
        if len(self.problems) > before or not isinstance(name, str) or expect is None:
            return None
        line, col = self.doc.where(at)
        given_id = body.get("id")
        instance_id = given_id if isinstance(given_id, str) else f"test-{i + 1}"
        return Case(name=name, number=i + 1, instance_id=instance_id,
                    payload=MappingProxyType(payload or {}), mocks=MappingProxyType(mocks), signals=signals,
                    expect=expect, line=line, col=col)

    def payload(self, at: tuple, value: Any) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            return None  # the schema reported it
        try:
            return payloads.check(value)[0]
        except payloads.PayloadError as exc:
            self.report(at, f"{loader.dotted(at)}: {exc}")
            return None

    def mocks(self, at: tuple, raw: Any, graph: Graph | None) -> dict[str, Mock]:
        out: dict[str, Mock] = {}
        if not isinstance(raw, dict):
            return out
        used = _handlers(graph) if graph is not None else None
        machine = graph.machine if graph is not None else ""
        for ref, results in raw.items():
            where = at + (ref,)
            try:
                key = handler_key(ref)
            except handlers.HandlerImportError as exc:
                self.report(where, f"mock: {exc}", key=True)
                continue
            if used is not None and key not in used:
                hint = difflib.get_close_matches(key, list(used), n=1)
                known = f"did you mean {hint[0]!r}?" if hint else f"it uses {', '.join(sorted(used)) or 'none'}"
                self.report(where, f"mock of {ref!r}: machine {machine!r} has no state with this handler ({known})",
                            key=True)
                continue
            if key in out:
                self.report(where, f"mock of {ref!r}: the same handler is mocked as {out[key].ref!r} too; "
                            "give it one list", key=True)
                continue
            if isinstance(results, list):
                parsed = [self.mock_result(where + (j,), r) for j, r in enumerate(results)]
                out[key] = Mock(ref, tuple(r for r in parsed if r is not None))
        return out

    def mock_result(self, at: tuple, raw: Any) -> MockResult | None:
        if not isinstance(raw, dict):
            return None  # the schema reported it
        if ("raise" in raw) == ("return" in raw):
            self.report(at, f"{loader.dotted(at)}: give one of raise (an error name) or return (a value)")
            return None
        if "return" in raw:
            if "message" in raw:
                self.report(at + ("message",), f"{loader.dotted(at)}: message goes with raise, not return",
                            key=True)
                return None
            value = raw["return"]
            if isinstance(value, list):
                if len(value) != 2 or not isinstance(value[0], str) or not isinstance(value[1], dict):
                    self.report(at + ("return",), f"{loader.dotted(at + ('return',))}: a list is [label, payload], "
                                "an outcome label and a mapping")
                    return None
                checked = self.payload(at + ("return", 1), value[1])
                return None if checked is None else MockResult("return", value=(value[0], checked))
            if isinstance(value, dict):
                checked = self.payload(at + ("return",), value)
                return None if checked is None else MockResult("return", value=checked)
            return MockResult("return", value=value)  # a label, or None; other types the schema reported
        error, message = raw.get("raise"), raw.get("message")
        if not isinstance(error, str) or not (message is None or isinstance(message, str)):
            return None
        return MockResult("raise", error=error, message=message)

    def signals(self, at: tuple, raw: Any, graph: Graph | None) -> tuple[Signal, ...]:
        out: list[Signal] = []
        waited = _signal_names(graph) if graph is not None else None
        machine = graph.machine if graph is not None else ""
        for j, body in enumerate(raw if isinstance(raw, list) else ()):
            if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                continue
            name, outcome = body["name"], body.get("outcome")
            # A signal no state waits for is never sent (as on a cluster, where it would wait in the
            # record); one that looks like a misspelling of a signal the machine waits for is an error.
            hint = difflib.get_close_matches(name, sorted(waited), n=1) if waited and name not in waited else []
            if hint:
                self.report(at + (j, "name"), f"signal {name!r}: no state of machine {machine!r} waits for it "
                            f"(did you mean {hint[0]!r}?)")
                continue
            payload = self.payload(at + (j, "payload"), body.get("payload", {}))
            if payload is not None and (outcome is None or isinstance(outcome, str)):
                out.append(Signal(name, outcome, MappingProxyType(payload)))
        return tuple(out)

    def expect(self, at: tuple, raw: Any, graph: Graph | None) -> Expect | None:
        if not isinstance(raw, dict):
            return None  # the schema reported it (expect is required)
        if not raw:
            self.report(at, f"{loader.dotted(at)}: give at least one of status, path, payload, error")
            return None
        path = raw.get("path")
        if isinstance(path, list) and graph is not None:
            for j, state in enumerate(path):
                if isinstance(state, str) and state not in graph.states:
                    hint = difflib.get_close_matches(state, list(graph.states), n=1)
                    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                    self.report(at + ("path", j), f"{loader.dotted(at + ('path', j))}: machine {graph.machine!r} "
                                f"has no state {state!r}{suggestion}")
        status = raw.get("status")
        payload = raw.get("payload")
        error: ExpectedError | None = None
        if "error" in raw:
            value = raw["error"]
            if value is None:
                error = ExpectedError(None)
            elif isinstance(value, str):
                error = ExpectedError(MappingProxyType({"type": value}))
            elif isinstance(value, dict):
                error = ExpectedError(MappingProxyType(dict(value)))
        return Expect(status=status if status in STATUSES else None,
                      path=tuple(p for p in path if isinstance(p, str)) if isinstance(path, list) else None,
                      payload=MappingProxyType(payload) if isinstance(payload, dict) else None,
                      error=error)


def _handlers(graph: Graph) -> set[str]:
    """The handlers a machine's states call, and those of the machines it calls, one spelling each
    (`handler_key`): a case mocks a child's handlers the same way."""
    machines = [graph, *graph.children().values()]
    return {handler_key(s.tick) for g in machines for s in g.states.values() if s.tick is not None}


def _signal_names(graph: Graph) -> set[str]:
    """The signals the states of a machine, and of the machines it calls, wait for."""
    machines = [graph, *graph.children().values()]
    return {s.signal for g in machines for s in g.states.values() if s.signal is not None}


__all__ = ["Case", "Expect", "ExpectedError", "Mock", "MockResult", "Signal", "TestFile", "handler_key",
           "load_test_file"]
