"""The etcd connection options, the same for every command that talks to etcd: one `EtcdArgs`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dsm.errors import InputError, NotFound, StoreUnavailable

from .exits import ExitCode, Fail
from .loop import run_async
from .options import keyword

if TYPE_CHECKING:
    from dsm.client import AsyncClient
    from dsm.store import Store
    from dsm.store.etcd import EtcdOptions

log = logging.getLogger("dsm.cli")


@dataclass(frozen=True, slots=True)
class EtcdArgs:
    """The etcd connection options as given on the command line, the same for every command that
    talks to etcd (see `app.command`): endpoints, namespace, TLS files and user (the password comes
    from DSM_ETCD_PASSWORD, never from the command line)."""

    endpoints: str | None = None
    namespace: str = "dsm"
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None

    @property
    def given(self) -> bool:
        return bool(self.endpoints)

    def options(self) -> EtcdOptions:
        """The checked store options; a usage error (exit 2) without an endpoint or with bad values."""
        from dsm.store.etcd import EtcdOptions

        if not self.endpoints:
            raise Fail(ExitCode.INVALID, "this command needs an etcd endpoint: give --etcd URLS or set DSM_ETCD")
        try:
            return EtcdOptions.build(self.endpoints, namespace=self.namespace, cacert=self.cacert, cert=self.cert,
                                     key=self.key, user=self.user, password=os.environ.get("DSM_ETCD_PASSWORD"))
        except InputError as exc:
            raise Fail(ExitCode.INVALID, str(exc)) from None

    @asynccontextmanager
    async def open(self, *, wait: asyncio.Event | None = None) -> AsyncIterator[Store]:
        """`async with etcd.open() as store`: exit code 3 with one line when etcd is unreachable.
        With `wait` (a stop event), an unreachable etcd is waited for instead, saying so, until it
        answers or `wait` is set (a worker started before etcd, as compose and Kubernetes may)."""
        from dsm.store.etcd import EtcdStore

        options = self.options()
        delay, said = 0.5, None
        while True:
            try:
                store = await EtcdStore.connect(options)
                break
            except StoreUnavailable as exc:
                if wait is not None and wait.is_set():
                    raise Fail(ExitCode.OK) from None  # stopped while waiting: nothing to say
                if wait is None:
                    raise Fail(ExitCode.UNREACHABLE, f"etcd unreachable at {options.display}: {exc}") from None
                if str(exc) != said:  # once per reason, not once per try
                    said = str(exc)
                    log.warning("waiting for etcd at %s (%s); retrying", options.display, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wait.wait(), delay)
                delay = min(delay * 2, 5.0)
        if said is not None:
            log.warning("etcd at %s answers", options.display)
        try:
            yield store
        finally:
            await store.close()

    def call(self, call: Callable[[AsyncClient], Any]) -> Any:
        """Connect, run `call(client)` (dsm's client over etcd), disconnect; an unknown instance id
        is invalid input (exit 2)."""
        from dsm.client import AsyncClient

        async def go() -> Any:
            async with self.open() as store:
                return await call(AsyncClient.over(store, self.options().keys))

        try:
            return run_async(go)
        except NotFound as exc:
            raise Fail(ExitCode.INVALID, str(exc)) from None


_ETCD = "etcd connection"  # their own panel in --help
ETCD_PARAMETERS = [  # etcd_FIELD for each field of EtcdArgs
    keyword("etcd_endpoints", Annotated[str | None, typer.Option(
        "--etcd", envvar="DSM_ETCD", metavar="URLS", rich_help_panel=_ETCD,
        help="etcd endpoints, comma separated (DSM_ETCD).")], None),
    keyword("etcd_namespace", Annotated[str, typer.Option(
        "--namespace", envvar="DSM_NAMESPACE", metavar="NAME", rich_help_panel=_ETCD,
        help="Key prefix /<namespace>/.")], "dsm"),
    keyword("etcd_cacert", Annotated[Path | None, typer.Option(
        "--cacert", metavar="FILE", rich_help_panel=_ETCD, help="CA bundle to verify etcd's TLS certificate.")], None),
    keyword("etcd_cert", Annotated[Path | None, typer.Option(
        "--cert", metavar="FILE", rich_help_panel=_ETCD, help="Client certificate for etcd TLS.")], None),
    keyword("etcd_key", Annotated[Path | None, typer.Option(
        "--key", metavar="FILE", rich_help_panel=_ETCD, help="Client key for etcd TLS.")], None),
    keyword("etcd_user", Annotated[str | None, typer.Option(
        "--user", envvar="DSM_ETCD_USER", metavar="NAME", rich_help_panel=_ETCD,
        help="etcd user; password from DSM_ETCD_PASSWORD.")], None),
]


def etcd_args(values: dict[str, Any]) -> EtcdArgs:
    """The `EtcdArgs` of a command's values, taking the etcd options out of them."""
    return EtcdArgs(**{p.name.removeprefix("etcd_"): values.pop(p.name) for p in ETCD_PARAMETERS})
