"""Every compile-time check of the contract: one bad file each, asserting line, column and message."""

from __future__ import annotations

import sys
import textwrap

import pytest

from bench.compile import chain, nested_forks, wide_fork
from dsm import compile_text, compiler, graphcheck, handlers, kinds, schema
from dsm.errors import DefinitionError, InputError
from dsm.graph import Kind

GOOD = """
machine: order
start: a
states:
  a:
    next: done
  done:
    terminal: true
"""


def problems(text: str, **kw) -> list:
    with pytest.raises(DefinitionError) as info:
        compile_text(textwrap.dedent(text).lstrip("\n"), "m.yaml", import_handlers=False, **kw)
    return info.value.problems


def one(text: str, **kw):
    found = problems(text, **kw)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def test_good_machine_compiles_to_a_frozen_graph():
    graph = compile_text(textwrap.dedent(GOOD), "m.yaml", import_handlers=False)
    assert graph.machine == "order" and graph.start == "a"
    assert graph.states["a"].kind is Kind.NEXT and graph.states["done"].terminal
    assert graph.digest.startswith("sha256:") and len(graph.digest) == 7 + 64
    with pytest.raises(TypeError):
        graph.states["x"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):  # a frozen dataclass: FrozenInstanceError
        graph.start = "b"  # type: ignore[misc]


def test_digest_is_of_the_content():
    a = compile_text(textwrap.dedent(GOOD), "a.yaml", import_handlers=False)
    b = compile_text(textwrap.dedent(GOOD), "b.yaml", import_handlers=False)
    c = compile_text(textwrap.dedent(GOOD) + "# changed\n", "c.yaml", import_handlers=False)
    assert a.digest == b.digest != c.digest


def test_schema_error_names_key_path_line_and_column():
    p = one("""
        machine: order
        start: a
        states:
          a:
            tick: m:f
            retry: {max_attempts: 0}
            next: done
          done:
            terminal: true
        """)
    assert (p.line, p.col) == (6, 27)
    assert p.message.startswith("states.a.retry.max_attempts: 0 is less than the minimum of 1")


def test_misspelt_routing_key_is_reported_twice_over():
    found = problems("""
        machine: order
        start: a
        states:
          a:
            nxt: done
          done:
            terminal: true
        """)
    assert [(p.line, p.col) for p in found] == [(4, 3), (5, 5)]
    assert "state 'a' has no routing key" in found[0].message
    assert "states.a: unknown key 'nxt' (did you mean 'next'?)" in found[1].message


def test_unknown_key_reports_did_you_mean():
    found = problems("""
        machine: order
        start: a
        states:
          a:
            next: done
            timout: 5s
          done:
            terminal: true
        """)
    (p,) = [p for p in found if "unknown key" in p.message]
    assert (p.line, p.col) == (6, 5)
    assert "unknown key 'timout' (did you mean 'timeout'?)" in p.message


def test_bad_machine_name_and_duration():
    found = problems("""
        machine: Order
        start: a
        defaults: {timeout: 30 seconds}
        states:
          a:
            next: done
          done:
            terminal: true
        """)
    assert [(p.line, p.path) for p in found] == [(1, "machine"), (3, "defaults.timeout")]
    assert "expected a duration" in found[1].message


@pytest.mark.parametrize("key, value, words", [
    ("timeout", ".inf", "states.a.timeout: must be a finite number of seconds >= 0, got inf"),
    ("timeout", ".nan", "states.a.timeout: must be a finite number of seconds >= 0, got nan"),
    ("timeout", "1" + "0" * 400, "states.a.timeout: must be a finite number of seconds >= 0, got an integer of 401 "
     "digits"),
    ("timeout", "9" * 400 + "d", "states.a.timeout: must be a finite duration, got '999"),
    ("retry", "{multiplier: .inf}", "states.a.retry.multiplier: must be a finite number >= 1, got inf"),
    ("retry", "{multiplier: 1" + "0" * 400 + "}", "states.a.retry.multiplier: must be a finite number >= 1, got an "
     "integer of 401 digits"),
], ids=["inf", "nan", "huge-integer", "huge-string", "inf-multiplier", "huge-multiplier"])
def test_numbers_the_schema_admits_but_no_clock_can_use_are_located(key, value, words):
    """Values of the right type and sign that are not finite: the schema lets them through, the
    compiler reports them (rather than failing, or dropping the timeout without a word)."""
    found = problems(f"""
        machine: order
        start: a
        states:
          a:
            tick: m:f
            {key}: {value}
            next: done
          done:
            terminal: true
        """)
    assert [(p.line, p.path) for p in found] == [(6, f"states.a.{key}" + (".multiplier" if key == "retry" else ""))]
    assert words in found[0].message


