"""The key layout of a namespace, shared by every store (memory and etcd alike).

    /<ns>/def/<digest>                  definition source by content digest (written once)
    /<ns>/machines/<machine>            the machine's newest definition: {digest, version, description,
                                        registered_at}; written in the transaction that first stores a
                                        definition of that machine (`definitions.py`), so it names the
                                        one stored last; what `dsm api` starts for a machine's name.
                                        Not written with instances: a listing reads these names but
                                        looks for machines they miss too (`index.py`)
    /<ns>/inst/<id>                     instance record: status, payload, tokens, fork activations
    /<ns>/hist/<id>/<seq>               a chunk of committed transitions, named by the seq of its last
                                        (zero-padded, commit order): a JSON list of entries, spilled
                                        from the record, which keeps the newest (`commits._recorded`);
                                        the first layout wrote one entry (a JSON object) a key
    /<ns>/work/<machine>/<age>/<id>#<token>   work marker: exists exactly while the token is pending;
                                        value {machine, digest, state, not_before, wait, owner, lease}:
                                        `owner` and `lease` say which worker claimed it, under which
                                        lease. `work/<machine>/<age>/<id>` is the instance's *place*,
                                        fixed for its life; its markers lie together there, and
                                        together they list the running instances, newest first

    /<ns>/work/<machine>/<age>/<id>#sync      the SYNC marker: this instance's markers lag its record

    /<ns>/idx/sm/<status>/<machine>/<age>/<id>    listing index: one entry a finished instance, under
                                                  its status and machine (values empty); a listing by
                                                  status, by machine or of everything merges these
                                                  ranges and the markers' (running), newest first,
                                                  each instance once (`index.py`)
    /<ns>/idx/attr/<name>/<text>/<age>/<id>       search index: one entry an instance's search
                                                  attribute that has a value (`search.py`), the
                                                  text percent-encoded (no '/' in it); values empty
    /<ns>/exp/<expires>/<id>            expiry index: a finished instance, by when retention deletes it;
                                        value {machine, status, created, transitions, search}
    /<ns>/sched/<name>                  a schedule: what it is and where it stands (`schedules.py`)
    /<ns>/sched-due/<when>/<name>       a schedule's due entry: when the housekeeping leader looks at it
                                        next (ms, 13 digits), written with the schedule
    /<ns>/housekeeper                   the housekeeping election: the holder's name, under its lease
    /<ns>/workers/<worker id>           a live worker's entry and heartbeat, under its lease (`membership.py`)
    /<ns>/meta/indexed                  present once every record of the namespace has its index entries
                                        (records written before the index existed are indexed once)
    /<ns>/meta/layout                   the key layout the namespace is written in (`layout.py`); absent: 1

`<age>` is 9999999999999 minus the creation time in milliseconds (13 digits), so a range read
ascending yields the newest first, ties broken by id; `<expires>` is the expiry time in
milliseconds, 13 digits, so a range from the start up to now yields exactly what has expired.
MARK (`#`) sorts below every character an id may hold, so an instance's markers lie where its
listing entry would, in the same order among other instances' (an id that is a prefix of
another's sorts first either way). Namespaces written by earlier releases hold markers at
`work/<id>/<token>` and running instances' listing entries, and release 0.1's also `idx/all/`,
`idx/status/<status>/` and `idx/machine/<machine>/`: upgrading a namespace moves the markers and
deletes the rest (`layout.py`).

Invariants, kept because every change is one transaction:
- a running instance's record lists token T  <=>  <place>#T exists, unless <place>#sync
  exists: a change too wide for one transaction (etcd takes 128 operations) writes the record
  and the markers that fit, and SYNC; whoever claims SYNC makes the markers match the record
  (`markers.py`). A marker whose token the record does not list, or whose instance has no record,
  is deleted by whoever meets it;
- token T is claimed by worker W exactly while its marker says `owner: W, lease: L` and W's entry
  workers/<W> exists under lease L. Nothing else holds a claim: a claim is the marker's value, so
  claiming, handing on and giving back are puts of the marker, and a claim dies with its
  worker's entry (its lease expired or revoked, or the entry deleted by a peer that took the
  worker for dead, `worker/peers.py`) without a write to the marker. A marker whose owner has no
  entry, or one under another lease, or that names no lease (written by release 0.1), is claimed
  by nobody;
- a claim compares the marker's mod revision as the claimer saw it, the claimer's own entry's
  lease (its entry exists: nobody can see its claim while it looks dead), and, when the marker
  named an owner, that owner's entry's lease as not the one named (a missing key's lease is 0);
  the claim's revision is the marker's new mod revision;
- a commit for token T compares the record's mod revision, T's marker's mod revision (the claim's
  revision: any other claim rewrites the marker) and the committer's entry's lease, so a worker
  whose lease expired or whose entry was deleted, or who was overtaken, can never commit;
- an instance has one search entry for each attribute its record's `search` names, under that
  text, written and deleted in the transactions that change them (`index.search_ops`);
- a finished instance has its listing entry, under its status, and its expiry entry; a running
  one has neither, and at least one marker (a token's or SYNC), which lists it: every transaction
  that creates a record, changes its status or deletes it writes them too (`index.py`). An expiry entry is
  written in the same transaction as the record, so its mod revision is the record's: deletion
  compares it, and never deletes a record that changed since (`housekeeping.py`).

Workers watch /<ns>/work/ and /<ns>/workers/, which are neighbours, in one stream (`watch_range`):
a work marker put without an owner is new work; a marker whose owner's entry is deleted or put
under another lease is work orphaned by a dead or departing worker. Each worker keeps an index
of the markers' owners from that stream, so an entry's deletion names the work it orphaned; a
resync reads the entries and then the markers again, with their owners. A token moving along a
line keeps its id, its marker and its claim: while the worker holding the claim continues it,
the marker is not rewritten (it says where the token was when it was last written), so a
linear transition writes the record alone (its history entry in it) and makes no watch event on
work/ at all. Markers and claim keys of earlier layouts are not taken for markers (`parse_work`).

A waiting token (a timer, a retry, a signal with a timeout) has a marker saying when it is due.
One that only something else can wake (a signal without a timeout, a child) is *parked*: its
`not_before` is `records.PARKED`, and workers keep no candidate for it. What wakes it rewrites
its marker as due now: `dsm signal` in the transaction that stores the signal (with the record),
a child's last commit for its parent's token (`commits.wake_parent_ops`; the parent's commit is
fenced by the child record's revision, so a wake-up that crosses it is never lost; the wake-up is
fenced by the parent's record existing, so a parent that is gone gets no marker back).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

from . import codec
from .errors import InputError
from .frozen import fast_init
from .records import millis
from .store import prefix_end

LAYOUT = 3  # the key layout this release writes (`dsm.layout` upgrades a namespace written in an earlier one)
# An id becomes part of keys: a '/' would put an instance's record, history or work where another
# key layout expects something else. The contract's pattern, matched whole.
INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_instance_id(value: object) -> str:
    """The id itself, or InputError saying what an id may be."""
    if not isinstance(value, str) or INSTANCE_ID.fullmatch(value) is None:
        raise InputError(f"invalid instance id {value!r}: an id is 1 to 128 letters, digits, '.', '_', ':' or '-', "
                         "starting with a letter or digit")
    return value


MACHINE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")  # as the schema says of `machine:`


def check_machine_name(value: object) -> str:
    """The machine name itself, or InputError saying what a name may be."""
    if not isinstance(value, str) or MACHINE_NAME.fullmatch(value) is None:
        raise InputError(f"invalid machine name {value!r}: a name is 1 to 64 lowercase letters, digits, '_' or '-', "
                         "starting with a letter")
    return value


SIGNAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_signal_name(value: object) -> str:
    """The signal name itself, or InputError saying what a name may be (as the schema says)."""
    if not isinstance(value, str) or SIGNAL_NAME.fullmatch(value) is None:
        raise InputError(f"invalid signal name {value!r}: a name is 1 to 128 letters, digits, '.', '_', ':' or '-', "
                         "starting with a letter or digit")
    return value


AGE_MAX = 9_999_999_999_999  # milliseconds: the age part of a listing or marker key counts down from here
MARK = "#"  # between an instance's place and a token in a marker's key: below every character of an id


def sort_key(created: int, instance_id: str) -> str:
    """The part of a listing or marker key that orders instances, newest first (`<age>/<id>`);
    also the cursor that resumes a listing after it."""
    return f"{AGE_MAX - min(max(created, 0), AGE_MAX):013d}/{instance_id}"


class Placed(Protocol):
    """What names an instance's place among the markers: a record, or an expiry entry's content."""

    @property
    def id(self) -> str: ...

    @property
    def machine(self) -> str: ...

    @property
    def created_at(self) -> float: ...


class TokenRef(NamedTuple):
    """One token of one instance: what a work marker (and the claim in it) is about. `place` is
    the start of its marker's key, `work/<machine>/<age>/<id>`: fixed for the instance's life."""

    instance: str
    token: str
    place: str

    @property
    def key(self) -> str:
        """The token's work marker."""
        return self.place + MARK + self.token


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str = "dsm"
    # `/<namespace>/` and its `work/`, made once: every key a worker writes or a watch event it reads starts so
    root: str = field(init=False, repr=False, compare=False)
    work_prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", f"/{self.namespace}/")
        object.__setattr__(self, "work_prefix", f"/{self.namespace}/work/")

    def definition(self, digest: str) -> str:
        return f"{self.root}def/{digest}"

    def machine(self, name: str) -> str:
        return f"{self.root}machines/{name}"

    @property
    def machines(self) -> str:
        return f"{self.root}machines/"

    def instance(self, instance_id: str) -> str:
        return f"{self.root}inst/{instance_id}"

    @property
    def instances(self) -> str:
        return f"{self.root}inst/"

    def history(self, instance_id: str, seq: int) -> str:
        return f"{self.root}hist/{instance_id}/{seq:010d}"

    def history_prefix(self, instance_id: str) -> str:
        return f"{self.root}hist/{instance_id}/"

    def listing(self, status: str, machine: str) -> str:
        """The listing entries of one status and one machine, newest first (`index.page` merges
        these ranges for a listing by status, by machine or of everything)."""
        return f"{self.root}idx/sm/{status}/{machine}/"

    def attribute(self, name: str, text: str) -> str:
        """The search entries of the instances whose attribute `name` has the text `text`, newest
        first (a page by `where` reads this range)."""
        return f"{self.root}idx/attr/{name}/{quote(text, safe='')}/"

    def listings(self, status: str | None = None) -> str:
        """Every listing entry, or every one of a status: for counting and watching them. Read as
        a range, it gives one machine's entries after another's, not the newest first."""
        return f"{self.root}idx/sm/" if status is None else f"{self.root}idx/sm/{status}/"

    @property
    def expiry_prefix(self) -> str:
        return f"{self.root}exp/"

    def expiry(self, expires_ms: int, instance_id: str) -> str:
        return f"{self.root}exp/{expires_ms:013d}/{instance_id}"

    def schedule(self, name: str) -> str:
        return f"{self.root}sched/{name}"

    @property
    def schedules(self) -> str:
        return f"{self.root}sched/"

    @property
    def schedules_due(self) -> str:
        """The schedules' due entries, `<when, ms>/<name>`: earliest first."""
        return f"{self.root}sched-due/"

    @property
    def housekeeper(self) -> str:
        return f"{self.root}housekeeper"

    @property
    def indexed(self) -> str:
        return f"{self.root}meta/indexed"

    @property
    def layout(self) -> str:
        return f"{self.root}meta/layout"

    def place(self, machine: str, created: int, instance_id: str) -> str:
        """Where an instance's work markers lie: `work/<machine>/<age>/<id>`, each followed by
        MARK and its token; `created` in milliseconds."""
        return f"{self.work_prefix}{machine}/{sort_key(created, instance_id)}"

    def place_of(self, inst: Placed) -> str:
        return self.place(inst.machine, millis(inst.created_at), inst.id)

    def ref(self, inst: Placed, token: str) -> TokenRef:
        return TokenRef(inst.id, token, self.place_of(inst))

    def work(self, place: str, token: str) -> str:
        """A token's marker, at the instance's `place`."""
        return place + MARK + token

    def running(self, machine: str) -> str:
        """The markers of one machine's running instances, newest first: its running listing."""
        return f"{self.work_prefix}{machine}/"

    @property
    def workers(self) -> str:
        return f"{self.root}workers/"

    def worker(self, worker_id: str) -> str:
        """A live worker's entry, under its lease (`membership.py`): what holds its claims."""
        return f"{self.root}workers/{worker_id}"

    @property
    def watch_range(self) -> tuple[str, str]:
        """work/ and workers/ in one range (nothing else lies between them): what workers watch."""
        return self.work_prefix, prefix_end(self.workers)

    def parse_worker(self, key: str) -> str | None:
        """workers/<id> -> id; None for anything else."""
        prefix = self.workers
        if not key.startswith(prefix) or len(key) == len(prefix):
            return None
        return key[len(prefix):]

    @staticmethod
    def work_of_instance(place: str) -> str:
        """The prefix of every marker of the instance at `place`."""
        return place + MARK

    def parse_work(self, key: str) -> TokenRef | None:
        """work/<machine>/<age>/<id>#<token> -> (id, token, place); None for anything else (the
        markers and claims of earlier layouts, `work/<id>/<token>[/claim]`, among them)."""
        if not key.startswith(self.work_prefix):
            return None
        place, sep, token = key.rpartition(MARK)
        parts = key[len(self.work_prefix):len(place)].split("/")
        if not sep or not token or len(parts) != 3 or len(parts[1]) != 13 or not parts[2]:
            return None
        return TokenRef(parts[2], token, place)

    def parse_legacy_work(self, key: str) -> tuple[str, str] | None:
        """work/<id>/<token>, a marker of layouts 1 and 2 -> (id, token); None for anything else."""
        if not key.startswith(self.work_prefix):
            return None
        instance_id, sep, token = key[len(self.work_prefix):].partition("/")
        if not sep or not token or "/" in token or MARK in token:
            return None
        return instance_id, token


