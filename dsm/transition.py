"""The transition: a pure function from (graph, instance, token, tick outcome) to the next instance.

Everything about routing lives here, once: next / on / choose, fork (a payload per branch), join
(exactly once per fork activation, counted per branch), both merge modes, catch, durable retry
scheduling, the loop guard, and failing the instance when a branch fails. It does no I/O and
reads no clock; the caller passes `now`. Stores and workers only persist what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from .errors import InputError
from .graph import Graph, Kind, State
from .guards import GuardError
from .records import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    Activation,
    CancelInfo,
    ErrorInfo,
    FailedAttempt,
    HistoryEntry,
    Instance,
    Stopped,
    Token,
    evolve,
    kept_failures,
)

_MISSING = object()


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt failed: the error's type name (and its bases, for non_retryable) and message."""

    type: str
    message: str
    retryable: bool = True
    bases: tuple[str, ...] = ()
    traceback: str | None = None  # the handler's traceback, its last 4 KiB


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt of a tick produced: a payload and maybe a label, or a failure."""

    payload: dict[str, Any] | None = None
    label: str | None = None
    failure: Failure | None = None
    started_at: float | None = None  # wall-clock time the attempt began (None: a state without a tick)
    duration: float | None = None  # seconds it ran


@dataclass(frozen=True, slots=True)
class Step:
    """The result of a transition: the new instance and what changed in its set of tokens.

    `removed` lists token ids that are gone; `upserted` lists tokens that are new or changed (a
    token moving along a line, or a retry with a new attempt and not_before, keeps its id).
    `history` holds the committed transitions this step makes (none for a retry or a failure).
    """

    instance: Instance
    removed: tuple[str, ...] = ()
    upserted: tuple[Token, ...] = ()
    history: tuple[HistoryEntry, ...] = ()


def start(graph: Graph, instance_id: str, payload: dict[str, Any], now: float) -> Instance:
    """A new instance with one token at the start state."""
    inst = Instance(id=instance_id, machine=graph.machine, digest=graph.digest, version=graph.version,
                    created_at=now, payload=payload, seq=1, input=payload,
                    retention=graph.retention)  # pinned, as the digest is
    token = Token(id="t1", state=graph.start)
    if graph.states[graph.start].terminal:
        return _finish(inst, graph.states[graph.start], now)
    return evolve(inst, tokens=MappingProxyType({token.id: token}))


def cancel(inst: Instance, now: float, *, reason: str | None = None, by: str | None = None) -> Step:
    """Cancel a running instance: every token goes, nothing else runs (what was pending is kept
    aside for a redrive)."""
    if inst.finished:
        return Step(inst)
    done = evolve(inst, status=CANCELLED, finished_at=now, tokens=MappingProxyType({}),
                   activations=MappingProxyType({}), cancel=CancelInfo(reason, by, now),
                   stopped=Stopped(inst.tokens, inst.activations))
    return Step(done, removed=tuple(inst.tokens))


def advance(graph: Graph, inst: Instance, token_id: str, outcome: Outcome, *, now: float, worker: str) -> Step:
    """Apply one attempt's outcome for one token."""
    if inst.status != RUNNING or token_id not in inst.tokens:
        return Step(inst)
    token = inst.tokens[token_id]
    state = graph.states[token.state]
    if outcome.failure is not None:
        return _failed_attempt(graph, inst, token, state, outcome.failure, outcome, now, worker)
    payload = outcome.payload if outcome.payload is not None else inst.payload_of(token)
    try:
        targets = _route(state, outcome.label, payload, inst)
    except _RouteError as exc:
        failure = Failure(exc.type, exc.message, retryable=False)
        return _failed_attempt(graph, inst, token, state, failure, outcome, now, worker)
    return _move(graph, inst, token, targets, payload, outcome.label, now, worker, outcome)


class _RouteError(Exception):
    def __init__(self, type_: str, message: str):
        self.type = type_
        self.message = message


def _route(state: State, label: str | None, payload: dict[str, Any], inst: Instance) -> tuple[str, ...]:
    kind = state.kind
    if kind is Kind.ON:
        if label is None:
            raise _RouteError("InvalidOutcome", f"state {state.name!r} must return an outcome label, one of "
                              f"{_labels(state)}; the handler returned none")
        target = state.on.get(label)
        if target is None:
            raise _RouteError("InvalidOutcome", f"state {state.name!r}: unknown outcome label {label!r}; "
                              f"expected one of {_labels(state)}")
        return (target,)
    if label is not None:
        raise _RouteError("InvalidOutcome", f"state {state.name!r} returned outcome label {label!r} but routes "
                          f"with {kind.value!r}, not 'on'; return None, a dict, or add 'on'")
    if kind is Kind.NEXT:
        return (state.next,)  # type: ignore[return-value]
    if kind is Kind.FORK:
        return state.fork
    if kind is Kind.CHOOSE:
        scope = {"id": inst.id, "machine": inst.machine}
        for choice in state.choose:
            if choice.guard is None:
                return (choice.next,)
            try:
                if choice.guard(payload, scope, state.name):
                    return (choice.next,)
            except GuardError as exc:
                raise _RouteError("GuardError", f"state {state.name!r}: {exc}") from None
        raise _RouteError("NoGuardMatched", f"state {state.name!r}: no choose guard matched and there is no "
                          "default entry")
    raise AssertionError(f"state {state.name!r} of kind {kind} has no route")