def test_missing_required_keys():
    found = problems("machine: order\n")
    messages = " | ".join(p.message for p in found)
    assert "missing required key 'start'" in messages and "missing required key 'states'" in messages


def test_unknown_state_reference_with_did_you_mean():
    p = one("""
        machine: order
        start: a
        states:
          a:
            next: dnoe
          done:
            terminal: true
        """)
    assert (p.line, p.col) == (5, 11)
    assert "state 'a': next refers to unknown state 'dnoe' (did you mean 'done'?)" in p.message


def test_unknown_start_and_catch_and_on_targets():
    found = problems("""
        machine: order
        start: begin
        states:
          a:
            tick: m:f
            on: {ok: done, bad: fial}
            catch: nowhere
          done:
            terminal: true
          fail:
            terminal: true
            status: failed
        """)
    text = "\n".join(map(str, found))
    assert "m.yaml:2:8: error: start refers to unknown state 'begin'" in text
    assert "on 'bad' refers to unknown state 'fial' (did you mean 'fail'?)" in text
    assert "catch refers to unknown state 'nowhere'" in text


def test_state_without_routing_key():
    p = one("""
        machine: order
        start: a
        states:
          a:
            tick: m:f
          done:
            terminal: true
        """)
    assert (p.line, p.col) == (4, 3)
    assert "state 'a' has no routing key" in p.message


def test_state_with_several_routing_keys():
    p = one("""
        machine: order
        start: a
        states:
          a:
            tick: m:f
            next: done
            on: {x: done}
          done:
            terminal: true
        """)
    assert p.line == 7
    assert "several routing keys (next, on)" in p.message


def test_tick_on_terminal_state():
    p = one("""
        machine: order
        start: a
        states:
          a:
            next: done
          done:
            terminal: true
            tick: m:f
        """)
    assert (p.line, p.col) == (8, 5)
    assert "terminal state 'done' cannot have a tick" in p.message


def test_on_without_tick():
    p = one("""
        machine: order
        start: a
        states:
          a:
            on: {x: done}
          done:
            terminal: true
        """)
    assert p.line == 5 and "routes with 'on' but has no tick" in p.message


def test_retry_without_tick_and_status_on_non_terminal():
    found = problems("""
        machine: order
        start: a
        states:
          a:
            next: done
            retry: {max_attempts: 2}
            status: failed
          done:
            terminal: true
        """)
    text = "\n".join(map(str, found))
    assert "m.yaml:6:5: error: state 'a' has 'retry' but no tick" in text
    assert "m.yaml:7:5: error: state 'a' is not terminal: 'status' applies to terminal states only" in text


def test_unreachable_state():
    p = one("""
        machine: order
        start: a
        states:
          a:
            next: done
          orphan:
            next: done
          done:
            terminal: true
        """)
    assert (p.line, p.col) == (6, 3)
    assert "state 'orphan' is unreachable from start 'a'" in p.message


def test_no_terminal_reachable():
    found = problems("""
        machine: order
        start: a
        states:
          a:
            tick: m:f
            on: {again: b, stop: done}
          b:
            next: c
          c:
            next: b
          done:
            terminal: true
        """)
    assert [(f.line, f.message) for f in found] == [
        (7, "no terminal state can be reached from state 'b'"),
        (9, "no terminal state can be reached from state 'c'"),
    ]


