"""`dsm worker --concurrency` (or `--run-ahead`) against the reference: rounds that alternate
the given values.

    python bench/concurrency.py                        # 8 and the default, 2 workers, 3 rounds
    python bench/concurrency.py 8,16,32,64,128 --workers 1 --rounds 2
    python bench/concurrency.py 8,default --isolation thread
    python bench/concurrency.py 1,default --option run-ahead   # a commit per tick, and the default

Each round runs `bench/run.py`'s reference (raw CAS at 64 in flight) and then, for each value,
`throughput_of` (the linear machine, 5,000 instances after the workers' warm-up) in that order,
so that a busy machine slows every value of a round alike. Prints each run's rate over the
round's reference, and the CPU each transition cost every process (worker, handler processes,
etcd, the driver that submits and watches), from /proc; `--json` writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench.run import LINEAR, machine, reference, throughput_of  # noqa: E402
from dsm.testing import make_cluster  # noqa: E402


def parse_values(text: str) -> list[int | None]:
    """`8,default` -> [8, None] (None: no `--concurrency`, the worker's default)."""
    return [None if v == "default" else int(v) for v in text.split(",")]


async def sweep(values: list[int | None], workers: int, rounds: int, isolation: str,
                instances: int, option: str = "concurrency") -> list[dict[str, Any]]:
    env = make_cluster(1)
    env.start()
    runs: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            ref = await reference(env, True)
            load = os.getloadavg()[0]
            print(f"round {r + 1}: reference {ref['cas_per_s']:,.0f} CAS/s, "
                  f"{ref['cpu_us_per_cas_c64']['total']:,.0f} µs of CPU per CAS, load {load:.1f}", flush=True)
            for value in values:
                out = await throughput_of(env, LINEAR, workers, instances, f"cc-{r}-{value}", isolation,
                                          **{option.replace("-", "_"): value})
                cpu = out["cpu_us_per_transition"]
                ratio = out["transitions_per_s"] / ref["cas_per_s"]
                print(f"  --{option} {value or 'default'}: {out['transitions_per_s']:,.0f}/s = {ratio:.2f}x; "
                      f"CPU µs per transition {cpu['total']:,.0f} (worker {cpu['workers']:.0f}, handler processes "
                      f"{cpu['handler_processes']:.0f}, etcd {cpu['etcd']:.0f}, driver {cpu['driver']:.0f})",
                      flush=True)
                runs.append({"round": r + 1, option.replace("-", "_"): value, "ratio": ratio, "load": load,
                             "reference": ref, **out})
    finally:
        env.stop()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("values", nargs="?", default="8,default", help="comma-separated; 'default': no flag")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isolation", choices=("process", "thread"), default="process")
    parser.add_argument("-n", type=int, default=5000, help="instances per run")
    parser.add_argument("--option", choices=("concurrency", "run-ahead"), default="concurrency",
                        help="the `dsm worker` option the values are for")
    parser.add_argument("--json", type=Path, help="where to write every run's figures")
    args = parser.parse_args()
    runs = asyncio.run(sweep(parse_values(args.values), args.workers, args.rounds, args.isolation, args.n,
                             args.option))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