def _labels(state: State) -> str:
    return ", ".join(repr(k) for k in state.on)


def _failed_attempt(graph: Graph, inst: Instance, token: Token, state: State, failure: Failure, outcome: Outcome,
                    now: float, worker: str) -> Step:
    # the token keeps the failed attempts of its visit: its history entry lists them when it commits
    started_at, duration_ms = _timing(outcome, now)
    failed = FailedAttempt.of(token.attempt, failure.type, failure.message, failure.traceback, worker=worker,
                              started_at=started_at, duration_ms=duration_ms)
    token = replace(token, failures=kept_failures(token.failures + (failed,)))
    policy = state.retry
    if failure.retryable and token.attempt < policy.max_attempts and policy.retries(failure.type, failure.bases):
        wait = policy.delay(token.attempt, f"{inst.id}/{token.id}/{token.attempt}")
        again = replace(token, attempt=token.attempt + 1, not_before=now + wait)
        tokens = dict(inst.tokens)
        tokens[token.id] = again
        return Step(evolve(inst, tokens=MappingProxyType(tokens)), upserted=(again,))
    error = ErrorInfo(type=failure.type, message=failed.message, state=state.name, attempts=token.attempt,
                      traceback=failed.traceback)
    if state.catch:
        payload = dict(inst.payload_of(token))
        payload["error"] = error.as_dict()
        return _move(graph, inst, token, (state.catch,), payload, None, now, worker, outcome)
    tokens = dict(inst.tokens)
    tokens[token.id] = token
    return fail(evolve(inst, tokens=MappingProxyType(tokens)), error, now)


def _timing(outcome: Outcome, now: float) -> tuple[float, int]:
    """When an attempt began and how long it ran, in milliseconds (a tick-less state: now, 0)."""
    started_at = outcome.started_at if outcome.started_at is not None else now
    return started_at, round(outcome.duration * 1000) if outcome.duration is not None else 0


def fail(inst: Instance, error: ErrorInfo, now: float) -> Step:
    """Fail the whole instance: a branch failing stops its siblings too. What was pending is kept
    aside (`stopped`), for a redrive."""
    done = evolve(inst, status=FAILED, error=error, finished_at=now, tokens=MappingProxyType({}),
                   activations=MappingProxyType({}), stopped=Stopped(inst.tokens, inst.activations))
    return Step(done, removed=tuple(inst.tokens))


def _finish(inst: Instance, terminal: State, now: float) -> Instance:
    return evolve(inst, status=terminal.status, state=terminal.name, finished_at=now,
                   tokens=MappingProxyType({}), activations=MappingProxyType({}))


def _move(graph: Graph, inst: Instance, token: Token, targets: tuple[str, ...], payload: dict[str, Any],
          label: str | None, now: float, worker: str, outcome: Outcome) -> Step:
    state = graph.states[token.state]
    if inst.transitions + 1 > graph.max_transitions:
        error = ErrorInfo(type="LoopGuard", message=f"instance exceeded max_transitions={graph.max_transitions} "
                          f"at state {state.name!r}", state=state.name, attempts=token.attempt)
        return fail(inst, error, now)
    started_at, duration_ms = _timing(outcome, now)
    entry = HistoryEntry(seq=inst.transitions + 1, state=state.name, next=targets, branch=token.branch,
                         attempt=token.attempt, outcome=label, worker=worker, at=now, started_at=started_at,
                         duration_ms=duration_ms, failures=token.failures)
    tokens = dict(inst.tokens)
    del tokens[token.id]
    activations = dict(inst.activations)
    seq = inst.seq
    upserted: list[Token] = []
    main_payload = inst.payload

    if state.kind is Kind.FORK and targets == state.fork:
        seq += 1
        act = Activation(id=f"a{seq}", fork=state.name, frames=token.frames, base=payload)
        activations[act.id] = act
        for branch in state.fork:
            seq += 1
            child = Token(id=f"t{seq}", state=branch, frames=token.frames + ((act.id, branch),), payload=payload,
                          visit=seq)
            tokens[child.id] = child
            upserted.append(child)
        if not token.frames:
            main_payload = payload
    else:
        (target,) = targets
        target_state = graph.states[target]
        frame = token.frames[-1] if token.frames else None
        if frame is not None and graph.forks[activations[frame[0]].fork].join == target:
            act = activations[frame[0]]
            arrived = dict(act.arrived)
            arrived[frame[1]] = payload
            fork = graph.forks[act.fork]
            if len(arrived) < len(fork.branches):
                activations[act.id] = replace(act, arrived=MappingProxyType(arrived))
            else:
                del activations[act.id]
                try:
                    merged = merge(fork.merge, act.base, arrived, fork.branches, fork.state)
                except MergeConflict as exc:
                    error = ErrorInfo(type="MergeConflict", message=str(exc), state=fork.state,
                                      attempts=token.attempt)
                    failed = fail(inst, error, now)
                    return failed
                outer = act.frames
                if target_state.terminal and not outer:  # the join is where the instance ends
                    done = _finish(evolve(inst, payload=merged, transitions=inst.transitions + 1), target_state, now)
                    return Step(done, removed=tuple(inst.tokens), history=(entry,))
                seq += 1
                child = Token(id=f"t{seq}", state=target, frames=outer, payload=merged if outer else None, visit=seq)
                if not outer:
                    main_payload = merged
                tokens[child.id] = child
                upserted.append(child)
        elif target_state.terminal:
            if token.frames:  # the compiler forbids this; keep the record consistent if it ever happens
                raise AssertionError(f"terminal state {target!r} reached inside a fork branch")
            done = _finish(evolve(inst, payload=payload, transitions=inst.transitions + 1), target_state, now)
            return Step(done, removed=tuple(inst.tokens), history=(entry,))
        else:
            # Along a line the token keeps its id: its work marker and claim stay where they are.
            seq += 1
            moved = Token(id=token.id, state=target, frames=token.frames, payload=payload if token.frames else None,
                          visit=seq)
            if not token.frames:
                main_payload = payload
            tokens[moved.id] = moved
            new = evolve(inst, payload=main_payload, transitions=inst.transitions + 1, seq=seq,
                          tokens=MappingProxyType(tokens), activations=MappingProxyType(activations))
            return Step(new, upserted=(moved,), history=(entry,))

    new = evolve(inst, payload=main_payload, transitions=inst.transitions + 1, seq=seq,
                  tokens=MappingProxyType(tokens), activations=MappingProxyType(activations))
    return Step(new, removed=(token.id,), upserted=tuple(upserted), history=(entry,))