def test_fork_with_fewer_than_two_branches():
    p = one("""
        machine: order
        start: f
        states:
          f:
            fork: [a]
            join: j
          a:
            next: j
          j:
            next: done
          done:
            terminal: true
        """)
    assert p.line == 5 and "malformed fork in state 'f': a fork needs at least two branches, got 1" in p.message


def test_fork_without_join():
    p = one("""
        machine: order
        start: f
        states:
          f:
            fork: [a, b]
          a:
            next: done
          b:
            next: done
          done:
            terminal: true
        """)
    assert (p.line, p.col) == (5, 5) and "malformed fork in state 'f': missing join" in p.message


def test_join_without_fork():
    found = problems("""
        machine: order
        start: a
        states:
          a:
            next: done
            join: done
          done:
            terminal: true
        """)
    assert any(p.line == 6 and "has a join but no fork" in p.message for p in found)


def test_overlapping_branches():
    found = problems("""
        machine: order
        start: f
        states:
          f:
            fork: [a, b]
            join: j
          a:
            next: shared
          b:
            next: shared
          shared:
            next: j
          j:
            next: done
          done:
            terminal: true
        """)
    assert any(p.line == 5 and "branches 'a' and 'b' of fork 'f' overlap at state 'shared'" in p.message
               for p in found)


def test_branch_holding_a_terminal():
    found = problems("""
        machine: order
        start: f
        states:
          f:
            fork: [a, b]
            join: j
          a:
            tick: m:f
            on: {ok: j, bad: failed}
          b:
            next: j
          j:
            next: done
          done:
            terminal: true
          failed:
            terminal: true
            status: failed
        """)
    assert any(p.line == 16 and "terminal state 'failed' is inside branch 'a' of fork 'f'" in p.message
               for p in found)


def test_branch_escaping_the_fork():
    found = problems("""
        machine: order
        start: start
        states:
          start:
            next: f
          f:
            fork: [a, b]
            join: j
          a:
            tick: m:f
            on: {ok: j, again: start}
          b:
            next: j
          j:
            next: done
          done:
            terminal: true
        """)
    text = "\n".join(map(str, found))
    assert "branch 'a' of fork 'f' leads back to the fork state 'f'" in text


def test_state_entered_from_outside_its_branch():
    found = problems("""
        machine: order
        start: start
        states:
          start:
            tick: m:f
            on: {split: f, skip: b}
          f:
            fork: [a, b]
            join: j
          a:
            next: j
          b:
            next: j
          j:
            next: done
          done:
            terminal: true
        """)
    assert any(p.line == 12 and "state 'b' in branch 'b' of fork 'f' is also entered from 'start'" in p.message
               for p in found)


def test_branch_that_never_reaches_the_join():
    found = problems("""
        machine: order
        start: f
        states:
          f:
            fork: [a, b]
            join: j
          a:
            next: spin
          spin:
            next: a
          b:
            next: j
          j:
            next: done
          done:
            terminal: true
        """)
    text = "\n".join(map(str, found))
    assert "state 'a' in branch 'a' of fork 'f' never reaches the join 'j'" in text


def test_nested_fork_must_join_inside_its_branch():
    found = problems("""
        machine: order
        start: f
        states:
          f:
            fork: [a, b]
            join: j
          a:
            fork: [a1, a2]
            join: j
          a1:
            next: j
          a2:
            next: j
          b:
            next: j
          j:
            next: done
          done:
            terminal: true
        """)
    text = "\n".join(map(str, found))
    assert "state 'j' is the join of two forks" in text or "is not in the same branch" in text


MAP_ESCAPE = """
machine: order
start: s
states:
  s:
    map: {{items: payload.xs, branch: b}}
    join: j
  b:
    tick: m:f
{edge}
  j:
    next: done
  done:
    terminal: true
"""


