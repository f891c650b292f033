"""The long chaos runs (each prints a JSON report and exits 1 when a check failed):

    python tests/chaos/run.py --minutes 10 --instances 1000     # fork/join machines, every fault
    python tests/chaos/run.py --constructs --minutes 10          # maps, signals, children, timers
    python tests/chaos/run.py --auth --minutes 5                 # etcd with auth: tokens lost, refused, expiring
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from auth_faults import AuthConfig, run_auth  # noqa: E402
from constructs import ConstructConfig, run_constructs  # noqa: E402
from harness import Config, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="keep submitting and injecting faults this long")
    parser.add_argument("--instances", type=int, default=1000, help="instances submitted at the start")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 4; --auth: 3)")
    parser.add_argument("--fault-every", type=float, default=5.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=1)
    constructs = parser.add_argument_group("the waiting constructs and maps (--constructs): the four phases are "
                                           "repeated for --minutes")
    constructs.add_argument("--constructs", action="store_true", help="run the chaos of maps, signals, children "
                            "and timers instead")
    constructs.add_argument("--map-items", type=int, default=500)
    constructs.add_argument("--maps", type=int, default=2, help="map instances per phase")
    constructs.add_argument("--map-kills", type=int, default=3)
    constructs.add_argument("--waiters", type=int, default=300)
    constructs.add_argument("--signals", type=int, default=5, help="per waiter")
    constructs.add_argument("--callers", type=int, default=200)
    constructs.add_argument("--rounds", type=int, default=3, help="call visits per caller")
    constructs.add_argument("--call-kills", type=int, default=3)
    constructs.add_argument("--call-pauses", type=int, default=1)
    constructs.add_argument("--sleepers", type=int, default=1000)
    auth = parser.add_argument_group("etcd with auth (--auth): every member killed, the leader killed, every token "
                                     "refused, compaction every second, repeated for --minutes; --workers is per "
                                     "namespace a, --instances the first batch")
    auth.add_argument("--auth", action="store_true", help="run the chaos of an etcd with auth instead")
    auth.add_argument("--token-ttl", type=int, default=None, help="etcd's --auth-token-ttl (default: etcd's, 300 s)")
    auth.add_argument("--bcrypt-cost", type=int, default=None, help="etcd's --bcrypt-cost (default: etcd's, 10): "
                      "what each token costs etcd to issue")
    auth.add_argument("--majority", action="store_true", help="kill all members but one, not every member")
    auth.add_argument("--top-up", type=int, default=50, help="instances submitted before each fault")
    auth.add_argument("--late", type=int, default=200, help="instances submitted after the last fault")
    args = parser.parse_args()
    if args.auth:
        config = AuthConfig(workers=args.workers or 3, seed=args.seed, minutes=args.minutes, timeout=300,
                            initial=args.instances, top_up=args.top_up, late=args.late, per_b=10,
                            token_ttl=args.token_ttl, bcrypt_cost=args.bcrypt_cost, majority=args.majority,
                            fault_every=args.fault_every)
        report = run_auth(config)
        print(json.dumps(report.as_dict(), indent=2, default=str))
        sys.exit(0 if report.ok else 1)
    args.workers = args.workers or 4
    if args.constructs:
        config = ConstructConfig(workers=args.workers, seed=args.seed, minutes=args.minutes, timeout=300,
                                 map_instances=args.maps, map_items=args.map_items, map_kills=args.map_kills,
                                 waiters=args.waiters, signals=args.signals, callers=args.callers,
                                 rounds=args.rounds, call_kills=args.call_kills, call_pauses=args.call_pauses,
                                 sleepers=args.sleepers)
        report = run_constructs(config)
        print(json.dumps(report.as_dict(), indent=2, default=str))
        sys.exit(0 if report.ok else 1)
    fanout = args.instances * 2 // 3
    config = Config(workers=args.workers, fanout=fanout, loopfork=args.instances - fanout, minutes=args.minutes,
                    fault_every=args.fault_every, seed=args.seed, timeout=600)
    legacy = run(config)
    print(json.dumps(legacy.as_dict(), indent=2, default=str))
    sys.exit(0 if legacy.ok else 1)


if __name__ == "__main__":
    main()
