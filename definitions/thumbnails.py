"""Handlers of the thumbnails machine (definitions/thumbnails.yaml)."""

from __future__ import annotations


def list_images(payload, ctx):
    payload.setdefault("bucket", "album")
    payload.setdefault("images", [f"photo-{n}.png" for n in range(1, 7)])


def resize(payload, ctx):
    # payload is {"item": "a.png", "index": 0, "bucket": "b1"}; ctx.branch is ("resize_all[0]",)
    name = payload["item"]
    return {"image": name, "thumbnail": f"{payload['bucket']}/thumbs/{name}"}


def publish(payload, ctx):
    payload["published"] = [t["thumbnail"] for t in payload["thumbnails"]]
