"""The transition: a pure function from (graph, instance, token, tick outcome) to the next instance.

Everything about routing lives here, once: next / on / choose, fork (a payload per branch), join
(exactly once per fork activation, counted per branch), both merge modes, catch, durable retry
scheduling, the loop guard, and failing the instance when a branch fails. It does no I/O and
reads no clock; the caller passes `now`. Stores and workers only persist what it returns.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from . import payloads, search
from .durations import format_duration
from .errors import InputError, InvalidSignal
from .frozen import fast_init
from .graph import Graph, Kind, SignalRoutes, State
from .guards import GuardError
from .records import (
    CANCELLED,
    FAILED,
    PARKED,
    RUNNING,
    SUCCEEDED,
    Activation,
    CancelInfo,
    ErrorInfo,
    FailedAttempt,
    HistoryEntry,
    Instance,
    Parent,
    Signal,
    Stopped,
    Token,
    evolve,
    kept_failures,
    millis,
)

_MISSING = object()
MAX_MAP_ITEMS = 10_000
MAP_BATCH = 32  # map items started by one step: a map of 10,000 never writes 10,000 tokens at once
# items in flight at most when a map sets no max_concurrency: the record holds every item in flight
# (about 200 bytes each, and its payload), so thousands of them would outgrow what the store takes
MAP_WINDOW = 1000
MAX_SIGNALS = 1000  # signals buffered per instance and not yet consumed


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt failed: the error's type name (and its bases, for non_retryable) and message."""

    type: str
    message: str
    retryable: bool = True
    bases: tuple[str, ...] = ()
    traceback: str | None = None  # the handler's traceback, its last 4 KiB


