"""One step of an instance, decided without I/O: outcomes in, the next record out.

Wherever an instance moves (a worker's commit, the embedded engine, `dsm test`), its attempts'
outcomes arrive as `Arrival`s and are applied here: one `transition.advance` each (`apply`), and
the record held to the size a store takes (`bounded`). The tick an attempt runs is called with
what `tick_call` builds from the token, whoever runs it. A worker's commit goes on to decide what
its transaction writes (`dsm.commits`); an in-memory driver keeps the new record (`dsm.driver`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import payloads, transition
from .context import Context, make_context
from .frozen import fast_init
from .graph import Graph, State
from .records import ErrorInfo, HistoryEntry, Instance, Token, dump_instance
from .ticks import TickCall
from .transition import Failure, Outcome


@fast_init
@dataclass(frozen=True, slots=True)
class Arrival:
    """An attempt's outcome for a token (on a worker: one it holds a claim on, read at `claim_rev`)."""

    token: Token  # the token as the attempt saw it
    claim_rev: int
    outcome: Outcome
    # the step the outcome makes from `base`, computed where the attempt ran (`commits.step_on_line`):
    # applied as it is when the instance is that very one still
    base: Instance | None = None
    step: transition.Step | None = None


def apply(graph: Graph, before: Instance, arrivals: list[Arrival], *, now: float, worker: str,
          started: list[Instance] | None = None,
          steps: list[tuple[int, Instance, int]] | None = None) -> tuple[Instance, list[HistoryEntry]]:
    """The arrivals' outcomes, one transition each, in order (a token's later visits after its
    earlier ones: a worker's run along a line); stale ones (their token moved on, went away, or is
    at another state than the attempt saw) change nothing. Child instances the steps start are
    added to `started`; with `steps`, each arrival applied adds (its index, the instance after it,
    the history entries so far)."""
    after = before
    history: list[HistoryEntry] = []
    for i, a in enumerate(arrivals):
        current = after.tokens.get(a.token.id)
        if (current is None or current.visit != a.token.visit or current.attempt != a.token.attempt
                or current.state != a.token.state):
            continue
        if a.step is not None and a.base is after:
            step = a.step
        else:
            step = transition.advance(graph, after, a.token.id, a.outcome, now=now, worker=worker)
        after = step.instance
        history.extend(step.history)
        if started is not None:
            started.extend(step.started)
        if steps is not None:
            steps.append((i, after, len(history)))
    return after, history


def bounded(before: Instance, after: Instance, arrivals: list[Arrival], *, now: float, max_record_bytes: int,
            serialize: bool = True) -> tuple[Instance, bytes, bool]:
    """`after`, unless its record would be larger than the store takes: then `before` failed with
    PayloadTooLarge. Returns the instance, its record (empty when not `serialize`d and there was
    nothing to size: only branch payloads together can outgrow the limit each payload is held to)
    and whether it was too large."""
    sized = serialize or bool(after.activations) or any(t.payload is not None for t in after.tokens.values())
    record = dump_instance(after) if sized else b""
    if len(record) <= max_record_bytes:
        return after, record, False
    token = arrivals[0].token
    error = ErrorInfo(type="PayloadTooLarge", message=f"state {token.state!r}: the instance record would be "
                      f"{len(record)} bytes (its live payloads together); the store accepts {max_record_bytes}",
                      state=token.state, attempts=token.attempt)
    failed = transition.fail(before, error, now).instance
    return failed, dump_instance(failed), True


def tick_call(inst: Instance, token: Token, state: State, *, wall: Callable[[], float], payload_limit: int,
              worker: str | None) -> TickCall:
    """The call of `token`'s tick, for an executor: its handler, a private copy of the payload, and
    what `ctx` says (its `ctx.deadline` on the `wall` clock)."""
    return TickCall(handler=state.tick, payload=payloads.copy(inst.payload_of(token)),  # type: ignore[arg-type]
                    instance_id=inst.id, machine=inst.machine, state=state.name, attempt=token.attempt,
                    branch=token.branch, visit=token.visit, timeout=state.timeout,
                    deadline=_deadline(state, wall), payload_limit=payload_limit, worker=worker)


def tick_context(inst: Instance, token: Token, state: State, *, wall: Callable[[], float],
                 worker: str | None) -> Context:
    """The `ctx` of `token`'s tick called right here, without a `TickCall` (the hot path of a
    driver's inline tick); the same as an executor's `ticks.context_of(tick_call(...))`."""
    return make_context(instance_id=inst.id, machine=inst.machine, state=state.name, attempt=token.attempt,
                        branch=token.branch, visit=token.visit, deadline=_deadline(state, wall), worker=worker)


def _deadline(state: State, wall: Callable[[], float]) -> float | None:
    return wall() + state.timeout if state.timeout else None


def unavailable(state: State) -> Outcome:
    """The outcome of a tick whose handler was not imported (it may be, where it is retried)."""
    ref = state.tick.ref if state.tick else "?"
    return Outcome(failure=Failure("HandlerUnavailable", f"state {state.name!r}: handler {ref!r} was not imported",
                                   retryable=True))
