"""Who is calling: the REST API's authentication, as xo-server's `setupApiContext` middleware does it.

A token comes from the `authenticationToken` cookie, else the `token` cookie. Any `Authorization` header
is split on a space and its second word base64-decoded as `user:password`, whatever the scheme, so a
Bearer token is just a garbled Basic login. A cookie *and* an Authorization header is a 400; no
credentials at all runs the request anonymously (public routes answer, the others 401 later); bad
credentials fail at once, on every path under `/rest/v0`, public or unknown.

Password checks follow `authenticateUser`: an empty password is refused before anything else (a plain
Error, so a 500), and a user whose last failure is less than 2 s old gets `too fast authentication tries`
(500) without the password being looked at. A Basic login is the user's email (`admin@admin.net`).
"""

from __future__ import annotations

import base64
import binascii
import string
from typing import Any, Protocol

from xofs.sim.model import SimError, TooFastError
from xofs.sim.rest_http import Request, RestError

WWW_AUTHENTICATE = ("WWW-Authenticate", 'Basic realm="xo"')
_BASE64_CHARS = frozenset(string.ascii_letters + string.digits + "+/")


class UserSource(Protocol):
    def user_for_token(self, token: str) -> dict[str, Any] | None: ...

    def authenticate(self, credentials: dict[str, Any]) -> tuple[dict[str, Any], str | None]: ...


def invalid_credentials() -> RestError:
    """XO's `invalidCredentials` (code 3) as REST answers it: 401 with a Basic challenge."""
    return RestError(401, "invalid credentials", headers=[WWW_AUTHENTICATE])


def decode_basic(encoded: str) -> tuple[str, str | None]:
    """`Buffer.from(encoded, 'base64').toString().split(':')`: lenient base64 (url-safe too), first two parts."""
    cleaned = "".join(c for c in encoded.replace("-", "+").replace("_", "/") if c in _BASE64_CHARS)
    if len(cleaned) % 4 == 1:  # a lone trailing character carries no whole byte
        cleaned = cleaned[:-1]
    try:
        raw = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    parts = raw.decode("utf-8", "replace").split(":")
    return parts[0], parts[1] if len(parts) > 1 else None


class Authenticator:
    """Resolves each request to a user (or None for anonymous).

    Password checks go through the model's `authenticate`, so the 2-second throttle after a failure is
    shared with JSON-RPC sign-ins, as XO's single `authenticateUser` shares it.
    """

    def __init__(self, users: UserSource) -> None:
        self._users = users

    def token_of(self, req: Request) -> str | None:
        return req.cookies.get("authenticationToken") or req.cookies.get("token") or None

    def authenticate(self, req: Request) -> dict[str, Any] | None:
        """The calling user, None if no credentials came; raises `RestError` for bad ones."""
        token = self.token_of(req)
        authorization = req.headers.get("authorization")
        if token and authorization:
            raise RestError(400, "Having multiple authentication methods is not supported, please choose one")
        if token:
            user = self._users.user_for_token(token)
            if user is None:
                raise invalid_credentials()
            return user
        if not authorization:
            return None
        words = authorization.split(" ")
        if len(words) < 2:
            raise RestError(400, "Malformed Authorization header")
        username, password = decode_basic(words[1])
        try:
            return self._users.authenticate({"username": username, "password": password})[0]
        except SimError as error:
            raise invalid_credentials() from error
        except (ValueError, TooFastError) as error:  # plain Errors in XO: 500 with their message
            raise RestError(500, str(error)) from error
