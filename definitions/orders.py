"""Handlers of the order machine (definitions/order.yaml)."""

from __future__ import annotations

import time


def receive(payload, ctx):
    """Fill in a sample order for whatever the payload leaves out (an empty payload is an order)."""
    payload.setdefault("order_id", ctx.instance_id[:8])
    payload.setdefault("items", ["widget"])
    payload.setdefault("total", 25)
    payload.setdefault("address", "1 Example Street")
    payload["received"] = True


def check(payload, ctx):
    """Approve orders with a positive total and at most 100 items."""
    if payload["total"] <= 0 or len(payload["items"]) > 100:
        return "rejected"
    return "approved"


def pick(payload, ctx):
    time.sleep(payload.get("pick_seconds", 0.05))
    payload["picked"] = list(payload["items"])


class GatewayTimeout(Exception):
    """The payment gateway did not answer."""


def bill(payload, ctx):
    """A flaky gateway: fails the first `bill_failures` attempts (default 0), then charges once.

    The charge id is derived from ctx.idempotency_key, the way a real gateway call would pass it
    so that a retried or re-run tick never charges twice.
    """
    time.sleep(payload.get("bill_seconds", 0.05))
    if ctx.attempt <= payload.get("bill_failures", 0):
        raise GatewayTimeout(f"gateway timed out on attempt {ctx.attempt}")
    payload["charge_id"] = "ch_" + ctx.idempotency_key.replace("/", "_")
    payload["billed_attempts"] = ctx.attempt


def ship(payload, ctx):
    if not payload.get("address"):
        raise ValueError("no shipping address")
    payload["tracking"] = f"TRK-{payload['order_id']}"


def insure(payload, ctx):
    payload["insured"] = round(payload["total"] * 0.01, 2)


def refund(payload, ctx):
    payload["refunded"] = payload.get("charge_id")
    ctx.logger.info("refunded %s: %s", payload["order_id"], payload["error"]["message"])