def changes(before: Instance, after: Instance) -> tuple[tuple[str, ...], tuple[Token, ...]]:
    """The net effect of any number of steps on the set of tokens: (removed ids, new or changed)."""
    removed = tuple(tid for tid in before.tokens if tid not in after.tokens)
    changed = tuple(t for tid, t in after.tokens.items() if before.tokens.get(tid) != t)
    return removed, changed


class MergeConflict(Exception):
    """Two branches changed one key to different values."""


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: Python's == holds 1 == 1.0 == True and 0 == False, at any depth,
    but in JSON a number and a boolean (and an integer and a float) are different values."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same_json, a, b))
    return bool(a == b)


def merge(mode: str, base: dict[str, Any], arrived: dict[str, dict[str, Any]], order: tuple[str, ...],
          fork: str) -> dict[str, Any]:
    """Combine branch payloads at a join; the result never depends on the order of arrival."""
    if mode == "branches":
        out = dict(base)
        out["branches"] = {b: arrived[b] for b in order}
        return out
    out = dict(base)
    changed_by: dict[str, str] = {}
    for branch in order:
        payload = arrived[branch]
        for key in [*base, *(k for k in payload if k not in base)]:
            before = base.get(key, _MISSING)
            after = payload.get(key, _MISSING)
            if same_json(before, after):
                continue
            if key in changed_by:
                if not same_json(out.get(key, _MISSING), after):
                    raise MergeConflict(f"fork {fork!r}: branches {changed_by[key]!r} and {branch!r} both "
                                        f"changed key {key!r} to different values")
                continue
            changed_by[key] = branch
            if after is _MISSING:
                out.pop(key, None)
            else:
                out[key] = after
    return out


def redrive(inst: Instance) -> Step:
    """Continue a failed or cancelled instance from the work that was pending when it stopped: each
    token with the payload it had, its attempts counted afresh, now. Fork activations come back
    with the branches that had arrived, so finished branches keep their results and each join
    still fires exactly once. Raises InputError for an instance that cannot be redriven."""
    if inst.status == RUNNING:
        raise InputError(f"instance {inst.id} is running: only a failed or cancelled instance can be redriven")
    if inst.status == SUCCEEDED:
        raise InputError(f"instance {inst.id} succeeded at {inst.state}: there is nothing to redrive")
    if inst.status == FAILED and inst.error is None:
        raise InputError(f"instance {inst.id} ended in its failure terminal state {inst.state!r} (status: failed): "
                         "it went where the machine sends it, no error stopped it, so there is nothing to redrive; "
                         "start a new instance instead")
    if inst.stopped is None or not inst.stopped.tokens:
        raise InputError(f"instance {inst.id} is {inst.status} but its record keeps no pending work to continue "
                         "from (it stopped before this version of dsm kept it)")
    tokens = {tid: replace(t, attempt=1, not_before=0.0) for tid, t in inst.stopped.tokens.items()}
    again = evolve(inst, status=RUNNING, state=None, error=None, finished_at=None, cancel=None, stopped=None,
                    tokens=MappingProxyType(tokens), activations=inst.stopped.activations,
                    redrives=inst.redrives + 1)
    return Step(again, upserted=tuple(tokens.values()))


__all__ = ["Failure", "Outcome", "Step", "advance", "cancel", "changes", "fail", "merge", "redrive", "same_json",
           "start", "MergeConflict"]