def range_of(prefix: str) -> tuple[str, str]:
    return prefix, prefix_end(prefix)


@fast_init
@dataclass(frozen=True, slots=True)
class WorkInfo:
    """The value of a work marker: enough to decide whether and when to claim, without the record.

    `owner` and `lease` name the worker that claimed the token and the lease it claimed under: the
    claim holds while that worker's entry lives under that lease (the layout's invariants, above).
    An owner without a lease (a marker written by release 0.1) holds nothing.
    `wait` is how long the token had to wait when the marker was written (`not_before` minus the
    writer's clock): a worker that learns of it counts that long on its own clock, so machines
    whose clocks disagree never lengthen or cut a wait. None in markers written before it existed.
    """

    machine: str
    digest: str
    state: str
    not_before: float = 0.0
    owner: str | None = None
    wait: float | None = None
    lease: int | None = None

    def dump(self) -> bytes:
        d = {"machine": self.machine, "digest": self.digest, "state": self.state, "not_before": self.not_before,
             "owner": self.owner, "wait": self.wait}
        if self.lease is not None:
            d["lease"] = self.lease
        return codec.dumps(d)

    @property
    def claimant(self) -> tuple[str, int] | None:
        """(owner, lease) the marker names as holding its claim; None when it names none (or an
        owner without a lease: release 0.1's, which holds nothing)."""
        if self.owner is None or not self.lease:
            return None
        return self.owner, self.lease

    def claimed(self, owner: str | None, lease: int | None) -> WorkInfo:
        """The same marker, claimed by `owner` under `lease` (None, None: given back)."""
        return WorkInfo(self.machine, self.digest, self.state, self.not_before, owner, self.wait,
                        lease if owner is not None else None)

    @staticmethod
    def load(raw: bytes) -> WorkInfo:
        d: dict[str, Any] = codec.loads(raw)
        # interned: a worker may hold thousands of these, all naming a few machines and states
        owner = d.get("owner")
        return WorkInfo(machine=sys.intern(d["machine"]), digest=sys.intern(d["digest"]),
                        state=sys.intern(d["state"]), not_before=d.get("not_before", 0.0),
                        owner=sys.intern(owner) if owner else None, wait=d.get("wait"), lease=d.get("lease"))

    def delay(self, wall: float, *, fresh: bool) -> float:
        """Seconds from now until the token may run. `fresh`: the marker was just written (a live
        watch event), so its whole `wait` lies ahead; else (read later) what is left of it by the local
        clock, but never more than `wait`."""
        if self.wait is None:
            return max(0.0, self.not_before - wall)
        if fresh:
            return self.wait
        return min(self.wait, max(0.0, self.not_before - wall))
