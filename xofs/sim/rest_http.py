"""The HTTP layer of the simulator's REST API, behaving as xo-server's Express stack does on the wire.

xo-server runs Express 4 with helmet (security headers on every answer), `compression()` (gzip when the
client accepts it, `Vary: Accept-Encoding` on compressible types) and `json spaces = 2`; `res.json` adds a
weak ETag and answers 304 to a matching `If-None-Match`; a GET route also answers HEAD. This module gives
the routes those answers: `Request` (what the client sent), `send_bytes` (Express's `res.send`),
`send_json`, `send_empty` and `StreamSender` (a piped stream). Header names keep the case Node writes, and
the order is the recorded one (`reference/real-xo/*.headers.json`): helmet's headers, the route's own,
`Content-Type`, `Content-Length`, `ETag`, `Vary`, `Content-Encoding`, then `Date`, `Connection` and
`Keep-Alive`; h11 adds `Transfer-Encoding: chunked` last when there is no length. Node sends no `Server`
header, and this app writes `Date` itself: run hypercorn as `server.hypercorn_config` sets it up.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, unquote

from xofs.sim import rest_json

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[str, str]]

_CSP = ("default-src 'self'; connect-src 'self' https://api.github.com; script-src 'self' "
        "'sha256-sIj1FFjxCJxsQo5Hw5ZkhT+9Gc+Q6LmIkJzdjARCn0o=' "
        "'sha256-Z5hWOtGcISU7nkyObsPm3ZZvPpAYxzoiQutkJucVkm8='; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:")
# helmet's headers, as xo-server's configuration makes them, in wire order.
SECURITY_HEADERS: Headers = [
    ("Content-Security-Policy", _CSP),
    ("X-Content-Security-Policy", _CSP),
    ("X-WebKit-CSP", _CSP),
    ("X-DNS-Prefetch-Control", "off"),
    ("X-Frame-Options", "SAMEORIGIN"),
    ("Strict-Transport-Security", "max-age=15552000; includeSubDomains"),
    ("X-Download-Options", "noopen"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-XSS-Protection", "1; mode=block"),
]
JSON_TYPE = "application/json; charset=utf-8"
COMPRESSION_THRESHOLD = 1024  # compression()'s default `threshold: '1kb'`
_EMPTY_ETAG = 'W/"0-2jmj7l5rSw0yVb/vlWAYkK/YBwk"'


class RestError(Exception):
    """An error answer: the status, Express's JSON body `{error, data?, info?}`, and extra headers."""

    def __init__(self, status: int, error: Any, *, data: Any = None, info: str | None = None,
                 headers: Headers | None = None) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.body: dict[str, Any] = {"error": error}
        if data is not None:
            self.body["data"] = data
        if info is not None:
            self.body["info"] = info
        self.headers = headers or []


class Request:
    """One HTTP request: method, path, query (flat keys, as Express parses them), headers, cookies."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self._receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.raw_path: str = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("?")[0]
        self.query_string: str = scope.get("query_string", b"").decode("latin-1")
        self.query: dict[str, str | list[str]] = {}
        for key, value in parse_qsl(self.query_string, keep_blank_values=True):
            previous = self.query.get(key)
            if previous is None:
                self.query[key] = value
            elif isinstance(previous, list):
                previous.append(value)
            else:
                self.query[key] = [previous, value]
        self.headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", []):
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            if name in self.headers:
                self.headers[name] += ("; " if name == "cookie" else ", ") + value
            else:
                self.headers[name] = value
        self.cookies = parse_cookies(self.headers.get("cookie", ""))
        self.body_done = False
        self.disconnected = False

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.strip().isdigit() else None

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The request body as it arrives; stops early if the client goes away."""
        while not self.body_done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self.body_done = True
                return
            self.body_done = not message.get("more_body", False)
            chunk = message.get("body", b"")
            if chunk:
                yield chunk

    async def read_body(self, limit: int = 16 << 20) -> bytes:
        """The whole (small) body: JSON bodies of PATCH and the simulator's control routes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.body_chunks():
            size += len(chunk)
            if size > limit:
                raise RestError(413, "request entity too large")
            parts.append(chunk)
        return b"".join(parts)

    async def drain(self) -> None:
        """Read and drop what is left of the body, so that the connection can carry the next request."""
        async for _ in self.body_chunks():
            pass

    async def wait_disconnect(self) -> None:
        """Return once the client has closed the connection (the body must have been read already)."""
        await self.drain()
        while not self.disconnected:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True

    def wants_close(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.scope.get("http_version") == "1.0":
            return "keep-alive" not in connection
        return "close" in connection


def parse_cookies(header: str) -> dict[str, str]:
    """`cookie-parser`: `a=b; c="d"`, values URI-decoded, the first occurrence of a name wins."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or name in cookies:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies[name] = unquote(value) if "%" in value else value
    return cookies


def etag_of(body: bytes) -> str:
    """Express's weak ETag: `W/"<length in hex>-<first 27 chars of base64(sha1)>"`."""
    if not body:
        return _EMPTY_ETAG
    digest = base64.b64encode(hashlib.sha1(body).digest()).decode()[:27]
    return f'W/"{len(body):x}-{digest}"'


def is_fresh(req: Request, etag: str) -> bool:
    """The `fresh` module: does the client's cached copy (If-None-Match) still match this answer?"""
    none_match = req.headers.get("if-none-match")
    modified_since = req.headers.get("if-modified-since")
    if not none_match and not modified_since:
        return False
    if "no-cache" in req.headers.get("cache-control", ""):
        return False
    if none_match and none_match != "*":
        tags = [t.strip() for t in none_match.split(",")]
        if not any(t == etag or "W/" + t == etag or t == "W/" + etag for t in tags):
            return False
    # Express sets no Last-Modified on these answers, so any If-Modified-Since counts as stale.
    return not modified_since


