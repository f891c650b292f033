"""Ticks of the machines that a namespace written by an earlier release holds."""


def step(payload, ctx):
    payload[ctx.state] = ctx.attempt


def fail(payload, ctx):
    raise RuntimeError(f"{ctx.state} always fails")
