"""Every example machine behaves the same on etcd as embedded: one engine, two stores."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from clitools import ROOT, dsm, waits_for_signals

pytestmark = [pytest.mark.etcd]

# examples that wait for signals cannot run embedded (nobody can send them one there)
EXAMPLES = sorted(p.name for p in (ROOT / "definitions").glob("*.yaml")
                  if not p.name.endswith(".test.yaml") and not waits_for_signals(p))
PAYLOADS = {"order.yaml": ['{"total": 150}', '{"address": ""}', '{"total": 0}', '{"bill_failures": 2}'],
            "document.yaml": ['{"text": "helo wrold teh end", "images": 2}'],
            "poll.yaml": ['{"ready_after": 4}', '{"ready_after": 100}']}


def shape(record: dict) -> dict:
    """What must match: where it ended, how, and which transitions it took (branches interleave)."""
    return {
        "status": record["status"], "state": record["state"], "transitions": record["transitions"],
        "error": record["error"],
        "history": Counter((h["state"], tuple(h["next"]), tuple(h["branch"]), h["outcome"], h["attempt"])
                           for h in record["history"]),
        "payload_keys": sorted(record["payload"]),
    }


# a poll that runs out of tries (100 polls) takes half a minute: with the long runs
CASES = [pytest.param(e, p, marks=pytest.mark.long) if p == '{"ready_after": 100}' else (e, p)
         for e in EXAMPLES for p in PAYLOADS.get(e, ["{}"])]


@pytest.mark.parametrize("example,payload", CASES)
def test_example_on_etcd_matches_embedded(example, payload, etcd, namespace):
    embedded = dsm("run", f"definitions/{example}", "--payload", payload, "--json")
    on_etcd = dsm("run", f"definitions/{example}", "--payload", payload, "--json", "--etcd", etcd.endpoint,
                  "--namespace", namespace)
    assert embedded.returncode == on_etcd.returncode, (embedded.stderr, on_etcd.stderr)
    a, b = json.loads(embedded.stdout), json.loads(on_etcd.stdout)
    assert shape(a) == shape(b)
    assert a["digest"] == b["digest"] and a["version"] == b["version"]
