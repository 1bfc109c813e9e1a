"""Imports: `POST /rest/v0/srs/<id>/vdis` (a new VDI) and `PUT /rest/v0/vdis/<id>.{raw,vhd}` (into one).

The order of events is xo-server's (`sr.controller` → `SR_importVdi` → `VDI_importContent`), so clients
and event watchers see what they would see with a real XO:

1. the SR (or VDI) is looked up first: an unknown id is a 404 even with a bad query; then tsoa's checks
   (422, e.g. a bare `?raw`);
2. the virtual size: a raw upload's Content-Length (none: the `assert.notEqual` 500, nothing created); a
   VHD's footer copy in its first 512 bytes, checked as XO does (a fixed VHD fails there, nothing created);
3. `VDI.create` (an `enter` event; an SR without room fails here as XAPI's `SR_FULL`);
4. without a Content-Length, "Trying to import a VDI without a length field…" (500), and the new VDI is
   destroyed;
5. an import task, and `other_config` `xo:import:task` / `xo:import:length` (the body length) while the
   body is written: raw bodies sparsely into a fresh disk file, VHD bodies converted as they arrive;
6. the VDI takes the new content, the task succeeds, and the answer is 201 with `Location:
   /rest/v0/vdis/<id>` and `{"id": …}` (204 for a PUT); the `other_config` keys go 0.2 s later, with the
   task, as XO's next event batch shows them gone. Any failure after step 3 destroys the
   VDI created in step 3 and answers the XAPI-side error `{"error": "500 Internal Server Error"}`.

The new VDI's `usage` is the body length, as with the recorded imports.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import io
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from xofs.formats.vhd import FOOTER_SIZE, VhdError, check_import_footer, vhd_to_raw
from xofs.sim.disks import BLOCK_SIZE
from xofs.sim.faults import Faults
from xofs.sim.model import SimModel
from xofs.sim.rest_http import Request, RestError, Send, send_bytes, send_empty, send_json
from xofs.sim.rest_params import ParamErrors

log = logging.getLogger(__name__)

NO_LENGTH = "Trying to import a VDI without a length field. Please report this error to the Xen Orchestra team."
RAW_NO_LENGTH = 'Expected "actual" to be strictly unequal to:\n\nundefined'
TASK_PROGRESS_EVERY = 1.0  # seconds between two updates of an import task's progress
UPLOAD_FAILED = "500 Internal Server Error"  # the HTTP error of XAPI's /import_raw_vdi/, as XO reports it
XAPI_ERROR_INFO = "This is a XenServer/XCP-ng error, not an XO error"
VDI_FORMATS = ("raw", "vhd")
PIECE = 1 << 20  # what the body's reader hands the VHD converter's thread at a time
PIECES_QUEUED = 4
UNCACHE_EVERY = 32 << 20  # a disk being written leaves the page cache this often (written back first)


class UploadFailed(Exception):
    """The upload to "XAPI" failed (short body, bad VHD past its footer, injected fault)."""


def default_name() -> str:
    """`'[XO] Imported disk - ' + new Date().toISOString()`."""
    now = datetime.datetime.now(datetime.UTC)
    return "[XO] Imported disk - " + now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sr_full(size: int, free: int) -> RestError:
    """XAPI's `SR_FULL(requested, maximum)` as XO's REST reports an XapiError: 500 with `info`."""
    return RestError(500, f"SR_FULL({size}, {max(free, 0)})", info=XAPI_ERROR_INFO)


class Importer:
    """Writes uploads into the model's disks."""

    def __init__(self, model: SimModel, faults: Faults, *, legacy: bool = False) -> None:
        self.model = model
        self.faults = faults
        self.legacy = legacy

    async def import_new(self, req: Request, send: Send, sr_id: str) -> None:
        """`POST /rest/v0/srs/<id>/vdis?name_label=&name_description=&raw=`."""
        sr = self.model.get_typed(sr_id, "SR")
        errors = ParamErrors()
        name_label = errors.string("name_label", req.query.get("name_label"))
        name_description = errors.string("name_description", req.query.get("name_description"))
        raw = errors.boolean("raw", req.query.get("raw"))
        if self.legacy:  # the legacy router: the mere presence of `raw` meant raw
            errors.fields.pop("raw", None)
            raw = "raw" in req.query
        errors.raise_if_any()
        length = req.content_length
        head = b""
        if raw:
            if length is None:
                raise RestError(500, RAW_NO_LENGTH)
            size = length
        else:
            head = await _read_head(req, FOOTER_SIZE)
            try:
                size = check_import_footer(head).current_size
            except VhdError as error:
                raise RestError(500, str(error)) from error
        if sr["size"] - sr["usage"] < size:
            raise sr_full(size, sr["size"] - sr["usage"])
        vdi = self.model.create_vdi(sr["id"], name_label=name_label or default_name(),
                                    name_description=name_description, size=size)
        self.model.flush_events()  # XO waits for VDI.create: watchers see the VDI before anything else
        try:
            if length is None:
                raise RestError(500, NO_LENGTH)
            await self._upload(req, vdi, sr, "raw" if raw else "vhd", head, length, base=None)
        except BaseException:
            if self.model.get(vdi["id"]) is not None:
                self.model.vdi_delete(vdi["id"])
            raise
        if self.legacy:
            await send_bytes(req, send, 200, vdi["id"].encode(), None, etag=False)
        else:
            await send_json(req, send, 201, {"id": vdi["id"]}, [("Location", f"/rest/v0/vdis/{vdi['id']}")])

    async def import_into(self, req: Request, send: Send, vdi_id: str, fmt: str) -> None:
        """`PUT /rest/v0/vdis/<id>.{raw,vhd}`: replace a VDI's content; 204."""
        vdi = self.model.get_typed(vdi_id, "VDI")
        errors = ParamErrors()
        errors.choice("format", fmt, VDI_FORMATS)
        errors.raise_if_any()
        length = req.content_length
        if length is None:
            raise RestError(500, NO_LENGTH)
        sr = self.model.get_typed(vdi["$SR"], "SR")
        await self._upload(req, vdi, sr, fmt, b"", length, base=vdi)
        await send_empty(req, send, 204)

    async def _upload(self, req: Request, vdi: dict[str, Any], sr: dict[str, Any], fmt: str, head: bytes,
                      length: int, *, base: dict[str, Any] | None) -> None:
        """Steps 5 and 6: the task, the `other_config` marks, the body into a new disk file."""
        task = self.model.start_task(f"[XO] Importing content into VDI {vdi['name_label']} on SR {sr['name_label']}")
        marks = {"xo:import:length": str(length), "xo:import:task": task}
        # XO sets the two marks with two concurrent XAPI calls. In four of the seven recorded imports its
        # `event.from` came between them, and the VDI entered beside the pending task with the length only
        # (`import-raw-4MiB.ws-frames.jsonl`); the task's mark came in a later batch.
        self._mark(vdi["id"], "xo:import:length", marks["xo:import:length"])
        self.model.flush_events()
        self._mark(vdi["id"], "xo:import:task", task)
        path = self.model.new_disk_path(vdi["id"])
        ok = False
        try:
            if self.faults.take_import_failure():
                await req.drain()
                raise UploadFailed("fail_next_import fault")
            body = _progressing(self.model, task, length, _body_after(req, head, self.faults.import_bytes_per_second))
            if fmt == "raw":
                await _write_raw(body, path, length, vdi["size"], base=self._base_disk(base))
            else:
                await _write_vhd(body, path, length, vdi["size"])
            ok = True
        except (UploadFailed, VhdError) as error:
            log.info("import into VDI %s failed: %s", vdi["id"], error)
            raise RestError(500, UPLOAD_FAILED) from error
        finally:
            if not ok:
                # XO learns of the failure at its next `event.from`; then it destroys the task, takes the
                # marks off, and the POST's caller destroys the VDI: watchers see the failed task, then all
                # that in the next batch (`import-raw-xapi-500.ws-frames.jsonl`).
                self.model.finish_task(task, status="failure")
                self.model.flush_events()
                self.model.retire_task(task)
                self._unmark(vdi["id"], marks)
                path.unlink(missing_ok=True)
        # XAPI ends the task and XO answers while its objects still show the marks: they go in XO's next
        # event batch, with the task (`import-raw-4MiB.ws-frames.jsonl`: success at 0.425 s, 201 at 0.468 s,
        # marks and task gone at 0.627 s).
        attached = False
        try:
            self.model.attach_disk_file(vdi["id"], path, usage=length)
            attached = True
        finally:  # a VDI deleted meanwhile: the task fails, and leaves all the same
            self.model.finish_task(task, status="success" if attached else "failure",
                                   with_exit=lambda: self._unmark(vdi["id"], marks))

    def _mark(self, vdi_id: str, key: str, value: str) -> None:
        """Set one `other_config` entry as XO does: removed, then added (so it goes last)."""
        other_config = {k: v for k, v in self.model.get_typed(vdi_id, "VDI")["other_config"].items() if k != key}
        self.model.update(vdi_id, {"other_config": {**other_config, key: value}})

    def _unmark(self, vdi_id: str, marks: dict[str, str]) -> None:
        """Take this import's marks off the VDI (not those of another import into it since)."""
        current = self.model.get(vdi_id)
        if current is not None:
            kept = {k: v for k, v in current["other_config"].items() if marks.get(k) != v}
            self.model.update(vdi_id, {"other_config": kept})

    def _base_disk(self, vdi: dict[str, Any] | None) -> Any:
        return self.model.disk(vdi["id"]) if vdi is not None else None


