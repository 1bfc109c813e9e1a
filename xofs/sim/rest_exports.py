"""Exports: `GET /rest/v0/vms/<id>.xva` (and vm-snapshots, vm-templates) and `GET /rest/v0/vdis/<id>.{raw,vhd}`
(and vdi-snapshots), streamed as xo-server pipes XAPI's stream through.

What a client sees, as recorded: 200 with lowercase `content-disposition: attachment; filename=<id>.<fmt>`
and `content-type: application/octet-stream`, no length (chunked), Range ignored. The headers leave only
once "XAPI answered", here once the first chunk of the body is ready. The unknown id is checked first (404
even with a bad format), then tsoa's checks (422). A Running or Paused VM is snapshotted first as
`[XO Export] <name_label>`; that snapshot is what is exported, and it is destroyed when the stream ends or
the client goes away, so event watchers see it come and go, in the recorded sequence of frames: the pending
export task alone, the snapshot's objects about 200 ms later, then at the end the snapshot and its devices
leave while its VDI-snapshots are sent again without VBDs, and those leave about 200 ms later. XAPI `task`
objects come and go around every export, as in the recorded event frames.

`application/octet-stream` counts as compressible for Express's `compression()` (mime-db says so), hence
the recorded `Vary: Accept-Encoding`: a client that sends `Accept-Encoding: gzip` gets the export
gzip-encoded on the fly, as from a real XO. HEAD runs the whole export (snapshot included) and sends only
the headers, as a real XO does.

Fault knobs (`faults.py`) cut or stall an export after a number of body bytes, send it in chunks as small
as a real XO's (`export_chunk_bytes`), or slowly (`export_bytes_per_second`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import trio

from xofs.formats.vhd import dynamic_vhd_stream
from xofs.formats.xva import compress_stream, xva_stream
from xofs.sim.faults import Faults
from xofs.sim.model import SimError, SimModel
from xofs.sim.rest_http import Request, Send, StreamSender
from xofs.sim.rest_params import ParamErrors

log = logging.getLogger(__name__)

RAW_CHUNK = 4 << 20  # bytes per chunk of a raw export: big chunks keep loopback above 1 GB/s
VHD_TIMESTAMP = 1_795_000_000  # a fixed VHD footer time, so that exporting twice gives the same bytes
VM_FORMATS = ("ova", "xva")
# XO learns what XAPI did through `event.from`, which returned about every 200 ms in the recorded export of a
# running VM (`exports/vm-xva.running.web-01.with-ws.ws-frames.jsonl`): the snapshot's objects entered about
# 220 ms after the export task, and its disks left about 200 ms after the snapshot itself.
XAPI_EVENT_S = 0.2
VDI_FORMATS = ("raw", "vhd")
COMPRESS_VALUES = ("zstd", "gzip")


def download_headers(obj_id: str, fmt: str) -> list[tuple[str, str]]:
    """The two headers XO's export services set, in lower case as they reach the wire."""
    return [("content-disposition", f"attachment; filename={obj_id}.{fmt}"),
            ("content-type", "application/octet-stream")]


def vm_compression(req: Request, errors: ParamErrors) -> str | None:
    """The XAPI `use_compression` of `?compress=`: `zstd`, `gzip` (also `true`, deprecated) or None.

    xo-server's deprecation middleware first turns `true`/`false` into `gzip`/absent; tsoa then accepts
    `boolean | 'zstd' | 'gzip'`, so `TRUE` still passes (as a boolean, meaning gzip) and anything else
    fails with the union message.
    """
    value = req.query.get("compress")
    if value == "true":
        value = "gzip"
    elif value == "false":
        value = None
    if value is None or value in COMPRESS_VALUES:
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return "gzip" if value.lower() == "true" else None
    errors.choice("compress", value, COMPRESS_VALUES)
    return None


