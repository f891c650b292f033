"""Handlers of tests/machines/loopfork.yaml: each invocation is appended to $DSM_TEST_LOG."""

from __future__ import annotations

import json
import os
import time


def _log(ctx):
    path = os.environ.get("DSM_TEST_LOG")
    if path:
        line = json.dumps({"instance": ctx.instance_id, "state": ctx.state, "attempt": ctx.attempt,
                           "key": ctx.idempotency_key, "pid": int(os.environ.get("DSM_WORKER_PID", os.getpid()))})
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    time.sleep(float(os.environ.get("DSM_TEST_TICK", "0.02")))


def begin(payload, ctx):
    _log(ctx)
    payload.setdefault("target", 3)
    payload.update(rounds=0, a=0, b=0)


def left(payload, ctx):
    _log(ctx)
    payload["a"] += 1


def right(payload, ctx):
    _log(ctx)
    payload["b"] += 2


def merge(payload, ctx):
    _log(ctx)
    payload["rounds"] += 1
    return "again" if payload["rounds"] < payload["target"] else "done"
