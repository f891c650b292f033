"""The Store protocol: etcd v3's own model (revisions, multi-key compare-and-swap, leases, watches).

Speaking etcd's terms keeps the etcd store a thin adapter and makes the memory store a faithful
model: code that works against `MemoryStore` meets the same rules on etcd (duplicate keys in a
transaction, operation and size limits, values compared on missing keys, leases that delete
their keys when they expire).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from ..errors import StoreError
from ..frozen import fast_init

PUT: Literal["put"] = "put"
DELETE: Literal["delete"] = "delete"
EventType = Literal["put", "delete"]
Target = Literal["version", "create", "mod", "value", "lease"]
Operator = Literal["==", "!=", "<", ">"]


@fast_init
@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@fast_init
@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction, on a key or (with `end`) on every key of a range.

    As in etcd, comparing the value of a missing key is false; other targets of a missing key
    compare as 0.
    """

    key: str
    target: Target
    op: Operator
    value: int | bytes
    end: str | None = None

    @staticmethod
    def version(key: str, op: Operator, value: int) -> Compare:
        return Compare(key, "version", op, value)

    @staticmethod
    def create(key: str, op: Operator, value: int) -> Compare:
        return Compare(key, "create", op, value)

    @staticmethod
    def mod(key: str, op: Operator, value: int) -> Compare:
        return Compare(key, "mod", op, value)

    @staticmethod
    def value_of(key: str, op: Operator, value: bytes) -> Compare:
        return Compare(key, "value", op, value)

    @staticmethod
    def lease_of(key: str, op: Operator, value: int) -> Compare:
        return Compare(key, "lease", op, value)


@fast_init
@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@fast_init
@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    end: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Get:
    """A read in a transaction: one key, or (with `end`) a range of up to `limit` keys (0: all);
    `keys_only` leaves the values out, as a range read's does."""

    key: str
    end: str | None = None
    limit: int = 0
    keys_only: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class Txn:
    """A nested transaction: its own compares and branches, applied within the outer one."""

    compare: Sequence[Compare]
    success: Sequence[Op] = ()
    failure: Sequence[Op] = ()


Op = Put | Delete | Get | Txn


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a Put in a transaction answers: nothing but that it applied."""


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: int


@fast_init
@dataclass(frozen=True, slots=True)
class GetResult:
    kvs: list[KeyValue]

    @property
    def first(self) -> KeyValue | None:
        return self.kvs[0] if self.kvs else None


PUT_RESULT = PutResult()


@fast_init
@dataclass(frozen=True, slots=True)
class TxnResult:
    """`responses` follow the ops of the branch taken, one typed result each. Read them with the
    accessors, which check the kind: `get(i)`, `deleted(i)`, `nested(i)`."""

    succeeded: bool
    revision: int
    responses: list[Response] = field(default_factory=list)

    def get(self, i: int) -> GetResult:
        return _expect(self.responses[i], GetResult)

    def deleted(self, i: int) -> int:
        return _expect(self.responses[i], DeleteResult).deleted

    def nested(self, i: int) -> TxnResult:
        return _expect(self.responses[i], TxnResult)

    def gets(self) -> list[GetResult]:
        """Every response, each a GetResult (a read-only transaction)."""
        return [_expect(r, GetResult) for r in self.responses]


Response = PutResult | DeleteResult | GetResult | TxnResult
_R = TypeVar("_R")


def _expect(response: object, kind: type[_R]) -> _R:
    if not isinstance(response, kind):
        raise TypeError(f"expected a {kind.__name__}, the operation answered {type(response).__name__}")
    return response


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KeyValue]
    more: bool
    revision: int


@fast_init
@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    kv: KeyValue  # for DELETE: the key with mod_revision set to the deletion's revision


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Events of one or more revisions, in order; `revision` is the store's revision at sending."""

    revision: int
    events: list[Event]


class Watch(Protocol):
    def __aiter__(self) -> AsyncIterator[WatchBatch]: ...

    async def cancel(self) -> None: ...


class Store(Protocol):
    """What dsm needs from a coordination store, in etcd v3's terms."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def range(self, start: str, end: str | None = None, *, limit: int = 0, revision: int = 0,
                    keys_only: bool = False) -> RangeResult: ...

    async def count(self, start: str, end: str | None = None) -> int:
        """How many keys [start, end) holds, without reading them."""

    async def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    async def delete(self, key: str, end: str | None = None) -> int: ...

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op] = (),
                  failure: Sequence[Op] = ()) -> TxnResult: ...

    async def lease_grant(self, ttl: float) -> int: ...

    async def lease_keepalive(self, lease: int) -> float:
        """Refresh a lease; return its remaining TTL. Raise LeaseLost when it has expired."""

    async def lease_revoke(self, lease: int) -> None: ...

    async def lease_ttl(self, lease: int) -> float:
        """Remaining seconds of a lease; -1 when it no longer exists."""

    async def lease_keys(self, lease: int) -> list[str]:
        """The keys attached to a lease. Raise LeaseLost when it has expired."""

    async def watch(self, start: str, end: str | None = None, *, start_revision: int = 0) -> Watch:
        """Watch [start, end) from a revision (0: from now). Raise Compacted when it is gone."""

    async def compact(self, revision: int, *, physical: bool = False) -> None:
        """Forget the history below `revision`; `physical`: wait until the backend has done so."""

    async def revision(self) -> int: ...

    async def close(self) -> None: ...

    async def alarms(self) -> list[str]:
        """The alarms raised in the store ("NOSPACE", "CORRUPT"), each once; [] when none."""


def prefix_end(prefix: str) -> str:
    """The end of the range holding every key that starts with `prefix` ("\\0": every key).

    Computed on code points: UTF-8 orders byte strings as their code points are ordered, so the
    same end is right for etcd, which compares the UTF-8 bytes of keys, and for the memory store,
    which compares strings. (Adding one to the last UTF-8 byte instead gives bytes that are not
    UTF-8, and decoding them as latin-1 gave a different key: a namespace like "café" saw nothing.)
    """
    chars = list(prefix)
    while chars:
        following = ord(chars.pop()) + 1
        if 0xD800 <= following <= 0xDFFF:  # surrogates are not characters: no key holds one
            following = 0xE000
        if following <= 0x10FFFF:
            return "".join(chars) + chr(following)
    return "\0"


class TxnRejected(StoreError):
    """The store refused a transaction as malformed (duplicate keys, too many operations, too large)."""


__all__ = [
    "Compare", "Delete", "DeleteResult", "Event", "EventType", "Get", "GetResult", "KeyValue", "Op", "Operator",
    "Put", "PutResult", "PUT_RESULT", "RangeResult", "Response", "Store", "Target", "Txn", "TxnRejected",
    "TxnResult", "Watch", "WatchBatch", "prefix_end", "PUT", "DELETE",
]
