"""Large response bodies go to the socket as they are, not copied into one bytes object first.

Hypercorn sends each body chunk through `h11.Connection.send`, which joins the chunk's framing (`400000\r\n`
... `\r\n`) and its bytes with `b"".join`: a copy of every 4 MiB an export sends, in the simulator's only
thread. That copy cost the simulator more when a FUSE daemon read the export than when curl did (the two
CPUs then share their caches with the daemon's own copies): serving `cp` from a mount, 0.51 s of CPU per GiB
against 0.41 for curl, so `cp` got 0.80x curl's speed from it. Sent piece by piece (h11's
`send_with_data_passthrough`, made for this), a 2 GiB `.raw`: curl 2582 -> 2797 MB/s, `cp` from a mount
2053 -> 2586 MB/s, the simulator 0.38 and 0.395 s of CPU per GiB (medians of 8 rounds taking turns,
docs/performance.md). The bytes on the wire are the same.

Small bodies (JSON answers, event frames) are still joined: one send, one TCP segment, as before.
"""

from __future__ import annotations

from typing import Any

import h11
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol

PASS_THROUGH = 64 << 10  # bytes: bodies this large are sent without the copy

_joining_send = H11Protocol._send_h11_event


async def _send_h11_event(self: Any, event: Any) -> None:
    """`H11Protocol._send_h11_event`, for a large `h11.Data` on a plain HTTP/1.1 connection without the copy."""
    connection = self.connection
    if type(event) is not h11.Data or len(event.data) < PASS_THROUGH or not isinstance(connection, h11.Connection):
        await _joining_send(self, event)
        return
    try:
        pieces = connection.send_with_data_passthrough(event)
    except h11.LocalProtocolError:  # as hypercorn: the client broke the exchange first, nothing to send
        if connection.their_state != h11.ERROR:
            raise
        return
    for piece in pieces or ():
        if piece:
            await self.send(RawData(data=piece))


def send_large_bodies_without_copying() -> None:
    """Install the above into hypercorn (idempotent); the simulator calls it before it serves."""
    H11Protocol._send_h11_event = _send_h11_event
