"""The write gate: whether the store takes writes, as far as etcd's NOSPACE alarm is concerned.

When etcd's database reaches its quota it raises the NOSPACE alarm and refuses every write
(claims, commits, lease grants) until an operator makes room and disarms the alarm. Nothing a
refused write carried is lost: the claim was not taken, the commit not applied, and the worker
holds its claims (keep-alives still pass) with the outcomes of their ticks in memory. So the
worker stops claiming, parks its commits on the gate, says so once, and asks the store every few
seconds whether the alarm is still raised; when it is gone, the gate opens and everything parked
goes on by itself.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import NoSpace, StoreError, StoreUnavailable
from ..store import Store

log = logging.getLogger("dsm.worker")

NOSPACE = "NOSPACE"


class WriteGate:
    def __init__(self, store: Store, *, name: str, interval: float = 2.0):
        self.store = store
        self.name = name
        self.interval = interval
        self.open = asyncio.Event()
        self.open.set()
        self.refusals = 0  # writes refused for lack of space, in all
        self.pauses = 0  # times the gate closed
        self._probe: asyncio.Task | None = None
        # when the last pause ended without the alarm read gone (so a refusal soon after is the same pause)
        self._unconfirmed: float | None = None

    @property
    def closed(self) -> bool:
        return not self.open.is_set()

    def refused(self, exc: NoSpace) -> None:
        """A write was refused with NOSPACE: close the gate (and say so, once per pause)."""
        self.refusals += 1
        if self.closed:
            return
        self.open.clear()
        loop = asyncio.get_running_loop()
        if self._unconfirmed is not None and loop.time() - self._unconfirmed < 5 * self.interval:
            self._probe = asyncio.get_running_loop().create_task(self._wait_for_room())
            return
        self.pauses += 1
        log.error("worker %s: etcd refuses writes, its NOSPACE alarm is raised (%s). Work waits here and nothing "
                  "is lost; it goes on by itself once an operator has made room in etcd and disarmed the alarm "
                  "(docs/operations.md)", self.name, exc)
        self._probe = asyncio.get_running_loop().create_task(self._wait_for_room(), name=f"dsm-nospace-{self.name}")

    async def wait(self) -> None:
        await self.open.wait()

    async def _wait_for_room(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                alarms = await self.store.alarms()
            except StoreUnavailable as exc:
                log.debug("worker %s: cannot read etcd's alarms (%s)", self.name, exc)
                continue
            except StoreError as exc:  # not allowed to read them (an etcd user without that right): write to see
                log.debug("worker %s: cannot read etcd's alarms (%s); trying to write", self.name, exc)
                self._unconfirmed = asyncio.get_running_loop().time()
                self.open.set()
                return
            if NOSPACE not in alarms:
                break
        self._unconfirmed = None
        log.warning("worker %s: etcd's NOSPACE alarm is disarmed; writing again", self.name)
        self.open.set()

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