@fast_init
@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt of a tick produced: a payload and maybe a label, or a failure."""

    payload: dict[str, Any] | None = None
    label: str | None = None
    failure: Failure | None = None
    started_at: float | None = None  # wall-clock time the attempt began (None: a state without a tick)
    duration: float | None = None  # seconds it ran
    child: ChildResult | None = None  # a call state's child, as the caller read it

    def timed(self, started_at: float, duration: float) -> Outcome:
        """This outcome, of an attempt that began at `started_at` and ran `duration` seconds
        (`dataclasses.replace` costs a worker more than twice as much, once per attempt)."""
        return Outcome(self.payload, self.label, self.failure, started_at, duration, self.child)


@dataclass(frozen=True, slots=True)
class ChildResult:
    """A call state's child instance as read from the store: its status (None: it does not exist)
    and, once it finished, its payload or error."""

    id: str
    status: str | None
    payload: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @staticmethod
    def of(child_id: str, inst: Instance | None) -> ChildResult:
        """The child as read (None: there is no such instance)."""
        if inst is None:
            return ChildResult(child_id, None)
        return ChildResult(inst.id, inst.status, inst.payload if inst.finished else None, inst.error)


@fast_init
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
    started: tuple[Instance, ...] = ()  # child instances to create with this step (`call`)


def start(graph: Graph, instance_id: str, payload: dict[str, Any], now: float) -> Instance:
    """A new instance with one token at the start state."""
    inst = Instance(id=instance_id, machine=graph.machine, digest=graph.digest, version=graph.version,
                    created_at=now, payload=payload, seq=1, input=payload,
                    retention=graph.retention)  # pinned, as the digest is
    inst = search.indexed(graph, inst)
    token = Token(id="t1", state=graph.start)
    if graph.states[graph.start].terminal:
        return _finish(inst, graph.states[graph.start], now)
    try:
        token = _arm(graph, inst, token, payload, now)
    except _RouteError as exc:
        return fail(inst, ErrorInfo(type=exc.type, message=exc.message, state=graph.start, attempts=1), now).instance
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
    if state.signal is not None:
        return _on_signal(graph, inst, token, state, outcome, now, worker)
    if state.call is not None:
        return _on_child(graph, inst, token, state, outcome, now, worker)
    payload = outcome.payload if outcome.payload is not None else inst.payload_of(token)
    try:
        targets = _route(state, outcome.label, payload, inst)
        items = _map_items(state, payload, inst) if state.kind is Kind.MAP else None
    except _RouteError as exc:
        failure = Failure(exc.type, exc.message, retryable=False)
        return _failed_attempt(graph, inst, token, state, failure, outcome, now, worker)
    return _move(graph, inst, token, targets, payload, outcome.label, now, worker, outcome, items=items)


def signal(inst: Instance, name: str, payload: dict[str, Any] | None = None, *, outcome: str | None = None,
           now: float) -> Step:
    """Send a signal: it is kept in the record (in the order sent) until a signal state named for
    it consumes it, and a token waiting for it now becomes due. Refused (InputError) for a
    finished instance."""
    if inst.finished:
        raise InputError(f"instance {inst.id} is {inst.status}: it takes no more signals")
    if len(inst.signals) >= MAX_SIGNALS:
        raise InputError(f"instance {inst.id} holds {len(inst.signals)} signals that no state has consumed yet; "
                         f"it takes no more (the limit is {MAX_SIGNALS})")
    sig = Signal(name, dict(payload or {}), outcome, now)
    tokens = dict(inst.tokens)
    woken = []
    for token in inst.tokens.values():
        if token.waits == f"signal:{name}" and token.not_before != 0.0:
            woken.append(replace(token, not_before=0.0))
            tokens[token.id] = woken[-1]
    return Step(evolve(inst, signals=inst.signals + (sig,), tokens=MappingProxyType(tokens)), upserted=tuple(woken))


def check_signal(graph: Graph, inst: Instance, name: str, outcome: str | None = None) -> None:
    """Refuse a signal before it is stored: InputError for a finished instance, InvalidSignal for
    one its machine (`graph`, the definition the instance pinned; the machines it calls do not
    count) does not take: a name no signal state waits for, an outcome label that no state waiting
    for the name routes on (a state that routes with `next` or `choose` routes on none), or no
    label where every state waiting for the name routes on one. Either would only wait forever or
    fail the state with InvalidOutcome. The message names what the machine takes."""
    if inst.finished:
        raise InputError(f"instance {inst.id} is {inst.status}: it takes no more signals")
    accepted = graph.signals()
    about = f"instance {inst.id} (machine {graph.machine!r})"
    routes = accepted.get(name)
    if routes is None:
        if not accepted:
            raise InvalidSignal(f"{about} waits for no signals at all: no state of its machine has `signal:`; "
                                f"signal {name!r} is not stored")
        raise InvalidSignal(f"{about} waits for no signal {name!r}; its machine takes "
                            f"{'; '.join(_takes(r) for r in accepted.values())}")
    states = ", ".join(repr(s) for s in routes.states)
    if outcome is not None and outcome not in routes.outcomes:
        if not routes.outcomes:
            raise InvalidSignal(f"{about}: signal {name!r} takes no outcome label, its state(s) {states} route "
                                f"without one; send it without an outcome, not {outcome!r}")
        raise InvalidSignal(f"{about}: signal {name!r} takes no outcome {outcome!r}; its state(s) {states} route "
                            f"on {_either(routes.outcomes)}")
    if outcome is None and not routes.bare:
        raise InvalidSignal(f"{about}: signal {name!r} needs an outcome label, its state(s) {states} route on "
                            f"{_either(routes.outcomes)}")


def _takes(routes: SignalRoutes) -> str:
    """One signal as a message lists what a machine takes: its name and the outcomes it needs."""
    if not routes.outcomes:
        return f"{routes.name!r} (without an outcome)"
    optional = ", or without one" if routes.bare else ""
    return f"{routes.name!r} (outcome {_either(routes.outcomes)}{optional})"


def _either(labels: tuple[str, ...]) -> str:
    quoted = [repr(label) for label in labels]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _on_signal(graph: Graph, inst: Instance, token: Token, state: State, outcome: Outcome, now: float,
               worker: str) -> Step:
    """A signal state's token runs: consume the first signal of its name, or time out, or (woken
    for a signal another visit took first) wait again."""
    at = next((i for i, sig in enumerate(inst.signals) if sig.name == state.signal), None)
    if at is None:
        if token.not_before == 0.0 or token.parked or token.deadline is None:
            again = replace(token, not_before=token.deadline if token.deadline is not None else PARKED)
            return _replaced(inst, again)
        failure = Failure("SignalTimeout", f"state {state.name!r}: no signal {state.signal!r} arrived within "
                          f"{format_duration(state.timeout or 0.0)}", retryable=False)
        return _failed_attempt(graph, inst, token, state, failure, outcome, now, worker)
    sig = inst.signals[at]
    inst = evolve(inst, signals=inst.signals[:at] + inst.signals[at + 1:])
    payload = {**inst.payload_of(token), **sig.payload}
    label = sig.outcome if state.kind is Kind.ON else None
    try:
        if state.kind is Kind.ON and label is None:
            raise _RouteError("InvalidOutcome", f"state {state.name!r} routes with 'on' and signal {sig.name!r} "
                              f"came without an outcome label; expected one of {_labels(state)}")
        targets = _route(state, label, payload, inst)
    except _RouteError as exc:
        failure = Failure(exc.type, exc.message, retryable=False)
        return _failed_attempt(graph, inst, token, state, failure, outcome, now, worker)
    return _move(graph, inst, token, targets, payload, sig.outcome, now, worker, outcome, signal=sig)


def child_id(inst: Instance, token: Token) -> str:
    """The id of the child a call state starts: derived from the parent's visit and attempt (and
    redrive), so it is the same however often that step is planned, and new for a retry."""
    suffix = f".c{token.visit}.{token.attempt}" + (f".r{inst.redrives}" if inst.redrives else "")
    return _child_base(inst.id) + suffix


def child_prefix(parent_id: str) -> str:
    """What the ids of the children an instance starts begin with (and those of theirs, but for a
    child whose own id is over 96 characters). Other instances may share it: a child is one whose
    record names the parent."""
    return _child_base(parent_id) + ".c"


def _child_base(parent_id: str) -> str:
    if len(parent_id) <= 96:
        return parent_id
    return parent_id[:60] + "-" + hashlib.blake2b(parent_id.encode(), digest_size=8).hexdigest()


def descends_from(instance_id: str, root: str) -> bool:
    """Whether an instance is `root` or one of the children its call states start, or theirs (as
    far as ids tell: a child of a child whose id grew past 96 characters is not recognised)."""
    if instance_id == root:
        return True
    return instance_id.startswith(child_prefix(root))


def _on_child(graph: Graph, inst: Instance, token: Token, state: State, outcome: Outcome, now: float,
              worker: str) -> Step:
    """A call state's token runs: start its child (once per attempt), or take the child's result."""
    assert state.call is not None
    if token.child is None:
        child_graph = state.call.graph
        if child_graph is None:
            failure = Failure("ChildFailed", f"state {state.name!r}: the machine {state.call.path!r} it calls is "
                              "not known to this process", retryable=True)
            return _failed_attempt(graph, inst, token, state, failure, outcome, now, worker)
        cid = child_id(inst, token)
        child = start(child_graph, cid, inst.payload_of(token), now)
        child = evolve(child, parent=Parent(inst.id, state.name, token.id, inst.machine, inst.digest,
                                           millis(inst.created_at)))
        inst = evolve(inst, children=inst.children + 1)
        deadline = now + state.timeout if state.timeout is not None else None
        # a child that ends as it starts (its start state is terminal) makes no commit that would
        # wake this token: it is due at once, to take the child's result
        due = 0.0 if child.finished else deadline if deadline is not None else PARKED
        waiting = replace(token, child=cid, not_before=due, deadline=deadline, waits="child")
        step = _replaced(inst, waiting)
        return replace(step, started=(child,))
    result = outcome.child
    if result is None or result.status == RUNNING:
        if token.deadline is not None and now >= token.deadline:
            failure = Failure("ChildTimeout", f"state {state.name!r}: child instance {token.child} did not finish "
                              f"within {format_duration(state.timeout or 0.0)}", retryable=True)
            return _failed_attempt(graph, inst, token, state, failure, outcome, now, worker)
        again = replace(token, not_before=token.deadline if token.deadline is not None else PARKED)
        return _replaced(inst, again, force=True)
    if result.status != SUCCEEDED:
        why = (f"{result.error.type}: {result.error.message}" if result.error is not None
               else "it does not exist" if result.status is None else f"it ended {result.status}")
        failure = Failure("ChildFailed", f"state {state.name!r}: child instance {result.id} failed ({why})",
                          retryable=True)
        return _failed_attempt(graph, inst, token, state, failure, outcome, now, worker)
    payload = dict(result.payload or {})
    try:
        targets = _route(state, None, payload, inst)
    except _RouteError as exc:
        failure = Failure(exc.type, exc.message, retryable=False)
        return _failed_attempt(graph, inst, token, state, failure, outcome, now, worker)
    return _move(graph, inst, token, targets, payload, None, now, worker, outcome, child=result.id)


def by_parent(parent_id: str) -> str:
    """Who cancelled a child its parent let go of, as its record's `cancel.by` says."""
    return f"parent:{parent_id}"


