"""`dsm test`: machines' test cases run offline, deterministically, with time skipped and mocks."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from clitools import ROOT, dsm

from dsm.errors import DefinitionError
from dsm.testing import load_test_file, run_case, run_file

SHOP = """
machine: shop
start: order
states:
  order:
    tick: {module}:order
    next: pay
  pay:
    tick: {module}.pay
    retry: {{max_attempts: 3, backoff: 1h, max_backoff: 1d, jitter: false, non_retryable: [LookupError, Declined]}}
    on:
      paid: pack
      declined: refused
  pack:
    fork: [label, box]
    join: ship
  label:
    tick: {module}:label
    next: stamp
  stamp:
    tick: {module}:stamp
    next: ship
  box:
    tick: {module}:box
    next: tape
  tape:
    tick: {module}:tape
    next: ship
  ship:
    tick: {module}:ship
    next: done
  done:
    terminal: true
  refused:
    terminal: true
    status: failed
"""

HANDLERS = """
import asyncio

def order(payload, ctx):
    payload["ordered_by"] = ctx.instance_id

def pay(payload, ctx):
    raise RuntimeError("the real gateway must not be called in these tests")

def label(payload, ctx):
    payload["label"] = "/".join(ctx.branch)

async def box(payload, ctx):
    await asyncio.sleep(0)
    payload["box"] = ctx.attempt

def stamp(payload, ctx):
    pass

def tape(payload, ctx):
    pass

def ship(payload, ctx):
    payload["shipped"] = True
