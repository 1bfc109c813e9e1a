"""Helpers for the simulator's REST tests: raw HTTP answers (headers in wire order, framing) and the
recordings of the real xo-server they are compared with (`shared/reference/real-xo/`)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import SimProcess

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "real-xo"
if not REFERENCE.exists():  # a checkout outside /work (a git worktree elsewhere)
    REFERENCE = Path("/work/shared/reference/real-xo")
ADMIN = ("admin@admin.net", "admin")


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]  # in wire order, names as sent
    body: bytes
    complete: bool  # False when the connection dropped before the end of the body
    reason: str = ""  # the status line's reason phrase

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def names(self) -> list[str]:
        """Header names in wire order and case (`Date` included: only its value changes)."""
        return [k for k, _ in self.headers]

    @property
    def chunked(self) -> bool:
        return (self.header("Transfer-Encoding") or "").lower() == "chunked"

    def json(self) -> Any:
        return json.loads(self.body)


def call(sim: SimProcess, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, *, token: str | None = "default",
         timeout: float = 30.0, read_body: bool = True, limit: int | None = None) -> Answer:
    """One request on a fresh connection; never raises on an HTTP status or a cut body.

    With `read_body=False` the connection is closed once the headers are in (the body is left unread);
    with `limit`, once that many body bytes are in (`complete` is then False).
    """
    hdrs = dict(headers or {})
    if token == "default":
        token = sim.token
    if token is not None:
        hdrs.setdefault("Cookie", f"authenticationToken={token}")
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        headers_list = [(k, v) for k, v in resp.getheaders()]
        complete = True
        if not read_body:
            return Answer(resp.status, headers_list, b"", False, resp.reason)
        if limit is not None:
            return Answer(resp.status, headers_list, resp.read(limit), False, resp.reason)
        try:
            data = resp.read()
        except http.client.IncompleteRead as error:
            data, complete = error.partial, False
        return Answer(resp.status, headers_list, data, complete, resp.reason)
    finally:
        conn.close()


def raw_exchange(sim: SimProcess, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", sim.port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def recorded(name: str) -> tuple[dict[str, Any], bytes | None]:
    """A recorded exchange: its `.headers.json` and its `.body` (None if not stored)."""
    meta = json.loads((REFERENCE / f"{name}.headers.json").read_text())
    body_path = REFERENCE / f"{name}.body"
    return meta, body_path.read_bytes() if body_path.exists() else None


def recorded_names(meta: dict[str, Any]) -> list[str]:
    return [k for k, _ in meta["headers"]]


def recorded_header(meta: dict[str, Any], name: str) -> str | None:
    values = [v for k, v in meta["headers"] if k.lower() == name.lower()]
    return values[0] if values else None


def same_shape(a: Any, b: Any) -> bool:
    """Same JSON type and, for objects, the same keys with values of the same shapes (recursively)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_shape(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return True  # list lengths follow the inventory
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return True
    return type(a) is type(b)


def basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class EventWatcher:
    """A signed-in JSON-RPC socket that keeps every `all` notification it gets (see `watch_events`)."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def entered(self, predicate: Any) -> list[dict[str, Any]]:
        return [obj for f in self.frames if f["type"] == "enter" for obj in f["items"].values() if predicate(obj)]

    def exited(self) -> set[str]:
        return {i for f in self.frames if f["type"] == "exit" for i in f["items"]}


@asynccontextmanager
async def watch_events(sim: SimProcess) -> AsyncIterator[EventWatcher]:
    """Sign in over `/api/` with the sim's token and record the event frames while the block runs."""
    import trio
    from trio_websocket import open_websocket_url

    watcher = EventWatcher()
    async with open_websocket_url(sim.url.replace("http://", "ws://") + "/api/") as ws:
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session.signIn",
                                          "params": {"token": sim.token}}))
        while "result" not in json.loads(await ws.get_message()):
            pass

        async def read() -> None:
            while True:
                message = json.loads(await ws.get_message())
                if message.get("method") == "all":
                    watcher.frames.append(message["params"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            yield watcher
            await trio.sleep(0.5)  # let the last batches (finished tasks linger 0.2 s) arrive
            nursery.cancel_scope.cancel()
