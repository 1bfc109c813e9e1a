"""The simulator's HTTP side: XO's REST API v0 (era T4, xo-server 5.207.2), its one-shot `/api/<random>`
downloads, and the `/_sim/` fault-injection routes. `make_rest_app(model, faults)` is the ASGI app.

A request goes through what xo-server's Express stack does, in its order: the `/_sim/` and `/api/` routes
aside, any path under `/rest/v0` is authenticated first (`rest_auth`: bad credentials fail even on public
routes and unknown paths), then matched against the routes below (a GET route also answers HEAD), and
anything unmatched falls through to XO's sign-in gate (a 302 to `/signin` outside `/rest/` without a valid
`token` cookie) and then to Express's HTML `Cannot GET …` 404. Errors become XO's JSON bodies as
its generic error handler writes them (`SimError` codes to statuses, `{error, data?, info?}`).

With `legacy=True` (`xofs sim --legacy`) the answers that changed with the tsoa rewrite take their
pre-5.111 form (era L): a text `Unauthorized` 401 (cookie only), the HTML 404 for an unknown object, a bare
UUID 200 for an import, `OK` 200 for a delete, and the legacy router's PATCH (`Editor.patch_legacy`).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import trio

from xofs.sim.faults import Faults, FaultsError
from xofs.sim.model import SimError, SimModel, TooFastError
from xofs.sim.rest_auth import WWW_AUTHENTICATE, Authenticator
from xofs.sim.rest_collections import COLLECTIONS, Lister, ListQuery, collection_href, predicate, vdi_href
from xofs.sim.rest_edits import Editor
from xofs.sim.rest_exports import Exporter
from xofs.sim.rest_hostile import send_corrupt_listing
from xofs.sim.rest_http import (
    JSON_TYPE,
    SECURITY_HEADERS,
    Headers,
    Message,
    Receive,
    Request,
    RestError,
    Scope,
    Send,
    StreamSender,
    raw_headers,
    send_bytes,
    send_empty,
    send_error,
    send_json,
    tail_headers,
)
from xofs.sim.rest_imports import XAPI_ERROR_INFO, Importer

log = logging.getLogger(__name__)

BASE = "/rest/v0"
_COLLECTION = "|".join(re.escape(c) for c in COLLECTIONS)
_VM_COLLECTIONS = "vms|vm-snapshots|vm-templates|vm-controllers"
_VM_EXPORTS = "vms|vm-snapshots|vm-templates"
_VDI_COLLECTIONS = "vdis|vdi-snapshots"
_ID = r"(?P<obj_id>[^/]+)"
# Express's `:id.:format`: the id is lazy and the format has no dot, so the split is at the last dot.
_ID_FORMAT = r"(?P<obj_id>[^/]+?)\.(?P<fmt>[^/.]+?)"
_DOWNLOAD_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    label: str  # for the request statistics, e.g. "/rest/v0/{coll}/{id}" ({coll} is filled in)
    handler: str  # the RestApp method that answers
    public: bool = False


def _route(method: str, path: str, label: str, handler: str, *, public: bool = False) -> Route:
    # Express routes are case-insensitive and allow one trailing slash.
    return Route(method, re.compile(f"^{path}/?$", re.IGNORECASE), label, handler, public)


ROUTES = [
    _route("GET", BASE, BASE, "redirect_to_docs", public=True),
    _route("GET", f"{BASE}/ping", f"{BASE}/ping", "ping", public=True),
    _route("GET", f"{BASE}/docs(?:/.*)?", f"{BASE}/docs", "docs", public=True),
    _route("GET", f"{BASE}/(?P<coll>{_COLLECTION})", f"{BASE}/{{coll}}", "list_collection"),
    _route("GET", f"{BASE}/(?P<coll>{_VM_EXPORTS})/{_ID_FORMAT}", f"{BASE}/{{coll}}/{{id}}.{{format}}",
           "export_vm"),
    _route("GET", f"{BASE}/(?P<coll>{_VDI_COLLECTIONS})/{_ID_FORMAT}", f"{BASE}/{{coll}}/{{id}}.{{format}}",
           "export_vdi"),
    _route("GET", f"{BASE}/(?P<coll>{_COLLECTION})/{_ID}", f"{BASE}/{{coll}}/{{id}}", "get_object"),
    _route("GET", f"{BASE}/(?P<coll>{_VM_COLLECTIONS})/{_ID}/vdis", f"{BASE}/{{coll}}/{{id}}/vdis",
           "list_vm_vdis"),
    _route("PATCH", f"{BASE}/(?P<coll>vms|vdis)/{_ID}", f"{BASE}/{{coll}}/{{id}}", "patch"),
    _route("DELETE", f"{BASE}/(?P<coll>{_VM_EXPORTS}|{_VDI_COLLECTIONS})/{_ID}", f"{BASE}/{{coll}}/{{id}}",
           "delete"),
    _route("POST", f"{BASE}/srs/{_ID}/vdis", f"{BASE}/srs/{{id}}/vdis", "import_new"),
    _route("PUT", f"{BASE}/vdis/{_ID_FORMAT}", f"{BASE}/vdis/{{id}}.{{format}}", "import_into"),
]
CONTROL_ROUTES = {
    ("GET", "/_sim/faults"): "get_faults",
    ("POST", "/_sim/faults"): "set_faults",
    ("DELETE", "/_sim/faults"): "reset_faults",
    ("POST", "/_sim/close-websockets"): "close_websockets",
    ("POST", "/_sim/websocket-frames"): "websocket_frames",
    ("POST", "/_sim/expire-token"): "expire_token",
    ("GET", "/_sim/stats"): "get_stats",
    ("POST", "/_sim/stats/reset"): "reset_stats",
}


def make_rest_app(model: SimModel, faults: Faults, legacy: bool | None = None) -> RestApp:
    """The ASGI app; `legacy` defaults to the model's flag (`xofs sim --legacy`)."""
    return RestApp(model, faults, model.legacy if legacy is None else legacy)


