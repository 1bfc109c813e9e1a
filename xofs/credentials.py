"""Where a mount's XO credentials come from, and how a refused token is replaced without remounting.

Sources, first match wins:

1. `--token-file FILE`: the token, alone in a file;
2. `--basic-file FILE`: `user:password` (for servers where nobody wants to manage tokens): xofs signs in
   with it over JSON-RPC and asks XO for a session token, as XO's own web sign-in does, with a client id
   per mount point so that a remount reuses (and extends) the same token instead of adding one;
3. `$XOFS_TOKEN`;
4. the token `xofs login URL` stored for that server (`$XDG_CONFIG_HOME/xofs/tokens/<host>`);
5. xo-cli's configuration (`$XDG_CONFIG_HOME/xo-cli/config.json`, keys `server` and `token`, written by
   `xo-cli register`), when it is registered with the same server.

A file that holds a secret is refused when its group or others may read it. No secret ever goes into an
error message or a log line; `secrets()` lists them so that the log can blank them out should one slip in.

Mid-mount, a 401 from XO makes `RotatingClient` read the source again (`Credentials.refresh`): a rotated
token is picked up and the request retried once (GETs only; never an upload). When the source still holds
the refused token, the operation fails with EACCES and a message carrying `REFUSED_MARK`, which the log
lets through once a minute rather than once per call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from xofs.client.export import ExportResponse
from xofs.client.rest import RestClient
from xofs.errors import XoAuthError

log = logging.getLogger(__name__)

# Part of the message of every operation refused because XO no longer takes the token (see OncePerMinute).
REFUSED_MARK = "XO refuses the token"
BASIC_REREAD_INTERVAL = 60.0  # seconds between two sign-ins with a Basic file after refusals


class CredentialError(Exception):
    """No usable credentials; the message is the one line the user sees (it never contains the secret)."""


def config_home(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def stored_token_path(url: str, env: Mapping[str, str] = os.environ) -> Path:
    """Where `xofs login URL` keeps the token of that server."""
    netloc = urlsplit(url).netloc.rsplit("@", 1)[-1].lower() or "default"
    return config_home(env) / "xofs" / "tokens" / netloc.replace(":", "_").replace("/", "_")


@dataclass(frozen=True)
class TokenSource:
    """One place a token (or Basic credentials) is read from."""

    kind: str  # "token-file", "basic-file", "env", "login", "xo-cli", or "given" (by the caller, fixed)
    path: Path | None = None

    def describe(self) -> str:
        return {
            "token-file": f"the token file {self.path}",
            "basic-file": f"the credentials file {self.path}",
            "env": "$XOFS_TOKEN",
            "login": f"the token `xofs login` stored in {self.path}",
            "xo-cli": f"xo-cli's configuration {self.path}",
            "given": "the token given",
        }[self.kind]


def choose_source(url: str, *, token_file: Path | None, basic_file: Path | None,
                  env: Mapping[str, str] = os.environ) -> TokenSource:
    """The source of this mount's credentials (see the module's docstring for the order)."""
    if token_file is not None and basic_file is not None:
        raise CredentialError("give either a token file or a credentials file, not both")
    if token_file is not None:
        return TokenSource("token-file", token_file)
    if basic_file is not None:
        return TokenSource("basic-file", basic_file)
    if env.get("XOFS_TOKEN", "").strip():
        return TokenSource("env")
    stored = stored_token_path(url, env)
    if stored.exists():
        return TokenSource("login", stored)
    xo_cli = config_home(env) / "xo-cli" / "config.json"
    if _xo_cli_config(xo_cli, url) is not None:
        return TokenSource("xo-cli", xo_cli)
    raise CredentialError("no XO token: pass --token-file FILE, set XOFS_TOKEN, or run `xofs login URL` "
                          "(or `xo-cli register`) first")


def read_secret_file(path: Path) -> str:
    """The stripped content of a file that holds a secret; refused if its group or others may read or write it."""
    try:
        with open(path, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
                raise CredentialError(f"{path} is readable by its group or others (mode "
                                      f"{stat.S_IMODE(st.st_mode):04o}); it holds a secret: chmod 600 {path}")
            _check_only_ours(path, st)
            text = f.read().strip()
    except OSError as err:
        raise CredentialError(f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialError(f"{path} is not UTF-8 text") from None
    if not text:
        raise CredentialError(f"{path} is empty")
    if "\n" in text or "\r" in text:  # never shown: it is a secret, and a header would refuse it anyway
        lines = [line for line in text.splitlines() if line.strip()]
        raise CredentialError(f"{path} must hold one line, but it holds {len(lines)}" if len(lines) > 1 else
                              f"{path} must hold one line, but it holds blank lines too")
    return text


def _one_token(token: str, where: str) -> str:
    """`token`, refused (without showing it) if it has a space or a control character, which no XO token
    has: sent in a header it failed as "cannot reach XO", its whole value in the message (helper 44)."""
    if any(c.isspace() or not c.isprintable() for c in token):
        raise CredentialError(f"{where} is no XO token: it holds spaces, line breaks or control characters")
    return token


def write_secret_file(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 (its directory 0700 if made here), replacing it atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _xo_cli_config(path: Path, url: str) -> dict[str, Any] | None:
    """xo-cli's configuration, when it holds a token for the server at `url`."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("token"), str) or not config["token"]:
        return None
    server = config.get("server")
    if not (isinstance(server, str) and same_server(server, url)):
        return None
    _check_only_ours(path, path.stat())  # readable by others is xo-cli's own choice
    return config


