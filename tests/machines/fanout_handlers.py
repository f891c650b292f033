"""Handlers of tests/machines/fanout.yaml: each invocation is appended to $DSM_TEST_LOG."""

from __future__ import annotations

import json
import os
import time


def _log(ctx, **extra):
    path = os.environ.get("DSM_TEST_LOG")
    if path:
        pid = int(os.environ.get("DSM_WORKER_PID", os.getpid()))  # the worker's, in a handler process
        line = json.dumps({"instance": ctx.instance_id, "state": ctx.state, "attempt": ctx.attempt,
                           "key": ctx.idempotency_key, "pid": pid, **extra})
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def step(payload, ctx):
    _log(ctx)
    time.sleep(float(os.environ.get("DSM_TEST_TICK", "0.05")))
    payload[ctx.state] = int(os.environ.get("DSM_WORKER_PID", os.getpid()))


def gather(payload, ctx):
    _log(ctx)
    payload["gathered"] = sorted(k for k in ("left", "middle2", "right") if k in payload)