@pytest.mark.parametrize("edge, state, line, col", [
    ("    on: {ok: j, gone: done}", "b", 9, 23),
    ("    choose:\n      - when: payload.item\n        next: j\n      - next: done", "b", 12, 15),
    ("    next: j\n    catch: done", "b", 10, 12),
    ("    next: c\n  c:\n    next: done", "c", 11, 11),
], ids=["on", "choose", "catch", "next"])
def test_map_branch_routing_to_a_terminal_outside_it_is_reported_at_the_edge(edge, state, line, col):
    found = problems(MAP_ESCAPE.format(edge=edge))
    escape = (f"malformed map: state {state!r} in branch 'b' of map 's' routes to terminal state 'done' outside "
              "the branch; branches must end at the join 'j'")
    assert [(p.line, p.col) for p in found if p.message == escape] == [(line, col)], "\n".join(map(str, found))
    terminal_line = MAP_ESCAPE.format(edge=edge).lstrip("\n").splitlines().index("  done:") + 1
    assert not [p for p in found if p.line == terminal_line], "\n".join(map(str, found))


def test_terminal_state_only_a_map_branch_reaches_is_inside_it():
    found = problems(MAP_ESCAPE.format(edge="    on: {ok: j, gone: lost}\n  lost:\n    terminal: true"))
    assert [(p.line, p.col, p.message) for p in found] == [
        (10, 3, "malformed map: terminal state 'lost' is inside branch 'b' of map 's'; branches must end at the "
                "join 'j'")]


def test_guard_that_does_not_compile():
    found = problems("""
        machine: order
        start: a
        states:
          a:
            choose:
              - when: "payload.total >"
                next: done
              - when: "total > 1"
                next: done
              - next: done
          done:
            terminal: true
        """)
    assert [(p.line, p.col) for p in found] == [(6, 15), (8, 15)]
    assert "does not compile" in found[0].message
    assert "unknown name 'total'" in found[1].message


def test_default_choice_must_be_last_and_single():
    found = problems("""
        machine: order
        start: a
        states:
          a:
            choose:
              - next: done
              - when: "payload.x"
                next: done
          done:
            terminal: true
        """)
    assert found[0].line == 7 and "follows the default entry choose[0] and can never be chosen" in found[0].message


def test_every_problem_of_a_file_is_reported():
    found = problems("""
        machine: Bad Name
        start: a
        states:
          a:
            next: nowhere
          b:
            tick: m:f
          c:
            terminal: true
            tick: m:f
        """)
    assert len(found) >= 4
    assert found == sorted(found, key=lambda p: (p.line, p.col))


HANDLERS = """
def f(payload, ctx):
    return None

value = 3
"""


def test_handler_that_does_not_import(write):
    path = write("m.yaml", """
        machine: order
        start: a
        states:
          a:
            tick: no_such_module_here:f
            next: done
          done:
            terminal: true
        """)
    with pytest.raises(DefinitionError) as info:
        compiler.load(path)
    (p,) = info.value.problems
    assert (p.line, p.col) == (5, 11)
    assert "cannot import module 'no_such_module_here'" in p.message
    compiler.load(path, import_handlers=False)  # --no-import skips the check


def test_handler_missing_and_not_callable(write):
    path = write("m.yaml", """
        machine: order
        start: a
        states:
          a:
            tick: hmod:g
            next: b
          b:
            tick: hmod.value
            next: done
          done:
            terminal: true
        """, hmod=HANDLERS)
    with pytest.raises(DefinitionError) as info:
        compiler.load(path)
    first, second = info.value.problems
    assert first.line == 5 and "module 'hmod' has no attribute 'g'" in first.message
    assert second.line == 8 and "hmod.value is not a function" in second.message


def test_handler_with_syntax_error_names_file_and_line(write):
    path = write("m.yaml", """
        machine: order
        start: a
        states:
          a:
            tick: broken_mod:f
            next: done
          done:
            terminal: true
        """, broken_mod="def f(:\n    pass\n")
    with pytest.raises(DefinitionError) as info:
        compiler.load(path)
    assert f"syntax error at {path.parent / 'broken_mod.py'}:1:7: invalid syntax" in info.value.problems[0].message


