"""How the simulator's HTTP/1.1 connections send as Node does: status lines, websocket closes, large bodies.

Status lines: hypercorn hands h11 no reason phrase, so every status line read `HTTP/1.1 200 ` where Node
(xo-server's Express) writes `HTTP/1.1 200 OK`, Node's own phrase for each code (`http.STATUS_CODES`, and
`unknown` for a code it has none for; the recordings of a real xo-server show those of 200, 201, 204, 304,
404, 422 and 500).

Framing header: h11 adds `Transfer-Encoding: chunked` before the `Connection: close` it adds, where Node
writes it last; and it frames the answer to a HEAD as it would the GET's, where Node sends no framing
header (the recorded HEAD of a `.vhd` export). The line is moved to the end of the header block h11
writes, or taken out for a HEAD (whose body h11 would frame is never sent).

Websocket compression: xo-server's `ws` (^8.2.3) has `perMessageDeflate = {threshold = 524288}` (its
config.toml), and ws applies a threshold only on a connection without server context takeover (a client
that offered `server_no_context_takeover`): there, messages under 512 KiB go out as they are (RSV1 clear).
wsproto compressed every message; it still does on other connections, as ws does.

Websocket closes: xo-server closes a socket whose token expired without a status code (a client sees
1005, "no status received"). An ASGI close always has a code, and wsproto turns 1005 into 1000 unless it
is given its own `CloseReason.NO_STATUS_RCVD`: a close asked with 1005 goes out with no code here.

Bodies: hypercorn sends each body chunk through `h11.Connection.send`, which joins the chunk's framing (`400000\r\n`
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
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode

PASS_THROUGH = 64 << 10  # bytes: bodies this large are sent without the copy
DEFLATE_THRESHOLD = 512 << 10  # bytes: XO's threshold (applied without server context takeover only)

# Node's http.STATUS_CODES (lib/_http_server.js), as Express writes them after the code.
NODE_REASONS: dict[int, bytes] = {code: phrase.encode() for code, phrase in {
    100: "Continue", 101: "Switching Protocols", 102: "Processing", 103: "Early Hints",
    200: "OK", 201: "Created", 202: "Accepted", 203: "Non-Authoritative Information", 204: "No Content",
    205: "Reset Content", 206: "Partial Content", 207: "Multi-Status", 208: "Already Reported", 226: "IM Used",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Found", 303: "See Other", 304: "Not Modified",
    305: "Use Proxy", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 407: "Proxy Authentication Required",
    408: "Request Timeout", 409: "Conflict", 410: "Gone", 411: "Length Required", 412: "Precondition Failed",
    413: "Payload Too Large", 414: "URI Too Long", 415: "Unsupported Media Type", 416: "Range Not Satisfiable",
    417: "Expectation Failed", 418: "I'm a Teapot", 421: "Misdirected Request", 422: "Unprocessable Entity",
    423: "Locked", 424: "Failed Dependency", 425: "Too Early", 426: "Upgrade Required",
    428: "Precondition Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    451: "Unavailable For Legal Reasons",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported", 506: "Variant Also Negotiates",
    507: "Insufficient Storage", 508: "Loop Detected", 509: "Bandwidth Limit Exceeded", 510: "Not Extended",
    511: "Network Authentication Required",
}.items()}

_FRAMING = b"Transfer-Encoding: chunked\r\n"  # the header line h11 adds to a chunked answer

_joining_send = H11Protocol._send_h11_event
_coded_close = FrameProtocol.close
_deflating = PerMessageDeflate.frame_outbound


async def _send_h11_event(self: Any, event: Any) -> None:
    """`H11Protocol._send_h11_event`, with Node's reason phrase in a status line that has none, the framing
    header last (none on the answer to a HEAD), and a large `h11.Data` on a plain HTTP/1.1 connection sent
    uncopied."""
    kind = type(event)
    if (kind is h11.Response or kind is h11.InformationalResponse) and not event.reason:
        event = kind(status_code=event.status_code, headers=event.headers.raw_items(),
                     http_version=event.http_version, reason=NODE_REASONS.get(event.status_code, b"unknown"))
    connection = self.connection
    if not isinstance(connection, h11.Connection):
        await _joining_send(self, event)
        return
    if kind is not h11.Response and (kind is not h11.Data or len(event.data) < PASS_THROUGH):
        await _joining_send(self, event)
        return
    try:
        pieces = connection.send_with_data_passthrough(event)
    except h11.LocalProtocolError:  # as hypercorn: the client broke the exchange first, nothing to send
        if connection.their_state != h11.ERROR:
            raise
        return
    if kind is h11.Response:
        block = b"".join(pieces or ())
        at = block.find(b"\r\n" + _FRAMING)
        if at >= 0:
            block = block[: at + 2] + block[at + 2 + len(_FRAMING):]
            if getattr(connection, "_request_method", None) != b"HEAD":
                block = block[:-2] + _FRAMING + b"\r\n"
        pieces = [block]
    for piece in pieces or ():
        if piece:
            await self.send(RawData(data=piece))


def _close(self: FrameProtocol, code: int | None = None, reason: str | None = None) -> bytearray:
    """`FrameProtocol.close`, with no status code in the frame when asked for 1005."""
    if code == CloseReason.NO_STATUS_RCVD and not reason:
        code = CloseReason.NO_STATUS_RCVD  # the enum itself: wsproto then writes an empty close frame
    return _coded_close(self, code, reason)


def _frame_outbound(self: PerMessageDeflate, proto: Any, opcode: Opcode, rsv: Any, data: bytes,
                    fin: bool) -> tuple[Any, bytes]:
    """`PerMessageDeflate.frame_outbound`, leaving a server's whole message under the threshold as it is on a
    connection without server context takeover."""
    if (not proto.client and self.server_no_context_takeover and fin and opcode in (Opcode.TEXT, Opcode.BINARY)
            and len(data) < DEFLATE_THRESHOLD):
        return rsv, data
    return _deflating(self, proto, opcode, rsv, data, fin)


def send_as_node_does() -> None:
    """Install the above into hypercorn and wsproto (idempotent); the simulator calls it before it serves."""
    H11Protocol._send_h11_event = _send_h11_event
    FrameProtocol.close = _close  # type: ignore[method-assign]
    PerMessageDeflate.frame_outbound = _frame_outbound  # type: ignore[method-assign]