def _check_only_ours(path: Path, st: os.stat_result) -> None:
    """Refuse a file holding a token that another user owns or may write: xofs reads it again whenever XO
    refuses the token, so whoever can change it could make the mount act as them."""
    if st.st_uid not in (os.getuid(), 0):
        raise CredentialError(f"{path} belongs to another user (uid {st.st_uid}); it holds a secret: "
                              f"chown {os.getuid()} {path}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CredentialError(f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); they could "
                              f"put their token in it: chmod 600 {path}")


def same_server(a: str, b: str) -> bool:
    """Whether two XO URLs name the same server (xo-cli keeps what the user typed, scheme or not)."""
    def key(u: str) -> tuple[str, str]:
        parts = urlsplit(u if "://" in u else "//" + u)
        netloc = parts.netloc.rsplit("@", 1)[-1].lower()
        default = {"http": ":80", "https": ":443"}.get(parts.scheme, "")
        return parts.scheme, netloc.removesuffix(default)

    (scheme_a, host_a), (scheme_b, host_b) = key(a), key(b)
    return host_a == host_b and (not scheme_a or not scheme_b or scheme_a == scheme_b)


class Credentials:
    """The token a mount uses now, where it comes from, and how to read it again."""

    def __init__(self, url: str, source: TokenSource, *, verify: bool | str = True,
                 mountpoint: str = "", env: Mapping[str, str] = os.environ) -> None:
        self.url = url
        self.source = source
        self.verify = verify
        self.mountpoint = mountpoint
        self._env = env
        self.token = ""
        self._user = ""
        self._password: str | None = None
        self._used: set[str] = set()  # every token this mount had: none may reach the log
        self._lock = trio.Lock()
        self._last_sign_in = float("-inf")
        self.listeners: list[Callable[[str], None]] = []  # called with the new token after a rotation

    def describe(self) -> str:
        return self.source.describe()

    @classmethod
    def given(cls, url: str, token: str) -> Credentials:
        """Fixed credentials: `token`, with nothing to read again."""
        credentials = cls(url, TokenSource("given"))
        credentials._set(token)
        return credentials

    def secrets(self) -> list[str]:
        return [s for s in (*self._used, self._password) if s]

    def read(self) -> None:
        """Read the source now (not the Basic sign-in, which needs the network: `load` does it)."""
        if self.source.kind == "basic-file":
            self._read_basic()
        else:
            self._set(self._read_token())

    async def load(self) -> None:
        """Make sure there is a token: signs in with Basic credentials if that is the source."""
        if not self.token:
            if self.source.kind == "basic-file":
                self._set(await self._sign_in())
            else:
                self.read()

    async def refresh(self, refused: str) -> bool:
        """XO refused the token `refused`: read the source again. True when there is now another token.

        A Basic file signs in again at most once a minute; files and the environment are cheap to re-read.
        """
        async with self._lock:
            if self.token != refused:
                return True  # another refusal already brought a new token
            if self.source.kind == "basic-file":
                if trio.current_time() - self._last_sign_in < BASIC_REREAD_INTERVAL:
                    return False
                self._read_basic()
                new = await self._sign_in()
            else:
                new = self._read_token()
            if new == self.token:
                return False
            self._set(new)
            log.info("XO credentials: a new token from %s", self.describe())
            for listener in self.listeners:
                listener(new)
            return True

    def _set(self, token: str) -> None:
        self.token = token
        self._used.add(token)

    def _read_token(self) -> str:
        kind, path = self.source.kind, self.source.path
        if kind == "given":
            return self.token
        if kind in ("token-file", "login"):
            assert path is not None
            return _one_token(read_secret_file(path), str(path))
        if kind == "env":
            token = self._env.get("XOFS_TOKEN", "").strip()
            if not token:
                raise CredentialError("XOFS_TOKEN is empty")
            return _one_token(token, "XOFS_TOKEN")
        assert path is not None
        config = _xo_cli_config(path, self.url)
        if config is None:
            raise CredentialError(f"{path} no longer holds a token for {self.url}")
        return _one_token(str(config["token"]), f"the token for {self.url} in {path}")

    def _read_basic(self) -> None:
        assert self.source.path is not None
        user, sep, password = read_secret_file(self.source.path).partition(":")
        if not sep or not user.strip() or not password:
            raise CredentialError(f"{self.source.path} must hold one line, user:password")
        self._user, self._password = user.strip(), password

    async def _sign_in(self) -> str:
        from xofs.login import LoginError, request_token

        self._last_sign_in = trio.current_time()
        host = socket.gethostname()
        try:
            return await request_token(
                self.url, self._user, self._password or "", verify=self.verify,
                client_id=f"xofs-mount:{host}:{self.mountpoint}",
                description=f"xofs mount on {host}:{self.mountpoint}")
        except LoginError as err:
            raise CredentialError(f"signing in with {self.describe()}: {err}") from None