"""


@pytest.fixture
def shop(write):
    """Writes shop.yaml with its handlers (a module of this test's own) and returns a function that
    writes a test file for it: shop_tests(cases_yaml) -> path."""
    module = f"shop_{uuid.uuid4().hex[:12]}"  # a module of this test's own
    write("shop.yaml", SHOP.format(module=module), **{module: HANDLERS})

    def tests(cases: str, name: str = "shop.test.yaml") -> object:
        return write(name, "machine: shop.yaml\ncases:\n" + cases.replace("MOD", module))

    tests.module = module  # type: ignore[attr-defined]
    return tests


PAID = "mock: {MOD:pay: [{return: paid}]}"


def test_a_case_that_does_what_it_expects_passes(shop):
    path = shop(f"""
      - name: paid and shipped
        payload: {{total: 120}}
        {PAID}
        expect:
          status: succeeded
          path: [order, pay, pack, label, box, stamp, tape, ship, done]
          payload: {{total: 120.0, ordered_by: test-1, label: label, box: 1, shipped: true}}
          error: null
    """)
    result = run_file(path)
    assert result.passed, result.report()
    (case,) = result.cases
    assert case.record["status"] == "succeeded" and case.record["payload"]["shipped"] is True
    assert result.report() == f"PASS {path}::paid and shipped\n"


def test_a_case_that_does_not_fails_with_each_difference(shop):
    path = shop(f"""
      - name: wrong about everything
        id: my-order
        {PAID}
        expect:
          status: failed
          path: [order, pay, refused]
          payload: {{ordered_by: someone, shipped: 1, nested: {{a: 1}}}}
          error: ValueError
    """)
    (case,) = run_file(path).cases
    assert not case.passed
    assert case.reasons == (
        "status: expected failed, got succeeded (at done)",
        "path: expected [order, pay, refused], got [order, pay, pack, label, box, stamp, tape, ship, done]: "
        "from position 3: expected refused, got pack",
        'payload.ordered_by: expected "someone", got "my-order"',
        "payload.shipped: expected 1, got true",
        'payload.nested: expected {"a": 1}, missing (there: ordered_by, label, box, shipped)',
        'error: expected {"type": "ValueError"}, got none',
    )


def test_mocks_answer_successive_calls_in_order_and_retries_are_attempts(shop):
    path = shop("""
      - name: declined twice by timeouts, then paid
        mock:
          MOD:pay: [{raise: TimeoutError, message: slow}, {raise: GatewayDown}, {return: [paid, {charge: c1}]}]
          MOD.box: [{return: {box: small}}]
        expect: {status: succeeded, payload: {charge: c1, box: small}}
    """)
    (case,) = run_file(path).cases
    assert case.passed, case.reasons
    assert case.calls == {f"{shop.module}:pay": 3, f"{shop.module}:box": 1}
    pay = next(h for h in case.history if h.state == "pay")
    assert pay.attempt == 3 and pay.outcome == "paid"
    assert [(f.attempt, f.type, f.message) for f in pay.failures] == [
        (1, "TimeoutError", "slow"), (2, "GatewayDown", f"raised by the mock of {shop.module}:pay")]


def test_a_mocked_mapping_is_merged_into_the_payload(shop):
    path = shop("""
      - name: merged
        payload: {keep: me}
        mock:
          MOD:pay: [{return: [paid, {charge: c1}]}]
          MOD:ship: [{return: {shipped: later}}]
        expect: {payload: {keep: me, charge: c1, shipped: later, ordered_by: test-1}}
    """)
    (case,) = run_file(path).cases
    assert case.passed, case.reasons


def test_a_mock_that_runs_out_fails_the_case_saying_so(shop):
    path = shop("""
      - name: too few results
        mock: {MOD:pay: [{raise: TimeoutError}]}
        expect: {status: succeeded}
    """)
    (case,) = run_file(path).cases
    assert case.reasons == (f"the mock of {shop.module}:pay ran out: it gives 1 result(s), and state 'pay' called it "
                            "a 2nd time (attempt 2); add results to its list",)


def test_retry_backoff_passes_at_once_on_the_virtual_clock(shop):
    path = shop("""
      - name: an hour, then two
        mock: {MOD:pay: [{raise: TimeoutError}, {raise: TimeoutError}, {return: paid}]}
        expect: {status: succeeded}
    """)
    started = time.monotonic()
    (case,) = run_file(path).cases
    assert case.passed, case.reasons
    assert time.monotonic() - started < 60  # nothing slept through the three hours
    pay = next(h for h in case.history if h.state == "pay")
    assert pay.at - case.instance.created_at == pytest.approx(3 * 3600)  # 1h, then 2h (multiplier 2)


def test_errors_are_classes_by_name_builtins_with_their_bases(shop):
    path = shop("""
      - name: a builtin is itself, its bases count for non_retryable
        mock: {MOD:pay: [{raise: KeyError, message: no such card}]}
        expect: {status: failed, error: {type: KeyError, state: pay, attempts: 1}}
      - name: a name that is no builtin is a new exception class
        mock: {MOD:pay: [{raise: Declined}]}
        expect: {status: failed, error: {type: Declined, attempts: 1}}
      - name: a builtin that takes other arguments still has its name
        mock: {MOD:pay: [{raise: UnicodeDecodeError}, {return: paid}]}
        expect: {status: succeeded}
    """)
    result = run_file(path)
    assert result.passed, result.report()


def test_branches_take_turns_in_declaration_order_and_runs_repeat_exactly(shop):
    path = shop(f"""
      - name: turns
        {PAID}
        expect: {{path: [order, pay, pack, label, box, stamp, tape, ship, done]}}
    """)
    first, second = run_file(path).cases[0], run_file(path).cases[0]
    assert first.passed, first.reasons
    assert first.record["payload"] == second.record["payload"]
    assert [(h.seq, h.state, h.next, h.branch) for h in first.history] == \
        [(h.seq, h.state, h.next, h.branch) for h in second.history]


def test_real_handlers_run_beside_their_machine_async_ones_awaited(shop):
    """label and box are real: box is `async def`, label sees its branch in ctx."""
    path = shop(f"""
      - name: real
        {PAID}
        expect: {{payload: {{label: label, box: 1, ordered_by: test-1}}}}
    """)
    assert run_file(path).passed


def test_cases_run_from_inside_an_event_loop_too(shop):
    path = shop(f"""
      - name: in a loop
        {PAID}
        expect: {{status: succeeded}}
    """)

    async def main():
        return run_file(path)

    assert asyncio.run(main()).passed


def test_run_case_by_name(shop):
    path = shop(f"""
      - name: one
        {PAID}
        expect: {{status: succeeded}}
      - name: two
        mock: {{MOD:pay: [{{return: declined}}]}}
        expect: {{status: failed, path: [order, pay, refused]}}
    """)
    tests = load_test_file(path)
    assert [c.name for c in tests.cases] == ["one", "two"]
    assert run_case(tests, "two").passed
    with pytest.raises(KeyError):
        run_case(tests, "three")


def test_a_case_that_never_ends_stops_at_the_step_guard(write):
    write("spin.yaml", """
        machine: spin
        start: a
        max_transitions: 1000000
        states:
          a: {next: b}
          b:
            choose:
              - {when: "payload.stop", next: done}
              - {next: a}
          done: {terminal: true}
    """)
    path = write("spin.test.yaml", """
        machine: spin.yaml
        cases:
          - {name: forever, payload: {stop: false}, expect: {status: succeeded}}
    """)
    (case,) = run_file(path, max_steps=500).cases
    assert case.reasons == ("the case did not finish within 500 steps (still running at a); a loop without a way "
                            "out?",)


WAITING = """
machine: waiting
start: ask
states:
  ask:
    next: decide
  decide:
    signal: decision
    timeout: 1h
    catch: remind
    on: {approve: cool_off, reject: rejected}
  remind:
    next: last_call
  last_call:
    signal: decision
    on: {approve: cool_off, reject: rejected}
  cool_off:
    wait: 1d
    next: sub
  sub:
    call: child.yaml
    next: done
  done: {terminal: true}
  rejected: {terminal: true, status: failed}
"""

CHILD = """
machine: child
start: confirm
states:
  confirm:
    signal: confirmed
    next: done
  done: {terminal: true}
"""


def test_signals_timers_timeouts_and_children_run_in_virtual_time(write):
    """Signals go, in order, to whichever instance (the case's, or a child) waits for them when
    nothing else can run; a signal's timeout and a timer pass at once; a call runs its child."""
    write("child.yaml", CHILD)
    write("waiting.yaml", WAITING)
    path = write("waiting.test.yaml", """
        machine: waiting.yaml
        cases:
          - name: approved at once, child confirmed
            signals: [{name: decision, outcome: approve, payload: {by: ann}}, {name: confirmed, payload: {ok: 1}}]
            expect: {status: succeeded, path: [ask, decide, cool_off, sub, done], payload: {by: ann, ok: 1}}
          - name: rejected at once
            signals: [{name: decision, outcome: reject}]
            expect: {status: failed, path: [ask, decide, rejected]}
          - name: nobody decides within the hour, then nobody at all
            expect: {status: running, path: [ask, decide, remind]}
          - name: approved but the child is never confirmed
            signals: [{name: decision, outcome: approve}]
            expect: {status: running, path: [ask, decide, cool_off]}
    """)
    started = time.monotonic()
    cases = run_file(path).cases
    assert all(c.passed for c in cases), [c.reasons for c in cases]
    assert time.monotonic() - started < 10  # an hour's timeout and a day's timer were skipped


def test_the_example_of_the_contract_passes_and_a_signal_no_state_waits_for_is_never_sent(write):
    """SPEC's example, word for word but for the machine's path: `order` waits for no signal, so
    the one the case lists is never sent, and the case passes."""
    path = write("spec.test.yaml", f"""
        machine: {ROOT / 'definitions' / 'order.yaml'}
        cases:
          - name: a big order is insured
            payload: {{total: 120}}
            mock:                                     # handler -> results of successive calls
              orders:bill: [{{raise: TimeoutError}}, {{return: {{charge_id: c1}}}}]
              orders:check: [{{return: approved}}]
            signals: [{{name: approve, outcome: yes, payload: {{by: ann}}}}]
            expect:
              status: succeeded
              path: [receive, check, fulfil, pick, bill, ship, insured, done]   # history states, in order
              payload: {{charge_id: c1, insured: 1.2}}                              # a subset of the payload
    """)
    (case,) = run_file(path).cases
    assert case.passed, case.reasons


def test_a_misspelled_signal_is_a_bad_test_file(write):
    write("child.yaml", CHILD)
    write("waiting.yaml", WAITING)
    path = write("typo.test.yaml", """
        machine: waiting.yaml
        cases:
          - name: a
            signals: [{name: decison, outcome: approve}]
            expect: {status: running}
    """)
    with pytest.raises(DefinitionError) as caught:
        load_test_file(path)
    assert f"{path}:4:22: error: signal 'decison': no state of machine" in str(caught.value)
    assert "did you mean 'decision'?" in str(caught.value)


def test_a_failing_case_is_one_line_with_every_difference(shop):
    path = shop(f"""
      - name: wrong twice
        {PAID}
        expect: {{status: failed, path: [order]}}
    """)
    (line,) = run_file(path).report().splitlines()
    assert line.startswith(f"FAIL {path}::wrong twice: status: expected failed, got succeeded")
    assert "; path: expected [order]" in line


# -- bad test files: every problem at file:line:col, nothing runs --------------------------------

BAD = [
    ("unknown key", "  - name: a\n    expect: {status: succeeded}\n    expct: {}\n", 5, 5, "unknown key 'expct'"),
    ("wrong type", "  - name: a\n    payload: [1]\n    expect: {status: succeeded}\n", 4, 14,
     "cases[0].payload: expected a mapping, got list"),
    ("duplicate key", "  - name: a\n    expect: {status: succeeded}\n    name: b\n", 5, 5, "duplicate key 'name'"),
    ("unknown state in path", "  - name: a\n    expect: {path: [order, pya]}\n", 4, 28,
     "machine 'shop' has no state 'pya' (did you mean 'pay'?)"),
    ("unknown status", "  - name: a\n    expect: {status: ok}\n", 4, 22, '"ok" is not one of'),
    ("mock of a handler the machine does not use", "  - name: a\n    mock: {MOD:refund: [{return: null}]}\n"
     "    expect: {status: succeeded}\n", 4, 12, "has no state with this handler"),
    ("one handler mocked in two spellings", "  - name: a\n    mock:\n      MOD:pay: [{return: paid}]\n"
     "      MOD.pay: [{return: paid}]\n    expect: {status: succeeded}\n", 6, 7, "the same handler is mocked as"),
    ("a mock result that neither raises nor returns", "  - name: a\n    mock:\n      MOD:pay:\n        - {message: x}\n"
     "    expect: {status: succeeded}\n", 6, 11, "give one of raise (an error name) or return (a value)"),
    ("a case without expectations", "  - name: a\n    expect: {}\n", 4, 13, "give at least one of status"),
    ("two cases of one name", "  - {name: a, expect: {status: failed}}\n  - {name: a, expect: {status: failed}}\n",
     4, 12, "case name 'a' is used twice (first at line 3)"),
]


@pytest.mark.parametrize("what,cases,line,col,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_test_file_is_reported_at_file_line_col(shop, what, cases, line, col, message):
    path = shop(cases)
    with pytest.raises(DefinitionError) as caught:
        load_test_file(path)
    problems = [str(p) for p in caught.value.problems]
    assert any(p.startswith(f"{path}:{line}:{col}: error: ") and message in p for p in problems), problems


def test_a_missing_or_invalid_machine_is_a_bad_test_file(write):
    missing = write("a.test.yaml", "machine: nowhere.yaml\ncases: [{name: a, expect: {status: failed}}]\n")
    with pytest.raises(DefinitionError) as caught:
        load_test_file(missing)
    assert str(caught.value).startswith(f"{missing}:1:10: error: machine: no file 'nowhere.yaml'")
    broken = write("broken.yaml", "machine: broken\nstart: a\nstates:\n  a: {next: b}\n  done: {terminal: true}\n")
    bad = write("b.test.yaml", "machine: broken.yaml\ncases: [{name: a, expect: {status: failed}}]\n")
    with pytest.raises(DefinitionError) as caught:
        load_test_file(bad)
    text = str(caught.value)
    assert f"{broken}:4:13: error: state 'a': next refers to unknown state 'b'" in text  # at the machine's line
    assert f"{bad}:1:10: error: machine: 'broken.yaml' is not a valid definition" in text


# -- the command ---------------------------------------------------------------------------------

def test_every_example_machine_has_test_cases_and_they_pass():
    machines = sorted(p.name.removesuffix(".yaml") for p in (ROOT / "definitions").glob("*.yaml")
                      if not p.name.endswith(".test.yaml"))
    tested = sorted(p.name.removesuffix(".test.yaml") for p in (ROOT / "definitions").glob("*.test.yaml"))
    assert tested == machines
    result = dsm("test", "definitions")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].endswith(" passed, 0 failed") and all(line.startswith("PASS ") for line in lines[:-1])
    assert len(lines) - 1 == int(lines[-1].split()[0])


def test_the_command_exits_1_when_a_case_fails_and_2_for_a_bad_file(shop, tmp_path):
    good = shop(f"""
      - name: passes
        {PAID}
        expect: {{status: succeeded}}
      - name: fails
        {PAID}
        expect: {{status: failed}}
    """)
    result = dsm("test", str(good))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"PASS {good}::passes",
        f"FAIL {good}::fails: status: expected failed, got succeeded (at done)",
        "1 passed, 1 failed",
    ]
    shop("  - name: a\n    expect: {status: maybe}\n", name="bad.test.yaml")
    folder = dsm("test", str(tmp_path))  # finds both files; the bad one runs nothing
    assert folder.returncode == 2
    assert f"{tmp_path / 'bad.test.yaml'}:4:22: error: cases[0].expect.status" in folder.stdout
    assert folder.stdout.splitlines()[-1] == "1 passed, 1 failed"
    assert "1 of 2 test file(s) invalid" in folder.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = dsm("test", str(empty))
    assert none.returncode == 2 and "no test files" in none.stderr
