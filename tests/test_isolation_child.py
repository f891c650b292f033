"""A handler process's own parts, without a process: what it is started with, what ctx says."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from dsm import handlers
from dsm.context import Context
from dsm.errors import AttemptAbandoned
from dsm.ticks import TickCall, context_of
from dsm.worker.isolation.child import ChildContext, ChildOptions


def test_a_handler_process_reads_back_the_options_it_is_started_with() -> None:
    options = ChildOptions(path=("/srv/app", "/usr/lib/python3"), search=("/srv/handlers",), ppid=4242, level=20,
                           handler_level=10, text_format="dsm: %(message)s", log={"format": "json", "worker": "w-1"},
                           preload=("shop.orders",), cpu_clock_from=0.0002)
    assert ChildOptions.from_json(json.loads(options.to_json())) == options
    assert json.loads(options.to_json())["path"] == ["/srv/app", "/usr/lib/python3"]  # what BOOT reads first


@pytest.mark.parametrize("deadline, worker", [(None, None), (time.time() + 3600, "w-1")],
                         ids=["no-deadline", "deadline"])  # ids without the clock: xdist's processes collect alike
def test_ctx_in_a_handler_process_says_what_it_says_on_a_thread(deadline: float | None, worker: str | None) -> None:
    call = TickCall(handler=handlers.unresolved("m:f"), payload={}, instance_id="inst-1", machine="orders",
                    state="work", attempt=2, branch=("a", "b"), visit=3, timeout=None, deadline=deadline,
                    payload_limit=1 << 20, worker=worker)
    polled: list[bool] = []
    ctx = ChildContext.of(call, lambda: polled.append(True))
    on_a_thread = context_of(call)
    for field in dataclasses.fields(Context):
        assert getattr(ctx, field.name) == getattr(on_a_thread, field.name), field.name
    assert ctx.idempotency_key == "inst-1/3" and ctx.logger.extra == on_a_thread.logger.extra
    ctx.heartbeat()
    assert polled == [True]  # frames the worker sent are read first
    ctx.abandon("the claim was lost")
    with pytest.raises(AttemptAbandoned, match="the claim was lost"):
        ctx.heartbeat()
