"""Fault injection through a store wrapper: real operations, answered wrongly or late.

`LateStore` loses the answer of a chosen transaction (the caller gets StoreUnavailable) and
applies the transaction for real later, as etcd does with a request whose deadline passed (a
slow fsync, a leader change): just AFTER the caller's next read of a key it writes (the caller
re-reads, sees nothing, and only then does it apply), or just BEFORE the next transaction that
writes one of its keys (the caller's retry loses to it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dsm.errors import LeaseLost, StoreUnavailable
from dsm.store import Delete, Get, Put, Txn

Predicate = Callable[[Sequence[Any], Sequence[Any]], bool]


def ops_of(success: Sequence[Any]) -> list[Any]:
    """Every operation, nested transactions' included."""
    out: list[Any] = []
    for op in success:
        if isinstance(op, Txn):
            out.extend(ops_of(op.success))
        else:
            out.append(op)
    return out


@dataclass
class _Late:
    compare: Sequence[Any]
    success: Sequence[Any]
    failure: Sequence[Any]
    writes: set[str]
    when: str


class LateStore:
    def __init__(self, store: Any):
        self.store = store
        self._rules: list[list[Any]] = []  # [predicate, times, kind]
        self._late: list[_Late] = []
        self.injected = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def lose_answer(self, predicate: Predicate, times: int = 1, *, when: str = "after_read") -> None:
        """The next `times` matching transactions apply late and answer StoreUnavailable; `when`:
        "after_read" or "before_write" (see the module's docstring)."""
        self._rules.append([predicate, times, when])

    def refuse_lease(self, predicate: Predicate, times: int = 1) -> None:
        """The next `times` matching transactions are not applied and answer LeaseLost."""
        self._rules.append([predicate, times, "lease"])

    def fail_get(self, predicate: Callable[[str], bool], times: int = 1) -> None:
        """The next `times` gets of a matching key answer StoreUnavailable."""
        self._rules.append([predicate, times, "get"])

    async def get(self, key: str) -> Any:
        for rule in self._rules:
            if rule[2] == "get" and rule[1] > 0 and rule[0](key):
                rule[1] -= 1
                self.injected += 1
                raise StoreUnavailable("injected: no answer")
        return await self.store.get(key)

    async def txn(self, compare: Sequence[Any], success: Sequence[Any] = (), failure: Sequence[Any] = ()) -> Any:
        for rule in self._rules:
            if rule[2] != "get" and rule[1] > 0 and rule[0](compare, success):
                rule[1] -= 1
                self.injected += 1
                if rule[2] == "lease":
                    raise LeaseLost("injected: requested lease not found")
                writes = {op.key for op in ops_of(success) if isinstance(op, (Put, Delete))}
                self._late.append(_Late(compare, success, failure, writes, rule[2]))
                raise StoreUnavailable("injected: the answer was lost")
        ops = ops_of(success)
        writes = {op.key for op in ops if isinstance(op, (Put, Delete))}
        await self._apply_late("before_write", writes)
        result = await self.store.txn(compare, success, failure)
        await self._apply_late("after_read", {op.key for op in ops if isinstance(op, Get)})
        return result

    async def _apply_late(self, when: str, keys: set[str]) -> None:
        for late in list(self._late):
            if late.when == when and late.writes & keys:
                self._late.remove(late)
                await self.store.txn(late.compare, late.success, late.failure)


def is_claim(compare: Sequence[Any], success: Sequence[Any]) -> bool:
    """A worker's claim: it puts a work marker (naming itself) and reads the record, writing none."""
    ops = ops_of(success)
    return any(isinstance(op, Put) and "/work/" in op.key for op in ops) and any(
        isinstance(op, Get) and "/inst/" in op.key for op in ops) and not any(
        isinstance(op, Put) and "/inst/" in op.key for op in ops)


def is_fork_commit(compare: Sequence[Any], success: Sequence[Any]) -> bool:
    ops = ops_of(success)
    return sum(1 for op in ops if isinstance(op, Put) and "/work/" in op.key) >= 2


def is_commit(compare: Sequence[Any], success: Sequence[Any]) -> bool:
    """A worker's commit: it writes a record, fenced by its claims (its tokens' markers and its
    own entry among live workers)."""
    return any(isinstance(op, Put) and "/inst/" in op.key for op in ops_of(success)) and any(
        "/workers/" in c.key for c in compare)
