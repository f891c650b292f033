"""Who may do what through the HTTP API: the bearer token, the origin of writes, and the Host.

- **Actions** (every method but GET, HEAD and OPTIONS) need `Authorization: Bearer TOKEN` when
  the API has a token (`DSM_API_TOKEN`), and are refused when a browser says they come from
  another origin: an `Origin` header that does not name the host the request was sent to, or a
  `Sec-Fetch-Site` other than `same-origin` or `none`. A request with neither header (curl, a
  script) is not a browser's, and the token alone decides. So a page on another site cannot make
  a visitor's browser start, signal, cancel or delete anything, token or not.
- **Reads** need no token: they change nothing, the API listens on loopback unless told
  otherwise, and the dashboard follows live updates with `EventSource`, which cannot send one.
  Other sites cannot read answers (no CORS headers are ever sent), and when the API listens on
  loopback it answers only requests whose `Host` is a loopback name (or one allowed by name), so
  a site that points its own name at 127.0.0.1 (DNS rebinding) cannot read them either.

- **Listening beyond loopback** without a token would open the actions to anyone who can reach
  the port: `dsm api` refuses to start so unless given `--no-token` (`is_loopback` says which
  addresses are loopback), and then warns on every start.

- **A method that no route takes at a path** (TRACE, or PUT where only GET is served) runs nothing
  whatever the token: it gets its 405 with `Allow`, not a 401 that would ask for a token no
  answer there needs.

`refusal` decides, purely, from the method and headers (and whether a route takes the request);
`AccessCheck` is the ASGI middleware that asks it before anything else runs, so a refused request never
reaches a route and writes nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# sent with every answer: no sniffing of JSON as HTML, no framing of the dashboard by other sites
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin")]


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine only: `localhost` or a
    loopback address (127.0.0.0/8, ::1). Any other name is not, whatever it resolves to today."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    type: str
    message: str


def _host_and_port(netloc: str, default_port: int | None) -> tuple[str, int | None] | None:
    """`host[:port]` (IPv6 in brackets) as a lowercase host and a port; None when malformed."""
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else default_port


def same_origin(origin: str, host: str) -> bool:
    """Whether an `Origin` header names the host the request was sent to (its `Host` header).
    Schemes are not compared (a proxy may end TLS); a missing port is the scheme's default."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        return False  # "null" (sandboxed frames, file: pages) and anything unexpected
    default = DEFAULT_PORTS[parts.scheme]
    theirs = _host_and_port(parts.netloc, default)
    ours = _host_and_port(host, default)
    return theirs is not None and theirs == ours


def refusal(method: str, headers: Mapping[str, str], *, token: str | None,
            allowed_hosts: Collection[str] | None = None, routed: bool = True) -> Refusal | None:
    """Why a request is refused, or None when it may go on. `headers` are lowercase-keyed;
    `routed`: a route takes this method at this path (else the router answers 405, running nothing)."""
    host = headers.get("host", "")
    if allowed_hosts is not None:
        parsed = _host_and_port(host, None)
        if parsed is None or parsed[0] not in allowed_hosts:
            return Refusal(403, "Forbidden", f"this API does not answer to the host {host!r} (it answers to "
                           f"{', '.join(sorted(allowed_hosts))}; dsm api --allow-host NAME adds one)")
    if method.upper() in SAFE_METHODS or not routed:
        return None
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return Refusal(403, "Forbidden", f"actions from another site are refused (Sec-Fetch-Site: {fetch_site})")
    origin = headers.get("origin")
    if origin is not None and not same_origin(origin, host):
        return Refusal(403, "Forbidden", f"actions from another origin are refused: the request comes from "
                                         f"{origin!r}, the API is {host!r}")
    if token is None:
        return None
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return Refusal(401, "Unauthorized", "this action needs the API's token: send the header "
                                            "'Authorization: Bearer TOKEN' (the value of DSM_API_TOKEN)")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return Refusal(401, "Unauthorized", "the bearer token is not the API's token (DSM_API_TOKEN)")
    return None


class AccessCheck:
    """ASGI middleware: refuses what `refusal` refuses, adds the security headers to every answer.
    `routes`: the app's, to tell a request that reaches one (None: every request does)."""

    def __init__(self, app: ASGIApp, *, token: str | None, allowed_hosts: Collection[str] | None = None,
                 routes: Sequence[BaseRoute] | None = None):
        self.app = app
        self.token = token or None
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts) if allowed_hosts is not None else None
        self.routes = routes

    def routed(self, scope: Scope) -> bool:
        return self.routes is None or any(route.matches(scope)[0] is Match.FULL for route in self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        refused = refusal(scope["method"], Headers(scope=scope), token=self.token, allowed_hosts=self.allowed_hosts,
                          routed=self.routed(scope))
        if refused is not None:
            headers = {"www-authenticate": "Bearer"} if refused.status == 401 else None
            response = JSONResponse({"error": {"type": refused.type, "message": refused.message}},
                                    status_code=refused.status, headers=headers)
            await response(scope, receive, secured)
            return
        await self.app(scope, receive, secured)