def _redirect_body(accept: str | None, location: str) -> tuple[bytes, str | None]:
    """`res.format({text, html, default})`: text unless the client prefers HTML; nothing for neither."""
    types = [t.split(";")[0].strip().lower() for t in (accept or "*/*").split(",")]
    if "text/html" in types and "text/plain" not in types:
        return f"<p>Found. Redirecting to {location}</p>".encode(), "text/html; charset=utf-8"
    if {"text/plain", "text/*", "*/*"} & set(types):
        return f"Found. Redirecting to {location}".encode(), "text/plain; charset=utf-8"
    return b"", None


# XO's sign-in gate lets these through to the routes behind it (UNCHECKED_URL_RE in index.mjs).
_UNGATED = re.compile(r"^/rest/|^/openmetrics/|favicon|manifest\.webmanifest|fontawesome|images|styles"
                      r"|\.(?:css|jpg|png|svg)$")
SIGNIN_PAGE = "/signin"  # authentication.defaultSignInPage


def _session_cookie() -> str:
    """express-session's cookie value: `s:` + a 24-byte id + `.` + its HMAC-SHA256 signature, URI-encoded."""
    sid = secrets.token_urlsafe(24)
    signature = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return quote(f"s:{sid}.{signature}", safe="")


async def _redirect(req: Request, send: Send, location: str, extra: Headers | None = None) -> None:
    """Express's `res.redirect(location)`: 302, a body in the type `res.format` negotiates; `extra` headers
    (a middleware's cookie) come after Express's own."""
    body, ctype = _redirect_body(req.headers.get("accept"), location)
    headers = [*SECURITY_HEADERS, ("Location", location)]
    if ctype is None:
        headers += [("Vary", "Accept"), ("Content-Length", "0")]
    else:  # compression() appends to the Vary that res.format set
        headers += [("Vary", "Accept, Accept-Encoding"), ("Content-Type", ctype), ("Content-Length", str(len(body)))]
    await send({"type": "http.response.start", "status": 302,
                "headers": raw_headers([*headers, *(extra or []), *tail_headers(req)])})
    await send({"type": "http.response.body", "body": b"" if req.method == "HEAD" else body})


