"""xofs.client.events: the JSON-RPC event feed, against `xofs sim` and against a small local websocket fake for
what the simulator does not do on purpose (garbage frames, a silent socket, refused reconnections)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket

from tests.support import SimProcess
from xofs.client.events import EventFeed, ws_url
from xofs.client.rest import RestClient
from xofs.errors import XoAuthError, XoError, XoNotFound, XoUnreachable

GOOD = "good-token"
USER = {"id": "0c7f0d5e", "email": "admin@admin.net", "groups": [], "permission": "admin", "preferences": {}}


class Sink:
    """Records every call, in order, and fails the test if two of them ever overlap."""

    def __init__(self, resync_hook: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.log: list[tuple] = []
        self.quiet: list[float] = []  # each feed_state's quiet_for
        self.resyncs = 0
        self._busy = False
        self._hook = resync_hook

    async def resync(self) -> None:
        assert not self._busy, "sink called concurrently"
        self._busy = True
        self.resyncs += 1
        self.log.append(("resync",))
        try:
            if self._hook is not None:
                await self._hook(self.resyncs)
        finally:
            self._busy = False
        self.log.append(("resynced",))

    def apply(self, kind: str, items: dict) -> None:
        assert not self._busy, "apply() during resync()"
        self.log.append(("apply", kind, items))

    def feed_state(self, state: str, detail: str = "", quiet_for: float = 0.0) -> None:
        assert not self._busy, "feed_state() during resync()"
        self.log.append(("state", state, detail))
        self.quiet.append(quiet_for)

    def session_failed(self, reason: str, refused: bool) -> None:
        self.log.append(("failed", reason))

    @property
    def states(self) -> list[str]:
        return [e[1] for e in self.log if e[0] == "state"]

    @property
    def applied(self) -> list[tuple[str, dict]]:
        return [(e[1], e[2]) for e in self.log if e[0] == "apply"]

    async def wait_for(self, predicate: Callable[[Sink], bool], timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while not predicate(self):
                await trio.sleep(0.01)


# --- a fake XO JSON-RPC websocket server ---

Behaviour = Callable[[WebSocketConnection, int], Awaitable[None]]


@dataclass
class FakeWs:
    url: str = ""
    paths: list[str] = field(default_factory=list)
    received: list[dict] = field(default_factory=list)


async def start_fake_ws(nursery: trio.Nursery, behave: Behaviour,
                        reject: Callable[[int], bool] = lambda n: False) -> FakeWs:
    """Run `behave(ws, n)` for the n-th connection (n from 0), or refuse it with a 503 when `reject(n)`."""
    fake = FakeWs()

    async def handler(request: WebSocketRequest) -> None:
        n = len(fake.paths)
        fake.paths.append(request.path)
        if reject(n):
            await request.reject(503)
            return
        await behave(await request.accept(), n)

    server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", 0, None))
    fake.url = f"http://127.0.0.1:{server.port}"
    return fake


def frame(method: str, params: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params})


async def serve_rpc(fake: FakeWs, ws: WebSocketConnection, *, token: str = GOOD, answer_keepalive: bool = True,
                    after_sign_in: Callable[[], Awaitable[None]] | None = None,
                    answers: dict[str, Any] | None = None) -> None:
    """Answer like XO: session.signIn (code 3 for a bad token), system.getServerVersion, `answers`."""
    try:
        while True:
            message = json.loads(await ws.get_message())
            fake.received.append(message)
            method, call_id = message["method"], message["id"]
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": call_id}
            if method == "session.signIn":
                if message["params"].get("token") == token:
                    reply["result"] = USER
                else:
                    reply["error"] = {"code": 3, "message": "invalid credentials"}
            elif method == "system.getServerVersion":
                if not answer_keepalive:
                    continue
                reply["result"] = "5.207.2"
            elif answers and method in answers:
                value = answers[method]
                if value is None:
                    continue  # never answered
                reply.update(value)
            else:
                reply["error"] = {"code": -32601, "message": f"method not found: {method}", "data": method}
            await ws.send_message(json.dumps(reply))
            if method == "session.signIn" and "result" in reply and after_sign_in is not None:
                await after_sign_in()
    except Exception:  # the client went away: this connection is over
        return


# --- fake server tests ---


def test_ws_url_is_exactly_slash_api_slash():
    assert ws_url("http://xo.lan") == "ws://xo.lan/api/"
    assert ws_url("https://xo.lan:8443/") == "wss://xo.lan:8443/api/"
    assert ws_url("HTTPS://xo.lan:8443/") == "wss://xo.lan:8443/api/"  # it took the mount down (helper 44)
    assert ws_url("https://proxy.lan/xo") == "wss://proxy.lan/xo/api/"
    with pytest.raises(ValueError):
        ws_url("xo.lan")


async def test_signs_in_on_slash_api_and_calls_work(nursery):
    fake = await start_fake_ws(nursery, lambda ws, n: serve_rpc(fake, ws, answers={
        "vm.missing": {"error": {"code": 1, "message": "no such VM x", "data": {"id": "x", "type": "VM"}}}}))
    sink = Sink()
    feed = EventFeed(fake.url, GOOD, sink)
    with pytest.raises(XoUnreachable):
        await feed.call("system.getServerVersion")  # not connected yet
    await nursery.start(feed.run)
    assert fake.paths == ["/api/"]
    first = fake.received[0]
    assert first["jsonrpc"] == "2.0" and first["method"] == "session.signIn"
    assert first["params"] == {"token": GOOD} and isinstance(first["id"], int)
    assert sink.log == [("state", "connecting", ""), ("resync",), ("resynced",), ("state", "connected", "")]
    assert await feed.call("system.getServerVersion") == "5.207.2"
    with pytest.raises(XoNotFound, match="no such VM x"):
        await feed.call("vm.missing", {"id": "x"})
    with pytest.raises(XoError) as info:
        await feed.call("no.such.method")
    assert info.value.code == -32601
    ids = [m["id"] for m in fake.received]
    assert len(set(ids)) == len(ids)
    nursery.cancel_scope.cancel()


async def test_notifications_during_resync_are_applied_after_it_in_order(nursery):
    sent = trio.Event()
    live: list[WebSocketConnection] = []

    async def burst() -> None:
        ws = live[0]
        await ws.send_message(frame("all", {"type": "enter", "items": {"a": {"id": "a", "type": "VM", "v": 1}}}))
        await ws.send_message(frame("all", {"type": "exit", "items": {"b": 0}}))
        await ws.send_message(frame("all", {"type": "enter", "items": {"a": {"id": "a", "type": "VM", "v": 2}}}))
        sent.set()

    async def behave(ws: WebSocketConnection, n: int) -> None:
        live.append(ws)
        await serve_rpc(fake, ws, after_sign_in=burst)

    async def slow_resync(n: int) -> None:
        await sent.wait()
        await trio.sleep(0.2)  # the burst is surely queued on the client by now

    fake = await start_fake_ws(nursery, behave)
    sink = Sink(slow_resync)
    feed = EventFeed(fake.url, GOOD, sink)
    await nursery.start(feed.run)
    assert sink.log == [
        ("state", "connecting", ""), ("resync",), ("resynced",),
        ("apply", "enter", {"a": {"id": "a", "type": "VM", "v": 1}}),
        ("apply", "exit", {"b": 0}),
        ("apply", "enter", {"a": {"id": "a", "type": "VM", "v": 2}}),
        ("state", "connected", ""),
    ]
    await live[0].send_message(frame("all", {"type": "exit", "items": {"a": 0}}))
    await sink.wait_for(lambda s: s.applied[-1] == ("exit", {"a": 0}))
    nursery.cancel_scope.cancel()


async def test_bad_frames_are_skipped_and_the_feed_stays_up(nursery, caplog):
    live: list[WebSocketConnection] = []

    async def behave(ws: WebSocketConnection, n: int) -> None:
        live.append(ws)
        await serve_rpc(fake, ws)

    fake = await start_fake_ws(nursery, behave)
    sink = Sink()
    feed = EventFeed(fake.url, GOOD, sink)
    await nursery.start(feed.run)
    ws = live[0]
    for garbage in [
        "this is not JSON", b"\x00\x01\x02binary", "[1, 2, 3]", "42",
        frame("someOtherNotification", {"x": 1}),
        frame("all", ["enter"]),
        frame("all", {"type": "update", "items": {"a": {}}}),
        frame("all", {"type": "enter", "items": "a"}),
        frame("all", {"type": "enter"}),
        json.dumps({"jsonrpc": "2.0", "id": 999999, "result": "nobody asked"}),
        json.dumps({"jsonrpc": "2.0", "id": [1], "result": "unhashable id"}),
        frame("all", {"type": "enter", "items": {"good": {"id": "good", "type": "VDI"}, "bad": 5}}),
        frame("all", {"type": "exit", "items": {"gone": 0}}),
    ]:
        await ws.send_message(garbage)
    await sink.wait_for(lambda s: len(s.applied) == 2)
    assert sink.applied == [("enter", {"good": {"id": "good", "type": "VDI"}}), ("exit", {"gone": 0})]
    assert await feed.call("system.getServerVersion") == "5.207.2"
    assert sink.states == ["connecting", "connected"]
    assert len(fake.paths) == 1
    nursery.cancel_scope.cancel()


async def test_silent_socket_is_detected_by_keepalive_then_reconnects(nursery):
    async def behave(ws: WebSocketConnection, n: int) -> None:
        await serve_rpc(fake, ws, answer_keepalive=n > 0)

    fake = await start_fake_ws(nursery, behave)
    sink = Sink()
    feed = EventFeed(fake.url, GOOD, sink, keepalive=0.3, backoff=(0.05, 0.2))
    await nursery.start(feed.run)
    await sink.wait_for(lambda s: s.states == ["connecting", "connected", "disconnected", "connected"])
    detail = next(e[2] for e in sink.log if e[:2] == ("state", "disconnected"))
    assert "keepalive" in detail
    assert sink.quiet[sink.states.index("disconnected")] == 0.3  # silent since the unanswered call at least
    assert sink.resyncs == 2 and len(fake.paths) == 2
    await trio.sleep(1)  # the second connection answers its keepalives: it stays up
    assert sink.states[-1] == "connected" and len(fake.paths) == 2
    nursery.cancel_scope.cancel()


async def test_drop_reports_disconnected_once_and_retries_until_back(nursery):
    async def behave(ws: WebSocketConnection, n: int) -> None:
        if n == 0:
            await serve_rpc(fake, ws, after_sign_in=partial(close_soon, ws))
        elif n == 3:
            await serve_rpc(fake, ws, token="another-token")  # refuses our sign-in
        else:
            await serve_rpc(fake, ws)

    async def close_soon(ws: WebSocketConnection) -> None:
        await trio.sleep(0.2)
        await ws.aclose(1001, "going away")

    async def resync(n: int) -> None:
        if n == 2:  # like a sink reading several collections at once, and XO failing on some
            raise ExceptionGroup("resync", [XoUnreachable("cannot reach XO: connection refused")])

    fake = await start_fake_ws(nursery, behave, reject=lambda n: n in (1, 2))
    sink = Sink(resync)
    feed = EventFeed(fake.url, GOOD, sink, backoff=(0.05, 0.2))
    await nursery.start(feed.run)
    await sink.wait_for(lambda s: s.states[-1] == "connected" and s.resyncs == 3)
    assert sink.states == ["connecting", "connected", "disconnected", "connected"]
    detail = next(e[2] for e in sink.log if e[:2] == ("state", "disconnected"))
    assert "1001" in detail and "going away" in detail
    # connections: 0 live, 1-2 refused upgrades, 3 refused sign-in, 4 resync failed, 5 live
    assert len(fake.paths) == 6 and set(fake.paths) == {"/api/"}
    assert await feed.call("system.getServerVersion") == "5.207.2"
    nursery.cancel_scope.cancel()


async def test_first_sign_in_refused_raises_auth_error(nursery):
    fake = await start_fake_ws(nursery, lambda ws, n: serve_rpc(fake, ws))
    sink = Sink()
    feed = EventFeed(fake.url, "wrong-token", sink)
    with trio.fail_after(10), pytest.raises(XoAuthError, match="invalid credentials"):
        await nursery.start(feed.run)
    assert sink.resyncs == 0 and len(fake.paths) == 1


async def test_pending_call_fails_when_the_connection_drops(nursery):
    live: list[WebSocketConnection] = []

    async def behave(ws: WebSocketConnection, n: int) -> None:
        live.append(ws)
        await serve_rpc(fake, ws, answers={"never.answered": None})

    fake = await start_fake_ws(nursery, behave)
    feed = EventFeed(fake.url, GOOD, Sink(), backoff=(5, 5))
    await nursery.start(feed.run)

    async def close_later() -> None:
        await trio.sleep(0.2)
        await live[0].aclose()

    nursery.start_soon(close_later)
    with trio.fail_after(5), pytest.raises(XoUnreachable):
        await feed.call("never.answered")
    nursery.cancel_scope.cancel()


async def test_a_server_that_completes_the_upgrade_after_a_stall_does_not_hang_the_feed(nursery):
    """trio-websocket's connect_timeout fired, but the connection it went on making after a stalled XO
    came back held the feed for ever: no reconnection, the mount's listings frozen."""
    fake = await start_fake_ws(nursery, lambda ws, n: serve_rpc(fake, ws))
    upstream_port = int(fake.url.rsplit(":", 1)[1])
    connections = []

    async def stalling_proxy(client: trio.SocketStream) -> None:
        n = len(connections)
        connections.append(n)
        async with client, await trio.open_tcp_stream("127.0.0.1", upstream_port) as server:
            request = await client.receive_some()
            if n == 0:
                await trio.sleep(2.5)  # XO stalls (SIGSTOP, a long GC), then completes the upgrade
            await server.send_all(request)

            async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await a.receive_some():
                        await b.send_all(data)

            async with trio.open_nursery() as pumps:
                pumps.start_soon(pump, client, server)
                pumps.start_soon(pump, server, client)

    listeners = await nursery.start(partial(trio.serve_tcp, stalling_proxy, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    sink = Sink()
    feed = EventFeed(f"http://127.0.0.1:{port}", GOOD, sink, connect_timeout=0.5, backoff=(0.05, 0.2))
    with trio.fail_after(10):
        await nursery.start(feed.run)
    assert len(connections) >= 2 and sink.states[-1] == "connected"
    assert ("failed", "timed out connecting after 0.5 s") in sink.log, sink.log
    nursery.cancel_scope.cancel()


# --- against the simulator ---


class RestSink(Sink):
    """A sink whose resync really reads XO, as the daemon's does."""

    def __init__(self, client: RestClient) -> None:
        super().__init__(self._read)
        self.client = client
        self.vdis: dict[str, dict] = {}

    async def _read(self, n: int) -> None:
        self.vdis = {v["id"]: v for v in await self.client.collection("vdis")}


async def start_sim_feed(nursery: trio.Nursery, sim: SimProcess, **kwargs: Any) -> tuple[EventFeed, RestSink]:
    client = RestClient(sim.url, sim.token)
    sink = RestSink(client)
    feed = EventFeed(sim.url, sim.token, sink, **kwargs)
    with trio.fail_after(20):
        await nursery.start(feed.run)
    return feed, sink


def entered(sink: Sink, obj_id: str) -> list[dict]:
    return [items[obj_id] for kind, items in sink.applied if kind == "enter" and obj_id in items]


async def test_sim_rename_arrives_as_enter_and_delete_as_exit(nursery, fresh_sim):
    feed, sink = await start_sim_feed(nursery, fresh_sim)
    assert sink.vdis and sink.states == ["connecting", "connected"]
    vdi_id = next(i for i, v in sink.vdis.items() if not v["$VBDs"])  # deleting an attached one is VDI_IN_USE
    await sink.client.patch("vdis", vdi_id, {"name_label": "renamed-by-event-test"})
    await sink.wait_for(lambda s: any(o.get("name_label") == "renamed-by-event-test" for o in entered(s, vdi_id)))
    update = entered(sink, vdi_id)[-1]
    assert update["id"] == vdi_id and update["type"] == "VDI"
    await sink.client.delete("vdis", vdi_id)
    await sink.wait_for(lambda s: ("exit", vdi_id) in [(k, i) for k, items in s.applied for i in items])
    exit_items = next(items for kind, items in sink.applied if kind == "exit" and vdi_id in items)
    assert exit_items[vdi_id] == 0
    assert isinstance(await feed.call("system.getServerVersion"), str)
    await sink.client.aclose()
    nursery.cancel_scope.cancel()


async def test_sim_closed_websockets_reconnect_and_resync(nursery, fresh_sim):
    feed, sink = await start_sim_feed(nursery, fresh_sim, backoff=(0.1, 1))
    assert sink.resyncs == 1
    status, _, body = fresh_sim.request("POST", "/_sim/close-websockets", b"{}",
                                        {"Content-Type": "application/json"})
    assert status in (200, 204), body
    await sink.wait_for(lambda s: s.states == ["connecting", "connected", "disconnected", "connected"])
    assert sink.resyncs == 2
    # and the new socket is live: a change made now arrives
    vdi_id = next(iter(sink.vdis))
    await sink.client.patch("vdis", vdi_id, {"name_label": "after-reconnect"})
    await sink.wait_for(lambda s: any(o.get("name_label") == "after-reconnect" for o in entered(s, vdi_id)))
    await sink.client.aclose()
    nursery.cancel_scope.cancel()


async def test_sim_silent_socket_is_found_within_twice_a_short_keepalive(nursery, fresh_sim):
    """`--keepalive 1`: a socket that goes silent (the simulator's `silent_websockets`: no answers, no events) is
    dropped within about 2 s; once XO answers again the feed reconnects and re-reads what changed meanwhile."""
    keepalive = 1.0
    feed, sink = await start_sim_feed(nursery, fresh_sim, keepalive=keepalive, backoff=(0.1, 0.3),
                                      connect_timeout=1)
    vdi_id = next(iter(sink.vdis))
    await sink.client.patch("vdis", vdi_id, {"name_label": "before-the-silence"})
    await sink.wait_for(lambda s: any(o.get("name_label") == "before-the-silence" for o in entered(s, vdi_id)))
    set_silent(fresh_sim, True)
    silent_since = trio.current_time()
    await sink.client.patch("vdis", vdi_id, {"name_label": "during-the-silence"})  # its event is never sent
    await sink.wait_for(lambda s: "disconnected" in s.states, timeout=4 * keepalive)
    detected = trio.current_time() - silent_since
    assert detected <= 2 * keepalive + 0.5, f"a silent socket found after {detected:.2f} s"
    detail = next(e[2] for e in sink.log if e[:2] == ("state", "disconnected"))
    assert detail == "no answer to the keepalive call within 1 s"
    assert not any(o.get("name_label") == "during-the-silence" for o in entered(sink, vdi_id))
    set_silent(fresh_sim, False)
    await sink.wait_for(lambda s: s.states == ["connecting", "connected", "disconnected", "connected"])
    assert sink.resyncs == 2 and sink.vdis[vdi_id]["name_label"] == "during-the-silence"
    await sink.client.aclose()
    nursery.cancel_scope.cancel()


def set_silent(sim: SimProcess, silent: bool) -> None:
    status, _, body = sim.request("POST", "/_sim/faults", json.dumps({"silent_websockets": silent}).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 200, body


async def test_sim_refused_sign_in_raises_auth_error(nursery, sim):
    sink = Sink()
    feed = EventFeed(sim.url, "not-the-token-" + "x" * 29, sink)
    with trio.fail_after(20), pytest.raises(XoAuthError):
        await nursery.start(feed.run)
    assert sink.resyncs == 0


async def test_sim_expired_token_drops_the_socket_and_sign_in_is_retried(nursery, fresh_sim):
    feed, sink = await start_sim_feed(nursery, fresh_sim, keepalive=0.3, backoff=(0.1, 0.3))
    status, _, body = fresh_sim.request("POST", "/_sim/expire-token", json.dumps({"token": fresh_sim.token}).encode(),
                                        {"Content-Type": "application/json"})
    assert status == 204, body
    await sink.wait_for(lambda s: "disconnected" in s.states)
    await trio.sleep(1.5)  # several refused sign-ins later: still one "disconnected", and no crash
    assert sink.states == ["connecting", "connected", "disconnected"]
    with pytest.raises(XoUnreachable):
        await feed.call("system.getServerVersion")
    await sink.client.aclose()
    nursery.cancel_scope.cancel()