class RotatingClient:
    """A `RestClient` (same methods) that takes a new token from `Credentials` when XO refuses the old one.

    The current `RestClient` is replaced, not changed: requests under way on the old one finish there, and
    it is closed once none is left on it; the current one is closed at the end.
    """

    def __init__(self, credentials: Credentials, make_client: Callable[[str], RestClient]) -> None:
        self.credentials = credentials
        self._make = make_client
        self._client = make_client(credentials.token)
        self._token = credentials.token
        self._retired: list[RestClient] = []  # clients of replaced tokens, closed once no request is on them
        self._busy: dict[RestClient, int] = {}  # requests under way, per client

    def current(self) -> RestClient:
        """The client of the current token (requests on it are not retried after a refusal)."""
        return self._current()[0]

    async def aclose(self) -> None:
        for client in [*self._retired, self._client]:
            await client.aclose()

    async def check(self) -> None:
        await self._get(lambda c: c.check())

    async def collection(self, coll: str, **kwargs: Any) -> list[dict]:
        return await self._get(lambda c: c.collection(coll, **kwargs))

    async def get_object(self, coll: str, obj_id: str) -> dict:
        return await self._get(lambda c: c.get_object(coll, obj_id))

    async def open_export(self, path: str) -> ExportResponse:
        return await self._get(lambda c: c.open_export(path))

    async def import_vdi(self, sr_id: str, body_path: Path, **kwargs: Any) -> str:
        return await self._once(lambda c: c.import_vdi(sr_id, body_path, **kwargs))

    async def patch(self, coll: str, obj_id: str, body: dict) -> None:
        await self._once(lambda c: c.patch(coll, obj_id, body))

    async def delete(self, coll: str, obj_id: str) -> None:
        await self._once(lambda c: c.delete(coll, obj_id))

    async def _get(self, request: Callable[[RestClient], Any]) -> Any:
        """An idempotent request: tried again, once, when a refusal brought a new token."""
        client, token = self._current()
        try:
            return await self._on(client, request)
        except XoAuthError as err:
            if not await self._new_token_after(err, token):
                raise self._refused(err) from None
        client, _ = self._current()
        try:
            return await self._on(client, request)
        except XoAuthError as err:
            raise self._refused(err) from None

    async def _once(self, request: Callable[[RestClient], Any]) -> Any:
        """A request that changes something is never sent twice; a refusal still fetches a new token."""
        client, token = self._current()
        try:
            return await self._on(client, request)
        except XoAuthError as err:
            await self._new_token_after(err, token)
            raise self._refused(err) from None

    async def _on(self, client: RestClient, request: Callable[[RestClient], Any]) -> Any:
        """`request` on `client`; then the clients of replaced tokens that no request is on any more are
        closed (their pooled connections stayed open, in CLOSE-WAIT, until the unmount: helper 55)."""
        self._busy[client] = self._busy.get(client, 0) + 1
        try:
            return await request(client)
        finally:
            self._busy[client] -= 1
            if not self._busy[client]:
                del self._busy[client]
            idle = [c for c in self._retired if c not in self._busy]
            if idle:
                self._retired = [c for c in self._retired if c in self._busy]
                with trio.CancelScope(shield=True):  # closing an idle pool takes no time; never left half done
                    for retired in idle:
                        await retired.aclose()

    def _current(self) -> tuple[RestClient, str]:
        if self.credentials.token != self._token:
            self._retired.append(self._client)
            self._client = self._make(self.credentials.token)
            self._token = self.credentials.token
        return self._client, self._token

    async def _new_token_after(self, err: XoAuthError, token: str) -> bool:
        if err.status != 401:  # 403: the token is fine, its user lacks a permission
            return False
        try:
            return await self.credentials.refresh(token)
        except CredentialError as problem:
            log.warning("XO refused the token and reading %s again failed: %s", self.credentials.describe(),
                        problem)
            return False

    def _refused(self, err: XoAuthError) -> XoAuthError:
        """A 401 as the operation reports it: with where the token came from, and the mark the log filter
        lets through once a minute."""
        if err.status != 401:
            return err
        again = ("a new sign-in follows a refusal at most once a minute" if self.credentials.source.kind == "basic-file"
                 else "it is read again at the next refusal")  # the file is fine: its session token is not
        return XoAuthError(err.status, f"{err.xo_message} ({REFUSED_MARK} from {self.credentials.describe()}; "
                           f"{again})", object_id=err.object_id, url=err.url)