def released_children(before: Instance, after: Instance, now: float) -> tuple[tuple[str, str], ...]:
    """The children that tokens of `before` waited for and no token of `after` waits for, each
    with why its parent let go of it at `now`: (child id, reason), for the child's `cancel.reason`.

    A child never outlives its parent's interest in it: the caller cancels those that still run
    (`by_parent`). A call state lets go of its child when the child ended (it moves on, retries or
    is caught), and of a running one only when it timed out; every child goes when the parent
    ends, however it ends. Cancelling a child that ended already changes nothing."""
    waited = {t.child: t for t in before.tokens.values() if t.child is not None}
    if not waited:
        return ()
    still = {t.child for t in after.tokens.values() if t.child is not None}
    out = []
    for cid, token in waited.items():
        if cid in still:
            continue
        if after.status == CANCELLED:
            why = f"its parent {after.id} was cancelled"
            if after.cancel is not None and after.cancel.reason:
                why += f": {after.cancel.reason}"
        elif token.deadline is not None and now >= token.deadline:
            why = f"its parent {after.id} gave up on it: its call state {token.state!r} timed out waiting for it"
        elif after.finished:
            why = f"its parent {after.id} {after.status}"
            if after.error is not None:
                why += f" ({after.error.type} at state {after.error.state!r})"
        else:
            why = f"its parent {after.id} no longer waits for it at state {token.state!r}"
        out.append((cid, why))
    return tuple(out)


