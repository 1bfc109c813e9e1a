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

    def __init__(self, message: str, *, object_id: str | None = None, errno_: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.object_id = object_id
        if errno_ is not None:
            self.errno = errno_

    def describe(self) -> str:
        where = f" (XO object {self.object_id})" if self.object_id else ""
        return f"{self.message}{where}"


class XoError(XofsError):
    """XO answered with an error. `status` is the HTTP status (0 for JSON-RPC), `xo_message` XO's words."""

    def __init__(self, status: int, xo_message: str, *, data: Any = None, object_id: str | None = None,
                 url: str | None = None, code: int | None = None) -> None:
        self.status = status
        self.xo_message = xo_message
        self.data = data
        self.url = url
        self.code = code
        prefix = f"XO answered {status}" if status else f"XO error {code}"
        super().__init__(f"{prefix}: {xo_message}", object_id=object_id, errno_=errno_for_status(status))


class XoNotFound(XoError):
    """404 / noSuchObject: the object is gone."""


class XoAuthError(XoError):
    """401 / 403: the token is invalid, expired or lacks the permission."""


class XoUnreachable(XofsError):
    """The server could not be reached, or the connection broke."""

    errno = errno.EIO


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
                           object_id: str | None = None) -> XoError:
    """Build the right `XoError` from an error answer of any era (JSON body, text, or HTML)."""
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

            m = re.search(r"<pre>(.*?)</pre>", text, re.S)
            message = m.group(1) if m else f"HTTP {status}"
        else:
            message = text[:500] or f"HTTP {status}"
    if not isinstance(message, str):
        message = json.dumps(message, sort_keys=True)
    cls = XoNotFound if status == 404 else XoAuthError if status in (401, 403) else XoError
    return cls(status, message, data=data, object_id=object_id, url=url)