class OncePerMinute(logging.Filter):
    """Lets through one log line a minute about a refused token (`REFUSED_MARK`) from each part of the
    daemon (its logger: reads, imports, the polls), all other lines always. One a minute in all hid the
    first refusal of an import or a poll behind a read's (helper 45)."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or REFUSED_MARK not in record.getMessage():
            return True
        # xofs.fs logs every operation's failure: its reads and its imports' closes are told apart by the
        # operation (the line's first word), the rest by their logger
        kind = record.name
        if record.name == "xofs.fs" and isinstance(record.args, tuple) and record.args:
            kind += f":{record.args[0]}"
        if record.created - self._last.get(kind, float("-inf")) < self.interval:
            return False
        self._last[kind] = record.created
        return True


class Redactor(logging.Filter):
    """Blanks out the secrets of `credentials` from every log line, should one ever slip into a message."""

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self.credentials = credentials

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        secrets = [s for s in self.credentials.secrets() if s in message]
        if secrets:
            for secret in secrets:
                message = redact(message, secret)
            record.msg, record.args = message, None
        return True


SHORT_SECRET = 8  # characters: a secret shorter than this is blanked only where it stands as a word of its own


def redact(message: str, secret: str) -> str:
    """`message` with `secret` blanked out. A short one (a weak Basic password such as `ex`) is blanked only
    where no letter or digit touches its own letters or digits, so that it does not blank every word it is
    part of (`<secret>ample.net`); one as a word of its own (`user:ex@host`, `password ex`) still goes, and
    so does one whose edge is no letter or digit (`-x` in `a-x`)."""
    if len(secret) >= SHORT_SECRET:
        return message.replace(secret, "<secret>")
    before = r"(?<![^\W_])" if secret[0].isalnum() else ""
    after = r"(?![^\W_])" if secret[-1].isalnum() else ""
    return re.sub(before + re.escape(secret) + after, "<secret>", message)
