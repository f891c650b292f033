"""What a worker's commit writes, decided without I/O: `plan_commit`, then `commit_txn`.

A commit applies the outcomes of one instance's finished attempts (folded into one step,
`dsm.step`), runs
the tick-less states that follow right away, and claims the next tokens this worker will run.
All of it is one transaction, and a transaction is bounded: etcd refuses more than 128
operations (`--max-txn-ops`), and the memory store models that. The record is always written
whole in the commit, with the newest history entries in it (older ones are spilled, a chunk at a
time, into a key of their own: `_recorded`); so is everything about the committing worker's own
tokens. Work markers of other tokens (fork branches, siblings removed by a failure or a join)
go in the same transaction while they fit; the rest is deferred: the commit puts the `SYNC`
marker instead, and whichever worker claims it makes the markers match the record
(`dsm.markers.reconcile`), in transactions of its own. Markers are an index of the record, which is
the truth, so a deferred marker is never lost: at worst it is late by one claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import codec, index, search, transition
from .frozen import fast_init
from .graph import Graph, State
from .keys import Keys, WorkInfo
from .markers import MAX_TXN_OPS, sync_marker, work_info
from .records import HistoryEntry, Instance, Token, dump_instance, evolve, history_to_row, row_failures, row_seq
from .step import Arrival, apply, bounded
from .store import Compare, Delete, Op, Put, Txn
from .transition import Outcome, Step

MAX_ARRIVALS = 60  # outcomes folded into one commit (each adds a compare)
MAX_FOLDED = 32  # tick-less states run inside one commit; a longer chain continues in the next
CHILD_OPS = 8  # operations creating one child takes, at most (its record, entries and marker)
RECENT = 8  # history entries a record holds: the commit that would make it hold more spills them
RECENT_FAILURES = 8  # failed attempts (each with up to 4 KiB of traceback) the entries a record holds may carry
RECORD_SLACK = 4096  # bytes a record before a run's last step may differ by, besides its payload and entries


@fast_init
@dataclass(frozen=True, slots=True)
class CommitPlan:
    before: Instance
    after: Instance
    history: tuple[HistoryEntry, ...]
    removed: tuple[str, ...]  # tokens gone
    changed: tuple[Token, ...]  # tokens new or changed
    own: frozenset[str]  # tokens of the arrivals (their claims, in their markers, are compared)
    keep: tuple[Token, ...]  # tokens claimed by this commit for this worker to run next
    deferred: frozenset[str]  # tokens whose marker change waits for the SYNC marker
    record: bytes
    started: tuple[Instance, ...] = ()  # child instances this commit creates (`call` states)
    applied: int = 0  # how many of the arrivals it applies (the first ones); the rest wait for the next commit
    required: int = 0  # operations it cannot do without (record, history, entries, its own tokens)
    spill: tuple[int, bytes] | None = None  # a history chunk to write: (its last seq, its entries)
    # planned by `_along_line` (its one token moved on, kept, its marker left alone): the same plan as
    # the general planning makes, which `commit_txn` writes without looking at it again
    line: bool = field(default=False, compare=False)
    too_large: bool = field(default=False, compare=False)  # the record would outgrow the store: it fails instead

    @property
    def sync(self) -> bool:
        return bool(self.deferred)


def plan_commit(graph: Graph, before: Instance, arrivals: list[Arrival], *, now: float, worker: str,
                slots: int, max_record_bytes: int, max_ops: int = MAX_TXN_OPS, shortcut: bool = True) -> CommitPlan:
    """Apply `arrivals` to `before` and choose what this worker claims next.

    `slots`: how many new tokens this worker may take on (besides its own that move along); 0 when
    it is stopping, which also gives back its own tokens.

    Every arrival needs operations of its own (a history entry, its marker, a child it
    starts): when the arrivals together need more than a transaction holds (dozens of map items
    finishing at once), the plan applies the first of them that fit (`applied`) and the rest wait
    for the next commit.

    The arrivals may be one token's run along a line (`step_on_line`: its later visits after its
    earlier ones), applied in order. When a step of such a run would make the record outgrow the
    store (even if a later one shrinks it again), the steps before it are committed, and then it
    alone, which fails the instance as it does committed on its own.

    `shortcut`: a commit along a line is planned without the general planning (`_along_line`);
    False plans it the general way too, which finds the same plan (the tests compare them).
    """
    count = len(arrivals)
    run = count > 1 and len({a.token.id for a in arrivals}) == 1
    while True:
        plan = _plan(graph, before, arrivals[:count], now=now, worker=worker, slots=slots,
                     max_record_bytes=max_record_bytes, max_ops=max_ops, shortcut=shortcut)
        if run and count > 1 and not plan.too_large and _may_outgrow(plan, arrivals[:count - 1], max_record_bytes):
            outgrown = _first_outgrown(graph, before, arrivals[:count], now=now, worker=worker,
                                       max_record_bytes=max_record_bytes)
            if outgrown is not None:
                count = max(1, outgrown)
                continue
        if plan.too_large and count > 1 and run:  # its last step outgrows the store: the others first
            count -= 1
            continue
        if plan.required < max_ops or count <= 1:
            return plan
        count = max(1, min(count - 1, count * (max_ops * 3 // 4) // plan.required))


def _may_outgrow(plan: CommitPlan, earlier: list[Arrival], max_record_bytes: int) -> bool:
    """Whether a record before the last step of a run might have been larger than the store takes,
    though the plan's own fits: bounded without serializing those records, by the plan's record,
    the largest payload an earlier step left, the history rows the plan spilled (an earlier record
    may still have held them) and RECORD_SLACK for the rest (a token's state and counters)."""
    biggest = max((len(codec.dumps(a.outcome.payload)) for a in earlier if a.outcome.payload is not None), default=0)
    spilled = len(plan.spill[1]) if plan.spill is not None else 0
    return len(plan.record) + biggest + spilled + RECORD_SLACK > max_record_bytes


def _first_outgrown(graph: Graph, before: Instance, arrivals: list[Arrival], *, now: float, worker: str,
                    max_record_bytes: int) -> int | None:
    """In a run along a line, the first step but the last (whose record the plan bounds itself)
    after which the record, with its history entries, would be larger than the store takes: its
    index. None when none would be."""
    steps: list[tuple[int, Instance, int]] = []
    _, history = apply(graph, before, arrivals[:-1], now=now, worker=worker, steps=steps)
    for i, inst, entries in steps:
        recorded, _ = _recorded(inst, history[:entries])
        if len(dump_instance(recorded)) > max_record_bytes:
            return i
    return None


def _plan(graph: Graph, before: Instance, arrivals: list[Arrival], *, now: float, worker: str, slots: int,
          max_record_bytes: int, max_ops: int, shortcut: bool = True) -> CommitPlan:
    started: list[Instance] = []
    after, history = apply(graph, before, arrivals, now=now, worker=worker, started=started)
    own = frozenset(a.token.id for a in arrivals)
    if shortcut and len(history) == len(arrivals) and not started and len(own) == 1:
        line = _along_line(graph, before, after, history, arrivals, own, now=now, max_record_bytes=max_record_bytes)
        if line is not None:
            return line
    keep, after = _keep(graph, before, after, own, history, now, worker, slots, started, max_ops)
    after = search.indexed(graph, after)  # their entries move in this transaction (`index.status_ops`)
    recorded, spill = _recorded(after, history)
    recorded, record, too_large = bounded(before, recorded, arrivals, now=now, max_record_bytes=max_record_bytes)
    if too_large and spill is None and history:  # the entries kept in it tipped it over: spill them
        recorded, spill = _recorded(after, history, spill=True)
        recorded, record, too_large = bounded(before, recorded, arrivals, now=now, max_record_bytes=max_record_bytes)
    after = recorded
    if too_large:
        history, keep, started, spill = [], [], [], None
    started = [c for c in started if c.parent is not None and _waits_for(after, c)]
    removed, changed = transition.changes(before, after)
    changed_ids = {t.id for t in changed}
    changed += tuple(t for t in _rewritten(before, after, arrivals) if t.id not in changed_ids)
    entries = (spill is not None) + index.status_op_count(before, after) + sum(_creation_ops(c) for c in started)
    entries += _wakes_parent(before, after)
    keep, deferred, required = _fit(own, removed, changed, keep, entries, max_ops)
    return CommitPlan(before, after, tuple(history), removed, changed, own, tuple(keep), deferred, record,
                      tuple(started), len(arrivals), required, spill, too_large=too_large)


def _along_line(graph: Graph, before: Instance, after: Instance, history: list[HistoryEntry],
                arrivals: list[Arrival], own: frozenset[str], *, now: float,
                max_record_bytes: int) -> CommitPlan | None:
    """The plan of the usual commit, made without the general planning: the one token of a running
    instance moved along a line (one step, or a run of them, `step_on_line`) to a state with a
    tick, due now, and nothing else changed. The general planning finds the same
    (`tests/test_commits_line.py` compares them): the token kept for this worker, its marker left
    alone, no other marker, no listing or expiry entry (only the search entries of attributes the
    steps changed), no child, nothing folded (a state with a tick does not fold). None for any
    other commit, or a record too large."""
    if len(after.tokens) != 1 or len(before.tokens) != 1 or after.finished:
        return None
    (tid,) = own
    moved, was = after.tokens.get(tid), before.tokens.get(tid)
    if (moved is None or was is None or moved.visit == was.visit or moved.attempt != 1 or moved.not_before > now
            or graph.states[moved.state].tick is None):
        return None
    after = search.indexed(graph, after)
    recorded, spill = _recorded(after, history)
    recorded, record, too_large = bounded(before, recorded, arrivals, now=now, max_record_bytes=max_record_bytes)
    if too_large:
        return None
    # required: the record, the history chunk if any, the search entries that move, and the
    # token's own marker (left alone)
    return CommitPlan(before, recorded, tuple(history), (), (moved,), own, (moved,), frozenset(), record,
                      applied=len(arrivals), required=2 + (spill is not None) + index.search_op_count(before, recorded),
                      spill=spill, line=True)


def step_on_line(graph: Graph, inst: Instance, token: Token, outcome: Outcome, *, now: float,
                 worker: str) -> tuple[Step | None, Token | None]:
    """The step an attempt's outcome makes from `inst` when it may be a commit along a line (the
    instance's one token, a success), computed where the attempt ran: the commit applies it as
    it is while the record is still `inst` (`step.apply`). And the token, when the step moved it
    along a line to a state with a tick, due now, its first attempt, nothing started, nothing
    folded: a worker may run that tick before it commits (the outcomes then go in one commit,
    applied in order). (None, None) for a failure, a child's result or an instance of several
    tokens; (step, None) for a step to anything else: a fork, a join, a timer, a state without a
    tick, the end."""
    if outcome.failure is not None or outcome.child is not None or len(inst.tokens) != 1:
        return None, None
    step = transition.advance(graph, inst, token.id, outcome, now=now, worker=worker)
    after = step.instance
    moved = after.tokens.get(token.id)
    if (moved is None or step.started or len(step.history) != 1 or len(after.tokens) != 1 or after.finished
            or moved.visit == token.visit or moved.attempt != 1 or moved.not_before > now or moved.child is not None
            or graph.states[moved.state].tick is None):
        return step, None
    return step, moved


def _recorded(after: Instance, history: list[HistoryEntry], *,
              spill: bool = False) -> tuple[Instance, tuple[int, bytes] | None]:
    """`after` with the new history entries kept in its record, and the chunk to write when they
    are too many (or carry too many failures' tracebacks, or `spill`): then every entry the record
    held goes into one key, `hist/<id>/<seq of its last entry>`, and the record holds none. A
    transition costs no key of its own; one in RECENT writes a chunk."""
    if not history:
        return after, None
    recent = after.recent + tuple(history_to_row(entry) for entry in history)
    if spill or len(recent) >= RECENT or sum(row_failures(row) for row in recent) > RECENT_FAILURES:
        return evolve(after, recent=()), (row_seq(recent[-1]), codec.dumps(list(recent)))
    return evolve(after, recent=recent), None


def _waits_for(inst: Instance, child: Instance) -> bool:
    """Whether the record still has the token that started this child waiting for it (a failure
    later in the same commit may have removed it: then the child is not created)."""
    assert child.parent is not None
    token = inst.tokens.get(child.parent.token)
    return not inst.finished and token is not None and token.child == child.id


def _rewritten(before: Instance, after: Instance, arrivals: list[Arrival]) -> list[Token]:
    """Tokens of the arrivals that went back to waiting unchanged (a call state whose child still
    runs): their markers were woken, so they are written again, parked."""
    out = []
    for a in arrivals:
        token = after.tokens.get(a.token.id)
        if token is not None and token.parked and before.tokens.get(a.token.id) == token:
            out.append(token)
    return out


def _creation_ops(child: Instance) -> int:
    """Operations creating a child instance takes: its record, its entries and its markers."""
    return 1 + len(index.created_ops(Keys(), child)) + len(child.tokens)


def _keep(graph: Graph, before: Instance, after: Instance, own: frozenset[str], history: list[HistoryEntry],
          now: float, worker: str, slots: int, started: list[Instance],
          max_ops: int = MAX_TXN_OPS) -> tuple[list[Token], Instance]:
    """The tokens this worker runs next: its own that moved on keep their slots, new ones take free
    slots. Tick-less states among them run right here, folded into the same commit; call states
    only while the children they start take at most half the transaction (the others run as jobs
    of their own)."""
    if slots <= 0 and not any(tid in after.tokens for tid in own):
        return [], after
    for _ in range(MAX_FOLDED + 1):
        if after.finished:
            return [], after
        # free slots, plus those of our own tokens this commit consumes (a fork hands its token's
        # slot to a branch)
        budget = max(slots, 0) + sum(1 for tid in own if tid not in after.tokens)
        mine = [t for tid, t in after.tokens.items() if t.not_before <= now and t.attempt == 1 and (
            (tid in own and before.tokens.get(tid) != t) or tid not in before.tokens)]
        if len(mine) == 1 and (mine[0].id in own or budget > 0):  # along a line: the usual case
            keep = mine
        else:
            keep = [t for t in mine if t.id in own] + [t for t in mine if t.id not in own][:budget]
        states = graph.states
        tickless = None
        for t in keep:
            state = states[t.state]
            if state.tick is None and t.child is None and (
                    state.call is None or _room_for_child(graph, state, started, max_ops)):
                tickless = t
                break
        if tickless is None or len(history) >= MAX_FOLDED:
            return keep, after
        step = transition.advance(graph, after, tickless.id, Outcome(), now=now, worker=worker)
        after = step.instance
        history.extend(step.history)
        started.extend(step.started)
    return keep, after


def _room_for_child(graph: Graph, state: State, started: list[Instance], max_ops: int) -> bool:
    """Whether a call state may fold into the commit: the children it starts, and the moves of
    the instance's own search entries (two operations an attribute, at most), take at most half
    the transaction (a call state's token folds only to start its child: the child's result is
    read by a job). A child costs CHILD_OPS and one entry for each of its search attributes."""
    assert state.call is not None
    child = state.call.graph
    cost = CHILD_OPS + (len(child.search) if child is not None else 0)
    return max_ops // 2 - 2 * len(graph.search) - sum(_creation_ops(c) for c in started) >= cost


def _fit(own: frozenset[str], removed: tuple[str, ...], changed: tuple[Token, ...], keep: list[Token],
         entries: int, max_ops: int) -> tuple[list[Token], frozenset[str], int]:
    """Trim what does not fit in one transaction: keep fewer new tokens, defer other markers.
    Also returns the operations that cannot be trimmed (when they are `max_ops` or more, the
    commit has too many arrivals)."""
    # the record, a history chunk and the index entries; then each own token's marker: deleted
    # (gone), put (given back: a retry waiting, no slot here, a stale outcome) or left alone
    # (moving along a line), one operation at most
    required = 1 + entries + len(own)
    room = max_ops - required - 1  # one op stays free for the SYNC marker
    fitted: list[Token] = []
    for token in keep:
        if token.id in own:
            fitted.append(token)
        elif room >= 1:  # its marker, claimed for us: one put
            fitted.append(token)
            room -= 1
    kept = {t.id for t in fitted}
    deferred: set[str] = set()
    for token in changed:
        if token.id in own or token.id in kept:
            continue
        if room >= 1:
            room -= 1
        else:
            deferred.add(token.id)
    for tid in removed:
        if tid in own:
            continue
        if room >= 1:
            room -= 1
        else:
            deferred.add(tid)
    return fitted, frozenset(deferred), required


def commit_txn(keys: Keys, plan: CommitPlan, rev: int, claims: dict[str, int], *, worker: str, lease: int,
               now: float, fences: tuple[Compare, ...] = ()) -> Txn:
    """The transaction of a plan, fenced by the record's revision, the claims of its arrivals (each
    marker's mod revision as this worker claimed or last wrote it, and the worker's entry under
    `lease`) and `fences` (the revisions of the child records its outcomes were read from).

    A claim is the marker's value (`keys.py`): a token this worker keeps is a marker put with
    `owner: worker, lease: lease` (one put; one kept along a line is left alone), a token given
    back is a marker put without an owner, a token that goes is its marker deleted."""
    inst = plan.after
    iid = inst.id
    if plan.line and not fences:  # the usual commit: the record, and what moves of the search entries
        (tid,) = plan.own
        written: list[Op] = [Put(keys.instance(iid), plan.record)]
        if plan.spill is not None:
            written.append(Put(keys.history(iid, plan.spill[0]), plan.spill[1]))
        written += index.status_ops(keys, plan.before, inst)  # none, unless a search attribute moved
        return Txn([Compare.mod(keys.instance(iid), "==", rev),
                    Compare.mod(keys.work(keys.place_of(inst), tid), "==", claims[tid]),
                    Compare.lease_of(keys.worker(worker), "==", lease)], written)
    place = keys.place_of(inst)
    ops: list[Op] = [Put(keys.instance(iid), plan.record)]
    if plan.spill is not None:
        ops.append(Put(keys.history(iid, plan.spill[0]), plan.spill[1]))
    ops += index.status_ops(keys, plan.before, plan.after)  # the listing and expiry entries follow the status
    for child in plan.started:
        ops += creation_ops(keys, child, now)
    ops += wake_parent_ops(keys, plan.before, plan.after)
    kept = {t.id for t in plan.keep}
    touched = set(plan.removed)
    for gone in plan.removed:
        if gone not in plan.deferred:
            ops.append(Delete(keys.work(place, gone)))
    for token in plan.changed:
        touched.add(token.id)
        if token.id in plan.deferred:
            continue
        owner = worker if token.id in kept else None
        if owner is not None and token.id in plan.own and token.id in plan.before.tokens:
            # Along a line, under our claim, due now: its marker (and the claim in it) stays as
            # it is. Nobody runs a claimed token, so a rewrite would only make a watch event
            # that every worker decodes and drops.
            continue
        # kept: claimed for us in the same put; else given back (a retry waiting, no slot) or new
        ops.append(Put(keys.work(place, token.id), work_info(inst, token, now, owner, lease if owner else None).dump()))
    for tok in sorted(plan.own - touched):  # stale outcomes: give their claims back
        stale = inst.tokens.get(tok)
        if stale is not None and not inst.finished:
            ops.append(Put(keys.work(place, tok), work_info(inst, stale, now).dump()))
    if plan.sync:
        ops.append(sync_marker(keys, inst))
    compare = [Compare.mod(keys.instance(iid), "==", rev), *fences]
    for tid in sorted(plan.own):
        compare.append(Compare.mod(keys.work(place, tid), "==", claims[tid]))
    compare.append(Compare.lease_of(keys.worker(worker), "==", lease))
    return Txn(compare, ops)


def creation_ops(keys: Keys, child: Instance, now: float) -> list[Op]:
    """Create an instance: its record, its listing entries and its work markers."""
    ops: list[Op] = [Put(keys.instance(child.id), dump_instance(child))]
    ops += index.created_ops(keys, child)
    place = keys.place_of(child)
    for token in child.tokens.values():
        ops.append(Put(keys.work(place, token.id), work_info(child, token, now).dump()))
    return ops


def wake_parent_ops(keys: Keys, before: Instance, after: Instance) -> list[Op]:
    """A child that finishes makes its parent's waiting token due: its marker, written again, in a
    transaction nested in the child's, fenced by the parent's record existing. A parent that is
    gone (retention or `dsm delete` took it) gets nothing: a marker without a record has nothing
    to run, and was claimed and given back by every worker, for ever."""
    if not _wakes_parent(before, after):
        return []
    parent = after.parent
    assert parent is not None
    place = keys.place(parent.machine, parent.created, parent.id)
    marker = Put(keys.work(place, parent.token),
                 WorkInfo(parent.machine, parent.digest, parent.state, 0.0, None, wait=0.0).dump())
    return [Txn([Compare.version(keys.instance(parent.id), ">", 0)], [marker])]


def _wakes_parent(before: Instance, after: Instance) -> bool:
    """Whether this commit finishes a child instance, whose parent it wakes (`wake_parent_ops`)."""
    return after.parent is not None and after.finished and not before.finished
