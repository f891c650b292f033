"""Map throughput: one map of 10,000 items on a stock etcd, against the linear machine's rate.

    python bench/map.py                        # 10,000 items, max_concurrency unset and 64, 3 runs each
    python bench/map.py --items 2000 --runs 1  # a smoke run
    python bench/map.py --workers 2            # two worker processes share the map

etcd is started by `dsm.testing.make_cluster` with its stock limits (128 operations per
transaction, 1.5 MiB requests). Each run starts `dsm worker` processes (concurrency 64, handlers
in child processes: the defaults of bench/run.py's throughput), warms them up with a map of 256
items, then submits one instance of `bench/map.yaml` (no max_concurrency) or `bench/map64.yaml`
(max_concurrency: 64) whose item is one trivial tick: one transition per item. Reported:

- items/s over the 10%-90% window of the items' transitions (history keys counted every 100ms),
  and the whole map from submission to its join;
- the ratio to the linear machine's transitions/s (bench/run.py's `throughput`, same workers,
  measured in the same run, runs interleaved);
- items running at once, counted from the handler's invocations (each logs when it began and
  ended, on the machine's monotonic clock), and items in flight as the record says (started and
  not arrived, sampled every 250ms): with max_concurrency neither may exceed it;
- that the map succeeded, its results complete and in item order.

Medians of `--runs` runs; every run is kept in the JSON (bench/results/map.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from bench.run import (  # noqa: E402
    CONCURRENCY,
    LINEAR,
    clear,
    committed,
    connect,
    machine,
    start_workers,
    stop_workers,
    throughput_of,
    window_rate,
)
from dsm import compiler  # noqa: E402
from dsm.errors import StoreError  # noqa: E402
from dsm.keys import Keys  # noqa: E402
from dsm.operations import Operations  # noqa: E402
from dsm.records import SUCCEEDED, load_instance  # noqa: E402
from dsm.testing import EtcdCluster, make_cluster  # noqa: E402

MAPS = {None: BENCH / "map.yaml", 64: BENCH / "map64.yaml"}
WARM_ITEMS = 256


def peak_running(log: Path) -> int:
    """The most invocations that overlapped in time, from (began, ended) lines."""
    events: list[tuple[float, int]] = []
    for line in log.read_text().splitlines():
        began, ended = map(float, line.split())
        events += [(began, 1), (ended, -1)]
    events.sort()  # at equal times an end (-1) sorts before a start
    peak = running = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


async def map_once(env: EtcdCluster, limit: int | None, items: int, workers: int, namespace: str) -> dict[str, Any]:
    definition = MAPS[limit]
    graph = compiler.load(definition)
    log = Path(tempfile.mkdtemp(prefix="dsm-map-")) / "ticks.log"
    procs = start_workers(env, workers, definition, namespace, extra_env={"BENCH_MAP_LOG": str(log)})
    store = await connect(env, namespace)
    keys = Keys(namespace)
    client = Operations(store, keys)
    try:
        warm = await client.submit(graph, {"xs": list(range(WARM_ITEMS))})
        await client.wait(warm, timeout=300)
        log.unlink(missing_ok=True)
        base = await committed(store, keys)
        total = base + items + 1  # the map state's own transition, then one per item
        started = time.monotonic()
        iid = await client.submit(graph, {"xs": list(range(items))})
        samples: list[tuple[float, int]] = []
        in_flight = 0
        last_record = 0.0
        while True:
            now = time.monotonic()
            count = await committed(store, keys)
            samples.append((now, count))
            if now - last_record >= 0.25:
                last_record = now
                kv = await store.get(keys.instance(iid))
                inst = load_instance(kv.value) if kv is not None else None
                if inst is not None:
                    for act in inst.activations.values():
                        in_flight = max(in_flight, act.started - len(act.arrived))
                    if inst.finished:
                        break
            if count >= total:
                break
            if now - started > 1800:
                raise TimeoutError(f"only {count - base} of {items + 1} transitions after 1800s")
            await asyncio.sleep(0.1)
        inst = await client.wait(iid, timeout=600)
        wall = time.monotonic() - started
        kv = await store.get(keys.instance(iid))
        record_bytes = len(kv.value) if kv is not None else 0
        results = inst.payload.get("results") if inst.status == SUCCEEDED else None
        in_order = results is not None and [r.get("index") for r in results] == list(range(items)) and all(
            r.get("item") == r.get("index") for r in results)
        ok = inst.status == SUCCEEDED and in_order
        rate = window_rate(samples, base + items // 10, base + items * 9 // 10) if ok else 0.0
        return {"items": items, "max_concurrency": limit, "workers": workers, "status": inst.status,
                "error": inst.error.as_dict() if inst.error else None, "results_complete_in_order": in_order,
                "items_per_s": rate, "wall_s": wall, "items_per_s_whole": items / wall if ok else 0.0,
                "peak_running_ticks": peak_running(log) if log.exists() else 0,
                "peak_in_flight_record": in_flight, "record_bytes_at_end": record_bytes,
                "transitions": inst.transitions}
    finally:
        stop_workers(procs)
        await store.close()
        await clear(env, namespace)


def median_of(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r[key])
    chosen = dict(ordered[len(ordered) // 2])
    chosen[f"runs_{key}"] = [round(r[key]) for r in runs]
    return chosen


async def bench(items: int, runs: int, workers: int, linear_instances: int) -> dict[str, Any]:
    env = make_cluster(1)  # stock etcd: --max-txn-ops 128, --max-request-bytes 1.5 MiB
    env.start()
    linear: list[dict[str, Any]] = []
    maps: dict[Any, list[dict[str, Any]]] = {limit: [] for limit in MAPS}
    try:
        for i in range(runs):  # interleaved, so that drift in the machine weighs on all alike
            print(f"run {i + 1}/{runs}: linear ...", file=sys.stderr, flush=True)
            linear.append(await throughput_of(env, LINEAR, workers, linear_instances, f"lin-{i}"))
            for limit in MAPS:
                print(f"run {i + 1}/{runs}: map of {items:,}, max_concurrency {limit} ...", file=sys.stderr,
                      flush=True)
                try:
                    maps[limit].append(await map_once(env, limit, items, workers, f"map-{limit}-{i}"))
                except (TimeoutError, StoreError) as exc:
                    maps[limit].append({"items": items, "max_concurrency": limit, "workers": workers,
                                        "status": "error", "error": str(exc), "items_per_s": 0.0})
    finally:
        env.stop()
    out: dict[str, Any] = {"machine": machine(), "items": items, "workers": workers, "concurrency": CONCURRENCY,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "linear": median_of(linear, "transitions_per_s")}
    for limit, results in maps.items():
        chosen = median_of(results, "items_per_s")
        chosen["over_linear"] = chosen["items_per_s"] / out["linear"]["transitions_per_s"]
        chosen["all_runs"] = results
        out[f"map_{limit or 'unset'}"] = chosen
    return out


def table(out: dict[str, Any]) -> str:
    lin = out["linear"]["transitions_per_s"]
    rows = [(f"linear machine, transitions/s ({out['workers']} worker(s) x {out['concurrency']})", f"{lin:,.0f}",
             "1.00x")]
    for limit in MAPS:
        r = out[f"map_{limit or 'unset'}"]
        name = f"map of {out['items']:,}, max_concurrency {limit or 'unset'}"
        if r.get("status") != SUCCEEDED or not r.get("results_complete_in_order"):
            rows.append((name, "FAILED", f"{r.get('status')}: {r.get('error')}"))
            continue
        rows.append((f"{name}, items/s", f"{r['items_per_s']:,.0f}", f"{r['over_linear']:.2f}x linear"))
        rows.append((f"{name}, whole map", f"{r['wall_s']:.1f}s",
                     f"{r['items_per_s_whole']:,.0f} items/s, record {r['record_bytes_at_end'] / 1e6:.2f} MB"))
        bound = f" (limit {limit})" if limit else ""
        rows.append((f"{name}, most items at once{bound}", f"{r['peak_running_ticks']}",
                     f"ticks running; in flight per the record {r['peak_in_flight_record']}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'benchmark':<{width}}  {'value':>10}  note", "-" * (width + 40)]
    lines += [f"{a:<{width}}  {b:>10}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="dsm worker processes")
    parser.add_argument("--linear-instances", type=int, default=5000, help="instances of the linear reference")
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "map.json")
    args = parser.parse_args()
    out = asyncio.run(bench(args.items, args.runs, args.workers, args.linear_instances))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(table(out))
    failed = [k for k in out if k.startswith("map_") and out[k].get("status") != SUCCEEDED]
    limited = out["map_64"]
    over = limited.get("peak_running_ticks", 0) > 64 or limited.get("peak_in_flight_record", 0) > 64
    if failed or over:
        print(f"FAILED: {failed or ''} {'more than 64 in flight' if over else ''}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
