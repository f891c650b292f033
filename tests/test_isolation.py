"""Executors keep user code from stalling the worker: the promises of ProcessExecutor, and of
ThreadExecutor wherever threads can keep the same promise (the `make` fixture runs those tests
against both).

Handlers live in a module written into tmp_path per test. Tests that need a handler to be running
wait for a marker file it writes, and handlers that must block wait for a gate file the test
creates (or give up after 30 s, so a broken executor fails a test instead of hanging it).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import until_async

from dsm import handlers
from dsm.context import make_context
from dsm.errors import AttemptAbandoned
from dsm.executors import ThreadExecutor
from dsm.ticks import TickCall
from dsm.worker.isolation import _ABANDON, _CALL, _DROP, ProcessExecutor, _frame, _Server

WAIT = 30.0  # how long a test waits for something that should happen soon before it fails

HANDLERS = r'''
import asyncio, os, re, signal, sys, time
from dsm.errors import HandlerError


def _mark(payload):
    if "marker" in payload:
        with open(payload["marker"], "w") as f:
            f.write(str(os.getpid()))


def _wait_gate(payload):
    deadline = time.monotonic() + payload.get("patience", 30)
    while not os.path.exists(payload["gate"]) and time.monotonic() < deadline:
        time.sleep(0.01)


def keep(payload, ctx):
    return None

def spin(payload, ctx):
    end = time.process_time() + payload.get("cpu", 0.02)
    while time.process_time() < end:
        pass

def labelled(payload, ctx):
    return "approved"

def replace(payload, ctx):
    return {"replaced": True}

def pair(payload, ctx):
    return ("rejected", {"why": "too big"})

def mutate(payload, ctx):
    payload["n"] += 1

def big(payload, ctx):
    return {"big": 2 ** 70}

async def async_label(payload, ctx):
    await asyncio.sleep(0)
    return "from a coroutine"


class Custom(KeyError):
    pass

def custom(payload, ctx):
    raise Custom("bad thing")

def declined(payload, ctx):
    raise HandlerError("Declined", "not today", retryable=False)

def exits(payload, ctx):
    sys.exit(2)

def surrogate(payload, ctx):
    raise ValueError("bad \udc80 byte")


def a_set(payload, ctx):
    return {"s": {1, 2}}

def nan(payload, ctx):
    return {"x": float("nan")}

def number(payload, ctx):
    return 42

def lone_surrogate(payload, ctx):
    return {"s": "a\ud800b"}

def huge_integer(payload, ctx):
    return {"n": 10 ** 5000}

def at_the_limit(payload, ctx):
    return {"n": 10 ** 4300 - 1}


def context(payload, ctx):
    ctx.logger.info("context of %s", ctx.state)
    return {"instance_id": ctx.instance_id, "machine": ctx.machine, "state": ctx.state, "attempt": ctx.attempt,
            "branch": list(ctx.branch), "key": ctx.idempotency_key, "deadline": ctx.deadline,
            "logger": type(ctx.logger).__name__, "extra": dict(ctx.logger.extra)}

def noisy(payload, ctx):
    print("noise printed by a handler")
    sys.stdout.flush()
    os.write(1, b"\x00\x00\x00\x05junk")
    ctx.logger.warning("warning logged by a handler")
    return "quiet"


def hog(payload, ctx):
    _mark(payload)
    re.match(r"(a+)+$", "a" * 40 + "b")  # catastrophic backtracking: holds the GIL for ages
    return "finished"

def stuck(payload, ctx):
    _mark(payload)
    _wait_gate(payload)
    return "released"

async def blocker(payload, ctx):
    _mark(payload)
    _wait_gate(payload)  # blocks its event loop: no await
    return "released"

async def polite(payload, ctx):
    await asyncio.sleep(0.01)
    return "polite"

def heartbeats(payload, ctx):
    _mark(payload)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ctx.heartbeat()
        time.sleep(0.01)
    return "never abandoned"

def marks(payload, ctx):
    _mark(payload)
    return "ran"

def pid(payload, ctx):
    return {"pid": os.getpid()}

def exit3(payload, ctx):
    os._exit(3)

def sigkill(payload, ctx):
    os.kill(os.getpid(), signal.SIGKILL)

def slow(payload, ctx):
    time.sleep(0.3)
    return "slow"

def forks(payload, ctx):
    twin = os.fork()  # and forgets to end the child: both processes return
    if twin and payload["wait"]:
        os.waitpid(twin, 0)
    ctx.heartbeat()
    return {"pid": os.getpid()}

def forks_and_ends_the_child(payload, ctx):
    how = payload["how"]
    if how == "subprocess":
        import subprocess
        return {"status": subprocess.run([sys.executable, "-c", "pass"], preexec_fn=os.getpid).returncode}
    if how == "multiprocessing":
        import multiprocessing
        process = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
        process.start()
        process.join()
        return {"status": process.exitcode}
    twin = os.fork()
    if twin == 0:
        if how == "os._exit":
            os._exit(3)
        sys.exit(3)
    return {"status": os.waitstatus_to_exitcode(os.waitpid(twin, 0)[1])}

def forks_a_sleeper(payload, ctx):
    if os.fork() == 0:  # lives on after the handler returns, and after the handler process dies
        _wait_gate(payload)
        os._exit(0)
    return "forked"

async def forks_async(payload, ctx):
    os.fork()
    await asyncio.sleep(0)
    return "both"
'''


# -- fixtures and helpers ----------------------------------------------------------------------------

@pytest.fixture
def mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The handler module, under a fresh name (modules imported by earlier tests stay cached)."""
    name = "isolation_handlers_" + uuid.uuid4().hex[:10]
    (tmp_path / f"{name}.py").write_text(HANDLERS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return name


@pytest.fixture
def gate(tmp_path: Path) -> Any:
    """A gate file blocking handlers wait for; opened at teardown so no thread is left waiting."""
    path = tmp_path / "gate"
    yield path
    path.touch()


@pytest.fixture(params=["thread", "process"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    made: list[Any] = []

    def build(size: int, **options: Any) -> Any:
        if request.param == "thread":
            executor: Any = ThreadExecutor(size)
        else:
            executor = ProcessExecutor(size, search_path=[tmp_path], **options)
        made.append(executor)
        return executor

    build.kind = request.param  # type: ignore[attr-defined]
    yield build
    for executor in made:
        executor.close()


@pytest.fixture
def processes(tmp_path: Path) -> Any:
    made: list[ProcessExecutor] = []

    def build(size: int, **options: Any) -> ProcessExecutor:
        options.setdefault("search_path", [tmp_path])
        executor = ProcessExecutor(size, **options)
        made.append(executor)
        return executor

    yield build
    for executor in made:
        executor.close()


def call(mod: str, function: str, payload: dict[str, Any] | None = None, *, timeout: float | None = None,
         deadline: float | None = None, resolve: bool = True) -> TickCall:
    ref = f"{mod}:{function}"
    handler = handlers.resolve(ref) if resolve else handlers.unresolved(ref)
    return TickCall(handler=handler, payload=dict(payload or {}), instance_id="inst-1", machine="orders",
                    state="work", attempt=2, branch=("a", "b"), visit=3, timeout=timeout, deadline=deadline,
                    payload_limit=1 << 20)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def outcome(attempt: Any) -> Any:
    return await asyncio.wait_for(attempt.outcome(), WAIT)


async def appears(path: Path) -> str:
    """Wait for a handler's marker file; its text is the pid of the process that wrote it."""
    return await until_async(lambda: path.exists() and path.read_text(), f"{path.name} to appear (the handler started)",
                             timeout=WAIT, interval=0.01)


def process_state(pid: int) -> str | None:
    """The state letter of a process (Z: a zombie nobody reaped yet), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


# -- results ------------------------------------------------------------------------------------

@pytest.mark.parametrize("function, payload, label", [
    ("keep", {"n": 1}, None),
    ("labelled", {"n": 1}, "approved"),
    ("replace", {"replaced": True}, None),
    ("pair", {"why": "too big"}, "rejected"),
    ("mutate", {"n": 2}, None),
    ("big", {"big": 2 ** 70}, None),
    ("async_label", {"n": 1}, "from a coroutine"),
    ("at_the_limit", {"n": 10 ** 4300 - 1}, None),
])
def test_results_and_labels_come_back(make: Any, mod: str, function: str, payload: dict, label: str | None) -> None:
    async def main() -> Any:
        return await outcome(make(1).start(call(mod, function, {"n": 1})))

    result = run(main())
    assert result.failure is None
    assert result.payload == payload and result.label == label
    if function == "big":
        assert type(result.payload["big"]) is int  # read back exactly, not as a float


def test_large_and_unusual_payloads_cross_intact(make: Any, mod: str) -> None:
    """Bigger than a pipe's buffer both ways, an integer beyond 64 bits, text beyond ASCII."""
    payload = {"blob": "x" * 900_000, "big": -(2 ** 70), "text": "h\u00e9llo \u2713", "nested": [{"a": None}]}

    async def main() -> Any:
        return await outcome(make(1).start(call(mod, "keep", payload)))

    result = run(main())
    assert result.failure is None and result.payload == payload


def test_the_handler_sees_the_context_of_its_attempt(make: Any, mod: str) -> None:
    async def main() -> Any:
        return await outcome(make(1).start(call(mod, "context", deadline=4102444800.0)))

    result = run(main())
    assert result.failure is None
    assert result.payload == {
        "instance_id": "inst-1", "machine": "orders", "state": "work", "attempt": 2, "branch": ["a", "b"],
        "key": "inst-1/3", "deadline": 4102444800.0, "logger": "LoggerAdapter",
        "extra": {"instance": "inst-1", "machine": "orders", "state": "work", "attempt": 2}}


# -- failures -----------------------------------------------------------------------------------

def test_an_exception_comes_back_with_its_type_bases_and_traceback(make: Any, mod: str, tmp_path: Path) -> None:
    async def main() -> Any:
        return await outcome(make(1).start(call(mod, "custom")))

    failure = run(main()).failure
    assert (failure.type, failure.message, failure.retryable) == ("Custom", "'bad thing'", True)
    assert failure.bases == ("KeyError", "LookupError", "Exception")
    assert str(tmp_path / f"{mod}.py") in failure.traceback
    assert "in custom" in failure.traceback


@pytest.mark.parametrize("function, kind, message, retryable", [
    ("declined", "Declined", "not today", False),
    ("exits", "SystemExit", "2", True),
    ("surrogate", "ValueError", "bad \udc80 byte", True),  # not UTF-8: the frame falls back to ASCII escapes
], ids=["HandlerError", "sys.exit", "lone-surrogate"])
def test_handler_errors_keep_their_name_message_and_retryability(make: Any, mod: str, function: str, kind: str,
                                                                 message: str, retryable: bool) -> None:
    async def main() -> Any:
        executor = make(1)
        failed = await outcome(executor.start(call(mod, function)))
        after = await outcome(executor.start(call(mod, "labelled")))  # the slot survived the error
        return failed, after

    failed, after = run(main())
    assert (failed.failure.type, failed.failure.message, failed.failure.retryable) == (kind, message, retryable)
    assert after.label == "approved"


@pytest.mark.parametrize("function, kind, words", [
    ("a_set", "InvalidPayload", "set"),
    ("nan", "InvalidPayload", "nan"),
    ("number", "InvalidResult", "returned int"),
    ("lone_surrogate", "InvalidPayload", "payload.s holds a lone surrogate"),
    ("huge_integer", "InvalidPayload", "payload.n is an integer of more than 4300 digits"),
])
def test_results_that_are_not_json_fail_for_good(make: Any, mod: str, function: str, kind: str, words: str) -> None:
    async def main() -> Any:
        return await outcome(make(1).start(call(mod, function)))

    failure = run(main()).failure
    assert failure is not None and failure.type == kind and failure.retryable is False
    assert "'work'" in failure.message and words in failure.message


def test_what_a_handler_prints_goes_to_stderr_and_cannot_corrupt_replies(make: Any, mod: str,
                                                                         capfd: pytest.CaptureFixture[str]) -> None:
    async def main() -> Any:
        return await outcome(make(1).start(call(mod, "noisy")))

    result = run(main())
    assert result.failure is None and result.label == "quiet"
    if make.kind == "process":
        out, err = capfd.readouterr()
        assert "noise printed by a handler" in err and "junk" in err and "noise" not in out
        assert "warning logged by a handler" in err


# -- timeouts and blocking handlers --------------------------------------------------------------

# Process-only: a handler holding the GIL freezes every thread of its process, the event loop's
# included, so no timer of ThreadExecutor can fire and the test would hang rather than fail.
@needs_proc
def test_a_handler_holding_the_gil_times_out_while_other_slots_keep_working(processes: Any, mod: str, gate: Path,
                                                                            tmp_path: Path) -> None:
    marker = tmp_path / "hog-started"
    events: list[str] = []

    async def record(name: str, attempt: Any) -> Any:
        result = await outcome(attempt)
        events.append(name)
        return result

    async def main() -> Any:
        executor = processes(2)
        # both children up first (two handlers running at once), so the quick call waits for no start-up
        warm = [executor.start(call(mod, "stuck", {"gate": str(gate), "marker": str(tmp_path / f"warm{i}")}))
                for i in range(2)]
        await asyncio.gather(*(appears(tmp_path / f"warm{i}") for i in range(2)))
        gate.touch()
        await asyncio.gather(*(outcome(a) for a in warm))
        hog = asyncio.ensure_future(record("hog", executor.start(call(mod, "hog", {"marker": str(marker)},
                                                                       timeout=1.0))))
        hog_pid = int(await appears(marker))
        quick = await record("quick", executor.start(call(mod, "labelled")))
        hogged = await hog
        await until_async(lambda: process_state(hog_pid) is None, "the hog's process was not killed and reaped")
        after = await outcome(executor.start(call(mod, "labelled")))
        return executor, quick, hogged, after

    executor, quick, hogged, after = run(main())
    assert events == ["quick", "hog"]  # the other slot answered while the hog still ran
    assert quick.label == "approved"
    assert hogged.failure.type == "TimeoutError" and hogged.failure.retryable
    assert executor.killed == 1
    assert after.label == "approved"


def test_a_sync_handler_that_ignores_its_timeout_does_not_keep_its_slot(make: Any, mod: str, gate: Path) -> None:
    async def main() -> Any:
        executor = make(1)
        stuck = executor.start(call(mod, "stuck", {"gate": str(gate), "patience": 120}, timeout=0.5))
        behind = executor.start(call(mod, "labelled"))  # queued behind it, no timeout of its own
        return await outcome(stuck), await outcome(behind)

    stuck, behind = run(main())
    assert stuck.failure.type == "TimeoutError"
    assert behind.failure is None and behind.label == "approved"


def test_a_blocking_async_handler_does_not_stall_other_async_handlers(make: Any, mod: str, gate: Path,
                                                                      tmp_path: Path) -> None:
    marker = tmp_path / "blocker-started"

    async def main() -> Any:
        executor = make(2)
        blocker = asyncio.ensure_future(outcome(executor.start(call(mod, "blocker", {"gate": str(gate),
                                                                                    "marker": str(marker)}))))
        await appears(marker)
        polite = await outcome(executor.start(call(mod, "polite")))
        blocked_meanwhile = not blocker.done()
        gate.touch()
        return polite, blocked_meanwhile, await blocker

    polite, blocked_meanwhile, blocker = run(main())
    assert polite.label == "polite"
    assert blocked_meanwhile
    assert blocker.label == "released"


def test_a_call_that_timed_out_while_waiting_never_runs(make: Any, mod: str, gate: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    async def main() -> Any:
        executor = make(1)
        first = executor.start(call(mod, "stuck", {"gate": str(gate)}))  # no timeout: runs until it returns
        waiting = executor.start(call(mod, "marks", {"marker": str(marker)}, timeout=0.2))
        expired = await outcome(waiting)
        gate.touch()
        done = await outcome(first)
        last = await outcome(executor.start(call(mod, "labelled")))  # the slot went through its queue
        return expired, done, last

    expired, done, last = run(main())
    assert expired.failure.type == "TimeoutError"
    assert done.label == "released" and last.label == "approved"
    assert not marker.exists()


# -- abandon ------------------------------------------------------------------------------------

def test_abandon_makes_heartbeat_raise(make: Any, mod: str, tmp_path: Path) -> None:
    marker = tmp_path / "beating"

    async def main() -> Any:
        attempt = make(1).start(call(mod, "heartbeats", {"marker": str(marker)}))
        await appears(marker)
        attempt.abandon("the claim was lost")
        return await outcome(attempt)

    failure = run(main()).failure
    assert failure.type == "AttemptAbandoned" and failure.message == "the claim was lost" and failure.retryable


def test_abandoned_while_waiting_it_is_abandoned_from_its_first_heartbeat(make: Any, mod: str, gate: Path) -> None:
    async def main() -> Any:
        executor = make(1)
        first = executor.start(call(mod, "stuck", {"gate": str(gate)}))
        waiting = executor.start(call(mod, "heartbeats"))
        waiting.abandon("cancelled")
        gate.touch()
        await outcome(first)
        abandoned = await outcome(waiting)
        # an abandon after the end changes nothing, for it or for the next attempt on that slot
        waiting.abandon("too late")
        return abandoned, await outcome(executor.start(call(mod, "labelled")))

    abandoned, after = run(main())
    assert abandoned.failure.type == "AttemptAbandoned" and abandoned.failure.message == "cancelled"
    assert after.label == "approved"


# -- process only: pacing ------------------------------------------------------------------------

def test_quick_handlers_run_on_a_few_children(processes: Any, mod: str) -> None:
    async def main() -> Any:
        executor = processes(16, hot=2)

        async def lane() -> set[int]:
            return {(await outcome(executor.start(call(mod, "pid")))).payload["pid"] for _ in range(25)}

        pids = set().union(*await asyncio.gather(*(lane() for _ in range(16))))
        return executor, pids

    executor, pids = run(main())
    # two at a time, so two children; one or two more if a loaded machine made calls look slow
    assert len(pids) < 8 and executor.started < 8


def test_handlers_that_wait_get_a_child_for_each_call(processes: Any, mod: str, gate: Path,
                                                      tmp_path: Path) -> None:
    async def main() -> Any:
        executor = processes(8, hot=2)
        for _ in range(3):  # calls that wait more than they compute: the handler gains from more children
            await outcome(executor.start(call(mod, "stuck", {"gate": str(gate), "patience": 0.02})))
        markers = [tmp_path / f"stuck{i}" for i in range(8)]
        stuck = [executor.start(call(mod, "stuck", {"gate": str(gate), "marker": str(m)})) for m in markers]
        pids = {await appears(m) for m in markers}  # all eight run at once, the gate still shut
        gate.touch()
        return pids, [await outcome(a) for a in stuck]

    pids, stuck = run(main())
    assert len(pids) == 8
    assert [o.label for o in stuck] == ["released"] * 8



def test_children_idle_too_long_end_while_more_than_the_pacing_keeps_live(processes: Any, mod: str, gate: Path,
                                                                          tmp_path: Path) -> None:
    """A burst of calls that wait starts a child for each; once idle for `idle_exit`, the children
    beyond those the pacing keeps busy (`hot`) end, and a later call still runs."""
    async def main() -> Any:
        executor = processes(8, hot=1, idle_exit=0.5)
        for _ in range(3):  # the handler is seen to wait: its calls take a child each
            await outcome(executor.start(call(mod, "stuck", {"gate": str(gate), "patience": 0.02})))
        markers = [tmp_path / f"stuck{i}" for i in range(4)]
        stuck = [executor.start(call(mod, "stuck", {"gate": str(gate), "marker": str(m)})) for m in markers]
        pids = {int(await appears(m)) for m in markers}
        gate.touch()
        for attempt in stuck:
            await outcome(attempt)
        await until_async(lambda: sum(process_state(pid) is None for pid in pids) >= 3,
                          "three of the four children to end", timeout=WAIT)
        alive = [pid for pid in pids if process_state(pid) is not None]
        return executor, pids, alive, await outcome(executor.start(call(mod, "labelled")))

    executor, pids, alive, after = run(main())
    assert len(pids) == 4 and len(alive) == 1 and executor.retired == 3
    assert after.label == "approved"


def test_handlers_busy_on_the_cpu_run_on_as_many_children_as_the_pacing_keeps(processes: Any, mod: str) -> None:
    """Calls that compute for 20 ms each are neither queued behind each other nor given a child
    each: two run at once (`hot`), the others wait in the parent."""
    async def main() -> Any:
        executor = processes(16, hot=2)
        for _ in range(3):  # its calls are seen to run long, on the CPU
            await outcome(executor.start(call(mod, "spin")))
        results = await asyncio.gather(*(outcome(executor.start(call(mod, "spin"))) for _ in range(16)))
        return executor, results

    executor, results = run(main())
    assert all(r.failure is None for r in results)
    # two at a time, so two children; one or two more if a loaded machine made a call look idle
    assert executor.started <= 4, executor.started

def test_a_quick_handler_that_hangs_does_not_hold_up_the_others(processes: Any, mod: str, gate: Path,
                                                                tmp_path: Path) -> None:
    async def main() -> Any:
        executor = processes(4, hot=1)
        for _ in range(5):
            await outcome(executor.start(call(mod, "labelled")))
        marker = tmp_path / "hung"  # `stuck` has not been seen slow: its first call is paced
        hung = executor.start(call(mod, "stuck", {"gate": str(gate), "marker": str(marker)}))
        await appears(marker)
        after = await outcome(executor.start(call(mod, "labelled")))  # waits STUCK at most, not for the gate
        hung_meanwhile = not hung.future.done()
        gate.touch()
        return after, hung_meanwhile, await outcome(hung)

    after, hung_meanwhile, hung = run(main())
    assert after.label == "approved" and hung_meanwhile and hung.label == "released"


# -- process only: dying, search path, start-up, close ---------------------------------------------

@pytest.mark.parametrize("function, words", [("exit3", "exit code 3"), ("sigkill", "signal SIGKILL")])
def test_a_child_that_dies_fails_its_attempt_and_is_replaced(processes: Any, mod: str, function: str,
                                                             words: str) -> None:
    async def main() -> Any:
        executor = processes(1)
        died = await outcome(executor.start(call(mod, function)))
        after = await outcome(executor.start(call(mod, "labelled")))
        return executor, died, after

    executor, died, after = run(main())
    assert died.failure.type == "WorkerProcessDied" and died.failure.retryable
    assert "'work'" in died.failure.message and words in died.failure.message
    assert after.label == "approved"
    assert executor.started == 2


@pytest.mark.parametrize("wait", [True, False], ids=["parent-waits-for-the-child", "both-return-at-once"])
def test_a_handler_that_forks_and_returns_in_both_fails_its_attempt_and_its_slot_serves_on(
        processes: Any, mod: str, wait: bool) -> None:
    """The forked copy of the handler process shares its pipes: had it gone on serving, it would
    have read calls meant for the real one (and their answers or their ends). It ends as it returns,
    the attempt fails as HandlerForked, and every later call is answered, by the real process."""
    async def main() -> Any:
        executor = processes(1)
        real = (await outcome(executor.start(call(mod, "pid")))).payload["pid"]
        forked = await outcome(executor.start(call(mod, "forks", {"wait": wait})))
        one_by_one = [await outcome(executor.start(call(mod, "pid"))) for _ in range(10)]
        together = await asyncio.gather(*(outcome(executor.start(call(mod, "pid"))) for _ in range(30)))
        return executor, real, forked, one_by_one + list(together)

    executor, real, forked, after = run(main())
    failure = forked.failure
    assert failure is not None and failure.type == "HandlerForked" and failure.retryable is False, forked
    assert "'work'" in failure.message and "forked" in failure.message and "os._exit" in failure.message
    assert [o.failure for o in after] == [None] * 40
    assert {o.payload["pid"] for o in after} == {real}  # answered by the real process, not by its copy
    assert executor.started == 1
    copy = int(re.search(r"pid (\d+)", failure.message).group(1))  # type: ignore[union-attr]
    assert copy != real and process_state(copy) is None  # ended, and reaped


def test_an_async_handler_that_forks_and_returns_in_both_fails_its_attempt(processes: Any, mod: str) -> None:
    async def main() -> Any:
        executor = processes(1)
        return await outcome(executor.start(call(mod, "forks_async"))), await outcome(executor.start(call(mod, "pid")))

    forked, after = run(main())
    assert forked.failure is not None and forked.failure.type == "HandlerForked"
    assert after.failure is None


def test_a_process_a_handler_forked_does_not_hide_the_death_of_the_handler_process(processes: Any, mod: str,
                                                                                   gate: Path) -> None:
    """A process forked by a handler outlives the handler process. Had it kept the protocol pipes
    open, the worker would never see the handler process's output end: its attempt would never fail."""
    async def main() -> Any:
        executor = processes(1)
        forked = await outcome(executor.start(call(mod, "forks_a_sleeper", {"gate": str(gate)})))
        died = await asyncio.wait_for(executor.start(call(mod, "exit3")).outcome(), 10)
        return forked, died

    forked, died = run(main())
    assert forked.label == "forked"
    assert died.failure is not None and died.failure.type == "WorkerProcessDied"
    assert "exit code 3" in died.failure.message


@pytest.mark.parametrize("how, status", [("os._exit", 3), ("sys.exit", 3), ("subprocess", 0), ("multiprocessing", 0)])
def test_a_handler_whose_forked_process_ends_itself_runs_as_usual(processes: Any, mod: str, how: str,
                                                                  status: int) -> None:
    async def main() -> Any:
        executor = processes(1)
        return [await outcome(executor.start(call(mod, "forks_and_ends_the_child", {"how": how}))) for _ in range(3)]

    assert [(o.failure, o.payload) for o in run(main())] == [(None, {"status": status})] * 3


def test_a_child_applies_abandon_frames_to_the_running_attempt_only() -> None:
    """The child's side of abandon, without a process: frames for an ended attempt change nothing."""
    read, write = os.pipe()
    try:
        server = _Server(read, -1)
        ctx = make_context(instance_id="i", machine="m", state="s", attempt=1, branch=(), visit=1, deadline=None)
        server.current = (7, ctx)
        os.write(write, _frame([_ABANDON, 6, "an attempt that already ended"]))
        server.poll()
        ctx.heartbeat()  # does not raise
        os.write(write, _frame([_ABANDON, 7, "the claim was lost"]))
        server.poll()
        with pytest.raises(AttemptAbandoned, match="the claim was lost"):
            ctx.heartbeat()
    finally:
        os.close(read)
        os.close(write)


def test_a_child_drops_queued_calls_taken_back_and_starts_abandoned_ones_abandoned() -> None:
    """Calls of quick handlers queue in a child behind the one it runs. Before it starts the next,
    the child reads what the worker sent meanwhile: a call taken back (sent to another child, or
    timed out) never starts here; a call abandoned while queued starts abandoned."""
    read, write = os.pipe()
    try:
        server = _Server(read, -1)

        def queued(ident: int) -> bytes:
            return _frame([_CALL, ident, "m", "f", {}, "i", "m", "s", 1, [], 1, None, 1 << 20, None])

        os.write(write, queued(1) + queued(2) + queued(3) + queued(4))
        server.poll()
        os.write(write, _frame([_DROP, 2]) + _frame([_ABANDON, 3, "the claim was lost"]) + _frame([_DROP, 9]))
        server.poll()
        assert [c[1] for c in server.calls] == [1, 3, 4]
        assert [c[-1] for c in server.calls] == [None, "the claim was lost", None]
    finally:
        os.close(read)
        os.close(write)


def test_children_find_handlers_on_the_search_path(processes: Any, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = "isolation_elsewhere_" + uuid.uuid4().hex[:10]
    (elsewhere / f"{name}.py").write_text("def hello(payload, ctx):\n    return 'found'\n", encoding="utf-8")

    async def main() -> Any:
        found = await outcome(processes(1, search_path=[elsewhere]).start(call(name, "hello", resolve=False)))
        missing = await outcome(processes(1, search_path=[]).start(call(name, "hello", resolve=False)))
        return found, missing

    found, missing = run(main())
    assert found.label == "found"
    assert missing.failure.type == "HandlerUnavailable" and name in missing.failure.message


def test_preloaded_modules_are_imported_before_a_child_takes_calls(processes: Any, tmp_path: Path) -> None:
    name = "isolation_slow_import_" + uuid.uuid4().hex[:10]
    (tmp_path / f"{name}.py").write_text("import time\ntime.sleep(1.0)\n\ndef hello(payload, ctx):\n"
                                         "    return 'hello'\n", encoding="utf-8")

    async def main() -> Any:
        executor = processes(1, preload=[name])
        first = await outcome(executor.start(call(name, "hello", timeout=0.5, resolve=False)))
        second = await outcome(executor.start(call(name, "hello", resolve=False)))
        third = await outcome(executor.start(call(name, "hello", timeout=0.5, resolve=False)))
        return executor, first, second, third

    executor, first, second, third = run(main())
    # The first call timed out waiting for the start-up, which costs no child; had the import
    # been left to the first call, it would have run out its timeout and been killed.
    assert first.failure.type == "TimeoutError"
    assert second.label == third.label == "hello"
    assert executor.killed == 0 and executor.started == 1


@needs_proc
def test_close_stops_every_child_and_leaves_no_process(processes: Any, mod: str, gate: Path,
                                                       tmp_path: Path) -> None:
    marker = tmp_path / "stuck-started"
    before = _children()

    async def main() -> Any:
        executor = processes(2, grace=2.0)
        stuck = executor.start(call(mod, "stuck", {"gate": str(gate), "marker": str(marker)}))  # child A
        pids = [int(await appears(marker))]
        pids.append((await outcome(executor.start(call(mod, "pid")))).payload["pid"])  # child B
        slow = executor.start(call(mod, "slow"))  # on B, ends well within the grace
        # no child is idle: they wait, in the parent or queued in a child behind `slow`, not started
        waiting = [executor.start(call(mod, "labelled")) for _ in range(2)]
        assert len(set(pids)) == 2 and _children() - before >= set(pids)
        executor.close()
        with pytest.raises(RuntimeError):
            executor.start(call(mod, "labelled"))
        return pids, await outcome(stuck), await outcome(slow), [await outcome(a) for a in waiting]

    pids, stuck, slow, waiting = run(main())
    assert [process_state(pid) for pid in pids] == [None, None]  # exited and reaped: not even zombies
    assert _children() - before == set()
    assert stuck.failure.type == "WorkerProcessDied"  # it outlived the grace and was killed
    assert slow.label == "slow"  # it ended within the grace: its outcome counts
    assert [w.failure.type for w in waiting] == ["WorkerProcessDied"] * 2
    assert all("not started" in w.failure.message for w in waiting)


def _children() -> set[int]:
    """Processes whose parent is this one, zombies included."""
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == os.getpid()}


def _parent(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@needs_proc
def test_children_end_when_the_worker_dies(mod: str, tmp_path: Path) -> None:
    """An idle child sees the end of its input; one stuck in a handler gets the parent-death signal."""
    marker = tmp_path / "stuck-started"
    script = textwrap.dedent(f"""
        import asyncio, os, sys
        sys.path.insert(0, {str(tmp_path)!r})
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from helpers import until_async
        from dsm import handlers
        from dsm.ticks import TickCall
        from dsm.worker.isolation import ProcessExecutor

        def call(function, payload):
            return TickCall(handlers.unresolved({mod!r} + ":" + function), payload, "i", "m", "s", 1, (), 1,
                            None, None, 1 << 20)

        async def main():
            executor = ProcessExecutor(2)
            idle = (await executor.start(call("pid", {{}})).outcome()).payload["pid"]
            executor.start(call("stuck", {{"gate": "/nonexistent", "patience": 600, "marker": {str(marker)!r}}}))
            marker = {str(marker)!r}
            stuck = await until_async(lambda: os.path.exists(marker) and open(marker).read(), "stuck started")
            print(idle, stuck, flush=True)
            os._exit(0)  # no close(): the worker dies

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split()]

    async def gone() -> None:
        await until_async(lambda: all(process_state(pid) in (None, "Z") for pid in pids), f"children {pids} outlived "
                    "their worker")

    run(gone())
