"""XO's REST event stream (`GET /rest/v0/events`, XO 5.113 and later): an alternative to the JSON-RPC feed.

Used only when asked (`xofs mount --events sse`). Each (re)connect goes: open the stream, read `event: init`
and its subscriber id, subscribe to every type the cache keeps (`POST /rest/v0/events/<id>/subscriptions`
with `"fields": "*"`, so that `add` and `update` carry whole objects), let the sink re-read everything while
events queue up (the stream, like the socket, gives no snapshot), apply the queue, then apply events as
they come: `add` and `update` as an `enter` of the object (without XO's `$subscription` key), `remove` as an
`exit`. XO pings every 30 s and the client has no way to ask for a sign of life sooner, so a stream is taken
for dead after twice `keepalive` seconds of silence, as the socket is, but never less than 2.5 pings (75 s).

It drives the same `EventSink` as `xofs.client.events.EventFeed` and has the same `run()`, reconnecting with
exponential backoff (both through `xofs.client.reconnect`). A server without the route (404: XO before
5.113) raises `SseUnavailable` at the first start, so that the mount can fall back to the JSON-RPC feed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Iterable

import httpx
import trio

from xofs.client.auth import cookie_header, ssl_context
from xofs.client.reconnect import EventSink, Reconnector, SessionEnded
from xofs.errors import (
    XoAuthError,
    XofsError,
    XoProtocolError,
    xo_error_from_response,
    xo_unreachable,
    xofs_error_in,
)

log = logging.getLogger(__name__)

PING_INTERVAL = 30.0  # XO's
MIN_SILENCE = 2.5 * PING_INTERVAL  # a shorter bound would end a healthy stream between two pings


class SseUnavailable(XofsError):
    """The server has no REST event stream (an XO older than 5.113, or one behind a proxy that hides it)."""


class SseFeed:
    """Keeps an XO REST event stream open, subscribed to `types`, and feeds its events to an `EventSink`."""

    def __init__(self, base_url: str, token: str, sink: EventSink, *, types: Iterable[str],
                 verify: bool | str = True, connect_timeout: float = 10, keepalive: float = 30,
                 backoff: tuple[float, float] = (0.5, 30)) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/rest/v0/events"
        self._token = token
        self._sink = sink
        self._types = sorted(types)
        self._ssl = ssl_context(verify) if self.url.startswith("https:") else None
        self._timeout = httpx.Timeout(max(2 * keepalive, MIN_SILENCE), connect=connect_timeout)
        self._reconnector = Reconnector(sink, log, f"XO event stream {self.url}", backoff)
        self._end = ""  # why the current stream ended

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: stay subscribed, reconnecting with backoff. `task_status.started()` after the first resync.

        At the first start a refused token raises `XoAuthError` and a missing route `SseUnavailable`.
        """
        await self._reconnector.run(self._session, fatal=(XoAuthError, SseUnavailable), task_status=task_status)

    async def _session(self) -> None:
        headers = {"Cookie": cookie_header(self._token), "User-Agent": "xofs", "Accept": "text/event-stream",
                   "Accept-Encoding": "identity"}  # a compressed stream would arrive in bursts
        async with httpx.AsyncClient(headers=headers, timeout=self._timeout, verify=self._ssl or True,
                                     trust_env=False) as http:
            try:
                async with http.stream("GET", self.url) as resp:
                    if resp.status_code != 200:
                        await self._refusal(resp)
                    events = _parse(resp.aiter_lines())
                    sub_id = await self._init(events)
                    await self._follow(http, sub_id, events)
            except httpx.ReadTimeout:
                raise SessionEnded(f"no event nor ping for {self._timeout.read:g} s", self._timeout.read) from None
            except httpx.TransportError as exc:
                raise xo_unreachable(exc, self.url) from exc

    async def _refusal(self, resp: httpx.Response) -> None:
        body = await resp.aread()
        if resp.status_code == 404:
            raise SseUnavailable(f"GET {self.url} answered 404: this XO has no REST event stream (XO 5.113+)")
        raise xo_error_from_response(resp.status_code, body, url=self.url)

    async def _init(self, events: AsyncIterator[tuple[str, str]]) -> str:
        async for event, data in events:
            if event != "init":
                continue
            try:
                sub_id = json.loads(data)["id"]
            except (ValueError, KeyError, TypeError):
                sub_id = None
            if not isinstance(sub_id, str) or not sub_id:
                raise XoProtocolError(f"{self.url}: an init event without a subscriber id: {data[:200]!r}")
            return sub_id
        raise SessionEnded("the stream ended before its init event")

    async def _follow(self, http: httpx.AsyncClient, sub_id: str, events: AsyncIterator[tuple[str, str]]) -> None:
        """Subscribe, resync, then apply events until the stream ends (raises `SessionEnded` or the XO failure)."""
        self._end = "the server ended the stream"
        failure: XofsError | None = None
        queue_in, queue_out = trio.open_memory_channel[tuple[str, dict]](math.inf)
        # Failures are caught inside the nursery and raised after it, so that they do not come out wrapped
        # in an exception group.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, events, queue_in)
            try:
                await self._subscribe(http, sub_id)
                await self._sink.resync()
                await self._reconnector.follow(queue_out, f" ({len(self._types)} subscriptions)")
            except Exception as exc:  # re-raised below unless XO is what failed
                failure = xofs_error_in(exc)
                if failure is None:
                    raise
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        raise SessionEnded(self._end)

    async def _subscribe(self, http: httpx.AsyncClient, sub_id: str) -> None:
        for type_ in self._types:
            url = f"{self.url}/{sub_id}/subscriptions"
            try:
                resp = await http.post(url, json={"collection": type_, "fields": "*"})
            except httpx.TransportError as exc:
                raise xo_unreachable(exc, url) from exc
            if resp.status_code != 201:
                raise xo_error_from_response(resp.status_code, resp.content, url=url)

    async def _read(self, events: AsyncIterator[tuple[str, str]],
                    queue: trio.MemorySendChannel[tuple[str, dict]]) -> None:
        """Queue the stream's changes; the queue's end is the stream's, with the reason in `_end`."""
        async with queue:
            try:
                async for event, data in events:
                    change = _change(event, data)
                    if change is not None:
                        queue.send_nowait(change)
            except httpx.ReadTimeout:
                self._end = f"no event nor ping for {self._timeout.read:g} s"
            except httpx.TransportError as exc:
                self._end = xo_unreachable(exc, self.url).describe()


async def _parse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each Server-Sent Event: `event:` and `data:` lines, ended by a blank line."""
    event, data = "message", []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue  # a comment
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def _change(event: str, data: str) -> tuple[str, dict] | None:
    """An event as an `all`-style change, ("enter", {id: object}) or ("exit", {id: 0}); None to skip it."""
    if event not in ("add", "update", "remove"):
        return None  # ping, or something newer than this client
    try:
        obj = json.loads(data)
    except ValueError:
        log.warning("XO event stream: skipping a %s event that is not JSON: %.200r", event, data)
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        log.warning("XO event stream: skipping a %s event without an id: %.200r", event, data)
        return None
    obj.pop("$subscription", None)
    return ("exit", {obj["id"]: 0}) if event == "remove" else ("enter", {obj["id"]: obj})
