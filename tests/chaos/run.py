"""The long chaos run: python tests/chaos/run.py --minutes 10 --instances 1000 (prints a JSON report)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Config, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="keep submitting and injecting faults this long")
    parser.add_argument("--instances", type=int, default=1000, help="instances submitted at the start")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--fault-every", type=float, default=5.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    fanout = args.instances * 2 // 3
    config = Config(workers=args.workers, fanout=fanout, loopfork=args.instances - fanout, minutes=args.minutes,
                    fault_every=args.fault_every, seed=args.seed, timeout=600)
    report = run(config)
    print(json.dumps(report.as_dict(), indent=2, default=str))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