async def _read_head(req: Request, n: int) -> bytes:
    """The first `n` bytes of the body (fewer if it is shorter), as `peekFooterFromVhdStream` reads them."""
    head = bytearray()
    if n:
        async for chunk in req.body_chunks():
            head += chunk
            if len(head) >= n:
                break
    return bytes(head)


async def _progressing(model: SimModel, task: str, length: int, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`body`, the task's `progress` updated as it goes, at most once a second: XAPI's import updates its
    task as the disk comes in (the recordings' task ends at 0.97 with `success`)."""
    received, told = 0, time.monotonic()
    async for chunk in body:
        received += len(chunk)
        yield chunk
        if time.monotonic() - told >= TASK_PROGRESS_EVERY and length:
            told = time.monotonic()
            model.task_progress(task, received / length)


async def _body_after(req: Request, head: bytes, rate: int | None = None) -> AsyncIterator[bytes]:
    """The whole body again: the bytes already read, then the rest as it arrives (at most `rate` bytes
    per second: the `import_bytes_per_second` fault knob)."""
    if head:
        yield head
    async for chunk in req.body_chunks():
        yield chunk
        if rate:
            await trio.sleep(len(chunk) / rate)


async def _write_raw(body: AsyncIterator[bytes], path: Path, length: int, size: int, *, base: Any) -> None:
    """A raw body into a sparse file of `size` bytes (all-zero pieces left as holes).

    Written over a copy of `base` (a PUT into an existing VDI keeps what the upload does not cover, as
    XAPI's raw import writes in place). More bytes than the VDI holds is a failed upload.
    """
    with open(path, "wb") as out:
        fd = out.fileno()
        os.ftruncate(fd, size)
        if base is not None:
            for block in base.allocated_blocks():
                offset = block * BLOCK_SIZE
                os.pwrite(fd, base.read(offset, BLOCK_SIZE), offset)
        offset = uncached = 0
        async for chunk in body:
            if offset + len(chunk) > size:
                raise UploadFailed(f"the body is larger than the VDI ({size} bytes)")
            if chunk.count(0) != len(chunk) or base is not None:
                os.pwrite(fd, chunk, offset)
            offset += len(chunk)
            if offset - uncached >= UNCACHE_EVERY:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                uncached = offset
    if offset != length:
        raise UploadFailed(f"the body ended after {offset} of {length} bytes")


async def _write_vhd(body: AsyncIterator[bytes], path: Path, length: int, size: int) -> None:
    """A VHD body converted into the raw content of `path` as it arrives, as XO pipes it on to XAPI.

    A thread converts (`vhd_to_raw` reads forward only) what this task hands it, a list of body chunks of
    about PIECE bytes at a time. When the conversion fails, the rest of the body is still read, so the
    client gets the answer after its last byte, as before; a short body is reported as such first.
    """
    hand, take = trio.open_memory_channel[list[bytes]](PIECES_QUEUED)
    received = 0

    async def feed() -> None:
        nonlocal received
        batch: list[bytes] = []
        batched = 0
        taking = True
        async with hand:
            async for chunk in body:
                received += len(chunk)
                if not taking:
                    continue
                batch.append(chunk)
                batched += len(chunk)
                if batched >= PIECE:
                    try:
                        await hand.send(batch)
                    except trio.BrokenResourceError:  # the conversion stopped: drain the body
                        taking = False
                    batch, batched = [], 0
            if batch and taking:
                with contextlib.suppress(trio.BrokenResourceError):
                    await hand.send(batch)

    failure: VhdError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        try:
            with take:
                await trio.to_thread.run_sync(
                    lambda: vhd_to_raw(_PieceReader(take), path, expected_size=size, uncache_every=UNCACHE_EVERY))
        except VhdError as error:
            failure = error
    if received != length:
        raise UploadFailed(f"the body ended after {received} of {length} bytes")
    if failure is not None:
        raise failure


class _PieceReader(io.RawIOBase):
    """The thread's side of `_write_vhd`: `read` hands out what the trio task sent, piece by piece."""

    def __init__(self, pieces: trio.MemoryReceiveChannel[list[bytes]]) -> None:
        super().__init__()
        self.pieces = pieces
        self.queue: collections.deque[bytes] = collections.deque()
        self.current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> memoryview:  # type: ignore[override]
        while not self.current:
            if not self.queue:
                try:
                    self.queue.extend(trio.from_thread.run(self.pieces.receive))
                except trio.EndOfChannel:
                    return memoryview(b"")
            self.current = memoryview(self.queue.popleft())
        n = len(self.current) if size < 0 else size
        data, self.current = self.current[:n], self.current[n:]
        return data