def child_ended(inst: Instance, child: Instance) -> Instance:
    """A child that finished makes the token waiting for it due now (on etcd, the child's last
    commit does this to the token's work marker); unchanged when no token waits for it."""
    if child.parent is None or inst.finished or not child.finished:
        return inst
    token = inst.tokens.get(child.parent.token)
    if token is None or token.child != child.id:
        return inst
    return _replaced(inst, replace(token, not_before=0.0)).instance


def _replaced(inst: Instance, token: Token, *, force: bool = False) -> Step:
    """The instance with one token changed in place (it waits again, or for something new).
    `force`: listed as changed even when equal, so its work marker is written again."""
    if not force and inst.tokens.get(token.id) == token:
        return Step(inst)
    tokens = dict(inst.tokens)
    tokens[token.id] = token
    return Step(evolve(inst, tokens=MappingProxyType(tokens)), upserted=(token,))


def _map_items(state: State, payload: dict[str, Any], inst: Instance) -> list[Any]:
    spec = state.map
    assert spec is not None
    try:
        items = spec.items.value(payload, {"id": inst.id, "machine": inst.machine}, state.name)
    except GuardError as exc:
        raise _RouteError("MapItemsError", f"state {state.name!r}: map items: {exc}") from None
    if not isinstance(items, list):
        raise _RouteError("MapItemsError", f"state {state.name!r}: map items {spec.items.source!r} gave "
                          f"{type(items).__name__}, not a list")
    if len(items) > MAX_MAP_ITEMS:
        raise _RouteError("MapTooLarge", f"state {state.name!r}: map items {spec.items.source!r} gave {len(items)} "
                          f"items; a map takes at most {MAX_MAP_ITEMS}")
    try:  # each item goes into a payload: NaN or a lone surrogate must stop here, not at the commit
        payloads.check({"items": items}, limit=sys.maxsize)
    except payloads.PayloadError as exc:
        raise _RouteError("MapItemsError", f"state {state.name!r}: map items {spec.items.source!r} gave values that "
                          f"are not JSON: {str(exc).replace('payload.items', 'items', 1)}") from None
    return items


