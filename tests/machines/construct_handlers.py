"""Handlers of the chaos machines for the waiting constructs and maps (bigmap, waiter, caller,
callee, sleeper, relay): each invocation is appended to $DSM_TEST_LOG, and each tick sleeps
$DSM_TEST_TICK seconds so that workers hold claims when they are killed."""

from __future__ import annotations

import json
import os
import time


def _log(ctx, **extra):
    path = os.environ.get("DSM_TEST_LOG")
    if path:
        line = json.dumps({"instance": ctx.instance_id, "state": ctx.state, "attempt": ctx.attempt,
                           "key": ctx.idempotency_key, "pid": int(os.environ.get("DSM_WORKER_PID", os.getpid())),
                           **extra})
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    time.sleep(float(os.environ.get("DSM_TEST_TICK", "0.02")))


def begin(payload, ctx):
    _log(ctx)
    payload["began"] = True


def prepare(payload, ctx):
    _log(ctx)
    payload["xs"] = list(range(payload["n"]))


def square(payload, ctx):
    _log(ctx)
    assert ctx.branch == (f"fan[{payload['index']}]",), ctx.branch
    payload["y"] = payload["item"] * payload["item"] + payload["salt"]


def total(payload, ctx):
    _log(ctx)
    payload["total"] = sum(r["y"] for r in payload["squares"])


def record_signal(payload, ctx):
    _log(ctx)
    payload["seen"] = [*payload.get("seen", []), payload["n"]]


def after_call(payload, ctx):
    _log(ctx)
    payload["round"] = payload.get("round", 0) + 1


def child_work(payload, ctx):
    _log(ctx)
    attempt = ctx.instance_id.rsplit(".", 1)[-1]  # children are PARENT.cVISIT.ATTEMPT
    if payload.get("flaky") and attempt == "1":
        raise RuntimeError(f"child {ctx.instance_id} fails its parent's first attempt")
    payload["calls"] = [*payload.get("calls", []), ctx.instance_id]


def woke(payload, ctx):
    _log(ctx)
    payload["woke_at"] = time.time()


def step(payload, ctx):
    _log(ctx)
    payload["steps"] = [*payload.get("steps", []), ctx.state]