def _cannot(req: Request) -> bytes:
    """finalhandler's 404 page."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Error</title>\n'
            f"</head>\n<body>\n<pre>Cannot {req.method} {req.raw_path}</pre>\n</body>\n</html>\n").encode()


class RestApp:
    """One instance serves every HTTP request of a simulator."""

    def __init__(self, model: SimModel, faults: Faults, legacy: bool) -> None:
        self.model = model
        self.faults = faults
        self.legacy = legacy
        self.auth = Authenticator(model)
        self.lister = Lister()
        self.exporter = Exporter(model, faults)
        self.importer = Importer(model, faults, legacy=legacy)
        self.editor = Editor(model)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        req = Request(scope, receive)
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.handle(req, tracked_send)
        except Exception as error:  # noqa: BLE001 - every failure becomes XO's error answer
            if started:
                log.warning("%s %s failed after its answer started: %r", req.method, req.raw_path, error)
                return
            # Node reads and drops the rest of a refused upload, so the client gets to finish sending it and
            # read the answer; hypercorn can no longer read it once the answer is out, so it goes first.
            await req.drain()
            await self.send_failure(req, tracked_send, error)

    # -- dispatch ----------------------------------------------------------------------------------------

    async def handle(self, req: Request, send: Send) -> None:
        path = req.raw_path
        if path.startswith("/_sim/"):
            await self.control(req, send)
            return
        route, params = self.match(req)
        label = route.label.replace("{coll}", params.get("coll", "")) if route else "(no route)"
        self.faults.stats.record(req.method, label, path)
        if self.faults.latency_ms:
            await trio.sleep(self.faults.latency_ms / 1000)
        status = self.faults.take_5xx()
        if status is not None:
            raise RestError(status, f"xofs sim: injected failure (http_5xx_next), {status}")
        if req.method == "GET" and path.lower().startswith(BASE + "/") and self.faults.take_reset():
            await drop_connection(req, send)
            return
        if path.startswith("/api/"):  # XO serves a one-shot URL to any method
            await self.download(req, send)
            return
        user = None
        if path.lower() == BASE or path.lower().startswith(BASE + "/"):
            user = self.authenticate(req)
        if route is None:
            await self.unmatched(req, send)
            return
        if not route.public and user is None:
            raise self.unauthenticated()
        await getattr(self, route.handler)(req, send, **params)

    def match(self, req: Request) -> tuple[Route | None, dict[str, str]]:
        method = "GET" if req.method == "HEAD" else req.method
        for route in ROUTES:
            if route.method != method:
                continue
            found = route.pattern.match(req.raw_path)
            if found:
                params = {k: unquote(v) for k, v in found.groupdict().items()}
                if "coll" in params:
                    params["coll"] = params["coll"].lower()
                return route, params
        return None, {}

    def authenticate(self, req: Request) -> dict[str, Any] | None:
        if self.legacy:  # the legacy router read the token cookie only
            token = self.auth.token_of(req)
            if token is None:
                return None
            user = self.model.user_for_token(token)
            if user is None:
                raise self.unauthenticated()
            return user
        return self.auth.authenticate(req)

    def unauthenticated(self) -> RestError:
        if self.legacy:
            return RestError(401, "Unauthorized")
        return RestError(401, "invalid credentials", headers=[WWW_AUTHENTICATE])

    async def send_failure(self, req: Request, send: Send, error: Exception) -> None:
        """XO's generic error handler (and the legacy router's text answers)."""
        if isinstance(error, SimError):
            if self.legacy and error.code == 1:
                await self.not_found(req, send)
                return
            error = self.rest_error(error)
        elif isinstance(error, TooFastError | ValueError | TypeError):
            error = RestError(500, str(error))
        elif not isinstance(error, RestError):
            log.exception("%s %s failed", req.method, req.raw_path, exc_info=error)
            error = RestError(500, str(error) or type(error).__name__)
        if self.legacy and error.status == 401:
            await send_bytes(req, send, 401, b"Unauthorized", "text/plain; charset=utf-8")
            return
        await send_error(req, send, error)

    def rest_error(self, error: SimError) -> RestError:
        if error.code == 17 and error.data:  # VDI_IN_USE comes from XAPI, so XO reports a XapiError
            vdi = self.model.get(str(error.data.get("objectId")))
            ref = vdi["_xapiRef"] if vdi else error.data.get("objectId")
            return RestError(500, f"VDI_IN_USE({ref}, {error.data.get('operation')})", info=XAPI_ERROR_INFO)
        headers = [WWW_AUTHENTICATE] if error.code == 3 else []
        return RestError(error.http_status, error.message, data=error.data, headers=headers)

    async def unmatched(self, req: Request, send: Send) -> None:
        """What no route answers: XO's sign-in gate first (index.mjs), which sends every URL it does not
        let through (`/rest/…`, `/openmetrics/…`, assets) to `/signin` unless the `token` cookie is a valid
        session (recording the URL in the session, so express-session sets its cookie); then Express's
        404. The sign-in pages themselves, which XO serves before the gate, are not simulated: 404."""
        token = req.cookies.get("token")
        if (_UNGATED.search(req.raw_path) or req.raw_path.split("?")[0] in ("/signin", "/signin-otp")
                or (token and self.model.user_for_token(token) is not None)):
            await self.not_found(req, send)
            return
        await req.drain()
        await _redirect(req, send, SIGNIN_PAGE, [("Set-Cookie", f"connect.sid={_session_cookie()}; Path=/; HttpOnly")])

    async def not_found(self, req: Request, send: Send) -> None:
        """Express's final handler: `Cannot GET /path`, with its own CSP."""
        await req.drain()
        body = _cannot(req)
        headers = [(k, "default-src 'none'" if k == "Content-Security-Policy" else v) for k, v in SECURITY_HEADERS]
        headers += [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                    ("Vary", "Accept-Encoding"), *tail_headers(req)]
        await send({"type": "http.response.start", "status": 404, "headers": raw_headers(headers)})
        await send({"type": "http.response.body", "body": b"" if req.method == "HEAD" else body})

    # -- routes ------------------------------------------------------------------------------------------

    async def redirect_to_docs(self, req: Request, send: Send) -> None:
        await _redirect(req, send, "/rest/v0/docs")

    async def ping(self, req: Request, send: Send) -> None:
        await send_json(req, send, 200, {"result": "pong", "timestamp": int(time.time() * 1000)})

    async def docs(self, req: Request, send: Send) -> None:
        """Where the Swagger UI would be; the simulator does not ship it."""
        body = (b"<!DOCTYPE html>\n<html><head><title>xofs sim</title></head><body><p>REST API v0 of the xofs "
                b"simulator (xo-server 5.207.2). The Swagger UI is not bundled.</p></body></html>\n")
        await send_bytes(req, send, 200, body, "text/html; charset=utf-8")

    async def list_collection(self, req: Request, send: Send, coll: str) -> None:
        query = ListQuery(req)
        objects = self.model.by_type(COLLECTIONS[coll])
        kinds = self.faults.take_corruption(coll)
        if kinds is not None:
            await send_corrupt_listing(req, send, query, list(objects), collection_href(req), COLLECTIONS[coll],
                                       kinds)
            return
        await self.lister.send_list(req, send, query, objects, collection_href(req))
        self.lister.cache.forget_missing(self.model.all_objects())

    async def list_vm_vdis(self, req: Request, send: Send, coll: str, obj_id: str) -> None:
        query = ListQuery(req)
        vm = self.model.get_typed(obj_id, COLLECTIONS[coll])
        wanted = "VDI-snapshot" if vm["type"] == "VM-snapshot" else "VDI"
        vdis = []
        for vbd_id in vm["$VBDs"]:
            vbd = self.model.get_typed(vbd_id, "VBD")
            if "VDI" in vbd:
                vdi = self.model.get_typed(vbd["VDI"], ["VDI-snapshot", "VDI"])
                if vdi["type"] == wanted:
                    vdis.append(vdi)
        match = predicate(query.filter)
        if match is not None:
            vdis = [v for v in vdis if match(v)]
        await self.lister.send_list(req, send, query, vdis, vdi_href, filtered=True)

    async def get_object(self, req: Request, send: Send, coll: str, obj_id: str) -> None:
        obj = self.model.get_typed(obj_id, COLLECTIONS[coll])
        await send_json(req, send, 200, obj)

    async def export_vm(self, req: Request, send: Send, coll: str, obj_id: str, fmt: str) -> None:
        await self.exporter.export_vm(req, send, COLLECTIONS[coll], obj_id, fmt)

    async def export_vdi(self, req: Request, send: Send, coll: str, obj_id: str, fmt: str) -> None:
        await self.exporter.export_vdi(req, send, COLLECTIONS[coll], obj_id, fmt)

    async def patch(self, req: Request, send: Send, coll: str, obj_id: str) -> None:
        if self.legacy:
            await self.editor.patch_legacy(req, COLLECTIONS[coll], obj_id)
        elif coll == "vms":
            await self.editor.patch_vm(req, obj_id)
        else:
            await self.editor.patch_vdi(req, obj_id)
        await send_empty(req, send, 204)

    async def delete(self, req: Request, send: Send, coll: str, obj_id: str) -> None:
        self.editor.delete(COLLECTIONS[coll], obj_id)
        if self.legacy:
            await send_bytes(req, send, 200, b"OK", "text/plain; charset=utf-8")
        else:
            await send_empty(req, send, 204)

    async def import_new(self, req: Request, send: Send, obj_id: str) -> None:
        await self.importer.import_new(req, send, obj_id)

    async def import_into(self, req: Request, send: Send, obj_id: str, fmt: str) -> None:
        await self.importer.import_into(req, send, obj_id, fmt)

    async def download(self, req: Request, send: Send) -> None:
        """A one-shot `$getFrom` URL of `xo.getAllObjects({ndjson: true})`: no auth, NDJSON as "JSON"."""
        body = self.model.take_download(req.raw_path)
        if body is None:
            await self.unmatched(req, send)
            return
        stream = StreamSender(req, send, [("Content-Type", JSON_TYPE)])
        pending = bytearray()
        for piece in body:
            pending += piece
            if len(pending) >= _DOWNLOAD_CHUNK:
                await stream.write(bytes(pending))
                pending.clear()
        if pending:
            await stream.write(bytes(pending))
        await stream.end()

    # -- /_sim/ ------------------------------------------------------------------------------------------

    async def control(self, req: Request, send: Send) -> None:
        """The fault-injection routes (see `faults.py`); same authentication as `/rest/v0`."""
        name = CONTROL_ROUTES.get((req.method, req.raw_path.rstrip("/")))
        if name is None:
            await self.not_found(req, send)
            return
        if self.auth.authenticate(req) is None:
            raise RestError(401, "invalid credentials", headers=[WWW_AUTHENTICATE])
        await getattr(self, "control_" + name)(req, send)

    async def _json_body(self, req: Request) -> Any:
        raw = await req.read_body()
        try:
            return json.loads(raw) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RestError(400, f"invalid JSON body: {error}") from error

    async def control_get_faults(self, req: Request, send: Send) -> None:
        await send_json(req, send, 200, self.faults.as_dict())

    async def control_set_faults(self, req: Request, send: Send) -> None:
        try:
            self.faults.update(await self._json_body(req))
        except FaultsError as error:
            raise RestError(400, str(error)) from error
        self.model.socket_faults.silent = self.faults.silent_websockets
        await send_json(req, send, 200, self.faults.as_dict())

    async def control_reset_faults(self, req: Request, send: Send) -> None:
        self.faults.reset()
        self.model.socket_faults.silent = False
        await send_json(req, send, 200, self.faults.as_dict())

    async def control_close_websockets(self, req: Request, send: Send) -> None:
        self.model.close_all_sockets()
        await send_empty(req, send, 204)

    async def control_websocket_frames(self, req: Request, send: Send) -> None:
        body = await self._json_body(req)
        frames = body.get("frames") if isinstance(body, dict) else None
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            raise RestError(400, 'the body must be {"frames": ["<text frame>", …]}')
        await send_json(req, send, 200, {"sockets": self.model.socket_faults.send_raw(frames)})

    async def control_expire_token(self, req: Request, send: Send) -> None:
        body = await self._json_body(req)
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise RestError(400, 'the body must be {"token": "<token>"}')
        self.model.expire_token(token)
        await send_empty(req, send, 204)

    async def control_get_stats(self, req: Request, send: Send) -> None:
        await send_json(req, send, 200, self.faults.stats.as_dict())

    async def control_reset_stats(self, req: Request, send: Send) -> None:
        self.faults.stats.reset()
        await send_empty(req, send, 204)


async def drop_connection(req: Request, send: Send) -> None:
    """The `reset_next_gets` knob: a status line and headers, then the connection closes with no body.

    An ASGI app cannot reset a socket before answering (the server would send a 500 instead); ending the
    response before its body is the nearest it gets: the client sees the connection drop mid-answer."""
    await req.drain()
    headers = [*SECURITY_HEADERS, ("Content-Type", JSON_TYPE), *tail_headers(req)]
    await send({"type": "http.response.start", "status": 200, "headers": raw_headers(headers)})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