def test_allowlist_refuses_modules_outside_it_builtins_and_private_names(write):
    path = write("m.yaml", """
        machine: order
        start: a
        states:
          a:
            tick: hmod:f
            next: b
          b:
            tick: builtins:print
            next: c
          c:
            tick: hmod:_private
            next: done
          done:
            terminal: true
        """, hmod=HANDLERS)
    with pytest.raises(DefinitionError) as info:
        compiler.load(path, allow=handlers.Allowlist(("other",)))
    text = "\n".join(map(str, info.value.problems))
    assert "module 'hmod' is not in the worker's allowlist (other)" in text
    assert "module 'builtins' is never allowed" in text
    assert "private name '_private'" in text


RELAY = """
from subprocess import run
from os.path import join as joined


def own(payload, ctx):
    pass


class Handler:
    def __call__(self, payload, ctx):
        pass


instance = Handler()
"""

RELAYED = """
    machine: relay
    start: a
    states:
      a:
        tick: relay:own
        next: b
      b:
        tick: relay:instance
        next: c
      c:
        tick: relay:run
        next: d
      d:
        tick: relay.joined
        next: done
      done:
        terminal: true
    """


def test_names_imported_into_a_handler_module_are_not_handlers(write):
    path = write("m.yaml", RELAYED, relay=RELAY)
    with pytest.raises(DefinitionError) as info:
        compiler.load(path)
    found = info.value.problems
    assert [(p.line, p.col) for p in found] == [(11, 11), (14, 11)]
    assert "relay:run is defined in 'subprocess' and only imported into 'relay'" in found[0].message
    assert "--allow relay:run" in found[0].message and "'posixpath'" in found[1].message
    # allowed one by one, by name, they are handlers; a prefix alone never admits them
    graph = compiler.load(path, allow=handlers.Allowlist.of(["relay", "relay:run", "relay:joined"]))
    assert graph.states["c"].tick.func is not None
    with pytest.raises(DefinitionError):
        compiler.load(path, allow=handlers.Allowlist.of(["relay"]))
    only = handlers.Allowlist.of(["relay:run"])
    assert only.admits("relay") and only.admits_function("relay", "run") and not only.admits_module_wide("relay")
    assert handlers.refusal("relay", "own", only) == ("handler relay:own is not in the worker's allowlist "
                                                      "(relay:run)")


def test_modules_load_from_the_definition_folder(write):
    path = write("m.yaml", """
        machine: order
        start: a
        states:
          a:
            tick: hmod:f
            next: done
          done:
            terminal: true
        """, hmod=HANDLERS)
    graph = compiler.load(path)
    assert graph.states["a"].tick.func is not None
    assert graph.modules() == ("hmod",)


def test_defaults_apply_to_states_with_ticks():
    graph = compile_text(textwrap.dedent("""
        machine: order
        start: a
        defaults:
          timeout: 2m
          retry: {max_attempts: 4, backoff: 250ms}
        states:
          a:
            tick: m:f
            next: b
          b:
            tick: m:f
            timeout: 1
            retry: {max_attempts: 2}
            next: c
          c:
            next: done
          done:
            terminal: true
        """), "m.yaml", import_handlers=False)
    a, b, c = graph.states["a"], graph.states["b"], graph.states["c"]
    assert (a.timeout, a.retry.max_attempts, a.retry.backoff) == (120.0, 4, 0.25)
    assert (b.timeout, b.retry.max_attempts, b.retry.backoff) == (1.0, 2, 1.0)
    assert (c.timeout, c.retry.max_attempts) == (None, 1)


def test_nested_fork_structure():
    graph = compile_text(textwrap.dedent("""
        machine: doc
        start: f
        states:
          f:
            fork: [a, b]
            join: j
          a:
            fork: [a1, a2]
            join: aj
          a1:
            next: aj
          a2:
            next: aj
          aj:
            next: j
          b:
            next: j
          j:
            next: done
          done:
            terminal: true
        """), "m.yaml", import_handlers=False)
    assert graph.frames["a1"] == (("f", "a"), ("a", "a1"))
    assert graph.frames["aj"] == (("f", "a"),)
    assert graph.frames["j"] == ()
    assert graph.forks["f"].members["a"] == {"a", "a1", "a2", "aj"}
    assert graph.join_of == {"j": "f", "aj": "a"}


