"""Handlers of the onboarding machine (definitions/onboarding.yaml)."""

from __future__ import annotations


def open_account(payload, ctx):
    payload["account"] = f"acc-{ctx.instance_id[-6:]}"


def welcome(payload, ctx):
    payload["welcomed"] = payload.get("paid", False)