def is_compressible(content_type: str | None) -> bool:
    """`compressible` (mime-db): JSON, text, and application/octet-stream, but not application/x-ndjson."""
    if not content_type:
        return False
    mime = content_type.split(";")[0].strip().lower()
    return (mime.startswith("text/") or mime in ("application/json", "application/octet-stream")
            or mime.endswith(("+json", "+xml", "+text")))


def negotiate_encoding(req: Request) -> str | None:
    """gzip or deflate when the client's Accept-Encoding prefers it to identity (ties go to gzip), else None.

    compression() may also pick brotli, which this simulator does not speak: a client that accepts only
    `br` gets identity here.
    """
    header = req.headers.get("accept-encoding")
    if not header:
        return None
    weights: dict[str, float] = {}
    for item in header.split(","):
        name, _, params = item.partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        weights[name.strip().lower()] = q
    if "x-gzip" in weights:
        weights.setdefault("gzip", weights["x-gzip"])
    star = weights.get("*")

    def weight(name: str) -> float:
        return weights.get(name, star if star is not None else 0.0)

    identity = weights.get("identity", star if star is not None else min(weights.values()))
    best = max(("gzip", "deflate"), key=weight)
    if weight(best) <= 0 or weight(best) < identity:
        return None
    return best


def compressor(encoding: str) -> Any:
    """A zlib stream for `gzip` or `deflate` at Node's default level."""
    return zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)


def tail_headers(req: Request) -> Headers:
    """What Node's http server appends: Date, then Connection and Keep-Alive, unless the client asked to
    close, when h11 writes `Connection: close` itself."""
    date = ("Date", formatdate(usegmt=True))
    if req.wants_close():
        return [date]
    return [date, ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5")]


def raw_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """ASGI's form of a header list (bytes), names kept in their case."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def send_bytes(req: Request, send: Send, status: int, body: bytes, content_type: str | None,
                     headers: Headers = (), *, etag: bool = True) -> None:
    """Express's `res.send(body)`: ETag, 304 when fresh, compression, HEAD without a body."""
    out: Headers = list(SECURITY_HEADERS) + list(headers)
    tag = etag_of(body) if etag else None
    fresh = (tag is not None and req.method in ("GET", "HEAD") and (200 <= status < 300 or status == 304)
             and is_fresh(req, tag))
    if fresh:
        status = 304
        body = b""
        out.append(("ETag", tag))  # type: ignore[arg-type]
    else:
        if content_type is not None:
            out.append(("Content-Type", content_type))
        out.append(("Content-Length", str(len(body))))
        if tag is not None:
            out.append(("ETag", tag))
        if is_compressible(content_type):
            out.append(("Vary", "Accept-Encoding"))
            encoding = negotiate_encoding(req) if req.method != "HEAD" else None
            if encoding is not None and len(body) >= COMPRESSION_THRESHOLD:
                out = [(k, v) for k, v in out if k != "Content-Length"]
                out.append(("Content-Encoding", encoding))
                z = compressor(encoding)
                body = z.compress(body) + z.flush()
    out += tail_headers(req)
    await send({"type": "http.response.start", "status": status, "headers": raw_headers(out)})
    await send({"type": "http.response.body", "body": b"" if req.method == "HEAD" else body})


async def send_json(req: Request, send: Send, status: int, value: Any, headers: Headers = ()) -> None:
    """Express's `res.json(value)` with `json spaces = 2`."""
    text = value if isinstance(value, str) else rest_json.pretty(value)
    await send_bytes(req, send, status, text.encode(), JSON_TYPE, headers)


async def send_error(req: Request, send: Send, error: RestError) -> None:
    await send_json(req, send, error.status, error.body, error.headers)


async def send_empty(req: Request, send: Send, status: int = 204, headers: Headers = ()) -> None:
    """`res.status(204).end()`: helmet's headers and nothing else, not even a type or a Vary."""
    out = list(SECURITY_HEADERS) + list(headers) + tail_headers(req)
    await send({"type": "http.response.start", "status": status, "headers": raw_headers(out)})
    await send({"type": "http.response.body", "body": b""})


class StreamSender:
    """A body piped into the response (exports, NDJSON): no length, so chunked; gzip if negotiated.

    `headers` are the route's own, in the case and order the route sets them, the content type included.
    """

    def __init__(self, req: Request, send: Send, headers: Headers) -> None:
        self.req = req
        self._send = send
        self.headers: Headers = list(SECURITY_HEADERS) + list(headers)
        content_type = next((v for k, v in headers if k.lower() == "content-type"), None)
        self._zlib = None
        if is_compressible(content_type):
            self.headers.append(("Vary", "Accept-Encoding"))
            encoding = negotiate_encoding(req) if req.method != "HEAD" else None
            if encoding is not None:
                self.headers.append(("Content-Encoding", encoding))
                self._zlib = compressor(encoding)
        self.started = False
        self.sent = 0  # body bytes handed over, before compression

    async def start(self) -> None:
        await self._send({"type": "http.response.start", "status": 200,
                          "headers": raw_headers(self.headers + tail_headers(self.req))})
        self.started = True

    async def write(self, chunk: bytes) -> None:
        if not self.started:
            await self.start()
        self.sent += len(chunk)
        if self.req.method == "HEAD":
            return
        if self._zlib is not None:
            chunk = self._zlib.compress(chunk)
            if not chunk:
                return
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end(self) -> None:
        if not self.started:
            await self.start()
        tail = self._zlib.flush() if self._zlib is not None and self.req.method != "HEAD" else b""
        await self._send({"type": "http.response.body", "body": tail})
