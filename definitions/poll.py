"""Handlers of the polling machine (definitions/poll.yaml)."""

from __future__ import annotations


def submit(payload, ctx):
    payload["job"] = f"job-{ctx.instance_id[-6:]}"
    payload["polls"] = 0


def check(payload, ctx):
    payload["polls"] += 1
    return "ready" if payload["polls"] >= payload.get("ready_after", 3) else "pending"


def fetch(payload, ctx):
    payload["result"] = f"{payload['job']} done after {payload['polls']} polls"
