"""Handlers of the document pipeline (definitions/document.yaml)."""

from __future__ import annotations

import asyncio

FIXES = {"helo": "hello", "wrold": "world", "teh": "the"}
FRENCH = {"hello": "bonjour", "world": "monde", "the": "le"}


def ingest(payload, ctx):
    payload.setdefault("text", "")
    payload.setdefault("images", 0)
    payload["words"] = len(payload["text"].split())


def extract_text(payload, ctx):
    payload["tokens"] = payload["text"].lower().split()


def spellcheck(payload, ctx):
    return {"fixed": [FIXES.get(word, word) for word in payload["tokens"]]}


async def translate(payload, ctx):
    """An async handler: dsm awaits it on its own event loop thread."""
    await asyncio.sleep(0.01)
    return {"french": [FRENCH.get(FIXES.get(word, word), word) for word in payload["tokens"]]}


def collect_text(payload, ctx):
    branches = payload.pop("branches")
    payload.pop("tokens")
    payload["clean_text"] = " ".join(branches["spellcheck"]["fixed"])
    payload["translation"] = " ".join(branches["translate"]["french"])


def thumbnails(payload, ctx):
    payload["thumbnails"] = [f"thumb-{i}.png" for i in range(payload["images"])]


def publish(payload, ctx):
    payload["url"] = f"https://docs.example/{ctx.instance_id}"