def _arm(graph: Graph, inst: Instance, token: Token, payload: dict[str, Any], now: float) -> Token:
    """A token entering its state, set up for what the state waits for: a timer's due time, a
    signal (due at once when one is buffered, else at its timeout or never by the clock), or a
    child to start (due at once: running it starts the child)."""
    state = graph.states[token.state]
    if state.wait is not None:
        if state.wait.seconds is not None:
            due = now + state.wait.seconds
        else:
            assert state.wait.until is not None
            try:
                value = state.wait.until.value(payload, {"id": inst.id, "machine": inst.machine}, state.name)
            except GuardError as exc:
                raise _RouteError("WaitError", f"state {state.name!r}: wait until: {exc}") from None
            due = _moment(value, state)
        return replace(token, not_before=due, waits="timer")
    if state.signal is not None:
        deadline = now + state.timeout if state.timeout is not None else None
        buffered = any(sig.name == state.signal for sig in inst.signals)
        due = 0.0 if buffered else deadline if deadline is not None else PARKED
        return replace(token, not_before=due, deadline=deadline, waits=f"signal:{state.signal}")
    if state.call is not None:
        return replace(token, waits="child")
    return token


def _moment(value: Any, state: State) -> float:
    """A `wait: {until: ...}` value as epoch seconds: a number, or an ISO 8601 time (UTC when it
    names no zone)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _RouteError("WaitError", f"state {state.name!r}: wait until gave {value!r}; expected an ISO 8601 "
                          "time or epoch seconds")
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            raise _RouteError("WaitError", f"state {state.name!r}: wait until gave {value!r}, which is not an "
                              "ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    if value != value or value in (float("inf"), float("-inf")):
        raise _RouteError("WaitError", f"state {state.name!r}: wait until gave {value!r}")
    return float(value)


class _RouteError(Exception):
    def __init__(self, type_: str, message: str, state: str | None = None):
        self.type = type_
        self.message = message
        self.state = state


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
    if kind is Kind.MAP:
        assert state.map is not None
        return (state.map.branch,)
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
        again = replace(token, attempt=token.attempt + 1, not_before=now + wait, child=None, deadline=None)
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
          label: str | None, now: float, worker: str, outcome: Outcome, *, items: list[Any] | None = None,
          signal: Signal | None = None, child: str | None = None) -> Step:
    state = graph.states[token.state]
    if inst.transitions + 1 > graph.max_transitions:
        error = ErrorInfo(type="LoopGuard", message=f"instance exceeded max_transitions={graph.max_transitions} "
                          f"at state {state.name!r}", state=state.name, attempts=token.attempt)
        return fail(inst, error, now)
    started_at, duration_ms = _timing(outcome, now)
    # every field by position (seq, state, next, branch, attempt, outcome, worker, at, started_at,
    # duration_ms, failures, signal, child): one entry a transition, and keywords would make it slower
    entry = HistoryEntry(inst.transitions + 1, state.name, targets, token.branch, token.attempt, label, worker, now,
                         started_at, duration_ms, token.failures, signal, child)
    move = _Move(graph, inst, now)
    del move.tokens[token.id]
    try:
        if state.kind is Kind.FORK and targets == state.fork:
            move.seq += 1
            act = Activation(id=f"a{move.seq}", fork=state.name, frames=token.frames, base=payload)
            move.activations[act.id] = act
            for branch in state.fork:
                move.seq += 1
                move.add(Token(id=f"t{move.seq}", state=branch, frames=token.frames + ((act.id, branch),),
                               payload=payload, visit=move.seq), payload)
            if not token.frames:
                move.main_payload = payload
        elif state.kind is Kind.MAP and items is not None:
            assert state.map is not None and state.join is not None
            move.seq += 1
            act = Activation(id=f"a{move.seq}", fork=state.name, frames=token.frames, base=payload,
                             items=tuple(items))
            if not token.frames:
                move.main_payload = payload
            if not items:  # nothing to map: the join fires at once
                entry = replace(entry, next=(state.join,))
                done = move.joined(act, {**payload, state.map.collect: []}, state.join, entry)
                if done is not None:
                    return done
            else:
                move.activations[act.id] = move.start_items(act)
        else:
            (target,) = targets
            target_state = graph.states[target]
            frame = token.frames[-1] if token.frames else None
            if frame is not None and graph.forks[move.activations[frame[0]].fork].join == target:
                done = move.arrive(frame, payload, target, entry, token.attempt)
                if done is not None:
                    return done
            elif target_state.terminal:
                if token.frames:  # the compiler forbids this; keep the record consistent if it ever happens
                    raise AssertionError(f"terminal state {target!r} reached inside a fork branch")
                finished = _finish(evolve(inst, payload=payload, transitions=inst.transitions + 1), target_state,
                                   now)
                return Step(finished, removed=tuple(inst.tokens), history=(entry,))
            else:
                # Along a line the token keeps its id: its work marker and claim stay where they are.
                move.seq += 1
                moved = Token(id=token.id, state=target, frames=token.frames,
                              payload=payload if token.frames else None, visit=move.seq)
                if not token.frames:
                    move.main_payload = payload
                move.add(moved, payload)
                new = evolve(inst, payload=move.main_payload, transitions=inst.transitions + 1, seq=move.seq,
                             tokens=MappingProxyType(move.tokens), activations=MappingProxyType(move.activations))
                return Step(new, upserted=tuple(move.upserted), history=(entry,))
    except _RouteError as exc:  # a state entered could not be set up (a wait's time, a map's items)
        return fail(inst, ErrorInfo(type=exc.type, message=exc.message, state=exc.state or state.name,
                                    attempts=1), now)
    except MergeConflict as exc:
        return fail(inst, ErrorInfo(type="MergeConflict", message=str(exc), state=exc.fork,
                                    attempts=token.attempt), now)
    new = evolve(inst, payload=move.main_payload, transitions=inst.transitions + 1, seq=move.seq,
                 tokens=MappingProxyType(move.tokens), activations=MappingProxyType(move.activations))
    return Step(new, removed=(token.id,), upserted=tuple(move.upserted), history=(entry,))


class _Move:
    """The tokens and fork activations of one step as they change (the working state of `_move`)."""

    def __init__(self, graph: Graph, inst: Instance, now: float):
        self.graph = graph
        self.inst = inst
        self.now = now
        self.tokens = dict(inst.tokens)
        self.activations = dict(inst.activations)
        self.seq = inst.seq
        self.upserted: list[Token] = []
        self.main_payload = inst.payload

    def add(self, token: Token, payload: dict[str, Any]) -> None:
        """A token entering its state, armed for what the state waits for."""
        try:
            token = _arm(self.graph, self.inst, token, payload, self.now)
        except _RouteError as exc:
            exc.state = token.state
            raise
        self.tokens[token.id] = token
        self.upserted.append(token)

    def start_items(self, act: Activation) -> Activation:
        """Start the next map items the map's concurrency and the batch size allow."""
        fork = self.graph.forks[act.fork]
        spec = fork.map
        assert spec is not None and act.items is not None
        in_flight = act.started - len(act.arrived)
        room = len(act.items) - act.started
        room = min(room, (spec.max_concurrency or MAP_WINDOW) - in_flight, MAP_BATCH)
        base = act.base
        kept = {k: base[k] for k in spec.with_keys if k in base}
        for i in range(act.started, act.started + max(room, 0)):
            self.seq += 1
            item = {"item": act.items[i], "index": i, **kept}
            self.add(Token(id=f"t{self.seq}", state=spec.branch, frames=act.frames + ((act.id, f"{fork.state}[{i}]"),),
                           payload=item, visit=self.seq), item)
        return replace(act, started=act.started + max(room, 0))

    def arrive(self, frame: tuple[str, str], payload: dict[str, Any], target: str, entry: HistoryEntry,
               attempt: int) -> Step | None:
        """A branch (or map item) reached its join: count it; the last one continues past the join."""
        act = self.activations[frame[0]]
        fork = self.graph.forks[act.fork]
        arrived = dict(act.arrived)
        if fork.map is not None:
            assert act.items is not None
            arrived[frame[1][len(fork.state) + 1:-1]] = payload  # "thumbnails[3]" -> "3"
            if len(arrived) < len(act.items):
                self.activations[act.id] = self.start_items(replace(act, arrived=MappingProxyType(arrived)))
                return None
            merged = {**act.base, fork.map.collect: [arrived[str(i)] for i in range(len(act.items))]}
        else:
            arrived[frame[1]] = payload
            if len(arrived) < len(fork.branches):
                self.activations[act.id] = replace(act, arrived=MappingProxyType(arrived))
                return None
            merged = merge(fork.merge, act.base, arrived, fork.branches, fork.state)
        del self.activations[act.id]
        return self.joined(act, merged, target, entry)

    def joined(self, act: Activation, merged: dict[str, Any], target: str, entry: HistoryEntry) -> Step | None:
        """Continue past a join with the merged payload (a Step when the instance ends there)."""
        inst = self.inst
        outer = act.frames
        target_state = self.graph.states[target]
        if target_state.terminal and not outer:  # the join is where the instance ends
            done = _finish(evolve(inst, payload=merged, transitions=inst.transitions + 1), target_state, self.now)
            return Step(done, removed=tuple(inst.tokens), history=(entry,))
        self.seq += 1
        if not outer:
            self.main_payload = merged
        self.add(Token(id=f"t{self.seq}", state=target, frames=outer, payload=merged if outer else None,
                       visit=self.seq), merged)
        return None


