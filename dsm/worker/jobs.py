"""The jobs of a worker: each claimed token being worked on here, by the token it holds.

The job runner (`jobrunner.py`) adds and ends jobs; the other parts only ask: whether a token has a
job here (a claim of ours with none is given back), and tell the job holding a token that its
attempt no longer counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from ..executors import Attempt
from ..keys import TokenRef


@dataclass
class Job:
    """One claimed token being worked on by this worker."""

    ref: TokenRef
    claim_rev: int  # the claim's revision (its marker's mod revision): what committing it is fenced by
    lease: int | None = None  # the lease it was claimed under: it commits only while that is ours
    attempt: Attempt | None = None
    task: asyncio.Task | None = None
    woken: bool = False  # claimed through a marker that said "due now" (`JobRunner.stale_wake`)
    abandoned: bool = False  # told its attempt no longer counts: it runs no tick ahead of its commit

    def abandon(self, reason: str) -> None:
        """The running attempt, if any, no longer counts."""
        self.abandoned = True
        if self.attempt is not None:
            self.attempt.abandon(reason)


class JobTable:
    def __init__(self) -> None:
        self._jobs: dict[TokenRef, Job] = {}

    def __contains__(self, ref: object) -> bool:
        return ref in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def add(self, job: Job) -> None:
        self._jobs[job.ref] = job

    def remove(self, ref: TokenRef) -> None:
        self._jobs.pop(ref, None)

    def held(self, ref: TokenRef, revision: int, why: str) -> None:
        """The token changed under a job of ours (if one holds it): its attempt no longer counts."""
        job = self._jobs.get(ref)
        if job is not None and job.claim_rev < revision:
            job.abandon(why)

    def abandon_all(self, reason: str) -> None:
        for job in self._jobs.values():
            job.abandon(reason)
