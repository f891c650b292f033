"""Guards: what they can see, what they cannot reach, and what they cannot cost."""

from __future__ import annotations

import tracemalloc

import pytest

from dsm.guards import GuardError, compile_guard

PAYLOAD = {"total": 120, "lines": ["a", "b"], "items": [1], "name": "x", "nested": {"k": 1}}
INSTANCE = {"id": "i-1", "machine": "order"}


def check(expr: str, payload=PAYLOAD):
    return compile_guard(expr)(payload, INSTANCE, "ship")


@pytest.mark.parametrize("expr,expected", [
    ("payload.total > 100", True),
    ("payload.total > 1000", False),
    ("payload['total'] == 120 and payload.lines | length == 2", True),
    ("'a' in payload.lines", True),
    ("payload['items'] == [1]", True),  # a key named like a dict method needs the [] form
    ("payload.nested.k == 1", True),
    ("payload.get('missing') is none", True),
    ("payload.missing is defined", False),
    ("instance.machine == 'order' and instance.id.startswith('i-')", True),
    ("state == 'ship'", True),
    ("payload.lines | map('upper') | list == ['A', 'B']", True),
    ("(payload.total / 7) | round(1) > 17", True),
])
def test_guards_see_payload_instance_and_state(expr, expected):
    assert check(expr) is expected


@pytest.mark.parametrize("expr", [
    "payload.__class__",
    "payload.__class__.__mro__[1].__subclasses__()",
    "payload|attr('__class__')",
    "payload.items.__self__",
    "'{0.__class__}'.format(payload)",
    "'{x.__class__.__mro__}'.format_map({'x': payload})",
    "'{x.__init__.__globals__}'.format(x=payload)",
    "payload.name.__class__.__base__",
    "payload.update({'x': 1})",
    "payload.pop('total')",
    "payload.lines.append('c')",
    "payload.setdefault('x', 1)",
    "(payload.lines).__len__()",
])
def test_sandbox_escapes_and_mutation_are_refused(expr):
    with pytest.raises(GuardError) as info:
        check(expr)
    assert "<class" not in str(info.value) and "__builtins__" not in str(info.value)  # nothing leaked
    assert PAYLOAD["lines"] == ["a", "b"] and PAYLOAD["total"] == 120 and "x" not in PAYLOAD


@pytest.mark.parametrize("expr", [
    "'x' * 10 ** 9 != ''",
    "[1] * 10 ** 8 | length > 0",
    "2 ** 1000000 > 1",  # (Jinja's ** is left-associative: 2 ** 10 ** 6 is (2 ** 10) ** 6, cheap)
    "(2 ** 200) ** 200 > 1",
    "'%0999999999d' % 1",
    "payload.name.center(10 ** 9) != ''",
    "payload.name.ljust(10 ** 9) != ''",
    "('x' * 90000 + 'y' * 90000) * 3 != ''",
])
def test_guard_evaluation_is_bounded(expr):
    # refused before the work is done: the operation is checked, the huge value never built
    tracemalloc.start()
    try:
        with pytest.raises(GuardError):
            check(expr)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


@pytest.mark.parametrize("expr,words", [
    ("range(10) | length > 1", "unknown name 'range'"),
    ("lipsum() != ''", "unknown name 'lipsum'"),
    ("cycler(1) != 0", "unknown name 'cycler'"),
    ("os.system('true')", "unknown name 'os'"),
    ("payload.total >", "does not compile"),
    ("payload.total }} {{ 1", "does not compile"),
])
def test_unknown_names_and_syntax_fail_at_compile_time(expr, words):
    with pytest.raises(GuardError) as info:
        compile_guard(expr)
    assert words in str(info.value)


def test_errors_at_evaluation_name_the_guard():
    with pytest.raises(GuardError) as info:
        check("payload.nothing > 1")
    assert "payload.nothing > 1" in str(info.value) and "nothing" in str(info.value)
    with pytest.raises(GuardError):
        check("payload.name > 1")  # str > int
    with pytest.raises(GuardError):
        check("payload.total / 0")