class Exporter:
    """Streams exports from the model's disks, with the faults' cut and stall knobs applied."""

    def __init__(self, model: SimModel, faults: Faults) -> None:
        self.model = model
        self.faults = faults

    async def export_vm(self, req: Request, send: Send, vm_type: str, obj_id: str, fmt: str) -> None:
        vm = self.model.get_typed(obj_id, vm_type)
        errors = ParamErrors()
        errors.choice("format", fmt, VM_FORMATS)
        compression = vm_compression(req, errors)
        errors.raise_if_any()
        if fmt == "ova":
            raise SimError.not_implemented()
        task = self.model.start_task("[XO] VM export", vm["name_label"])
        exported = vm
        snapshot_id = snapshot_task = None

        def end(ok: bool) -> None:
            self.model.finish_task(task, status="success" if ok else "failure")
            if snapshot_id is None:
                return
            try:
                disks = self.model.vm_destroy(snapshot_id)
            except SimError as error:  # XO only logs a failed clean-up (a destroy-blocked VM, say)
                log.warning("could not destroy export snapshot %s: %s", snapshot_id, error.message)
                return
            # XO destroys the VDI-snapshots once XAPI has told it the snapshot is gone: watchers first see
            # them again without their VBDs, then leave a batch later. The batch goes out now, so that the
            # next one follows it by XAPI_EVENT_S whatever else keeps the model's loop busy.
            self.model.flush_events()
            self.model.call_later(XAPI_EVENT_S, lambda: self.model.destroy_vdis(disks))

        def cleanup(ok: bool) -> None:
            if snapshot_task is None:
                end(ok)
            else:
                # XO destroys the `Async.VM.snapshot` task once it has the snapshot, and sees it leave at its
                # next `event.from`, with whatever XAPI did meanwhile: a stream that ended before then ends
                # in the batch of that exit (`vm-xva.running.web-01.with-ws.ws-frames.jsonl`, 1 MiB in 17 ms).
                self.model.at_task_exit(snapshot_task, lambda: end(ok))

        if vm["power_state"] in ("Running", "Paused"):
            try:
                self.model.flush_events()  # the pending export task enters alone
                await trio.sleep(XAPI_EVENT_S)  # then XO waits for `Async.VM.snapshot`, through XAPI's events
                snapshot_id = self.model.vm_snapshot(vm["id"], f"[XO Export] {vm['name_label']}")
            except BaseException:
                cleanup(False)
                raise
            self.model.flush_events()  # watchers see the snapshot before the stream starts
            exported = self.model.get_typed(snapshot_id, "VM-snapshot")
            snapshot_task = self.model.task_with_result(exported["_xapiRef"])
        try:
            chunks = self._xva_chunks(exported)
            if compression is not None:
                chunks = compress_stream(chunks, compression)
        except BaseException:
            cleanup(False)
            raise
        await self.stream(req, send, download_headers(vm["id"], fmt), chunks, cleanup,
                          in_thread=compression is not None)

    def _xva_chunks(self, vm: dict[str, Any]) -> Iterator[bytes]:
        disks = [(vdi, content) for _vbd, vdi, content in self.model.vm_disks(vm["id"])]
        vbds = [v for v in (self.model.get(i) for i in vm["$VBDs"]) if v is not None]
        srs = {vdi["$SR"]: self.model.get(vdi["$SR"]) for vdi, _ in disks}
        return xva_stream(vm, disks, vbds=vbds, srs=[sr for sr in srs.values() if sr is not None],
                          hostname=self._hostname(vm))

    def _hostname(self, vm: dict[str, Any]) -> str:
        """The host XAPI would export from: the VM's own host, else the pool master."""
        container = self.model.get(vm["$container"])
        if container is None or container["type"] != "host":
            pool = self.model.get(vm["$pool"])
            container = self.model.get(pool["master"]) if pool is not None else None
        return container["hostname"] if container is not None else "xcp-01"

    async def export_vdi(self, req: Request, send: Send, vdi_type: str, obj_id: str, fmt: str) -> None:
        vdi = self.model.get_typed(obj_id, vdi_type)
        errors = ParamErrors()
        errors.choice("format", fmt, VDI_FORMATS)
        errors.raise_if_any()
        disk = self.model.disk(vdi["id"])
        if fmt == "raw":
            task = self.model.start_task("[XO] Exporting content of VDI as raw stream")
            chunks: Iterator[bytes] = disk.iter_raw(RAW_CHUNK)
        else:
            task = self.model.start_task(f"[XO] Exporting content of VDI  {vdi['name_label']} as vhd stream")
            chunks = dynamic_vhd_stream(disk, uuid=bytes.fromhex(vdi["uuid"].replace("-", "")),
                                        timestamp=VHD_TIMESTAMP)

        def cleanup(ok: bool) -> None:
            self.model.finish_task(task, status="success" if ok else "failure")

        await self.stream(req, send, download_headers(vdi["id"], fmt), chunks, cleanup)

    async def stream(self, req: Request, send: Send, headers: list[tuple[str, str]], chunks: Iterator[bytes],
                     cleanup: Callable[[bool], None], *, in_thread: bool = False) -> None:
        """Send `chunks` as the body; `cleanup(completed)` runs however the stream ends."""
        out = StreamSender(req, send, headers)
        completed = False
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_disconnect, req, scope)
                    completed = await self._pump(req, out, chunks, in_thread)
                    nursery.cancel_scope.cancel()
        finally:
            cleanup(completed)

    async def _pump(self, req: Request, out: StreamSender, chunks: Iterator[bytes], in_thread: bool) -> bool:
        """Move the chunks to the client; False if a fault cut, ended early or stalled the stream."""
        end = object()
        knobs = {"cut": self.faults.cut_export_after_bytes, "end": self.faults.end_export_after_bytes,
                 "stall": self.faults.stall_export_after_bytes}
        stop = min((n for n in knobs.values() if n is not None), default=None)
        fault = next((kind for kind, n in knobs.items() if n == stop), "")
        rate = self.faults.export_bytes_per_second
        piece_size = self.faults.export_chunk_bytes
        if rate is not None:  # paced: pieces of a tenth of a second's bytes at most, each sent on time
            piece_size = min(piece_size or rate, max(1, rate // 10))
        first = True
        began = trio.current_time()
        while True:
            chunk = await trio.to_thread.run_sync(next, chunks, end) if in_thread else next(chunks, end)
            if first:
                await out.start()  # "XAPI answered": the headers go once the stream has started
                first = False
            if chunk is end:
                # Every byte is handed over: the export is complete even if the client hangs up now.
                with trio.CancelScope(shield=True):
                    await out.end()
                return True
            assert isinstance(chunk, bytes)
            for piece in _pieces(chunk, piece_size):
                if stop is not None and out.sent + len(piece) >= stop:
                    await out.write(piece[: stop - out.sent])
                    self.faults.note_export_fault(fault)
                    if fault == "end":
                        await out.end()  # XAPI's answer ended early: XO ends its own cleanly
                    elif fault == "stall":
                        await trio.sleep_forever()  # until the client gives up (the disconnect watcher)
                    return False  # unless it was ended above, the server drops the connection mid-body
                await out.write(piece)
                if rate is not None:
                    await trio.sleep_until(began + out.sent / rate)
            if req.method == "HEAD":
                await trio.sleep(0)  # nothing is sent, so let the rest of the server run between chunks


def _pieces(chunk: bytes, size: int | None) -> list[bytes]:
    """`chunk` as the HTTP chunks to send: itself, or pieces of at most `size` bytes (the
    `export_chunk_bytes` knob: a real xo-server's chunks are those of its socket reads, 64 KiB at most)."""
    if size is None or len(chunk) <= size:
        return [chunk]
    return [chunk[at:at + size] for at in range(0, len(chunk), size)]


async def _cancel_on_disconnect(req: Request, scope: trio.CancelScope) -> None:
    await req.wait_disconnect()
    scope.cancel()

