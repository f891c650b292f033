"""Write a namespace with the release installed, and save it as JSON: what an upgrade starts from.

    python tests/upgrade/make_namespace.py OUT.json

Starts its own etcd on loopback, runs the machines of this folder with `dsm submit`, `dsm worker`,
`dsm signal` and `dsm cancel` as a user would, stops the worker (its claims go with it) and saves
every key of the namespace. The instances it leaves (ids fixed, see INSTANCES) are the cases an
upgrade must keep: finished ones (succeeded, failed, cancelled, one already past its retention),
running ones waiting for a signal, a timer or a child, and one never started. `layout1.json` was
made so by release 0.1.0, the last to write the first key layout (test_upgrade.py loads it), and
`layout2.json` by release 0.2.0, the last to write key layout 2.
Every machine here keeps its finished instances for a century but `brief` (a minute): what
test_upgrade.py finds expired does not depend on when it runs, once the namespace is a minute old.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from clitools import dsm, spawn, stop  # noqa: E402

from dsm.testing.cluster import make_cluster  # noqa: E402
from dsm.version import __version__  # noqa: E402

NAMESPACE = "up"
INSTANCES = {  # id -> (machine file, what it is left doing)
    "L-done": ("legacy.yaml", "succeeded, through a fork and a timer"),
    "L-gate": ("legacy.yaml", "running, waiting for the signal go"),
    "L-cancel": ("legacy.yaml", "cancelled at the gate"),
    "L-pending": ("legacy.yaml", "running, submitted while no worker ran"),
    "S-timer": ("sleeper.yaml", "running, waiting on a 20s timer"),
    "B-failed": ("broken.yaml", "failed"),
    "Q-brief": ("brief.yaml", "succeeded, retention 1m: expired by the time it is loaded, not yet deleted"),
    "P-parent": ("parent.yaml", "running, waiting for its child (which waits for the signal finish)"),
}


def status(url: str, iid: str) -> dict:
    out = dsm("status", iid, "--json", "--etcd", url, "--namespace", NAMESPACE)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def wait(what: str, check, timeout: float = 60, what_of=lambda: '') -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {timeout}s: {what}: {what_of()}")
        time.sleep(0.2)


def main(out: Path) -> None:
    cluster = make_cluster(1).start()
    url = cluster.endpoint
    common = ("--etcd", url, "--namespace", NAMESPACE)
    try:
        for iid, (path, _) in INSTANCES.items():
            if iid != "L-pending":
                done = dsm("submit", str(HERE / path), "--id", iid, *common)
                assert done.returncode == 0, done.stderr
        assert dsm("signal", "L-done", "go", *common).returncode == 0
        worker = spawn("worker", *(str(p) for p in sorted(HERE.glob("*.yaml"))), *common, "--isolation", "thread")
        try:
            wait("L-done succeeded", lambda: status(url, "L-done").get("status") == "succeeded",
                 what_of=lambda: status(url, "L-done"))
            wait("B-failed failed", lambda: status(url, "B-failed").get("status") == "failed")
            wait("Q-brief succeeded", lambda: status(url, "Q-brief").get("status") == "succeeded")
            for iid in ("L-gate", "L-cancel"):
                wait(f"{iid} at the gate", lambda iid=iid: status(url, iid).get("active") == ["gate"])
            wait("S-timer asleep", lambda: status(url, "S-timer").get("active") == ["snooze"])
            wait("P-parent's child", lambda: any(w.get("kind") == "child" for w in status(url, "P-parent")
                                                 .get("waiting", [])))
            assert dsm("cancel", "L-cancel", "--reason", "made so", *common).returncode == 0
        finally:
            print(stop(worker), file=sys.stderr)
        done = dsm("submit", str(HERE / "legacy.yaml"), "--id", "L-pending", *common)
        assert done.returncode == 0, done.stderr
        dump = subprocess.run(
            [sys.executable, "-c", _DUMP, url, f"/{NAMESPACE}/"], capture_output=True, text=True, check=True)
        saved = {"release": __version__, "namespace": NAMESPACE, "made_at": time.time(),
                 "instances": {iid: what for iid, (_, what) in INSTANCES.items()},
                 "keys": json.loads(dump.stdout)}
        out.write_text(json.dumps(saved, indent=1) + "\n")
        print(f"{out}: {len(saved['keys'])} keys of release {__version__}", file=sys.stderr)
    finally:
        cluster.stop()


# Every key of the namespace with its value (base64) and whether a lease holds it (none should).
_DUMP = """
import asyncio, base64, json, sys
from dsm.store.etcd import EtcdOptions, EtcdStore
from dsm.store import prefix_end

async def main(url, prefix):
    store = await EtcdStore.connect(EtcdOptions.build(url))
    try:
        found = await store.range(prefix, prefix_end(prefix))
        print(json.dumps([[kv.key, base64.b64encode(kv.value).decode(), kv.lease] for kv in found.kvs]))
    finally:
        await store.close()

asyncio.run(main(*sys.argv[1:]))
"""

if __name__ == "__main__":
    main(Path(sys.argv[1]))
