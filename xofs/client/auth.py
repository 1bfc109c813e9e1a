"""How the client proves who it is to XO, and how it decides whether to trust XO's certificate.

REST v0 takes the token only as a cookie (`authenticationToken`): an `Authorization: Bearer` header is
decoded as garbled Basic credentials and refused, and a cookie together with any `Authorization` header is a
400 (xo-api.md §3). The JSON-RPC socket takes the same token inside the socket, with `session.signIn`.
"""

from __future__ import annotations

import os
import ssl

TOKEN_COOKIE = "authenticationToken"


def cookie_header(token: str) -> str:
    """The `Cookie` header value that authenticates a REST request."""
    return f"{TOKEN_COOKIE}={token}"


def sign_in_params(token: str) -> dict[str, str]:
    """The `session.signIn` parameters for a token sign-in (a token bypasses OTP)."""
    return {"token": token}


def ssl_context(verify: bool | str) -> ssl.SSLContext:
    """A client TLS context: the system CAs (True), none at all (False), or a CA file or directory (str)."""
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if verify is True:
        return ssl.create_default_context()
    if os.path.isdir(verify):
        return ssl.create_default_context(capath=verify)
    return ssl.create_default_context(cafile=verify)
