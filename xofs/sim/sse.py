"""The simulator's REST event stream: `GET /rest/v0/events` and its subscriptions (XO 5.113+, xo-api.md §4).

A client opens the stream and gets `event: init` with its subscriber id, then `event: ping` with
`{"ping": <ms>}` every 30 s. It subscribes with `POST /rest/v0/events/<id>/subscriptions`
`{"collection": "VM", "fields": [...] | "*"}` (201 `{"id": "VM"}`) and unsubscribes with `DELETE
…/subscriptions/VM` (204). Each change of a subscribed type then comes as `event: add|update|remove` with
`data: {"$subscription": "VM", …fields…}`: the new object, or for a removal the object as it was (XO's
collection index hands listeners the previous object). The `task` collection is XO's own tasks, not XAPI's
`task` objects: the simulator runs none, so it sends none. With a field list, an update that changed none of
those fields is not sent. An unknown subscriber id is XO's `no such event <id>` (404).

Authentication is the REST API's (cookie, or Basic). Answers are not compressed: an event stream must
reach the client as each event is written. With `--legacy` the route does not exist (the pre-5.111 router
had none) and the REST app answers its HTML 404. Streams end when the simulator stops, and with the
`/_sim/close-websockets` knob (they register with the model as sockets do).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio

from xofs.sim.model import SimError, SimModel, TooFastError
from xofs.sim.rest_auth import Authenticator, invalid_credentials
from xofs.sim.rest_http import (
    SECURITY_HEADERS,
    Receive,
    Request,
    RestError,
    Scope,
    Send,
    raw_headers,
    send_empty,
    send_error,
    send_json,
    tail_headers,
)
from xofs.sim.rest_params import ParamErrors

log = logging.getLogger(__name__)

PREFIX = "/rest/v0/events"
PING_INTERVAL = 30.0
# XoListenerType: every XO object type, plus `alarm` and `task`.
LISTENER_TYPES = frozenset({
    "VM", "VM-snapshot", "VM-template", "VM-controller", "VDI", "VDI-snapshot", "VDI-unmanaged", "VBD", "VIF",
    "SR", "PBD", "host", "pool", "network", "PIF", "PCI", "PGPU", "GPU-group", "SM", "VTPM", "VUSB", "USB",
    "PUSB", "message", "gpuGroup", "host-patch", "pool-patch", "alarm", "task",
})
_SUBSCRIPTIONS = re.compile(rf"^{PREFIX}/(?P<sub>[^/]+)/subscriptions(?:/(?P<coll>[^/]+))?/?$", re.IGNORECASE)


@dataclass
class _Subscriber:
    id: str
    user_id: str
    fields: dict[str, list[str] | str] = field(default_factory=dict)  # subscribed type -> fields or "*"


class SseApp:
    """ASGI app for every path under `/rest/v0/events`; anything it does not serve goes to `fallback`."""

    def __init__(self, model: SimModel, fallback: Any) -> None:
        self.model = model
        self.fallback = fallback
        self.auth = Authenticator(model)
        self.subscribers: dict[str, _Subscriber] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = Request(scope, receive)
        path = req.raw_path.rstrip("/") or "/"
        match = _SUBSCRIPTIONS.match(req.raw_path)
        route = ("stream" if path.lower() == PREFIX and req.method == "GET"
                 else "subscribe" if match and not match["coll"] and req.method == "POST"
                 else "unsubscribe" if match and match["coll"] and req.method == "DELETE" else None)
        if self.model.legacy or route is None:
            await self.fallback(scope, receive, send)
            return
        try:
            user = self.auth.authenticate(req)
            if user is None:
                raise invalid_credentials()
            if route == "stream":
                await self.stream(req, send, user)
            elif route == "subscribe":
                assert match is not None
                await self.subscribe(req, send, match["sub"])
            else:
                assert match is not None
                self._subscriber(match["sub"]).fields.pop(match["coll"], None)
                await send_empty(req, send, 204)
        except RestError as error:
            await req.drain()
            await send_error(req, send, error)
        except SimError as error:
            await req.drain()
            await send_error(req, send, RestError(error.http_status, error.message, data=error.data))
        except (TooFastError, ValueError) as error:
            await req.drain()
            await send_error(req, send, RestError(500, str(error)))

    def _subscriber(self, sub_id: str) -> _Subscriber:
        subscriber = self.subscribers.get(sub_id)
        if subscriber is None:
            raise SimError.no_such_object(sub_id, "event")
        return subscriber

    async def subscribe(self, req: Request, send: Send, sub_id: str) -> None:
        subscriber = self._subscriber(sub_id)
        raw = await req.read_body()
        try:
            body = json.loads(raw) if raw.strip() else None
        except (UnicodeDecodeError, ValueError) as error:
            raise RestError(400, f"invalid JSON body: {error}") from error
        errors = ParamErrors()
        if not isinstance(body, dict):
            errors.add("body", "invalid object", body)
            errors.raise_if_any()
        assert isinstance(body, dict)
        collection = body.get("collection")
        if collection not in LISTENER_TYPES:
            errors.add("body.collection", "Value does not match any allowed schema", collection)
        fields = body.get("fields", "*")
        if fields != "*" and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
            errors.add("body.fields", "Value does not match any allowed schema", fields)
        errors.raise_if_any()
        subscriber.fields[collection] = fields
        await send_json(req, send, 201, {"id": collection})

    async def stream(self, req: Request, send: Send, user: dict[str, Any]) -> None:
        subscriber = _Subscriber(str(uuid.uuid4()), user["id"])
        self.subscribers[subscriber.id] = subscriber
        # Every object as the subscriber last saw it: a removal reports the object, an update is compared.
        known = dict(self.model.all_objects())
        batches = self.model.subscribe()
        headers = [*SECURITY_HEADERS, ("Content-Type", "text/event-stream"), ("Connection", "keep-alive"),
                   ("Cache-Control", "no-cache, no-transform")]
        await send({"type": "http.response.start", "status": 200,
                    "headers": raw_headers(headers + [h for h in tail_headers(req) if h[0] != "Connection"])})
        try:
            async with trio.open_nursery() as nursery:
                unregister = self.model.register_socket(nursery.cancel_scope.cancel)
                try:
                    nursery.start_soon(_until_disconnect, req, nursery.cancel_scope)
                    await _event(send, "init", {"id": subscriber.id})
                    nursery.start_soon(_ping, send)
                    async for kind, items in batches:
                        for frame in _frames(subscriber, known, kind, items):
                            await send({"type": "http.response.body", "body": frame, "more_body": True})
                    nursery.cancel_scope.cancel()  # dropped by the model: too far behind
                finally:
                    unregister()
        finally:
            del self.subscribers[subscriber.id]
            batches.close()
        try:
            await send({"type": "http.response.body", "body": b""})
        except Exception:  # noqa: BLE001 - the client is gone already
            pass


def _frames(subscriber: _Subscriber, known: dict[str, dict], kind: str, items: dict[str, Any]) -> list[bytes]:
    """The SSE frames one `all`-style batch makes for this subscriber (and `known` brought up to date)."""
    frames = []
    for obj_id, value in items.items():
        previous = known.get(obj_id)
        if kind == "enter":
            known[obj_id] = value
            event, current = ("update" if previous is not None else "add"), value
        elif previous is not None:
            del known[obj_id]
            event, current = "remove", previous
        else:
            continue
        type_ = current.get("type")
        # A `task` subscription listens to XO's own tasks (`xoApp.tasks`), which the simulator does not run;
        # XAPI's `task` objects reach no subscriber.
        fields = subscriber.fields.get(type_) if type_ != "task" else None
        if fields is None:
            continue
        data = current
        if fields != "*":
            data = _pick(current, fields)
            if event == "update" and previous is not None and data == _pick(previous, fields):
                continue  # no change the subscriber can see
        frames.append(_frame(event, {"$subscription": type_, **data}))
    return frames


def _pick(obj: dict[str, Any], fields: list[str] | str) -> dict[str, Any]:
    return {k: obj[k] for k in fields if k in obj}


def _frame(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _event(send: Send, event: str, data: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": _frame(event, data), "more_body": True})


async def _ping(send: Send) -> None:
    while True:
        await trio.sleep(PING_INTERVAL)
        await _event(send, "ping", {"ping": int(time.time() * 1000)})


async def _until_disconnect(req: Request, scope: trio.CancelScope) -> None:
    await req.wait_disconnect()
    scope.cancel()
