"""The event feed of a mount: which one runs, and starting it again when the token changes.

By default the JSON-RPC `all` feed (`xofs.client.events`); with `--events sse` XO's REST event stream
(`xofs.client.sse`), or, when the server has none (XO before 5.113), the JSON-RPC feed after one log line
saying so. A feed holds the token it signed in with, so when `Credentials` brings a new one (a rotation)
the running feed is stopped and a new one started; the `Syncer` sees a reconnection. A feed that loses its
connection, and every later session XO refuses the token of, also has the credentials' source read again
(cheap for files; at most once a minute for a Basic file), since an expired token is one reason for a lost
connection that only a new token cures, and the new token may be written after the old one stopped working.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from xofs.cache import KEPT_TYPES
from xofs.client.events import EventFeed
from xofs.client.reconnect import EventSink
from xofs.client.sse import SseFeed, SseUnavailable
from xofs.credentials import CredentialError, Credentials
from xofs.errors import TasksUnknown, XoAuthError, XofsError
from xofs.sync import Syncer

log = logging.getLogger(__name__)


class _FirstStart:
    """Passes the first `started()` of any feed on to the task status; later feeds start silently."""

    def __init__(self, task_status: trio.TaskStatus[None]) -> None:
        self._status: trio.TaskStatus[None] | None = task_status

    def started(self, value: None = None) -> None:
        if self._status is not None:
            status, self._status = self._status, None
            status.started(value)


class _Sink:
    """The syncer, as the feeds' sink; a lost connection also has the credentials checked."""

    def __init__(self, syncer: Syncer, on_lost: Callable[[], None]) -> None:
        self.syncer = syncer
        self.on_lost = on_lost

    async def resync(self) -> None:
        await self.syncer.resync()

    def apply(self, kind: str, items: dict) -> None:
        self.syncer.apply(kind, items)

    def feed_state(self, state: str, detail: str = "", quiet_for: float = 0.0) -> None:
        self.syncer.feed_state(state, detail, quiet_for)
        if state == "disconnected":
            self.on_lost()

    def session_failed(self, reason: str, refused: bool) -> None:
        if refused:  # at every refusal, not only the loss: the source may hold a new token by the next retry
            self.on_lost()


class FeedRunner:
    """Runs the mount's event feed for as long as the mount lives (`run`, started in its nursery)."""

    def __init__(self, kind: str, url: str, credentials: Credentials, syncer: Syncer, *,
                 verify: bool | str = True, connect_timeout: float = 10, keepalive: float = 30) -> None:
        self.kind = kind  # "jsonrpc" or "sse"; becomes "jsonrpc" if the server has no event stream
        self.url = url
        self.credentials = credentials
        self.sink: EventSink = _Sink(syncer, self._lost)
        self.verify = verify
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive  # seconds; see `EventFeed` and `SseFeed`
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._checking = False
        self._current: EventFeed | SseFeed | None = None
        credentials.listeners.append(self._rotated)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: run a feed; start a new one when the token changes. `started()` once the first is live.

        A feed only ends by raising (a refused first sign-in: `XoAuthError`, passed on) or by being
        cancelled here for a new token."""
        first = _FirstStart(task_status)
        refused: XoAuthError | None = None
        async with trio.open_nursery() as nursery:  # for the credential checks after a lost connection
            self._nursery = nursery
            while refused is None:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    try:
                        await self._feed().run(task_status=first)  # type: ignore[arg-type]
                    except SseUnavailable as err:
                        log.warning("%s; using the JSON-RPC event feed instead", err.describe())
                        self.kind = "jsonrpc"
                    except XoAuthError as err:
                        refused = err  # raised outside the nursery, so that it comes out unwrapped
            nursery.cancel_scope.cancel()
        raise refused

    def _feed(self) -> EventFeed | SseFeed:
        token = self.credentials.token
        if self.kind == "sse":
            self._current = SseFeed(self.url, token, self.sink, types=KEPT_TYPES, verify=self.verify,
                                    connect_timeout=self.connect_timeout, keepalive=self.keepalive)
        else:
            self._current = EventFeed(self.url, token, self.sink, verify=self.verify,
                                      connect_timeout=self.connect_timeout, keepalive=self.keepalive)
        return self._current

    async def xapi_tasks(self) -> dict[str, dict]:
        """XAPI's tasks as XO has them now (id -> object: `name_label`, `status`…), asked on the JSON-RPC
        feed's socket: `XofsError` when it is down or XO does not answer within the connect timeout, and
        `TasksUnknown` with the REST event stream, which has no call to ask them with (its `task`
        collection is XO's own tasks, not XAPI's)."""
        feed = self._current
        if not isinstance(feed, EventFeed):
            raise TasksUnknown("the event feed is XO's REST event stream, which cannot ask XAPI's tasks")
        with trio.move_on_after(self.connect_timeout) as scope:
            tasks = await feed.call("xo.getAllObjects", {"filter": {"type": "task"}})
        if scope.cancelled_caught:
            raise XofsError(f"XO did not answer xo.getAllObjects within {self.connect_timeout:g} s")
        if not isinstance(tasks, dict):
            raise XofsError(f"xo.getAllObjects answered {type(tasks).__name__}, not an object")
        return {task_id: task for task_id, task in tasks.items() if isinstance(task, dict)}

    def _rotated(self, token: str) -> None:
        if self._scope is not None:
            log.info("restarting the XO event feed with the new token")
            self._scope.cancel()

    def _lost(self) -> None:
        if self._nursery is not None and not self._checking:
            self._checking = True
            self._nursery.start_soon(self._check_credentials)

    async def _check_credentials(self) -> None:
        try:
            await self.credentials.refresh(self.credentials.token)
        except CredentialError as err:
            log.debug("reading %s again after the feed was lost: %s", self.credentials.describe(), err)
        finally:
            self._checking = False
