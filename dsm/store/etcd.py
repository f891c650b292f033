"""EtcdStore: the Store protocol on a real etcd v3 cluster, a thin adapter over aetcd's gRPC layer.

aetcd's high-level Client has gaps that matter here: no TLS channel, range requests that ignore
`limit`, a watcher that dies for good when the server restarts, and no nested transactions in its
response decoding. So the adapter speaks to etcd through aetcd's generated stubs and messages
directly, and keeps to the Store contract:

- every unary call has a deadline; UNAVAILABLE / DEADLINE_EXCEEDED become StoreUnavailable (a txn
  that times out may or may not have applied: callers re-read, never blindly retry);
- a watch is one gRPC stream; when it breaks (server restart, leader change) the iterator raises
  StoreUnavailable and the caller re-creates it from its last revision + 1, or resyncs when that
  revision was compacted (Compacted);
- leases are granted, refreshed and revoked on request; the worker keeps them alive;
- an auth token etcd refuses (it forgets them on restart, when auth is turned off and on, and after
  `--auth-token-ttl`) is renewed once and the call retried, streams included: a watch create
  refused as "permission denied" and a keep-alive are retried with a fresh token, and a watch
  cancelled so mid-stream ends as StoreUnavailable, for the caller to re-create it. Only a refusal
  that survives a fresh token is AccessDenied. Calls that meet one refused token together renew it
  once (authenticating costs etcd a password hash).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from aetcd import rpc

from ..errors import AccessDenied, Compacted, InputError, LeaseLost, NoSpace, StoreError, StoreUnavailable
from ..keys import Keys
from . import (
    DELETE,
    PUT,
    PUT_RESULT,
    Compare,
    Delete,
    DeleteResult,
    Event,
    Get,
    GetResult,
    KeyValue,
    Op,
    Put,
    RangeResult,
    Response,
    Txn,
    TxnRejected,
    TxnResult,
    WatchBatch,
)

log = logging.getLogger(__name__)

_TARGETS = {"version": rpc.Compare.VERSION, "create": rpc.Compare.CREATE, "mod": rpc.Compare.MOD,
            "value": rpc.Compare.VALUE, "lease": rpc.Compare.LEASE}
_RESULTS = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL, "<": rpc.Compare.LESS, ">": rpc.Compare.GREATER}

AUTH_TIMEOUT = 15.0  # seconds an Authenticate may take (see `_authenticate`)

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.enable_retries", 0),
]


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class EtcdOptions:
    """How to reach etcd: endpoints, namespace, TLS files and credentials (never printed)."""

    endpoints: tuple[Endpoint, ...]
    namespace: str = "dsm"
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 2.0  # per request (a request caught in a leader change waits this long); DSM_ETCD_TIMEOUT
    connect_timeout: float = 5.0

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    @property
    def tls(self) -> bool:
        return any(e.scheme == "https" for e in self.endpoints) or self.cacert is not None or self.cert is not None

    @property
    def display(self) -> str:
        return ",".join(str(e) for e in self.endpoints)

    def __repr__(self) -> str:
        return (f"EtcdOptions(endpoints={self.display!r}, namespace={self.namespace!r}, tls={self.tls}, "
                f"user={self.user!r})")

    @classmethod
    def build(cls, urls: str | Sequence[str], *, namespace: str = "dsm", cacert: Path | None = None,
              cert: Path | None = None, key: Path | None = None, user: str | None = None,
              password: str | None = None, timeout: float = 2.0) -> EtcdOptions:
        """Checked options from endpoints given as one comma-separated string (as `--etcd` and
        DSM_ETCD give them) or as a list of URLs (each may itself be comma-separated)."""
        if isinstance(urls, str):
            urls = [urls]
        elif not isinstance(urls, Sequence) or not all(isinstance(u, str) for u in urls):
            raise InputError(f"--etcd: endpoints are a string or a list of strings, not {urls!r}")
        endpoints = []
        for raw in (u.strip() for joined in urls for u in joined.split(",")):
            if not raw:
                continue
            parts = urlsplit(raw if "://" in raw else f"http://{raw}")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InputError(f"--etcd: {raw!r} is not an endpoint like http://127.0.0.1:2379")
            try:
                port = parts.port or 2379
            except ValueError:
                raise InputError(f"--etcd: {raw!r} has an invalid port") from None
            endpoints.append(Endpoint(parts.scheme, parts.hostname, port))
        if not endpoints:
            raise InputError("--etcd: no endpoint given")
        if len({e.scheme for e in endpoints}) > 1:
            raise InputError("--etcd: mix of http and https endpoints")
        if not namespace or "/" in namespace or not namespace.isprintable():
            raise InputError(f"--namespace: {namespace!r} must be a non-empty name without '/'")
        if (cert is None) != (key is None):
            raise InputError("--cert and --key go together")
        for name, value in (("--cacert", cacert), ("--cert", cert), ("--key", key)):
            if value is not None and not Path(value).is_file():
                raise InputError(f"{name}: no such file: {value}")
        if user and password is None:
            raise InputError("--user needs the password in DSM_ETCD_PASSWORD")
        raw_timeout = os.environ.get("DSM_ETCD_TIMEOUT")
        if raw_timeout:
            try:
                timeout = float(raw_timeout)
            except ValueError:
                raise InputError(f"DSM_ETCD_TIMEOUT: {raw_timeout!r} is not a number of seconds") from None
        return cls(tuple(endpoints), namespace, Path(cacert) if cacert else None, Path(cert) if cert else None,
                   Path(key) if key else None, user or None, password, timeout)


def _target(endpoints: Sequence[Endpoint]) -> tuple[str, str | None]:
    """A gRPC target over every endpoint (pick_first fails over in order); TLS name override."""
    if len(endpoints) == 1:
        e = endpoints[0]
        return f"{e.host}:{e.port}", None
    addresses = []
    family = "ipv4"
    for e in endpoints:
        try:
            ip = ipaddress.ip_address(e.host)
            addresses.append(f"[{ip}]:{e.port}" if ip.version == 6 else f"{ip}:{e.port}")
            family = "ipv6" if ip.version == 6 else family
        except ValueError:
            infos = socket.getaddrinfo(e.host, e.port, socket.AF_INET, socket.SOCK_STREAM)
            addresses.extend(f"{info[4][0]}:{e.port}" for info in infos[:1])
    override = next((e.host for e in endpoints if not _is_ip(e.host)), None)
    return f"{family}:{','.join(addresses)}", override


async def _ready(channel: grpc.aio.Channel, endpoints: int, tls: bool) -> None:
    """Wait until the channel connects; give up soon after every endpoint has refused."""
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state == grpc.ChannelConnectivity.SHUTDOWN:
            raise StoreUnavailable("channel shut down")
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), 0.5 * max(2, endpoints))
            except asyncio.TimeoutError:
                raise StoreUnavailable(await _why_not_connected(channel, tls)) from None
        else:
            await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)


async def _why_not_connected(channel: grpc.aio.Channel, tls: bool) -> str:
    """The reason a channel does not connect, in words. gRPC tells it only to a call, which fails
    at once with the last connection error while the channel is down."""
    try:
        await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=1.0)
    except grpc.aio.AioRpcError as exc:
        details = (exc.details() or "").lower()
        if "certificate" in details:
            return ("TLS handshake failed: a certificate was not accepted (give etcd's CA with --cacert, "
                    "and --cert/--key when it asks for a client certificate)")
        if tls and "handshake" in details:
            return "TLS handshake failed: the server may not speak TLS (is it a plain http:// endpoint?)"
        if not tls and "socket closed" in details:
            return "the server closed the connection: it may expect TLS (an https:// endpoint with --cacert)"
    return "connection refused"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _encode(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _kv(kv: Any) -> KeyValue:
    return KeyValue(_decode(kv.key), kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


# Requests are filled in place: upb copies a nested message each time one is passed to a
# constructor, which made building a batch of commits four times slower than this.

def _fill_compare(msg: Any, c: Compare) -> None:
    msg.key = _encode(c.key)
    msg.target = _TARGETS[c.target]
    msg.result = _RESULTS[c.op]
    target = c.target
    if target == "mod":
        msg.mod_revision = c.value
    elif target == "create":
        msg.create_revision = c.value
    elif target == "version":
        msg.version = c.value
    elif target == "lease":
        msg.lease = c.value
    else:
        msg.value = c.value if isinstance(c.value, bytes) else str(c.value).encode()
    if c.end is not None:
        msg.range_end = _encode(c.end)


def _fill_ops(repeated: Any, ops: Sequence[Op]) -> None:
    for op in ops:
        msg = repeated.add()
        if isinstance(op, Put):
            put = msg.request_put
            put.key = _encode(op.key)
            put.value = op.value
            if op.lease:
                put.lease = op.lease
        elif isinstance(op, Delete):
            delete = msg.request_delete_range
            delete.key = _encode(op.key)
            if op.end is not None:
                delete.range_end = _encode(op.end)
        elif isinstance(op, Get):
            get = msg.request_range
            get.key = _encode(op.key)
            if op.end is not None:
                get.range_end = _encode(op.end)
            if op.limit:
                get.limit = op.limit
            if op.keys_only:
                get.keys_only = True
        elif isinstance(op, Txn):
            _fill_txn(msg.request_txn, op.compare, op.success, op.failure)
        else:
            raise TypeError(f"unknown operation {op!r}")


def _fill_txn(msg: Any, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> Any:
    for c in compare:
        _fill_compare(msg.compare.add(), c)
    _fill_ops(msg.success, success)
    _fill_ops(msg.failure, failure)
    return msg


def _txn(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> Any:
    return _fill_txn(rpc.TxnRequest(), compare, success, failure)


def _txn_result(resp: Any, revision: int) -> TxnResult:
    out: list[Response] = []
    for r in resp.responses:
        kind = r.WhichOneof("response")
        if kind == "response_put":
            out.append(PUT_RESULT)
        elif kind == "response_delete_range":
            out.append(DeleteResult(r.response_delete_range.deleted))
        elif kind == "response_range":
            out.append(GetResult([_kv(kv) for kv in r.response_range.kvs]))
        elif kind == "response_txn":
            out.append(_txn_result(r.response_txn, revision))
    return TxnResult(succeeded=resp.succeeded, revision=revision, responses=out)


def _translate(exc: grpc.aio.AioRpcError, what: str) -> Exception:
    code, details = exc.code(), exc.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return StoreUnavailable(f"{what}: {details or code.name.lower()}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return StoreUnavailable(f"{what}: the endpoint does not speak etcd v3 gRPC ({details})")
    if "lease not found" in details:
        return LeaseLost(details)
    if "database space exceeded" in details:  # etcd's NOSPACE alarm: writes refused, nothing applied
        return NoSpace(f"{what}: {details}")
    if "compacted" in details:
        return Compacted(0)
    if code == grpc.StatusCode.INVALID_ARGUMENT and any(s in details for s in (
            "duplicate key", "too many operations", "too large", "value is too large")):
        return TxnRejected(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or "too large" in details:
        return TxnRejected(details)
    if code == grpc.StatusCode.PERMISSION_DENIED or "authentication failed" in details:
        return AccessDenied(f"{what}: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AccessDenied(f"{what}: {details}")
    if "leader" in details or "timed out" in details or "stopped" in details:
        return StoreUnavailable(f"{what}: {details}")
    return StoreError(f"{what}: {code.name}: {details}")


class _TokenRefused(Exception):
    """etcd refused a stream of ours: a fresh token may be all it takes."""


class _EtcdWatch:
    def __init__(self, store: EtcdStore, call: Any, requests: asyncio.Queue):
        self._store = store
        self._call = call
        self._requests = requests
        self._closed = False

    def __aiter__(self) -> AsyncIterator[WatchBatch]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[WatchBatch]:
        try:
            while True:
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    break
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    reason = resp.cancel_reason or "watch canceled by the server"
                    if "compacted" in reason:
                        raise Compacted(resp.compact_revision)
                    if "permission denied" in reason and not self._store.options.user:
                        raise AccessDenied(f"watch: {reason}")
                    # with a user, the token may be what was refused: the caller watches again,
                    # and the create authenticates again before it calls a refusal final
                    raise StoreUnavailable(f"watch: {reason}")
                if resp.events:
                    events = [Event(PUT if e.type == 0 else DELETE, _kv(e.kv)) for e in resp.events]
                    yield WatchBatch(resp.header.revision, events)
        except grpc.aio.AioRpcError as exc:
            if self._closed:
                return
            if self._store._refused_token(exc):
                raise StoreUnavailable(f"watch: {exc.details()}") from None  # watched again, with a fresh token
            raise self._store._failed(_translate(exc, "watch")) from None
        except asyncio.CancelledError:
            self._call.cancel()
            raise
        if not self._closed:
            raise StoreUnavailable("watch stream ended")

    async def cancel(self) -> None:
        if not self._closed:
            self._closed = True
            self._requests.put_nowait(None)
            self._call.cancel()


class EtcdStore:
    """The Store protocol against etcd v3 (see the module docstring)."""

    def __init__(self, options: EtcdOptions, channel: grpc.aio.Channel):
        self.options = options
        self._channel = channel
        self._kv = rpc.KVStub(channel)
        self._lease = rpc.LeaseStub(channel)
        self._watch = rpc.WatchStub(channel)
        self._maintenance = rpc.MaintenanceStub(channel)
        self._auth = rpc.AuthStub(channel)
        self._metadata: tuple | None = None
        self._auth_lock = asyncio.Lock()
        self.authentications = 0  # tokens asked for (each costs etcd a password hash)
        self.errors: collections.Counter[str] = collections.Counter()  # errors etcd answered, by type (metrics)

    @classmethod
    async def connect(cls, options: EtcdOptions) -> EtcdStore:
        """Open a channel and prove it works; StoreUnavailable with a reason when it does not."""
        target, override = _target(options.endpoints)
        channel_options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
        if options.tls:
            try:
                root = options.cacert.read_bytes() if options.cacert else None
                chain = options.cert.read_bytes() if options.cert else None
                key = options.key.read_bytes() if options.key else None
            except OSError as exc:
                raise StoreUnavailable(f"cannot read TLS files: {exc}") from None
            credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                                       certificate_chain=chain)
            if override:
                channel_options.append(("grpc.ssl_target_name_override", override))
            channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        else:
            channel = grpc.aio.insecure_channel(target, options=channel_options)
        store = cls(options, channel)
        try:
            await asyncio.wait_for(_ready(channel, len(options.endpoints), options.tls), options.connect_timeout)
            if options.user:
                await store._authenticate()
            await store.revision()
        except asyncio.TimeoutError:
            await channel.close()
            raise StoreUnavailable(f"no answer from {options.display} within {options.connect_timeout:g}s") from None
        except StoreError:
            await channel.close()
            raise
        return store

    async def _authenticate(self) -> None:
        try:
            # A token costs etcd a password hash, and after an outage every client asks at once: a
            # caller that gave up after the usual deadline would leave etcd hashing for nobody and ask
            # again, a storm that can starve everyone of a token. One request at a time per store
            # (`_renew`), given long enough to be answered.
            resp = await self._auth.Authenticate(
                rpc.AuthenticateRequest(name=self.options.user, password=self.options.password),
                timeout=max(self.options.timeout, AUTH_TIMEOUT))
        except grpc.aio.AioRpcError as exc:
            error = _translate(exc, "authenticate")
            if isinstance(error, AccessDenied):
                raise AccessDenied(f"etcd refused user {self.options.user!r}: {exc.details()}") from None
            raise error from None
        self._metadata = (("token", resp.token),)
        self.authentications += 1

    async def _renew(self, refused: tuple | None) -> None:
        """The token `refused` was refused: take a new one, unless another call already did."""
        async with self._auth_lock:
            if self._metadata is refused:
                await self._authenticate()

    def _refused_token(self, exc: grpc.aio.AioRpcError) -> bool:
        """Whether etcd may have refused our token rather than our user: a fresh one is worth a try."""
        return bool(self.options.user) and exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                                          grpc.StatusCode.PERMISSION_DENIED)

    async def _call(self, method: Any, request: Any, what: str, timeout: float | None = None) -> Any:
        deadline = timeout or self.options.timeout
        return await self._retrying(lambda: method(request, timeout=deadline, metadata=self._metadata), what)

    async def _retrying(self, make: Any, what: str) -> Any:
        """Run one call; when etcd refuses the auth token, authenticate again and retry once."""
        for attempt in (1, 2):
            used = self._metadata
            try:
                return await make()
            except grpc.aio.AioRpcError as exc:
                if attempt == 1 and self._refused_token(exc):
                    await self._renew(used)
                    continue
                raise self._failed(_translate(exc, what)) from None
        raise AssertionError("unreachable")

    def _failed(self, error: Exception) -> Exception:
        """Count an error etcd answered (dsm.metrics), and return it to be raised."""
        self.errors[type(error).__name__] += 1
        return error

    # -- reads ------------------------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call(self._kv.Range, rpc.RangeRequest(key=_encode(key)), "get")
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def range(self, start: str, end: str | None = None, *, limit: int = 0, revision: int = 0,
                    keys_only: bool = False) -> RangeResult:
        req = rpc.RangeRequest(key=_encode(start), limit=limit, revision=revision, keys_only=keys_only)
        if end is not None:
            req.range_end = _encode(end)
        resp = await self._call(self._kv.Range, req, "range")
        return RangeResult(kvs=[_kv(kv) for kv in resp.kvs], more=resp.more, revision=resp.header.revision)

    async def count(self, start: str, end: str | None = None) -> int:
        req = rpc.RangeRequest(key=_encode(start), count_only=True)
        if end is not None:
            req.range_end = _encode(end)
        return (await self._call(self._kv.Range, req, "count")).count

    async def revision(self) -> int:
        # A read inside the namespace: a user whose role covers only its prefix may ask this too.
        # One key, not the namespace's range: etcd 3.5 walks every key of a range to count it,
        # whatever the limit, and the housekeeper asks this every few seconds.
        req = rpc.RangeRequest(key=_encode(self.options.keys.root), keys_only=True)
        resp = await self._call(self._kv.Range, req, "revision")
        return resp.header.revision

    # -- writes -----------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = await self._call(self._kv.Put, rpc.PutRequest(key=_encode(key), value=value, lease=lease), "put")
        return resp.header.revision

    async def delete(self, key: str, end: str | None = None) -> int:
        req = rpc.DeleteRangeRequest(key=_encode(key))
        if end is not None:
            req.range_end = _encode(end)
        resp = await self._call(self._kv.DeleteRange, req, "delete")
        return resp.deleted

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op] = (),
                  failure: Sequence[Op] = ()) -> TxnResult:
        resp = await self._call(self._kv.Txn, _txn(compare, success, failure), "txn")
        return _txn_result(resp, resp.header.revision)

    # -- leases -----------------------------------------------------------------------------
    async def lease_grant(self, ttl: float) -> int:
        resp = await self._call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=max(1, round(ttl))), "lease grant")
        if resp.error:
            raise StoreError(f"lease grant: {resp.error}")
        return resp.ID

    async def lease_keepalive(self, lease: int) -> float:
        async def once() -> float:
            call = self._lease.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
                                              timeout=self.options.timeout, metadata=self._metadata)
            async for resp in call:
                if resp.TTL <= 0:
                    raise LeaseLost(f"lease {lease:x} expired")
                return float(resp.TTL)
            raise StoreUnavailable("lease keep-alive: no answer")

        return await self._retrying(once, "lease keep-alive")

    async def lease_revoke(self, lease: int) -> None:
        try:
            await self._call(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease), "lease revoke")
        except LeaseLost:
            pass

    async def lease_ttl(self, lease: int) -> float:
        resp = await self._call(self._lease.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=lease), "lease ttl")
        return float(resp.TTL)

    async def lease_keys(self, lease: int) -> list[str]:
        resp = await self._call(self._lease.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=lease, keys=True),
                                "lease keys")
        if resp.TTL < 0:
            raise LeaseLost(f"lease {lease:x} expired")
        return [_decode(k) for k in resp.keys]

    # -- watches ----------------------------------------------------------------------------
    async def watch(self, start: str, end: str | None = None, *, start_revision: int = 0) -> _EtcdWatch:
        create = rpc.WatchCreateRequest(key=_encode(start), start_revision=start_revision)
        if end is not None:
            create.range_end = _encode(end)
        for attempt in (1, 2):
            used = self._metadata
            try:
                return await self._open_watch(create)
            except _TokenRefused as refused:
                if attempt == 2:
                    raise self._failed(AccessDenied(f"watch: {refused}")) from None
                await self._renew(used)
        raise AssertionError("unreachable")

    async def _open_watch(self, create: Any) -> _EtcdWatch:
        """One watch stream, created; _TokenRefused when etcd refuses it (a stale token or our user)."""
        requests: asyncio.Queue = asyncio.Queue()
        requests.put_nowait(rpc.WatchRequest(create_request=create))

        async def feed() -> AsyncIterator[Any]:
            while True:
                item = await requests.get()
                if item is None:
                    return
                yield item

        call = self._watch.Watch(feed(), metadata=self._metadata)
        try:
            first = await asyncio.wait_for(call.read(), self.options.timeout)
        except asyncio.TimeoutError:
            call.cancel()
            raise StoreUnavailable("watch: no answer to the create request") from None
        except grpc.aio.AioRpcError as exc:
            if self._refused_token(exc):
                raise _TokenRefused(exc.details() or exc.code().name) from None
            raise self._failed(_translate(exc, "watch")) from None
        if first is grpc.aio.EOF:
            raise StoreUnavailable("watch: stream closed")
        if first.compact_revision:
            call.cancel()
            raise Compacted(first.compact_revision)
        if first.canceled:
            call.cancel()
            reason = first.cancel_reason or "canceled"
            if "compacted" in reason:
                raise Compacted(first.compact_revision)
            if "permission" not in reason:
                raise StoreUnavailable(f"watch: {reason}")
            if not self.options.user:
                raise self._failed(AccessDenied(f"watch: {reason}"))
            raise _TokenRefused(reason)  # etcd says the same of a token it forgot as of a key we may not read
        return _EtcdWatch(self, call, requests)

    async def alarms(self) -> list[str]:
        resp = await self._call(self._maintenance.Alarm, rpc.AlarmRequest(action=rpc.AlarmRequest.GET), "alarms")
        return sorted({rpc.AlarmType.Name(a.alarm) for a in resp.alarms if a.alarm})

    async def compact(self, revision: int, *, physical: bool = False) -> None:
        # By default not physical: etcd compacts its backend in the background; history below
        # `revision` is unreadable from the moment this returns, which is all the contract asks.
        await self._call(self._kv.Compact, rpc.CompactionRequest(revision=revision, physical=physical), "compact",
                         timeout=max(self.options.timeout, 60.0))

    async def close(self) -> None:
        await self._channel.close()
