"""Reading a worker's /metrics as a test would: scraped over HTTP and parsed by prometheus_client."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

from helpers import until
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """(sample name, sorted labels) -> value, for every sample of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for one not (yet) exposed."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `check()` became true within `timeout` seconds (metrics count an answer after it came)."""
    try:
        return bool(until(check, "the metrics", timeout=timeout, interval=0.05))
    except AssertionError:
        return False
