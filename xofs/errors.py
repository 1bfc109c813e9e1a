"""The one place where XO, HTTP and local failures become an errno and a log message.

Every error a FUSE handler can meet is an `XofsError` (or is turned into one by `to_xofs_error`), so that
the errno the user sees and the log line that explains it always agree. `describe()` gives the words for
the log: what XO said, about which object.
"""

from __future__ import annotations

import errno
from typing import Any


class XofsError(Exception):
    """Base error: carries the errno a FUSE handler answers and the words a log line prints."""

    errno: int = errno.EIO

    def __init__(self, message: str, *, object_id: str | None = None, errno_: int | None = None,
                 routine: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.object_id = object_id
        if errno_ is not None:
            self.errno = errno_
        # The same failure as the operation just before on the same open file met (a reader that goes on
        # past a failed read, as rsync does, 256 KiB at a time): logged at debug level after the first.
        self.repeated = False
        # A refusal tools expect and go on after, such as `cp -a` and `mv` setting a POSIX ACL: logged at
        # debug level, so that the warnings (and `xofs status`'s recent errors) keep to real failures.
        self.routine = routine

    def describe(self) -> str:
        where = f" (XO object {self.object_id})" if self.object_id else ""
        return f"{self.message}{where}"


def with_tls_hint(words: str, ca_file: object = None) -> str:
    """A failed check of XO's certificate, with the option that fixes it (`xofs mount`, `xofs login`); with
    `--ca-file` given, what else to check."""
    if "certificate verification failed" not in words:
        return words
    words = words.rstrip(".")  # OpenSSL's "Hostname mismatch, certificate is not valid for 'h'."
    if "certificate has expired" in words or "certificate is not yet valid" in words:
        return words + " (XO's certificate is out of its dates: renew it on XO, or check this machine's clock)"
    if ca_file:
        return words + (f" (checked against --ca-file {ca_file}: is it the CA that signed XO's certificate, "
                        "and does the certificate name the host of the URL?)")
    return words + " (for a private CA or XOA's self-signed certificate: --ca-file FILE)"


class XoError(XofsError):
    """XO answered with an error. `status` is the HTTP status (0 for JSON-RPC), `xo_message` XO's words."""

    def __init__(self, status: int, xo_message: str, *, data: Any = None, object_id: str | None = None,
                 url: str | None = None, code: int | None = None) -> None:
        self.status = status
        self.xo_message = xo_message
        self.data = data
        self.url = url
        self.code = code
        prefix = f"XO answered {status}" if status else f"XO error {code}" if code is not None else "XO error"
        # XO's words may span lines (Node's assertion messages: "+ actual - expected\n\n…"): one log line
        # each, as promised, with the breaks shown as ` / `.
        words = " / ".join(line.strip() for line in xo_message.splitlines() if line.strip())
        super().__init__(f"{prefix}: {words}", object_id=object_id, errno_=errno_for_status(status))


class XoNotFound(XoError):
    """404 / noSuchObject: the object is gone."""


class XoAuthError(XoError):
    """401 / 403: the token is invalid, expired or lacks the permission."""


class XoUnreachable(XofsError):
    """The server could not be reached, or the connection broke."""

    errno = errno.EIO


class XoStalled(XoUnreachable):
    """The connection is up, but the server sent nothing for the read timeout: slow, not gone."""


class TasksUnknown(XofsError):
    """XAPI's tasks cannot be asked at all on this mount (its event feed is XO's REST event stream)."""


class XoProtocolError(XofsError):
    """The server answered something that is not what XO answers (malformed JSON, wrong types)."""

    errno = errno.EIO


def errno_for_status(status: int) -> int:
    """The errno that best tells a user what an HTTP status from XO means."""
    if status == 404:
        return errno.ENOENT
    if status in (401, 403):
        return errno.EACCES
    if status == 409:
        return errno.EBUSY
    if status in (400, 422):
        return errno.EINVAL
    if status == 507:
        return errno.ENOSPC
    return errno.EIO


def xo_error_from_response(status: int, body: bytes, *, url: str | None = None,
                           object_id: str | None = None, location: str | None = None) -> XoError:
    """Build the right `XoError` from an error answer of any era (JSON body, text, or HTML; a redirect's
    `location` is named: it is what the user needs, such as an http:// URL that XO sends to https://)."""
    import json

    message: Any = None
    data = None
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        message = parsed["error"]
        data = parsed.get("data")
    elif isinstance(parsed, str):
        message = parsed
    if message is None:
        # Legacy eras answer text ("Unauthorized", "OK") or Express's HTML "Cannot GET …".
        if text.startswith("<"):
            import re

            # Express's pages hold the words in <pre>; a proxy's (nginx: "413 Request Entity Too Large")
            # in <title> or <h1>.
            m = (re.search(r"<pre>(.*?)</pre>", text, re.S | re.I) or re.search(r"<h1>(.*?)</h1>", text, re.S | re.I)
                 or re.search(r"<title>(.*?)</title>", text, re.S | re.I))
            words = " ".join(re.sub(r"<[^>]*>", " ", m.group(1)).split())[:500] if m else ""
            message = words or f"HTTP {status}"
        else:
            message = text[:500] or f"HTTP {status}"
    if not isinstance(message, str):
        message = json.dumps(message, sort_keys=True)
    if location and 300 <= status < 400 and location not in message:
        message = f"{message} (redirected to {location})"
    cls = XoNotFound if status == 404 else XoAuthError if status in (401, 403) else XoError
    return cls(status, message, data=data, object_id=object_id, url=url)


# --- Added for the XO client (xofs/client/): JSON-RPC errors and connection failures. ---

# JSON-RPC error codes (xo-common/api-errors.js) and the HTTP status REST answers for the same error, so that
# both transports give the same errno.
_RPC_CODE_STATUS = {1: 404, 2: 403, 3: 401, 5: 403, 10: 422, 16: 409, 25: 409, 26: 403, 0: 501, 28: 503}


def xo_error_from_rpc(error: Any, *, method: str, object_id: str | None = None) -> XoError:
    """Build the right `XoError` from a JSON-RPC error object `{"code", "message", "data"?}` (any shape)."""
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        message = f"malformed JSON-RPC error from {method}: {error!r:.200}"
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    status = _RPC_CODE_STATUS.get(code, 500) if code is not None else 500
    cls = XoNotFound if status == 404 else XoAuthError if status in (401, 403) else XoError
    err = cls(0, message, data=error.get("data") if isinstance(error, dict) else None,
              object_id=object_id, url=f"jsonrpc:{method}", code=code)
    err.errno = errno_for_status(status)
    return err


def describe_connection_error(exc: BaseException) -> str:
    """Say in a few words why a connection to XO failed: refused, DNS, TLS, timeout, reset…

    Libraries wrap the OS error (httpx in `ConnectError`, trio in an `OSError` whose cause is a group of one
    error per address tried), so the whole cause chain and any exception groups are searched.
    """
    import socket
    import ssl

    seen = error_chain(exc)
    for e in seen:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {e.verify_message or e.reason}"
    for e in seen:
        if isinstance(e, ssl.SSLError):
            if e.reason == "WRONG_VERSION_NUMBER":  # what OpenSSL makes of an answer in plain HTTP
                return f"TLS error: {e.reason} (the server does not speak TLS there: is the URL http://?)"
            return f"TLS error: {e.reason or e}"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the host name ({e.strerror})"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused (is XO listening on that port?)"
        if isinstance(e, ConnectionResetError):
            return "connection reset by the server"
        if isinstance(e, TimeoutError) or type(e).__name__.endswith("Timeout"):
            return "timed out"
        if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return (e.strerror or "unreachable").lower()
    return str(exc) or type(exc).__name__


def error_chain(exc: BaseException) -> list[BaseException]:
    """`exc`, its causes and contexts, and the members of any exception group among them, once each."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return seen


def xo_unreachable(exc: BaseException, url: str) -> XoUnreachable:
    """An `XoUnreachable` naming the URL and the reason, for a connection that failed or broke."""
    err = XoUnreachable(f"cannot reach XO at {url}: {describe_connection_error(exc)}")
    err.__cause__ = exc
    return err


def xofs_error_in(exc: BaseException) -> XofsError | None:
    """The XO failure `exc` is, or the first of an exception group made only of them (an event sink's resync
    reads many collections at once); None for anything else, which is a bug to let through."""
    if isinstance(exc, XofsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(XofsError)
        if matched is not None and rest is None:
            while isinstance(matched, BaseExceptionGroup):
                matched = matched.exceptions[0]
            return matched  # type: ignore[return-value]
    return None
