"""What a worker did, in plain counts (`Worker.stats`); by machine, for the metrics, see `meter.py`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class WorkerStats:
    claimed: int = 0
    committed: int = 0
    transitions: int = 0
    conflicts: int = 0
    lost: int = 0
    ticks: int = 0
    failures: int = 0
    given_back: int = 0  # claims of ours (markers naming us) found with no job and given back
    started_at: float = field(default_factory=time.monotonic)
