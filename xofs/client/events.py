"""XO's change feed: the JSON-RPC websocket at `/api/`, its `all` notifications, and reconnection.

XO sends nothing before `session.signIn` and never an initial snapshot (xo-api.md §4), so every (re)connect
goes: connect, sign in, let the sink re-read everything (`resync`) while notifications queue up, apply the
queue in arrival order, then apply notifications as they come. A notification carries whole objects
(`enter`: added or changed) or ids (`exit`: gone), so replaying those that raced with the re-read is
harmless. XO has no heartbeat: a cheap call every `keepalive` seconds notices a silent socket. Reconnecting
with backoff, and going live, are `xofs.client.reconnect`'s, shared with the SSE feed.

One task applies everything, so the sink's methods are never called concurrently with each other.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import ssl
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from xofs.client.auth import sign_in_params, ssl_context
from xofs.client.reconnect import EventSink, Reconnector, SessionEnded
from xofs.errors import (
    XoAuthError,
    XoError,
    XofsError,
    XoUnreachable,
    describe_connection_error,
    xo_error_from_rpc,
    xofs_error_in,
)

log = logging.getLogger(__name__)

API_PATH = "/api/"  # xo-server upgrades only this exact path
MAX_MESSAGE = 256 << 20  # connecting a pool sends all its objects in one `all` frame
RECEIVE_BUFFER = 256 << 10
DISCONNECT_TIMEOUT = 2.0
CONNECT_GRACE = 1.0  # seconds past connect_timeout before our own deadline cancels a connect that hangs


class _PendingCall:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.message: dict | None = None
        self.error: XofsError | None = None


class EventFeed:
    """Keeps a signed-in JSON-RPC socket to XO and feeds its notifications to an `EventSink`."""

    def __init__(self, base_url: str, token: str, sink: EventSink, *, keepalive: float = 30,
                 backoff: tuple[float, float] = (0.5, 30), verify: bool | str = True,
                 connect_timeout: float = 10) -> None:
        self.url = ws_url(base_url)
        self._token = token
        self._sink = sink
        self._keepalive = keepalive
        self._reconnector = Reconnector(sink, log, f"XO event feed {self.url}", backoff)
        self._ssl = ssl_context(verify) if self.url.startswith("wss:") else None
        self._connect_timeout = connect_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _PendingCall] = {}
        self._live: WebSocketConnection | None = None  # set while signed in
        self._drop_reason: str | None = None
        self._drop_quiet = 0.0  # how long the socket had been silent when it was taken for lost
        self._session_scope: trio.CancelScope | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: stay connected and signed in, reconnecting with exponential backoff and jitter.

        `task_status.started()` comes after the first sign-in and resync. A refused first sign-in raises
        `XoAuthError` (bad credentials do not get better by retrying); later refusals are retried.
        """
        await self._reconnector.run(self._session, fatal=(XoAuthError,), task_status=task_status)

    async def call(self, method: str, params: dict | None = None) -> Any:
        """One JSON-RPC call on the live socket; `XoUnreachable` when there is none or it drops meanwhile."""
        ws = self._live
        if ws is None:
            raise XoUnreachable(f"no live XO event connection ({self.url}) for {method}")
        return await self._call_on(ws, method, params)

    # --- one connection ---

    async def _session(self) -> None:
        """Connect, sign in, resync, then apply notifications until the connection is lost (raises
        `SessionEnded`, or `XoAuthError` for a refused sign-in: fatal at the first start only)."""
        self._drop_reason, self._drop_quiet = None, 0.0
        refused: XoAuthError | None = None
        queue_in, queue_out = trio.open_memory_channel[tuple[str, dict]](math.inf)
        # trio-websocket's own connect_timeout fires, but its nursery then waits for its reader task, which a
        # server that completes the upgrade late (after a stall) keeps alive for ever: a deadline of ours
        # around the connecting, lifted once connected, cancels all of it.
        connecting = trio.CancelScope(deadline=trio.current_time() + self._connect_timeout + CONNECT_GRACE)
        try:
            with connecting:
                async with trio_websocket.open_websocket_url(
                        self.url, self._ssl, max_message_size=MAX_MESSAGE, receive_buffer_size=RECEIVE_BUFFER,
                        connect_timeout=self._connect_timeout, disconnect_timeout=DISCONNECT_TIMEOUT) as ws:
                    connecting.deadline = math.inf
                    refused = await self._signed_in(ws, queue_in, queue_out)
            if connecting.cancelled_caught:
                self._lose(f"timed out connecting after {self._connect_timeout:g} s")
        except (HandshakeError, OSError, trio.BrokenResourceError) as exc:
            reason = handshake_reason(exc, self._connect_timeout)
            if isinstance(exc, trio_websocket.ConnectionTimeout) and self._ssl is not None:
                reason = await tls_failure(self.url, self._ssl, self._connect_timeout) or reason
            self._lose(reason)
        finally:
            self._live = None
            self._session_scope = None
            self._fail_pending(self._drop_reason or "connection closed")
        if refused is not None:
            raise refused
        raise SessionEnded(self._drop_reason or "connection closed", self._drop_quiet)

    async def _signed_in(self, ws: WebSocketConnection, queue_in: trio.MemorySendChannel[tuple[str, dict]],
                         queue_out: trio.MemoryReceiveChannel[tuple[str, dict]]) -> XoAuthError | None:
        """Sign in, resync, follow: until the connection is lost; the refusal of the sign-in, if that is how
        it ended. XO failures never raise out of this nursery (they would come out wrapped in an exception
        group): every way the session ends goes through _lose(); only bugs propagate."""
        async with trio.open_nursery() as nursery:
            self._session_scope = nursery.cancel_scope
            nursery.start_soon(self._read_frames, ws, queue_in)
            try:
                await self._sign_in(ws)
                nursery.start_soon(self._keep_alive, ws)
                await self._sink.resync()
            except Exception as exc:  # re-raised below unless XO is what failed
                err = xofs_error_in(exc)
                if err is None:
                    raise
                self._lose(err.describe())
                return err if isinstance(err, XoAuthError) else None
            await self._reconnector.follow(queue_out)
        return None

    async def _sign_in(self, ws: WebSocketConnection) -> None:
        with trio.move_on_after(self._connect_timeout) as scope:
            user = await self._call_on(ws, "session.signIn", sign_in_params(self._token))
        if scope.cancelled_caught:
            raise XoUnreachable(f"no answer to session.signIn within {self._connect_timeout:g} s")
        who = (user.get("email") or user.get("id")) if isinstance(user, dict) else user
        log.info("XO event feed %s: signed in as %s", self.url, who)
        self._live = ws

    async def _keep_alive(self, ws: WebSocketConnection) -> None:
        """Every `keepalive` s a call that needs no auth; no answer within `keepalive` s: a dead link."""
        while True:
            await trio.sleep(self._keepalive)
            with trio.move_on_after(self._keepalive) as scope:
                try:
                    await self._call_on(ws, "system.getServerVersion")
                except XoError:
                    pass  # an answer, even an error, proves the link is alive
            if scope.cancelled_caught:
                # Silent since the call at least: the changes made meanwhile are unknown since then.
                self._lose(f"no answer to the keepalive call within {self._keepalive:g} s", self._keepalive)
                return

    async def _read_frames(self, ws: WebSocketConnection,
                           queue: trio.MemorySendChannel[tuple[str, dict]]) -> None:
        try:
            while True:
                self._dispatch(await ws.get_message(), queue)
        except ConnectionClosed as exc:
            reason = exc.reason
            detail = f" ({reason.code} {reason.name}{': ' + reason.reason if reason.reason else ''})" \
                if reason else ""
            self._lose(f"websocket closed{detail}")

    def _lose(self, reason: str, quiet_for: float = 0.0) -> None:
        """Record why the session ends (the first reason wins) and end it."""
        if self._drop_reason is None:
            self._drop_reason, self._drop_quiet = reason, quiet_for
        self._live = None
        if self._session_scope is not None:
            self._session_scope.cancel()

    # --- JSON-RPC ---

    async def _call_on(self, ws: WebSocketConnection, method: str, params: dict | None = None) -> Any:
        call_id = next(self._ids)
        pending = self._pending[call_id] = _PendingCall()
        message = {"jsonrpc": "2.0", "id": call_id, "method": method, "params": params or {}}
        try:
            await ws.send_message(json.dumps(message))
            await pending.done.wait()
        except ConnectionClosed as exc:
            raise XoUnreachable(f"XO event connection closed during {method}") from exc
        finally:
            del self._pending[call_id]
        if pending.error is not None:
            raise pending.error
        answer = pending.message or {}
        if "error" in answer:
            raise xo_error_from_rpc(answer["error"], method=method)
        return answer.get("result")

    def _fail_pending(self, reason: str) -> None:
        for pending in self._pending.values():
            pending.error = XoUnreachable(f"XO event connection lost: {reason}")
            pending.done.set()

    def _dispatch(self, frame: str | bytes, queue: trio.MemorySendChannel[tuple[str, dict]]) -> None:
        """Route a frame: an answer to its caller, an `all` notification to the queue, the rest to the log."""
        try:
            message = json.loads(frame)
        except ValueError:
            log.warning("XO event feed: skipping a frame that is not JSON: %.200r", frame)
            return
        if not isinstance(message, dict):
            log.warning("XO event feed: skipping a frame that is not an object: %.200r", frame)
        elif "method" in message and "id" not in message:
            if message["method"] == "all":
                notification = _all_notification(message.get("params"))
                if notification is not None:
                    queue.send_nowait(notification)
            else:
                log.debug("XO event feed: ignoring notification %.100r", message["method"])
        elif isinstance(message.get("id"), int) and message["id"] in self._pending \
                and ("result" in message or "error" in message):
            pending = self._pending[message["id"]]
            pending.message = message
            pending.done.set()
        else:
            log.warning("XO event feed: skipping an unexpected frame: %.200r", frame)