def changes(before: Instance, after: Instance) -> tuple[tuple[str, ...], tuple[Token, ...]]:
    """The net effect of any number of steps on the set of tokens: (removed ids, new or changed)."""
    removed = tuple(tid for tid in before.tokens if tid not in after.tokens)
    changed = tuple(t for tid, t in after.tokens.items() if before.tokens.get(tid) != t)
    return removed, changed


class MergeConflict(Exception):
    """Two branches changed one key to different values."""

    def __init__(self, message: str, fork: str = ""):
        super().__init__(message)
        self.fork = fork


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
                                        f"changed key {key!r} to different values", fork)
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
    # each token runs again now: a timer counts as passed, a signal state looks for its signal
    # again (waiting without its timeout), a call state starts a new child
    tokens = {tid: replace(t, attempt=1, not_before=0.0, child=None, deadline=None)
              for tid, t in inst.stopped.tokens.items()}
    again = evolve(inst, status=RUNNING, state=None, error=None, finished_at=None, cancel=None, stopped=None,
                    tokens=MappingProxyType(tokens), activations=inst.stopped.activations,
                    redrives=inst.redrives + 1)
    return Step(again, upserted=tuple(tokens.values()))


__all__ = ["ChildResult", "Failure", "Outcome", "Step", "advance", "by_parent", "cancel", "changes",
           "check_signal", "child_ended", "child_id", "child_prefix", "descends_from", "fail", "merge", "redrive",
           "released_children", "same_json", "signal", "start", "MergeConflict", "MAX_MAP_ITEMS", "MAP_BATCH",
           "MAP_WINDOW"]
