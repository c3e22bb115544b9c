"""Who may use the service, and how much a request may send: one ASGI
middleware in front of every route, HTTP and websocket alike.

In order: the request target must be a path; exactly one ``Host`` header,
naming this server (the DNS rebinding defence); at most one ``Origin`` and
one ``Authorization``; a CORS preflight from an origin allowed with
``--allow-origin`` is answered here, without the token (browsers send none);
the page's own origin or an allowed one for the API, ``/ws`` and
``/status``; the token (``Authorization: Bearer`` with any case of the
scheme, or ``?token=`` for ``/ws`` and ``/status``, which browsers cannot
give headers); a request body of at most ``max_body_bytes``, read here
whether it came with a length or chunked. A refused websocket gets an HTTP
answer instead of its upgrade. Nothing a client sends is ever copied into a
response header unchecked.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from livepp.serve.service import Service

__all__ = ["AccessMiddleware", "bearer", "protected_path", "ALLOWED_METHODS"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

ALLOWED_METHODS = "GET, HEAD, POST, OPTIONS"
# A header name is an RFC 9110 token: nothing a client sends as one can end a header line.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (the scheme in any case)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def protected_path(path: str) -> bool:
    """Paths that need the token (and a trusted origin): everything but the
    page, health and metrics."""
    return path not in ("/", "/index.html", "/healthz", "/metrics", "/openapi.json")


def _cors_path(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/tokenizer_info")


class _Headers:
    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.items = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def one(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None


class _Refusal(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class AccessMiddleware:
    def __init__(self, app: Any, *, service: "Service") -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _Headers(scope.get("headers") or [])
        extra: list[tuple[bytes, bytes]] = []
        try:
            origin = self._check(scope, headers)
            if origin is not None and origin in self.service.config.allowed_origins and _cors_path(scope["path"]):
                # A page of an origin the operator allowed (--allow-origin) may read the answers.
                extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
            if scope["type"] == "http" and scope["method"] == "OPTIONS" and _cors_path(scope["path"]):
                await _preflight(headers, extra, send)
                return
            if scope["type"] == "http":
                self._check_length(headers)  # a body announced too large is refused before anything else
            self._check_token(scope, headers)
            if scope["type"] == "http":
                receive = await self._read_body(scope, headers, receive)
        except _Refusal as refusal:
            await _refuse(scope, send, refusal, extra)
            return
        if extra:
            send = _with_headers(send, extra)
        await self.app(scope, receive, send)

    def _check(self, scope: Scope, headers: _Headers) -> str | None:
        """Target, Host and Origin; the request's origin, if it has one."""
        if not scope["path"].startswith("/"):
            raise _Refusal(400, "the request target must be a path such as /v1/models")
        hosts = headers.all("host")
        if len(hosts) != 1:
            raise _Refusal(400, "a request needs exactly one Host header")
        if not self.service.host_allowed(hosts[0]):
            raise _Refusal(403, "unknown Host header (allow it with --allow-host)", "forbidden")
        origins, auths = headers.all("origin"), headers.all("authorization")
        if len(origins) > 1 or len(auths) > 1:
            raise _Refusal(400, "at most one Origin and one Authorization header")
        origin = origins[0] if origins else None
        if protected_path(scope["path"]) and not self.service.origin_allowed(origin, hosts[0]):
            raise _Refusal(403, f"origin {origin} not allowed", "forbidden")
        return origin

    def _check_token(self, scope: Scope, headers: _Headers) -> None:
        if not protected_path(scope["path"]):
            return
        given = bearer(headers.one("authorization"))
        if given is None and (scope["type"] == "websocket" or scope["path"] == "/status"):
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        if not self.service.token_ok(given):
            raise _Refusal(401, "missing or wrong API key: send 'Authorization: Bearer TOKEN' with the server's --token", "invalid_api_key")

    def _check_length(self, headers: _Headers) -> None:
        limit = self.service.config.max_body_bytes
        lengths = headers.all("content-length")
        if len(set(lengths)) > 1:
            raise _Refusal(400, "conflicting Content-Length headers")
        if lengths and (not lengths[0].isascii() or not lengths[0].isdigit()):
            raise _Refusal(400, "bad Content-Length")
        if lengths and int(lengths[0]) > limit:
            raise _Refusal(413, f"request bodies are limited to {limit} bytes")

    async def _read_body(self, scope: Scope, headers: _Headers, receive: Receive) -> Receive:
        """The whole body, at most ``max_body_bytes``, replayed to the app."""
        limit = self.service.config.max_body_bytes
        lengths = headers.all("content-length")
        if scope["method"] in ("GET", "HEAD") and not lengths and not headers.all("transfer-encoding"):
            return receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay(b"", receive, disconnected=True)
            size += len(message.get("body", b""))
            if size > limit:
                raise _Refusal(413, f"request bodies are limited to {limit} bytes")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return _replay(b"".join(chunks), receive)


def _replay(body: bytes, receive: Receive, *, disconnected: bool = False) -> Receive:
    given = False

    async def replay() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.disconnect"} if disconnected else {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] in ("http.response.start", "websocket.http.response.start"):
            message = message | {"headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def _error_body(status: int, message: str, code: str | None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return (json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}) + "\n").encode("utf-8")


async def _refuse(scope: Scope, send: Send, refusal: _Refusal, extra: list[tuple[bytes, bytes]]) -> None:
    body = _error_body(refusal.status, str(refusal), refusal.code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if scope["type"] == "websocket":
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": refusal.status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


async def _preflight(headers: _Headers, extra: list[tuple[bytes, bytes]], send: Send) -> None:
    """A browser's CORS preflight: allowed for an --allow-origin origin; the
    headers it asks for are echoed only when each is a header name."""
    if not extra:
        raise _Refusal(403, f"origin {headers.one('origin')} not allowed", "forbidden")
    asked = headers.one("access-control-request-headers")
    names = [n.strip() for n in (asked or "Authorization, Content-Type").split(",") if n.strip()]
    if not names or not all(_TOKEN.match(n) for n in names):
        raise _Refusal(400, "Access-Control-Request-Headers must list header names")
    allow = [(b"access-control-allow-methods", ALLOWED_METHODS.encode()), (b"access-control-allow-headers", ", ".join(names).encode()),
             (b"access-control-max-age", b"600"), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 204, "headers": [*extra, *allow]})
    await send({"type": "http.response.body", "body": b""})