def ws_url(base_url: str) -> str:
    """The JSON-RPC socket URL of an XO: http(s)://host[:port][/prefix] -> ws(s)://host[:port][/prefix]/api/."""
    base = base_url.rstrip("/")
    scheme, sep, rest = base.partition("://")
    scheme = scheme.lower()  # `HTTPS://xo` is a URL like any other (RFC 3986 §3.1)
    if not sep or scheme not in ("http", "https", "ws", "wss"):
        raise ValueError(f"not an http(s) URL: {base_url!r}")
    scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    return f"{scheme}://{rest}{API_PATH}"


def _all_notification(params: Any) -> tuple[str, dict] | None:
    """`(kind, items)` of a well-formed `all` notification; None (and a log line) otherwise.

    Within a usable frame, an `enter` item that is not an object is dropped on its own.
    """
    if not isinstance(params, dict) or params.get("type") not in ("enter", "exit") \
            or not isinstance(params.get("items"), dict):
        log.warning("XO event feed: skipping an `all` notification of unexpected shape: %.200r", params)
        return None
    kind, items = params["type"], params["items"]
    if kind == "enter":
        bad = [k for k, v in items.items() if not isinstance(v, dict)]
        for key in bad:
            log.warning("XO event feed: skipping entered item %.60r, not an object: %.100r", key, items[key])
        items = {k: v for k, v in items.items() if k not in bad}
    return (kind, items) if items else None



async def tls_failure(url: str, ctx: ssl.SSLContext, timeout: float) -> str | None:
    """Why a TLS handshake with the host of `url` fails, if it does: trio-websocket turns a certificate it
    refuses into a connect timeout (a certificate changed on XO looked like a firewall), so it is asked
    again here, for the words."""
    parts = urlsplit(url)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_ssl_over_tcp_stream(parts.hostname or "", parts.port or 443, ssl_context=ctx)
            try:
                await stream.do_handshake()
            finally:
                await stream.aclose()
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        words = describe_connection_error(exc)
        return words if "TLS" in words else None
    return None


def handshake_reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return f"timed out connecting after {timeout:g} s"
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"websocket upgrade refused with HTTP {exc.status_code}"
    if isinstance(exc, trio_websocket.DisconnectionTimeout):
        return "connection closed (close handshake timed out)"
    return describe_connection_error(exc)
