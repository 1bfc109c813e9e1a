"""`xofs login URL [USER]`: trade a password for an XO authentication token, and keep the token safe.

The password is read from the terminal (never from the command line, where `ps` would show it), or from
standard input with `--password-stdin` for scripts. xofs then signs in over JSON-RPC (`session.signIn` with
the user's email and password) and calls `token.create` with a client id and a description, as `xo-cli
register` does: XO reuses and extends the live token of a client id it already knows, so logging in again
from the same machine does not pile up tokens. The token is written with mode 0600, where `xofs mount` finds
it on its own (or to `--token-file`, e.g. `/etc/xofs/token` for an fstab entry), and never printed.

`request_token` is also how a mount with a Basic credentials file gets its session token.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, HandshakeError

from xofs.client.auth import ssl_context
from xofs.client.events import handshake_reason, ws_url
from xofs.errors import XoError, XofsError, XoUnreachable, with_tls_hint, xo_error_from_rpc

CALL_TIMEOUT = 30.0
INVALID_PARAMETERS = 10  # XO's error code, answered by servers whose token.create takes no client/description
UNKNOWN_PEER_ERROR = -32000  # an error XO does not show a socket that is not signed in (its words are generic)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the XO server, e.g. https://xo.example.org")
    p.add_argument("user", nargs="?", help="XO user (its email); asked for when left out")
    p.add_argument("--token-file", type=Path, help="where to store the token (default: the per-server file "
                   "`xofs mount` looks in, under $XDG_CONFIG_HOME/xofs/tokens/)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input instead of the terminal")
    p.add_argument("--description", help="the token's description in XO (default: xofs login on <this machine's name>)")
    p.add_argument("--expires-in", help="token lifetime as XO takes it, e.g. '30 days' (default: XO's, 30 days)")
    p.add_argument("--otp", help="one-time password, when the account has two-factor authentication")
    p.add_argument("--ca-file", type=Path, help="CA certificate(s) to check XO's TLS certificate against")
    p.add_argument("--insecure", action="store_true", help="do not check XO's TLS certificate (dangerous)")


def run(args: argparse.Namespace) -> int:
    from xofs.credentials import stored_token_path, write_secret_file

    url = args.url.rstrip("/")
    try:
        url = _check_url(args.url).rstrip("/")
        user = args.user or _ask("XO user (email): ")
        password = _read_password(args, user, url)
    except (EOFError, KeyboardInterrupt):
        print("\nxofs login: cancelled", file=sys.stderr)
        return 1
    except LoginError as err:
        print(f"xofs login: {err}", file=sys.stderr)
        return 2
    from xofs.daemon import StartupError
    from xofs.mount import tls_verify

    try:
        verify = tls_verify(args)
    except StartupError as err:
        print(f"xofs login: {err}", file=sys.stderr)
        return 2
    if args.insecure:
        print(f"xofs login: WARNING: --insecure: XO's TLS certificate is NOT checked; anyone on the way to "
              f"{url} can read the password", file=sys.stderr)
    host = socket.gethostname()
    try:
        token = trio.run(lambda: request_token(
            url, user, password, verify=verify, otp=args.otp, expires_in=args.expires_in,
            client_id=f"xofs-login:{host}:{getpass.getuser()}",
            description=args.description or f"xofs login on {host}"))
    except LoginError as err:
        print(f"xofs login: {with_tls_hint(str(err), args.ca_file)}", file=sys.stderr)
        return 1
    path = args.token_file or stored_token_path(url)
    try:
        write_secret_file(path, token + "\n")
    except OSError as err:
        print(f"xofs login: cannot write the token to {path}: {err.strerror}", file=sys.stderr)
        return 1
    print(f"xofs login: signed in to {url} as {user}; token stored in {path} (mode 0600)", file=sys.stderr)
    return 0


class LoginError(Exception):
    """Signing in did not give a token; the message is the one line the user sees (never the password)."""


def _check_url(url: str) -> str:
    """Refuse what `xofs mount` refuses: a URL that is not http(s), or one that carries credentials (the
    command line is every user's to read; login takes the user as an argument and asks the password)."""
    from xofs.daemon import StartupError
    from xofs.mount import check_url

    parts = urlsplit(url)
    if parts.username or parts.password:
        raise LoginError("credentials in the URL are refused (every user can read command lines): give the "
                         "user after the URL; the password is asked for, or read with --password-stdin")
    try:
        return check_url(url)  # the port too; the scheme in lower case
    except StartupError as err:
        raise LoginError(str(err)) from None


def _ask(prompt: str) -> str:
    if not sys.stdin.isatty():
        raise LoginError("no user given and no terminal to ask on: pass it after the URL")
    answer = input(prompt).strip()
    if not answer:
        raise LoginError("no user given")
    return answer


def _read_password(args: argparse.Namespace, user: str, url: str) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        except OSError:
            raise LoginError("no terminal to ask the password on: use --password-stdin") from None
        os.close(tty)
        password = getpass.getpass(f"Password for {user} at {url}: ")
    if not password:
        raise LoginError("empty password")
    return password


async def request_token(url: str, user: str, password: str, *, verify: bool | str = True,
                        client_id: str, description: str, expires_in: str | None = None,
                        otp: str | None = None) -> str:
    """Sign in to XO's JSON-RPC API with a password and create a token (`token.create`); returns it.

    Raises `LoginError` with XO's words (wrong password, unreachable server, TLS failure…).
    """
    target = ws_url(url)
    tls = ssl_context(verify) if target.startswith("wss:") else None
    credentials: dict[str, Any] = {"email": user, "password": password}
    if otp:
        credentials["otp"] = otp
    params: dict[str, Any] = {"client": {"id": client_id}, "description": description}
    if expires_in:
        params["expiresIn"] = expires_in
    try:
        with trio.fail_after(CALL_TIMEOUT):
            if tls is not None:
                await _handshake_tls(target, tls)
            async with trio_websocket.open_websocket_url(target, tls, connect_timeout=CALL_TIMEOUT) as ws:
                rpc = _Rpc(ws)
                try:
                    await rpc.call("session.signIn", credentials)
                except XoError as err:
                    raise LoginError(f"XO refused the sign-in of {user}: {_sign_in_words(err)}") from None
                try:
                    token = await rpc.call("token.create", params)
                except XoError as err:
                    if err.code != INVALID_PARAMETERS:
                        raise
                    # An older XO: its token.create takes no client id nor description (as xo-cli retries).
                    token = await rpc.call("token.create", {"expiresIn": expires_in} if expires_in else {})
    except trio.TooSlowError:
        raise LoginError(f"no answer from {target} within {CALL_TIMEOUT:g} s") from None
    except (HandshakeError, OSError, trio.BrokenResourceError) as exc:
        raise LoginError(f"cannot reach XO at {target}: {handshake_reason(exc, CALL_TIMEOUT)}") from None
    except XofsError as err:
        raise LoginError(err.describe()) from None
    if not isinstance(token, str) or not token:
        raise LoginError(f"token.create answered {type(token).__name__}, not a token")
    return token


def _sign_in_words(err: XoError) -> str:
    """XO's words for a refused sign-in. XO refuses a sign-in within 2 s of a failed one with a plain error,
    "too fast authentication tries", which reaches a socket not signed in as -32000 "unknown error from the
    peer" (xo-api.md): that one gets its likely cause (it also answers an empty password so)."""
    if err.code == UNKNOWN_PEER_ERROR:
        return (f"{err.xo_message} (XO answers so a sign-in within 2 s of a failed one, as after a wrong "
                "password: wait a little and try again)")
    return err.xo_message


async def _handshake_tls(url: str, context: ssl.SSLContext) -> None:
    """Connect and do the TLS handshake alone, then hang up, so that its failure (a certificate not trusted, a
    server that speaks plain HTTP there) is told at once. Inside trio_websocket it is lost: the first send
    fails, that is taken for a closed connection, and the upgrade is waited for until the timeout."""
    parts = urlsplit(url)
    stream = await trio.open_ssl_over_tcp_stream(parts.hostname or "", parts.port or 443, ssl_context=context,
                                                 https_compatible=True)
    try:
        await stream.do_handshake()
    finally:
        await trio.aclose_forcefully(stream)


class _Rpc:
    """Calls on one socket, one at a time (notifications, which XO sends once signed in, are skipped)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 1

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        call_id = self.next_id
        self.next_id += 1
        try:
            await self.ws.send_message(json.dumps({"jsonrpc": "2.0", "id": call_id, "method": method,
                                                   "params": params}))
            while True:
                message = json.loads(await self.ws.get_message())
                if isinstance(message, dict) and message.get("id") == call_id:
                    break
        except ConnectionClosed:
            raise XoUnreachable(f"XO closed the connection during {method}") from None
        except ValueError:
            raise XofsError(f"XO answered {method} with something that is not JSON") from None
        if "error" in message:
            raise xo_error_from_rpc(message["error"], method=method)
        return message.get("result")
