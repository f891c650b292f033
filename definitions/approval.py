"""Handlers of the approval machine (definitions/approval.yaml)."""

from __future__ import annotations


def request(payload, ctx):
    payload["approver"] = payload.get("approver", "team-lead")
    ctx.logger.info("approval of %s requested from %s", payload.get("amount"), payload["approver"])


def escalate(payload, ctx):
    payload.pop("error", None)
    payload["approver"] = "finance-director"
    payload["escalated"] = True


def pay(payload, ctx):
    payload["paid"] = True
