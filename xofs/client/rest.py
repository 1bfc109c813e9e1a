"""XO's REST v0 API as the mount daemon uses it: listings, single objects, exports, imports, edits, deletes.

Every XO era is tolerated (xo-api.md §0): listings are asked for as NDJSON but parsed by what the answer says
it is; errors may be JSON, text or Express's HTML; imports answer `{"id"}` (201) or a bare UUID (200); deletes
answer 204 or `OK`. Idempotent GETs are retried a few times on connection errors and 5xx; uploads and edits
never are. Exports use the purpose-built reader of `export.py`, imports the uploader of `upload.py`, everything
else one pooled httpx client.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import trio

from xofs.client.auth import cookie_header, ssl_context
from xofs.client.export import ExportResponse, HttpTarget, open_stream, without_url
from xofs.client.upload import upload_file
from xofs.errors import (
    XoError,
    XofsError,
    XoNotFound,
    XoProtocolError,
    XoStalled,
    XoUnreachable,
    error_chain,
    xo_error_from_response,
    xo_unreachable,
)

log = logging.getLogger(__name__)

USER_AGENT = "xofs"
RETRY_DELAYS = (0.25, 1.0)  # sleeps between the (up to) 3 tries of an idempotent GET
RETRY_STATUSES = frozenset({500, 502, 503, 504})
DISK_TYPES = frozenset({"VDI", "VDI-snapshot", "VDI-unmanaged"})  # objects whose `size` is a disk's
GATEWAY_STATUSES = frozenset({502, 504})  # a proxy's words, not XO's: XO may have done the work
# XO answers an import only once XAPI has finished the task, which may be long after the last byte.
IMPORT_ANSWER_TIMEOUT = 1800.0
ERROR_BODY_LIMIT = 64 * 1024
MAX_BODY = 512 << 20  # a listing's body, decoded: the simulator's 10,000 VMs with every field are 21 MB
LISTING_DEADLINE = 300.0  # seconds for a whole answer to come (at least 5 read timeouts)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)

# Types of the few keys callers rely on; an item where one has another type is skipped, not trusted.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "uuid": str, "type": str, "name_label": str, "name_description": str,
    "size": int, "usage": int, "tags": list, "$VBDs": list, "VDIs": list,
}


class RestClient:
    """One XO server's REST v0 API, authenticated with a token cookie."""

    def __init__(self, base_url: str, token: str, *, max_connections: int = 16,
                 connect_timeout: float = 10, read_timeout: float = 60, verify: bool | str = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_url = httpx.URL(self.base_url + "/rest/v0/")
        if self.api_url.scheme not in ("http", "https") or not self.api_url.host:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._cookie = cookie_header(token)
        self._ssl = ssl_context(verify) if self.api_url.scheme == "https" else None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._http = httpx.AsyncClient(
            base_url=self.api_url,
            # gzip only: httpx would also take zstd and stacked codings, whose one decoded network chunk can
            # be gigabytes before MAX_BODY is looked at (256 MiB of zeros are 8 KB of zstd).
            headers={"Cookie": self._cookie, "User-Agent": USER_AGENT, "Accept-Encoding": "gzip"},
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            verify=self._ssl or False,  # plain http: no TLS, so do not spend ~80 ms loading the CA store
            trust_env=False,  # exports cannot go through a proxy, so nothing does
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def check(self) -> None:
        """Make sure XO answers and takes the token, with the cheapest authenticated request there is.

        Raises `XoUnreachable` (refused, DNS, TLS, timeout), `XoAuthError`, or `XoProtocolError` when the
        URL answers but is not an XO REST API.
        """
        try:
            resp = await self._get("vms", params={"fields": "id", "limit": "1"})
        except XoNotFound as err:
            raise XoProtocolError(f"no XO REST API at {self.api_url}: GET vms answered 404") from err
        except XoError as err:
            # XO sends a path it has no route for to its web UI's sign-in page: a wrong path in the URL
            # (XO served under another prefix, a typo), not a sign-in to make.
            if 300 <= err.status < 400 and "/signin" in err.xo_message:
                raise XoProtocolError(f"no XO REST API at {self.api_url}: GET vms answered {err.status}, a "
                                      f"redirect to XO's sign-in page, as XO answers a path it has no route "
                                      f"for") from err
            raise
        parse_collection(resp.content, resp.headers.get("content-type", ""), what=str(resp.url))

    async def collection(self, coll: str, *, fields: str = "*", filter: str | None = None,
                         limit: int | None = None, retry: bool = True) -> list[dict]:
        """The objects of a collection (`vms`, `vdis`, `vms/<id>/vdis`…), without their `href`.

        `id` is always requested, since items are keyed by it. Malformed items are logged and skipped.
        `retry=False` for a caller that tries again itself (the polls while the event feed is down).
        """
        params = {"fields": _with_id(fields), "ndjson": "true"}
        if filter is not None:
            params["filter"] = filter
        if limit is not None:
            params["limit"] = str(limit)
        resp = await self._get(coll, params=params, retry=retry)
        return parse_collection(resp.content, resp.headers.get("content-type", ""), what=str(resp.url))

    async def get_object(self, coll: str, obj_id: str) -> dict:
        """One object (raises `XoNotFound` when XO does not have it under that collection)."""
        resp = await self._get(f"{coll}/{quote(obj_id, safe='')}", object_id=obj_id)
        try:
            obj = json.loads(resp.content)
        except ValueError as exc:
            raise XoProtocolError(f"GET {resp.url} answered something that is not JSON",
                                  object_id=obj_id) from exc
        problem = item_problem(obj)
        if problem:
            raise XoProtocolError(f"GET {resp.url} answered an unusable object: {problem}", object_id=obj_id)
        return _without_hrefs(obj)

    async def open_export(self, path: str) -> ExportResponse:
        """Start downloading `/rest/v0/<path>` (e.g. `vdis/<id>.raw`); the caller reads it and closes it.

        A non-200 answer raises the matching `XoError` before any byte is handed over. Connection failures
        (also one that drops after a 200's head, before any body byte) and 5xx are retried, since nothing was
        delivered yet; never HEAD (it would start a real export).
        """
        url = self._http.build_request("GET", path).url
        target = HttpTarget(
            scheme=url.scheme, host=url.host, port=url.port or (443 if url.scheme == "https" else 80),
            target=url.raw_path.decode("ascii"),
            headers=[("Host", url.netloc.decode("ascii")), ("User-Agent", USER_AGENT), ("Accept", "*/*"),
                     ("Accept-Encoding", "identity"), ("Cookie", self._cookie), ("Connection", "close")])
        object_id = _object_id_of(path)
        for attempt, delay in enumerate((*RETRY_DELAYS, None)):
            err: XofsError
            try:
                response = await open_stream(target, ssl_context=self._ssl,
                                             connect_timeout=self._connect_timeout,
                                             read_timeout=self._read_timeout)
            except XoUnreachable as exc:
                err = exc
            else:
                if response.status == 200:
                    try:
                        await response.first_bytes()  # a drop right after the head is tried again too
                        return response
                    except BaseException as exc:
                        await response.aclose()
                        if not isinstance(exc, XoUnreachable) or isinstance(exc, XoStalled):
                            raise  # silent for the read timeout after its head: XO is slow, not gone
                        err = exc
                else:
                    async with response:
                        body = await _error_body(response)
                    err = xo_error_from_response(response.status, body, url=str(url), object_id=object_id,
                                                 location=response.headers.get("location"))
                    if response.status not in RETRY_STATUSES:
                        raise err
            if delay is None or not _worth_retrying(err):
                raise err
            log.info("export /rest/v0/%s: try %d failed (%s), retrying", path, attempt + 1,
                     without_url(err.describe(), str(url)))
            await trio.sleep(delay)
        raise AssertionError("unreachable")

    async def import_vdi(self, sr_id: str, body_path: Path, *, name_label: str, name_description: str | None,
                         raw: bool, progress: Callable[[int], None] | None = None, size: int | None = None,
                         ready: Callable[[int], Awaitable[None]] | None = None) -> str:
        """Upload a disk image as a new VDI on an SR; returns the new VDI's uuid. Never retried.

        The body streams from disk with an explicit Content-Length, which XO requires (a chunked upload is
        a 500): the file's size, or `size` for a file still being written (`ready`: see `upload_file`).
        `raw=False` means a dynamic or differencing VHD, XO's default: `raw` is left out then, since legacy
        XO (up to 5.110) took its mere presence, `raw=false` too, for "raw" and stored the VHD file itself
        as the disk; a raw upload sends `raw=true` (a bare `?raw` is a 422 since 5.111).
        """
        if size is None:
            size = body_path.stat().st_size
        params = {"name_label": name_label}
        if raw:
            params["raw"] = "true"
        if name_description is not None:
            params["name_description"] = name_description
        url = self._http.build_request("POST", f"srs/{quote(sr_id, safe='')}/vdis", params=params).url
        target = HttpTarget(
            scheme=url.scheme, host=url.host, port=url.port or (443 if url.scheme == "https" else 80),
            target=url.raw_path.decode("ascii"),
            headers=[("Host", url.netloc.decode("ascii")), ("User-Agent", USER_AGENT), ("Accept", "*/*"),
                     ("Cookie", self._cookie), ("Content-Type", "application/octet-stream"),
                     ("Connection", "close")])
        response = await upload_file(target, "POST", body_path, size, ssl_context=self._ssl,
                                     connect_timeout=self._connect_timeout, send_timeout=self._read_timeout,
                                     answer_timeout=IMPORT_ANSWER_TIMEOUT, progress=progress, ready=ready)
        # Answers that come once the whole body was sent, yet say nothing sure: XO may have made the VDI.
        maybe = (f"; XO may have made the VDI {name_label!r} on SR {sr_id} all the same: look for it before "
                 "copying again")
        async with response:
            if not 200 <= response.status < 300:
                err = xo_error_from_response(response.status, await _error_body(response), url=str(url),
                                             object_id=sr_id, location=response.headers.get("location"))
                if response.status in GATEWAY_STATUSES:  # a proxy that gave up waiting for XO's answer
                    err.message += maybe
                raise err
            body = await response.read_all(ERROR_BODY_LIMIT)
        try:
            return _new_vdi_id(response, body, str(url))
        except XoProtocolError as err:
            err.message += maybe
            raise

    async def patch(self, coll: str, obj_id: str, body: dict) -> None:
        """Change fields of an object (204), e.g. `{"name_label": …}` on a VDI."""
        await self._send("PATCH", f"{coll}/{quote(obj_id, safe='')}", object_id=obj_id, json=body)

    async def delete(self, coll: str, obj_id: str) -> None:
        """Destroy an object (204, or `OK` with 200 in legacy XO)."""
        await self._send("DELETE", f"{coll}/{quote(obj_id, safe='')}", object_id=obj_id)

    # --- requests ---

    async def _get(self, path: str, *, params: dict[str, str] | None = None,
                   object_id: str | None = None, retry: bool = True) -> _Answer:
        """An idempotent GET: a 200 answer, or the XO error; retried on connection errors and 5xx.

        The body is read whole, but bounded: at most MAX_BODY bytes once decoded (a gzip bomb of 2 MB took
        the daemon to 6 GB), within LISTING_DEADLINE (a server trickling a byte a second, which the read
        timeout never catches, held the event feed's re-read, and so the mount's freshness, for hours)."""
        deadline = max(LISTING_DEADLINE, 5 * self._read_timeout)
        for attempt, delay in enumerate((*(RETRY_DELAYS if retry else ()), None)):
            err: XofsError
            url = str(self.api_url.join(path))
            try:
                with trio.fail_after(deadline):
                    answer = await self._read_answer(path, params)
            except httpx.ReadTimeout:
                err = XoStalled(f"XO at {url} did not answer within {self._read_timeout:g} s (--read-timeout)",
                                object_id=object_id)
            except httpx.TransportError as exc:
                err = xo_unreachable(exc, url)
            except httpx.DecodingError as exc:
                raise XoProtocolError(f"GET {path}: undecodable answer ({exc})", object_id=object_id) from exc
            except trio.TooSlowError:  # not retried: a server that slow is no better a second later
                raise XoUnreachable(f"GET {url}: the answer took more than {deadline:g} s to come whole",
                                    object_id=object_id) from None
            else:
                if answer.status_code == 200:
                    return answer
                err = xo_error_from_response(answer.status_code, answer.content, url=str(answer.url),
                                             object_id=object_id, location=answer.headers.get("location"))
                if answer.status_code not in RETRY_STATUSES:
                    raise err
            if delay is None or not _worth_retrying(err):
                raise err
            log.info("GET %s: try %d failed (%s), retrying", path, attempt + 1, err.describe())
            await trio.sleep(delay)
        raise AssertionError("unreachable")

    async def _read_answer(self, path: str, params: dict[str, str] | None) -> _Answer:
        async with self._http.stream("GET", path, params=params) as resp:
            codings = [c.strip().lower() for c in resp.headers.get_list("content-encoding", split_commas=True)]
            if [c for c in codings if c not in ("", "identity")] not in ([], ["gzip"], ["deflate"]):
                raise XoProtocolError(f"GET {resp.url} answered a body coded {', '.join(codings)}; xofs asked "
                                      "for gzip at most")
            limit = MAX_BODY if resp.status_code == 200 else ERROR_BODY_LIMIT
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    if resp.status_code != 200:
                        break  # an error page: its start says enough
                    raise XoProtocolError(f"GET {resp.url} answered more than {MAX_BODY >> 20} MiB "
                                          f"(decoded): refused, as no listing of XO's is that large")
                chunks.append(chunk)
            return _Answer(resp.status_code, resp.url, resp.headers, b"".join(chunks))

    async def _send(self, method: str, path: str, *, object_id: str | None, **kwargs: Any) -> httpx.Response:
        """A request that changes something: sent once; a 2xx response, or the XO error."""
        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise xo_unreachable(exc, str(self.api_url.join(path))) from exc
        if not 200 <= resp.status_code < 300:
            raise xo_error_from_response(resp.status_code, resp.content, url=str(resp.url),
                                         location=resp.headers.get("location"),
                                         object_id=object_id)
        return resp


@dataclass(frozen=True, slots=True)
class _Answer:
    """A GET's answer, its body read whole (and bounded)."""

    status_code: int
    url: httpx.URL
    headers: httpx.Headers
    content: bytes


def _worth_retrying(err: XofsError) -> bool:
    """A 5xx or a connection failure may pass in a second; a certificate or TLS failure will not, and an XO
    silent for the read timeout is slow, not gone: trying again would wait as long again (and start a new
    export, a snapshot of a running VM, each time)."""
    return not isinstance(err, XoStalled) and not any(isinstance(e, ssl.SSLError) for e in error_chain(err))


# --- parsing ---

def parse_collection(body: bytes, content_type: str, *, what: str) -> list[dict]:
    """The usable objects of a listing answer (NDJSON or a JSON array), `href` dropped.

    Bad items (not JSON, not an object, no id, a duplicate id, a key of the wrong type) are logged one line
    each and skipped; `XoProtocolError` is raised only when nothing in the answer is usable.
    """
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype and ctype != "application/x-ndjson" and "json" not in ctype and ctype != "text/plain":
        raise XoProtocolError(f"GET {what} answered {ctype}, not a JSON listing")
    raw_items, bad = _split_items(body, ctype, what)
    result: list[dict] = []
    seen: set[str] = set()
    for item in raw_items:
        problem = item_problem(item)
        if problem is None and item["id"] in seen:
            problem = f"duplicate id {item['id']}"
        if problem:
            log.warning("GET %s: skipping an item: %s: %.200r", what, problem, item)
            bad += 1
            continue
        seen.add(item["id"])
        result.append(_drop_hrefs(item))
    if not result and bad:
        raise XoProtocolError(f"GET {what}: none of the {bad} items in the answer is usable")
    return result


def _split_items(body: bytes, ctype: str, what: str) -> tuple[list[Any], int]:
    """The decoded items and the number of undecodable NDJSON lines.

    orjson, not json: it is several times faster on a 10,000-VM listing, and it shares key strings between
    objects (json.loads per line makes every object hold its own copies: some 40% more memory). An NDJSON
    line is decoded on its own, so one that is not UTF-8 costs that item only, not the whole listing.
    """
    stripped = body.lstrip()
    if ctype != "application/x-ndjson" and stripped.startswith(b"["):
        try:
            items = _loads(stripped.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise XoProtocolError(f"GET {what} answered a body that is not UTF-8") from exc
        except ValueError as exc:
            raise XoProtocolError(f"GET {what} answered a JSON array that does not parse: {exc}") from exc
        return items, 0
    if body.strip() and not body.endswith(b"\n"):
        # XO ends every line, the last one too: one without its end was cut (a Content-Length that lies);
        # its objects would silently vanish from the mount until the next full read.
        raise XoProtocolError(f"GET {what} answered NDJSON whose last line has no end: the answer was cut")
    items: list[Any] = []
    bad = 0
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(_loads(line.decode("utf-8")))
        except ValueError:  # UnicodeDecodeError included
            log.warning("GET %s: skipping NDJSON line %d, not JSON in UTF-8: %.200r", what, number, line)
            bad += 1
    return items, bad


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # orjson refuses a lone surrogate (`"\ud800"`), which XO writes for names that hold one (JavaScript
        # strings may): json takes it, and xofs.names shows it safely.
        return json.loads(text)


def item_problem(item: Any) -> str | None:
    """Why an XO object cannot be used (None when it can)."""
    if not isinstance(item, dict):
        return f"not an object but {type(item).__name__}"
    if not isinstance(item.get("id"), str) or not item["id"]:
        return "no string id"
    for key, types in _FIELD_TYPES.items():
        value = item.get(key)
        if key in item and (not isinstance(value, types) or (types is int and isinstance(value, bool))):
            return f"{key} is a {type(value).__name__}"
        if types is int and key in item and (value >= 1 << 62 or value < 0 and item.get("type") in DISK_TYPES):
            # a disk's size becomes a file's (`.raw`): the kernel takes no negative one, nor one that
            # overflows; an SR's may be -1 (XAPI's "unknown", SR.introduce) and stays
            return f"{key} is {value}, out of range"
    return None


def _drop_hrefs(obj: dict) -> dict:
    """`_without_hrefs` in place, for listings (no copy of 10,000 objects)."""
    obj.pop("href", None)
    for key in [k for k in obj if k.endswith("_href")]:
        del obj[key]
    return obj


def _without_hrefs(obj: dict) -> dict:
    # `href` on every listed item; legacy single objects also had `vdis_href`, `messages_href`…
    return {k: v for k, v in obj.items() if k != "href" and not k.endswith("_href")}


def _with_id(fields: str) -> str:
    names = [f.strip() for f in fields.split(",") if f.strip()]
    if "*" in names or "id" in names:
        return fields
    return ",".join([*names, "id"])


def _object_id_of(path: str) -> str | None:
    """The object an export path is about: `vdis/<id>.vhd` -> `<id>`."""
    last = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return last.rsplit(".", 1)[0] or None


def _new_vdi_id(response: ExportResponse, body: bytes, url: str) -> str:
    """The uuid in an import answer: `{"id"}` (201), a bare uuid (legacy 200), else the Location header."""
    text = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    candidate = parsed.get("id") if isinstance(parsed, dict) else parsed
    if isinstance(candidate, str) and _UUID.fullmatch(candidate):
        return candidate.lower()
    location = response.headers.get("location", "").rstrip("/").rsplit("/", 1)[-1]
    if _UUID.fullmatch(location):
        return location.lower()
    raise XoProtocolError(f"POST {url} answered {response.status} without a VDI uuid: {text[:200]!r}")


async def _error_body(response: ExportResponse) -> bytes:
    """What an error answer says, as far as it can be read (it is only used for the message)."""
    try:
        return await response.read_all(ERROR_BODY_LIMIT)
    except XofsError:
        return b""