# -- large machines: correct, linear, and bounded ------------------------------------------------

def test_large_machines_compile_with_their_structure():
    long = compile_text(chain(2000), "c.yaml", import_handlers=False)
    assert len(long.states) == 2000 and long.states["s1998"].next == "s1999" and long.frames["s5"] == ()
    wide = compile_text(wide_fork(1000), "w.yaml", import_handlers=False)
    assert len(wide.forks["f"].branches) == 1000 and wide.frames["b999"] == (("f", "b999"),)
    deep = compile_text(nested_forks(100), "n.yaml", import_handlers=False)
    assert len(deep.frames["leaf"]) == 100 and deep.frames["leaf"][0] == ("f0", "f1")
    assert deep.frames["c99"][-1] == ("f99", "c99") and deep.join_of["j50"] == "f50"


def lines_run_in_the_compiler(text: str, modules=(compiler,)) -> int:
    """Lines of compiler.py (or of `modules`) executed to compile `text`: a measure of work that
    does not depend on the machine's speed."""
    count = 0
    files = {module.__file__ for module in modules}

    def local(frame, event, arg):
        nonlocal count
        count += event == "line"
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename in files else None

    sys.settrace(calls)
    try:
        compile_text(text, "m.yaml", import_handlers=False)
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("shape,size", [(chain, 400), (wide_fork, 200)], ids=["chain", "wide-fork"])
def test_compiling_does_work_in_proportion_to_the_states(shape, size):
    small, double = lines_run_in_the_compiler(shape(size)), lines_run_in_the_compiler(shape(2 * size))
    assert double < 2.3 * small, (small, double)


@pytest.mark.parametrize("shape,size", [(chain, 400), (wide_fork, 200)], ids=["chain", "wide-fork"])
@pytest.mark.parametrize("module", [kinds, graphcheck])
def test_building_states_and_checking_the_graph_do_work_in_proportion_to_the_states(module, shape, size):
    small = lines_run_in_the_compiler(shape(size), (module,))
    double = lines_run_in_the_compiler(shape(2 * size), (module,))
    assert double < 2.3 * small, (small, double)


def test_the_kinds_of_state_know_every_key_the_schema_lets_a_state_have():
    keys = set(schema.schema()["definitions"]["state"]["properties"])
    known = {"description"} | {key for row in kinds.KINDS for key in (row.key, *row.takes, *row.needs, *row.excludes)}
    assert known == keys


def test_too_many_states_is_a_located_error(monkeypatch):
    p = one(chain(2001))
    assert (p.line, p.col) == (4 + 2 * 2000, 3)
    assert "too many states: the machine has 2001, the limit is 2000" in p.message and "DSM_MAX_STATES" in p.message
    monkeypatch.setenv("DSM_MAX_STATES", "3000")
    assert len(compile_text(chain(2001), "c.yaml", import_handlers=False).states) == 2001
    monkeypatch.setenv("DSM_MAX_STATES", "5")
    assert one(chain(6)).line == 4 + 2 * 5


def test_too_large_a_definition_is_a_located_error_and_is_not_read_whole(monkeypatch, tmp_path):
    monkeypatch.setenv("DSM_MAX_DEFINITION_BYTES", "100")
    text = chain(20)  # 3 lines of 33 bytes, then 19 bytes per state: byte 101 is line 11, column 5
    p = one(text)
    assert (p.line, p.col) == (11, 5) and "definition too large: more than 100 bytes" in p.message
    assert "DSM_MAX_DEFINITION_BYTES" in p.message
    path = tmp_path / "big.yaml"
    path.write_text(text + "# " + "x" * 10_000_000 + "\n")
    with pytest.raises(DefinitionError) as info:
        compiler.load(path, import_handlers=False)
    assert str(info.value).startswith(f"{path}:11:5: error: definition too large")
    monkeypatch.setenv("DSM_MAX_DEFINITION_BYTES", "lots")
    with pytest.raises(InputError, match="DSM_MAX_DEFINITION_BYTES"):
        compile_text(text, "m.yaml", import_handlers=False)
