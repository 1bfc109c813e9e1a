"""ExportManager driven directly (no kernel) against the simulator: bytes, sizes, spool, limits, failures.

Every read result is compared with the simulator's own answer to a plain GET of the same export, and what
reached XO is checked in the simulator's request counts (`/_sim/stats`), not only in xofs' own counters.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import zstandard

from tests.support import SimProcess, eventually, set_faults
from xofs.cache import COLLECTIONS, ObjectCache
from xofs.client.rest import RestClient
from xofs.errors import XofsError
from xofs.export_sizes import BOUND_MARGIN, compressed_bound, vhd_bound
from xofs.export_stream import RECEIVE
from xofs.exports import BACK_WINDOW, ExportManager
from xofs.views import Export

MiB = 1 << 20
SMALL = 3_000_000  # not a multiple of anything: the last VHD block and XVA chunk are partial
MEDIUM = 40 * MiB + 12345


# --- fixtures and helpers ---------------------------------------------------------------------------------


def import_raw(sim: SimProcess, data: bytes, name: str) -> str:
    """A new VDI with this content on the first non-ISO SR; its id."""
    srs = sim.get_json("/rest/v0/srs?fields=id,content_type")
    sr = next(s["id"] for s in srs if s.get("content_type") != "iso")
    status, _, body = sim.request("POST", f"/rest/v0/srs/{sr}/vdis?raw=true&name_label={name}", data,
                                  {"Content-Type": "application/octet-stream"})
    assert status in (200, 201), body
    return json.loads(body)["id"]


def disk_bytes(size: int, seed: int) -> bytes:
    """Random blocks with long zero runs, so that VHD and XVA exports skip some of them."""
    out = bytearray(size)
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    for at in range(0, size, 3 * MiB):
        piece = block[: min(MiB, size - at)]
        out[at : at + len(piece)] = piece
    out[-100:] = b"\xab" * 100
    return bytes(out)


def get_export(sim: SimProcess, path: str) -> bytes:
    status, _, body = sim.request("GET", f"/rest/v0/{path}")
    assert status == 200, (path, status, body[:300])
    return body


def export_gets(sim: SimProcess, path: str) -> int:
    """How many GETs of this export the simulator answered."""
    return sim.get_json("/_sim/stats")["paths"].get(f"GET /rest/v0/{path.split('?')[0]}", 0)


@pytest.fixture(scope="module")
def xo(tmp_path_factory) -> SimProcess:
    """A simulator of this module's own, with small imported disks (`xo.small`, `xo.medium`)."""
    state = tmp_path_factory.mktemp("exports-sim")
    proc = SimProcess(args=["--seed", "1", "--state-dir", str(state / "state")], log_path=state / "sim.log")
    proc.start()
    proc.small = import_raw(proc, disk_bytes(SMALL, 1), "small")
    proc.medium = import_raw(proc, disk_bytes(MEDIUM, 2), "medium")
    vms = proc.get_json("/rest/v0/vms?fields=id,name_label")
    proc.halted_vm = next(v["id"] for v in vms if v["name_label"] == "db-01")
    yield proc
    proc.stop()


async def load_cache(client: RestClient) -> ObjectCache:
    cache = ObjectCache()
    objects: list[dict] = []
    for coll in sorted(set(COLLECTIONS.values())):
        objects += await client.collection(coll)
    cache.replace_all(objects)
    return cache


@asynccontextmanager
async def running(sim: SimProcess, spool_dir: Path, token: str | None = None,
                  **kwargs) -> AsyncIterator[ExportManager]:
    client = RestClient(sim.url, sim.token)
    cache = await load_cache(client)
    if token is not None:
        await client.aclose()
        client = RestClient(sim.url, token)
    manager = ExportManager(client, cache, spool_dir=spool_dir, **kwargs)
    manager.size_events = []
    manager.on_size_known = manager.size_events.append
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            yield manager
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()


def vdi_export(manager: ExportManager, vdi_id: str, fmt: str) -> Export:
    size = manager.cache.get(vdi_id)["size"]
    return Export("vdis", vdi_id, fmt, exact_size=size if fmt == "raw" else None)


async def read_all(file, start: int = 0, block: int = MiB) -> bytes:
    out = bytearray()
    offset = start
    while True:
        data = await file.read(offset, block)
        if not data:
            return bytes(out)
        out += data
        offset += len(data)


async def read_file(manager: ExportManager, export: Export, block: int = MiB) -> bytes:
    f = await manager.open(export, f"/{export.path}")
    try:
        return await read_all(f, block=block)
    finally:
        await f.release()


# --- sequential reads and sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
async def test_sequential_read_gives_xos_bytes(xo, tmp_path, fmt):
    async with running(xo, tmp_path / "spool") as m:
        export = vdi_export(m, xo.medium, fmt)
        before = export_gets(xo, export.path)
        data = await read_file(m, export)
        assert hashlib.sha256(data).digest() == hashlib.sha256(get_export(xo, export.path)).digest()
        assert export_gets(xo, export.path) == before + 2  # ours and the reference
        assert len(m.spool) == 0  # a sequential reader never touches the disk


async def test_odd_read_sizes_and_small_backward_seeks(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        export = vdi_export(m, xo.medium, "vhd")
        want = get_export(xo, export.path)
        f = await m.open(export, "/x.vhd")
        offset, got = 0, bytearray()
        sizes = [4096, 131072, 1, 999_999, MiB]
        i = 0
        while offset < len(want):
            size = sizes[i % len(sizes)]
            i += 1
            data = await f.read(offset, size)
            assert data == want[offset : offset + size]
            if i % 7 == 0 and offset > 300_000:  # re-read a little behind the furthest point read
                back = offset + len(data) - 300_000
                assert await f.read(back, 4096) == want[back : back + 4096]
            got += data
            offset += len(data)
        assert bytes(got) == want
        assert await f.read(len(want), MiB) == b""
        await f.release()
        assert len(m.spool) == 0


async def test_raw_size_is_exact_and_vhd_size_a_bound_until_measured(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        raw = vdi_export(m, xo.small, "raw")
        assert m.attrs(raw).size == SMALL and m.attrs(raw).exact
        assert m.xattrs(raw)["user.xo.size_exact"] == b"true"

        vhd = vdi_export(m, xo.small, "vhd")
        real = len(get_export(xo, vhd.path))
        bound = m.attrs(vhd)
        assert not bound.exact and m.xattrs(vhd)["user.xo.size_exact"] == b"false"
        assert bound.size == vhd_bound(SMALL) + BOUND_MARGIN and vhd_bound(SMALL) >= real
        # stat and open cost no export
        gets = export_gets(xo, vhd.path)
        f = await m.open(vhd, "/x.vhd")
        await f.release()
        assert export_gets(xo, vhd.path) == gets

        assert len(await read_file(m, vhd)) == real
        assert m.attrs(vhd).size == real and m.attrs(vhd).exact
        assert m.xattrs(vhd)["user.xo.size_exact"] == b"true"
        assert m.size_events == [vhd]

        # an event about the disk makes the size a bound again
        m.on_changes([_change(m, xo.small)])
        assert m.attrs(vhd).size == bound.size and not m.attrs(vhd).exact


def _change(m: ExportManager, obj_id: str):
    from xofs.cache import Change

    obj = m.cache.get(obj_id)
    return Change(obj_id, obj["type"], obj, {**obj, "name_label": "renamed"})


async def test_the_end_of_an_import_keeps_the_length_measured_since(xo, tmp_path):
    """XO takes an import's marks off the disk 0.2 s after it answered the upload: an `rsync` right after
    the import measured the `.vhd` in between, and that event made its size a bound again, so the next
    rsync failed too. Marks that appear (an import into the disk starts) still forget it."""
    from xofs.cache import Change

    async with running(xo, tmp_path / "spool") as m:
        vhd = vdi_export(m, xo.small, "vhd")
        real = len(await read_file(m, vhd))
        disk = m.cache.get(xo.small)
        marked = {**disk, "other_config": {**disk["other_config"], "xo:import:task": "t",
                                           "xo:import:length": "1"}}
        m.on_changes([Change(xo.small, disk["type"], marked, disk)])
        assert m.attrs(vhd).size == real and m.attrs(vhd).exact
        m.on_changes([Change(xo.small, disk["type"], disk, marked)])
        assert not m.attrs(vhd).exact


async def test_an_event_about_a_vm_forgets_its_disks_sizes(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        vm = m.cache.get(xo.halted_vm)
        disk = next(m.cache.get(m.cache.get(v)["VDI"])["id"] for v in vm["$VBDs"]
                    if m.cache.get(v).get("VDI") and m.cache.get(v)["type"] == "VBD")
        export = vdi_export(m, disk, "vhd")
        m.measured(export, 12345, m._generations(export))
        assert m.attrs(export).size == 12345
        m.size_events.clear()
        m.on_changes([_change(m, xo.halted_vm)])
        assert not m.attrs(export).exact
        assert m.size_events == [export]  # the kernel drops the disk's size too


async def test_xva_and_compressed_xva(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        xva = Export("vms", xo.halted_vm, "xva")
        zst = Export("vms", xo.halted_vm, "xva", "compress=zstd")
        gz = Export("vms", xo.halted_vm, "xva", "compress=gzip")
        bounds = {e: m.attrs(e).size for e in (xva, zst, gz)}
        plain = await read_file(m, xva)
        assert plain == get_export(xo, xva.path)
        assert plain[:7] == b"ova.xml"
        packed = await read_file(m, zst)
        assert zstandard.ZstdDecompressor().decompressobj().decompress(packed) == plain
        gzipped = await read_file(m, gz)
        import gzip

        assert gzip.decompress(gzipped) == plain
        for export, data in ((xva, plain), (zst, packed), (gz, gzipped)):
            assert bounds[export] >= len(data)
            assert m.attrs(export).size == len(data) and m.attrs(export).exact
        assert bounds[zst] == compressed_bound(bounds[xva] - BOUND_MARGIN, "zstd") + BOUND_MARGIN


# --- random access and the spool --------------------------------------------------------------------------


async def test_footer_first_is_served_from_one_spooled_export(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        export = vdi_export(m, xo.medium, "vhd")
        want = get_export(xo, export.path)
        gets = export_gets(xo, export.path)
        f = await m.open(export, "/x.vhd")
        assert await f.read(len(want) - 512, 512) == want[-512:]  # qemu-img's footer check
        assert await f.read(0, 512) == want[:512]
        assert await f.read(1536, 4096) == want[1536 : 1536 + 4096]
        assert await read_all(f, block=65536) == want
        await f.release()
        assert export_gets(xo, export.path) == gets + 1
        assert len(m.spool) == 1 and m.spool.used == len(want)
        # a second open is served from the complete spool entry: no new export
        assert await read_file(m, export) == want
        assert export_gets(xo, export.path) == gets + 1
        # until XO says the disk changed
        m.on_changes([_change(m, xo.medium)])
        assert await read_file(m, export) == want
        assert export_gets(xo, export.path) == gets + 2


async def test_jump_after_the_start_diverts_the_running_export(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        export = vdi_export(m, xo.medium, "raw")
        want = get_export(xo, export.path)
        gets = export_gets(xo, export.path)
        f = await m.open(export, "/x.raw")
        assert await f.read(0, 4096) == want[:4096]
        assert await f.read(30 * MiB, MiB) == want[30 * MiB : 31 * MiB]  # jump: spool from here on
        assert await f.read(100, 1000) == want[100:1100]
        await f.release()
        assert export_gets(xo, export.path) == gets + 1


async def test_far_backward_seek_restarts_into_the_spool_checked(xo, tmp_path):
    async with running(xo, tmp_path / "spool", readahead=2 * MiB) as m:
        export = vdi_export(m, xo.medium, "vhd")
        want = get_export(xo, export.path)
        gets = export_gets(xo, export.path)
        f = await m.open(export, "/x.vhd")
        for offset in range(0, 10 * MiB, MiB):
            assert await f.read(offset, MiB) == want[offset : offset + MiB]
        assert f.feed.window_start > 0  # the start was dropped from memory
        assert await f.read(0, 4096) == want[:4096]
        assert await read_all(f, 5 * MiB) == want[5 * MiB :]
        await f.release()
        assert export_gets(xo, export.path) == gets + 2


async def settled(file) -> int:
    """What the export of an open file received once it stopped receiving (the same for 0.3 s)."""
    seen = [-1]
    with trio.fail_after(20):
        while True:
            await trio.sleep(0.1)
            seen.append(file.feed.received)
            if len(seen) > 3 and len(set(seen[-3:])) == 1:
                return seen[-1]


async def test_exports_streaming_at_once_share_the_read_ahead(xo, tmp_path):
    async with running(xo, tmp_path / "spool", readahead=8 * MiB) as m:
        export = vdi_export(m, xo.medium, "raw")
        want = get_export(xo, export.path)
        one = await m.open(export, "/one.raw")
        assert await one.read(0, MiB) == want[:MiB]
        # The stream is received up to the read-ahead past the end of the last read, and at most to the end
        # of the 2 MiB buffer the last receive went into.
        assert MiB + 8 * MiB <= await settled(one) < MiB + 8 * MiB + RECEIVE
        two = await m.open(export, "/two.raw")
        assert await two.read(0, MiB) == want[:MiB]
        assert MiB + 4 * MiB <= await settled(two) < MiB + 4 * MiB + RECEIVE  # half each
        await one.release()
        assert await two.read(MiB, MiB) == want[MiB:2 * MiB]
        assert 2 * MiB + 8 * MiB <= await settled(two) < 2 * MiB + 8 * MiB + RECEIVE  # alone again
        assert await two.read(2 * MiB, 30 * MiB) == want[2 * MiB:32 * MiB]
        await two.release()


async def test_a_later_export_takes_the_buffers_an_earlier_one_left(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        export = vdi_export(m, xo.medium, "raw")
        want = get_export(xo, export.path)
        mapped = []
        for name in ("first", "second", "third"):
            f = await m.open(export, f"/{name}.raw")
            assert await f.read(0, MiB) == want[:MiB]
            await settled(f)  # its whole read-ahead received
            await f.release()
            await eventually(lambda: m.buffers.held == 0, "its receiving task to end, and its buffers' views")
            mapped.append(m.buffers.mapped)
        assert mapped[0] > 0 and mapped[2] == mapped[1] == mapped[0]  # no new mapping after the first


async def test_receive_buffers_are_unmapped_once_no_export_runs_for_a_while(xo, tmp_path):
    async with running(xo, tmp_path / "spool", buffers_idle=0.5) as m:
        export = vdi_export(m, xo.medium, "raw")
        want = get_export(xo, export.path)
        f = await m.open(export, "/first.raw")
        assert await f.read(0, MiB) == want[:MiB]
        await settled(f)
        await trio.sleep(1.5)  # three idle periods, but the export still holds its slot
        assert m.buffers.pooled > 0
        assert await f.read(MiB, MiB) == want[MiB:2 * MiB]
        await f.release()
        with trio.fail_after(10):
            while m.buffers.pooled:
                await trio.sleep(0.1)
        before = m.buffers.mapped
        again = await m.open(export, "/again.raw")
        assert await read_all(again) == want  # fresh buffers, the same bytes
        await again.release()
        assert m.buffers.mapped > before


async def test_forward_skip_is_received_and_dropped_in_bounded_memory(xo, tmp_path):
    async with running(xo, tmp_path / "spool", readahead=2 * MiB) as m:
        export = vdi_export(m, xo.medium, "raw")
        want = get_export(xo, export.path)
        f = await m.open(export, "/x.raw")
        peak = reads = offset = 0
        while offset < len(want):
            data = await f.read(offset, 65536)
            assert data == want[offset : offset + 65536]
            peak = max(peak, sum(map(len, f.feed._window)))
            reads += 1
            offset += 65536 if reads % 50 else 10 * MiB  # every 50 reads, skip 10 MiB
            await trio.sleep(0)
        await f.release()
        assert len(m.spool) == 0
        # read-ahead + back window + one receive buffer at each end (the window holds whole buffers)
        assert peak <= 2 * MiB + BACK_WINDOW + 2 * RECEIVE


async def test_a_first_read_beyond_the_spool_limit_skips_in_memory(xo, tmp_path):
    async with running(xo, tmp_path / "spool", spool_limit=8 * MiB, readahead=2 * MiB) as m:
        export = vdi_export(m, xo.medium, "raw")
        want = get_export(xo, export.path)
        f = await m.open(export, "/x.raw")
        assert await f.read(30 * MiB, 4096) == want[30 * MiB : 30 * MiB + 4096]  # like `tail -c`
        assert await f.read(MEDIUM - 100, 100) == want[-100:]
        assert len(m.spool) == 0 and f.feed.window_start > 0
        await f.release()


async def test_spool_limit_evicts_least_recently_used(xo, tmp_path):
    async with running(xo, tmp_path / "spool", spool_limit=12 * MiB) as m:
        small_raw, small_vhd = vdi_export(m, xo.small, "raw"), vdi_export(m, xo.small, "vhd")
        for export in (small_raw, small_vhd):
            f = await m.open(export, "/x")
            await f.read(1000, 10)  # not at 0: spooled
            await read_all(f)
            await f.release()
        assert len(m.spool) == 2
        big = vdi_export(m, xo.medium, "raw")
        f = await m.open(big, "/big")
        await f.read(1000, 10)
        with pytest.raises(XofsError) as err:
            await read_all(f)  # 40 MiB cannot fit in 12 MiB; the two idle entries are dropped first
        assert err.value.errno == errno.EIO and "spool" in err.value.message
        await f.release()
        assert len(m.spool) == 0 and m.spool.used == 0


async def test_spool_directory_is_swept_at_start_and_exit(xo, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "xofs-export-leftover").write_bytes(b"x" * 1000)
    (spool / "someone-elses-file").write_bytes(b"keep")
    async with running(xo, spool) as m:
        assert not (spool / "xofs-export-leftover").exists()
        f = await m.open(vdi_export(m, xo.small, "vhd"), "/x")
        await f.read(4096, 10)
        assert os.listdir(spool) == ["someone-elses-file"]  # spool files are unlinked from the start
    assert os.listdir(spool) == ["someone-elses-file"]


# --- lifetime of an export ---------------------------------------------------------------------------------


async def test_sniffer_costs_one_cancelled_export(xo, tmp_path, caplog):
    caplog.set_level("DEBUG", logger="xofs.exports")
    async with running(xo, tmp_path / "spool") as m:
        export = Export("vms", xo.halted_vm, "xva")
        gets = export_gets(xo, export.path)
        f = await m.open(export, "/vms/x.xva")
        assert (await f.read(0, 1024))[:7] == b"ova.xml"
        feed = f.feed
        await f.release()
        await eventually(lambda: feed.done and not feed.running, "the feed to stop")
        assert feed.received < 70 * MiB  # stopped long before the end
        assert export_gets(xo, export.path) == gets + 1
        assert m.slots.free == m.max_exports
        assert any("cancelled after" in r.getMessage() and r.levelname == "DEBUG" for r in caplog.records)


async def test_concurrent_exports_are_limited(xo, tmp_path):
    async with running(xo, tmp_path / "spool", max_exports=1) as m:
        a = await m.open(vdi_export(m, xo.medium, "raw"), "/a")  # too big to end in the read-ahead
        b = await m.open(vdi_export(m, xo.medium, "vhd"), "/b")
        await a.read(0, 4096)
        with trio.move_on_after(0.5) as waited:
            await b.read(0, 4096)
        assert waited.cancelled_caught  # b waits for a's slot
        async with trio.open_nursery() as nursery:
            got = []

            async def read_b():
                got.append(await b.read(0, 4096))

            nursery.start_soon(read_b)
            await trio.sleep(0.2)
            assert not got
            await a.release()
        assert len(got[0]) == 4096
        await b.release()


async def test_a_reader_waiting_for_a_slot_fails_once_the_mount_stops(xo, tmp_path):
    """SIGTERM with a reader waiting for a slot: the stop waited for it (8 s seen), then an export started
    for nobody after the signal (QA: a paused VM's, so a snapshot)."""
    async with running(xo, tmp_path / "spool", max_exports=1, park_idle_after=0.5) as m:
        a = await m.open(vdi_export(m, xo.medium, "raw"), "/a")
        b = await m.open(vdi_export(m, xo.medium, "vhd"), "/b")
        await a.read(0, 4096)
        started = m.exports_started
        failed = []

        async def read_b():
            try:
                await b.read(0, 4096)
            except XofsError as err:
                failed.append(err)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_b)
            await trio.sleep(0.2)
            m.stop_starting()
            with trio.fail_after(3):  # within PARK_CHECK, and before a's idle slot would be taken (0.5 s)
                while not failed:
                    await trio.sleep(0.05)
        assert "not started: the mount is stopping" in failed[0].describe()
        assert m.exports_started == started
        await a.release()
        await b.release()


async def test_a_waiting_reader_takes_the_slot_of_an_idle_export(xo, tmp_path):
    async with running(xo, tmp_path / "spool", max_exports=1, park_idle_after=0.5, readahead=2 * MiB) as m:
        a_export, b_export = vdi_export(m, xo.medium, "raw"), vdi_export(m, xo.medium, "vhd")
        want_a, want_b = get_export(xo, a_export.path), get_export(xo, b_export.path)
        gets_a, gets_b = export_gets(xo, a_export.path), export_gets(xo, b_export.path)
        a = await m.open(a_export, "/a")
        b = await m.open(b_export, "/b")
        for offset in range(0, 5 * MiB, MiB):  # a reads a little, then waits for b (as `cmp a b` might)
            assert await a.read(offset, MiB) == want_a[offset : offset + MiB]
        with trio.fail_after(10):
            assert await b.read(0, MiB) == want_b[:MiB]  # a was parked for it
        assert a.feed.parked
        with trio.fail_after(30):  # a comes back: a new export, checked against what a had received
            assert await read_all(a, 5 * MiB) == want_a[5 * MiB :]
        assert await read_all(b, MiB) == want_b[MiB:]
        await a.release()
        await b.release()
        assert export_gets(xo, a_export.path) == gets_a + 2 and export_gets(xo, b_export.path) >= gets_b + 1


async def read_until_failure(f, what: str) -> tuple[int, XofsError]:
    """Read `f` a MiB at a time until a read fails: where, and the error. An empty read (an end) fails the test."""
    offset = 0
    with pytest.raises(XofsError) as err:
        while True:
            data = await f.read(offset, MiB)
            assert data, f"{what} must not look like an end"
            offset += len(data)
    return offset, err.value


async def test_broken_stream_fails_with_eio_naming_path_offset_and_cause(fresh_sim, tmp_path):
    data = disk_bytes(MEDIUM, 3)
    vdi = import_raw(fresh_sim, data, "cut")
    set_faults(fresh_sim, cut_export_after_bytes=5 * MiB)
    async with running(fresh_sim, tmp_path / "spool") as m:
        export = vdi_export(m, vdi, "raw")
        f = await m.open(export, "/vdis/cut.raw")
        offset, error = await read_until_failure(f, "a cut stream")
        assert error.errno == errno.EIO
        assert offset <= 5 * MiB
        text = error.describe()
        assert "/vdis/cut.raw" in text and f"offset {offset}" in text and vdi in text
        assert "ended early" in text or "closed" in text
        # and it stays failed: no silent resumption
        with pytest.raises(XofsError):
            await f.read(offset, MiB)
        # but the bytes it received before it broke are still its bytes (`head`, `file` reading the start)
        assert await f.read(offset - 4096, 4096) == data[offset - 4096:offset]
        with pytest.raises(XofsError):
            await f.read(offset - 4096, MiB)
        await f.release()


async def test_a_raw_resized_after_its_open_is_named_so_before_its_end_came(fresh_sim, tmp_path):
    """The read that reaches the size shown at open sees a longer stream before its end came: the log
    said "XO's export is longer than the VDI's size" while XO already said the size had changed (a race the
    mount test met once in four runs, whenever the read was quicker than the stream's end)."""
    vdi = import_raw(fresh_sim, disk_bytes(SMALL, 6), "grows")
    async with running(fresh_sim, tmp_path / "spool") as m:
        export = vdi_export(m, vdi, "raw")
        f = await m.open(export, "/vdis/grows.raw")
        status, _, _ = fresh_sim.request("PATCH", f"/rest/v0/vdis/{vdi}", json.dumps({"size": 4 * MiB}).encode(),
                                         {"Content-Type": "application/json"})
        assert status == 204
        m.cache.apply("enter", {vdi: {**m.cache.get(vdi), "size": 4 * MiB}})  # the event
        set_faults(fresh_sim, stall_export_after_bytes=3 * MiB + 7)  # its end never comes
        with pytest.raises(XofsError) as err:
            await read_all(f)
        assert err.value.errno == errno.EIO
        assert f"the VDI's size changed from {SMALL} to {4 * MiB} bytes after the file was opened" \
            in err.value.describe()
        await f.release()


async def test_an_export_ended_early_but_cleanly_fails_and_its_length_is_not_learnt(fresh_sim, tmp_path):
    """XO ends its answer cleanly when XAPI's stops early: the VHD's own structure tells the cut (the mount
    test does the same with cp and rsync, and the other formats; test_export_checks.py every cut)."""
    vdi = import_raw(fresh_sim, disk_bytes(MEDIUM, 4), "ends")
    set_faults(fresh_sim, end_export_after_bytes=5 * MiB)
    async with running(fresh_sim, tmp_path / "spool") as m:
        export = vdi_export(m, vdi, "vhd")
        f = await m.open(export, "/vdis/ends.vhd")
        offset, error = await read_until_failure(f, "an export ended early")
        assert error.errno == errno.EIO and offset <= 5 * MiB and not error.repeated
        text = error.describe()
        assert "/vdis/ends.vhd" in text and vdi in text and "is not a whole VHD: it ended after 5242880 bytes" in text
        assert text.count(export.url_path) == 1, text  # named once, not again by the check's own words
        # `xofs status` and the stop's "export read(s) cancelled" line tell it from one under way
        assert [t["phase"] for t in m.transfers()] == ["failed"]
        with pytest.raises(XofsError) as again:  # as rsync does: on past the failure (logged at debug level)
            await f.read(offset + MiB, MiB)
        assert again.value.repeated
        await f.release()
        assert not m.attrs(export).exact


async def test_a_read_waiting_for_its_export_to_start_shows_in_the_transfers(fresh_sim, tmp_path):
    """`xofs status`, where the docs send a user whose copy seems stuck, said "transfers: none" while the
    read waited for XO to answer the export (a running VM's snapshot; a hung XO) (helper 45)."""
    vdi = import_raw(fresh_sim, disk_bytes(SMALL, 6), "slow-start")
    async with running(fresh_sim, tmp_path / "spool") as m:
        export = vdi_export(m, vdi, "raw")
        f = await m.open(export, "/vdis/slow-start.raw")
        set_faults(fresh_sim, latency_ms=1500)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(f.read, 0, MiB)
            await eventually(lambda: [t["phase"] for t in m.transfers()] == ["starting"], "the read to wait")
        assert [t["phase"] for t in m.transfers()] == ["streaming"]
        await f.release()


async def test_only_failures_in_a_row_are_logged_as_repeats(fresh_sim, tmp_path):
    """A failure after a read that succeeded is a new incident, logged as a warning again (review)."""
    vdi = import_raw(fresh_sim, disk_bytes(SMALL, 8), "again")
    async with running(fresh_sim, tmp_path / "spool") as m:
        export = vdi_export(m, vdi, "vhd")
        f = await m.open(export, "/vdis/again.vhd")
        beyond = m.attrs(export).size - 1  # the bound's last byte: past the real end
        repeated = []
        for offset in (beyond, beyond, 0, beyond):
            try:
                assert await f.read(offset, 4096)
            except XofsError as err:
                assert "the read starts beyond the end of the export" in err.describe()
                repeated.append(err.repeated)
        assert repeated == [False, True, False]
        await f.release()


async def test_a_read_whose_bytes_stop_coming_fails_after_its_deadline(fresh_sim, tmp_path):
    """A read waited for its whole MiB: a stream that trickles (a byte now and then, so the read timeout
    never fires) held the reader in the kernel, where not even SIGKILL ends it. After `read_deadline` it
    fails, from the memory window and from the spool. Not a short answer (it was one): through the page
    cache (sendfile, splice, mmap) the kernel takes a short answer for the end of the file, so a copy made
    that way would have ended there, exit 0, even of a `.raw` whose size is exact."""
    small = disk_bytes(300_000, 12)
    vdi = import_raw(fresh_sim, small, "trickle")
    set_faults(fresh_sim, stall_export_after_bytes=100_000)
    async with running(fresh_sim, tmp_path / "spool", read_deadline=1.0) as m:
        export = vdi_export(m, vdi, "raw")
        f = await m.open(export, "/vdis/trickle.raw")
        started = trio.current_time()
        with trio.fail_after(10), pytest.raises(XofsError) as err:
            await f.read(0, MiB)
        assert err.value.errno == errno.EIO
        assert "100000 of the 1048576 bytes of a read at 0 came in 1 s" in err.value.describe()
        assert 0.9 < trio.current_time() - started < 5
        await f.release()
        # the spool: a read at the end diverts the export there, and waits; another reader of the start
        # fails the same way
        first, second = await m.open(export, "/a"), await m.open(export, "/b")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.read, len(small) - 512, 512)
            await eventually(lambda: m.spool.lookup(export.url_path) is not None, "the spool to take the export")
            with trio.fail_after(10), pytest.raises(XofsError) as err:
                await second.read(0, MiB)
            assert "100000 of the 1048576 bytes of a read at 0 came in 1 s" in err.value.describe()
            nursery.cancel_scope.cancel()
        await first.release()
        await second.release()


async def test_a_read_ahead_of_a_slow_stream_gets_its_deadline_from_its_first_byte(fresh_sim, tmp_path):
    """qemu-img reads ahead of the stream (from the spool): its reads wait for the stream to get there. Their
    deadline counted from the read's start, so on a steady but slow stream they failed ("… came in 2 s: XO's
    export is stalled") as soon as their first bytes came (helper 41). It counts from the first byte."""
    data = disk_bytes(5 * MiB, 13)
    vdi = import_raw(fresh_sim, data, "paced")
    set_faults(fresh_sim, export_bytes_per_second=2 * MiB)  # 3 MiB in 1.5 s, then 1 MiB in 0.5 s
    async with running(fresh_sim, tmp_path / "spool", read_deadline=1.0) as m:
        f = await m.open(vdi_export(m, vdi, "raw"), "/vdis/paced.raw")
        with trio.fail_after(10):
            assert await f.read(3 * MiB, MiB) == data[3 * MiB:4 * MiB]
        await f.release()


async def test_vanished_vdi_is_enoent_and_bad_token_eacces(fresh_sim, tmp_path):
    vdi = import_raw(fresh_sim, disk_bytes(SMALL, 4), "gone")
    async with running(fresh_sim, tmp_path / "spool") as m:
        export = vdi_export(m, vdi, "vhd")
        f = await m.open(export, "/vdis/gone.vhd")
        status, _, _ = fresh_sim.request("DELETE", f"/rest/v0/vdis/{vdi}")
        assert status in (200, 204)
        with pytest.raises(XofsError) as err:
            await f.read(0, MiB)
        assert err.value.errno == errno.ENOENT and "/vdis/gone.vhd" in err.value.describe()
        await f.release()
    async with running(fresh_sim, tmp_path / "spool2", token="not-a-valid-token-" + "x" * 24) as m:
        vm = next(iter(m.cache.of_type("VM")))
        f = await m.open(Export("vms", vm, "xva"), "/vms/x.xva")
        with pytest.raises(XofsError) as err:
            await f.read(0, MiB)
        assert err.value.errno == errno.EACCES
        await f.release()


async def test_vdi_deleted_mid_read_is_an_error_not_a_short_success(fresh_sim, tmp_path):
    vdi = import_raw(fresh_sim, disk_bytes(MEDIUM, 5), "deleted")
    async with running(fresh_sim, tmp_path / "spool", readahead=2 * MiB) as m:
        export = vdi_export(m, vdi, "raw")
        f = await m.open(export, "/vdis/deleted.raw")
        await f.read(0, MiB)
        status, _, _ = fresh_sim.request("DELETE", f"/rest/v0/vdis/{vdi}")
        assert status in (200, 204)
        got = MiB
        with pytest.raises(XofsError):
            while True:
                data = await f.read(got, MiB)
                got += len(data)
                if not data:
                    break
        assert got < MEDIUM
        await f.release()


async def test_stream_longer_than_the_measured_size_fails_loudly(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        export = vdi_export(m, xo.small, "vhd")
        want = get_export(xo, export.path)
        m.measured(export, len(want) - 4096, m._generations(export))  # as if an older version was shorter
        f = await m.open(export, "/x.vhd")  # a reader that trusts st_size stops at len(want) - 4096
        with pytest.raises(XofsError) as err:
            await read_all(f)
        assert err.value.errno == errno.EIO and "longer" in err.value.message
        await f.release()
        # the wrong length is gone (replaced by the real one if the stream had ended), and the kernel was told
        assert m.attrs(export).size in (len(want), vhd_bound(SMALL) + BOUND_MARGIN)
        assert m.size_events.count(export) >= 2
        assert await read_file(m, export) == want
        assert m.attrs(export).size == len(want) and m.attrs(export).exact


async def test_stream_shorter_than_the_measured_size_fails_loudly(xo, tmp_path):
    """A measured length is shown as exact: rsync reads up to it, and a copy through the page cache gets the
    short answer zero-filled to the end of its request and would end at that length, padded. A stream that
    ends before it fails the read that meets its end (EIO); the length it had is shown from then on."""
    async with running(xo, tmp_path / "spool") as m:
        export = vdi_export(m, xo.small, "vhd")
        want = get_export(xo, export.path)
        m.measured(export, len(want) + 4096, m._generations(export))  # as if an older version was longer
        f = await m.open(export, "/x.vhd")
        got = 0
        with pytest.raises(XofsError) as err:
            while data := await f.read(got, MiB):
                got += len(data)
        assert err.value.errno == errno.EIO and got == len(want) - len(want) % MiB
        assert (f"XO's export ended after {len(want)} bytes, before the length measured by an earlier read, "
                f"{len(want) + 4096}") in err.value.message
        with pytest.raises(XofsError):  # and the reads after it
            await f.read(len(want), MiB)
        await f.release()
        assert m.attrs(export).size == len(want) and m.attrs(export).exact
        assert await read_file(m, export) == want


async def test_objects_removed_from_xo_leave_no_change_count_behind(xo, tmp_path):
    """XO makes and removes objects all the time (backup jobs' snapshots, their disks): the change count
    each one got stayed for good, so a long mount grew with every object ever removed. A disk removed
    while its export's stream ends is not measured either."""
    async with running(xo, tmp_path / "spool") as m:
        vdi = m.cache.get(xo.small)
        counts = len(m._generation)
        for i in range(50):
            made = f"00000000-0000-4000-8000-{i:012d}"
            m.on_changes(m.cache.apply("enter", {made: {**vdi, "id": made, "uuid": made, "$VBDs": []}}))
            m.on_changes(m.cache.apply("exit", {made: 0}))
        assert len(m._generation) == counts

        export = vdi_export(m, xo.small, "vhd")
        generation = m._generations(export)
        m.cache.apply("exit", {xo.small: 0})  # the event comes before the manager hears of it
        m.measured(export, 12345, generation)
        assert not m._measured


async def test_reading_past_the_end_gives_eof(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        export = vdi_export(m, xo.small, "vhd")
        bound = m.attrs(export).size
        f = await m.open(export, "/x.vhd")
        assert len(await f.read(0, MiB)) == MiB
        real = len(get_export(xo, export.path))
        assert await f.read(real, MiB) == b""  # where a sequential reader ends
        # A read that starts beyond the end, where the size shown at open said there were bytes (`tail -c
        # 10`): an empty answer would be a silent wrong result.
        with pytest.raises(XofsError) as err:
            await f.read(bound - 10, 10)
        assert err.value.errno == errno.EIO and f"beyond the end of the export ({real} bytes)" in str(err.value)
        await f.release()
        assert m.attrs(export).size == real
        # Opened again, the size shown is the length: a read at it is the end, as on any file. One beyond it
        # comes from a reader that seeks past the end (dd skip=), or from a copy through the page cache whose
        # kernel still holds a larger size (it ended padded with zeros, with success: CI): it fails too.
        again = await m.open(export, "/x.vhd")
        assert await again.read(real, 10) == b""
        with pytest.raises(XofsError) as err:
            await again.read(bound - 10, 10)
        assert err.value.errno == errno.EIO and "still had a larger size" in str(err.value)
        assert (await again.read(real - 10, 10)) == get_export(xo, export.path)[-10:]
        await again.release()


async def test_reading_past_the_end_of_an_exact_size_starts_no_export(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        export = vdi_export(m, xo.medium, "raw")
        gets = export_gets(xo, export.path)
        f = await m.open(export, "/x.raw")
        assert await f.read(m.attrs(export).size, 4096) == b""
        assert await f.read(m.attrs(export).size + MiB, 4096) == b""
        await f.release()
        assert export_gets(xo, export.path) == gets and len(m.spool) == 0


async def test_writes_are_refused(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        f = await m.open(vdi_export(m, xo.small, "raw"), "/x.raw")
        assert f.info.direct_io and not f.info.keep_cache
        with pytest.raises(XofsError) as err:
            await f.write(0, b"x")
        assert err.value.errno == errno.EPERM
        await f.release()


def test_xva_bound_covers_a_real_export(xo):
    from xofs.export_sizes import vm_disks, xva_bound

    vm = xo.get_json(f"/rest/v0/vms/{xo.halted_vm}")
    objects = {}
    for coll in ("vbds", "vdis"):
        for obj in xo.get_json(f"/rest/v0/{coll}?fields=*"):
            objects[obj["id"]] = obj
    sizes, vbds = vm_disks(vm, objects.get)
    assert xva_bound(sizes, vbds) >= len(get_export(xo, f"vms/{xo.halted_vm}.xva"))


# --- the size bounds against the formats at their largest (every block and chunk written) ------------------


@pytest.mark.parametrize("size", [0, 1, 512, 2 * MiB - 1, 2 * MiB, 2 * MiB + 1, 7 * MiB + 3])
def test_bounds_cover_fully_allocated_exports(xo, tmp_path, size):
    import gzip
    import zlib

    from xofs.export_sizes import vm_disks, xva_bound
    from xofs.formats.vhd import dynamic_vhd_length
    from xofs.formats.xva import xva_length, xva_stream
    from xofs.sim.disks import FileDisk

    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(size))  # no block is empty, nothing compresses
    disk = FileDisk(path)
    assert dynamic_vhd_length(disk) <= vhd_bound(size)

    # db-01 as XO has it, its first disk replaced by this one
    vm = xo.get_json(f"/rest/v0/vms/{xo.halted_vm}")
    vbds = [xo.get_json(f"/rest/v0/vbds/{v}") for v in vm["$VBDs"]]
    vbd = next(v for v in vbds if not v["is_cd_drive"])
    vdi = {**xo.get_json(f"/rest/v0/vdis/{vbd['VDI']}"), "size": size}
    vm = {**vm, "$VBDs": [vbd["id"]]}
    sizes, count = vm_disks(vm, {vbd["id"]: vbd, vdi["id"]: vdi}.get)
    assert sizes == [size]
    bound = xva_bound(sizes, count)
    assert xva_length(vm, [(vdi, disk)], vbds=[vbd]) <= bound
    plain = b"".join(xva_stream(vm, [(vdi, disk)], vbds=[vbd]))
    assert len(zstandard.ZstdCompressor(level=3).compress(plain)) <= compressed_bound(len(plain), "zstd")
    assert len(gzip.compress(plain, 6)) <= compressed_bound(len(plain), "gzip")
    noise = os.urandom(size)  # compressors at their worst
    assert len(zstandard.ZstdCompressor(level=19).compress(noise)) <= compressed_bound(size, "zstd")
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    assert len(packer.compress(noise) + packer.flush()) <= compressed_bound(size, "gzip")


def running_vm_disk(m: ExportManager) -> str:
    """A disk plugged into a running VM: its bytes may change without an event."""
    for vdi_id, vdi in m.cache.of_type("VDI").items():
        for vbd_id in vdi.get("$VBDs", []):
            vm = m.cache.get(m.cache.get(vbd_id)["VM"])
            if vm["type"] == "VM" and vm["power_state"] == "Running" and vdi["size"] <= 2 << 30:
                return vdi_id
    raise AssertionError("the seeded inventory has no running VM with a disk")


async def test_a_live_disk_is_never_served_from_an_earlier_spool_copy(xo, tmp_path):
    async with running(xo, tmp_path / "spool") as m:
        live = vdi_export(m, running_vm_disk(m), "vhd")
        still = vdi_export(m, xo.small, "vhd")
        assert m.live(live) and not m.live(still)
        for export in (live, still):
            first = await m.open(export, "/first")
            await first.read(MiB, 100)  # out of order: into the spool
            whole = await read_all(first, 0)
            await first.release()
            gets = export_gets(xo, export.path)
            again = await m.open(export, "/again")
            assert await again.read(len(whole) - 100, 100) == whole[-100:]  # random access: the spool
            await again.release()
            # A still disk's complete copy serves the second open; a running VM's disk is exported again.
            assert export_gets(xo, export.path) == gets + (1 if export is live else 0), export.path


async def test_a_reader_going_through_more_files_than_slots_in_turn_gets_through(xo, tmp_path):
    # As `cmp a b`, or a program reading several exports in turn, with fewer slots than files: each is
    # parked at most once, and comes back beyond the limit instead of parking the next one.
    async with running(xo, tmp_path / "spool", max_exports=1, park_idle_after=0.3, readahead=2 * MiB) as m:
        exports = [vdi_export(m, xo.medium, "raw"), vdi_export(m, xo.medium, "vhd"),
                   vdi_export(m, xo.small, "raw")]
        want = [get_export(xo, e.path) for e in exports]
        gets = [export_gets(xo, e.path) for e in exports]
        files = [await m.open(e, f"/{i}") for i, e in enumerate(exports)]
        with trio.fail_after(30):
            for offset in range(0, 6 * MiB, MiB):
                for f, data in zip(files, want, strict=True):
                    assert await f.read(offset, MiB) == data[offset : offset + MiB]
        for f in files:
            await f.release()
        # medium.raw and medium.vhd share the object: count the exports of each path.
        assert [export_gets(xo, e.path) - g for e, g in zip(exports, gets, strict=True)] in (
            [2, 2, 1], [1, 2, 2], [2, 1, 2], [2, 2, 2]), "a restart for each parked export at most"


async def test_an_idle_live_export_is_not_parked_and_a_waiter_goes_beyond_the_limit(xo, tmp_path, caplog):
    caplog.set_level(logging.INFO, "xofs.export_stream")
    async with running(xo, tmp_path / "spool", max_exports=1, park_idle_after=0.3, readahead=2 * MiB) as m:
        live = vdi_export(m, running_vm_disk(m), "raw")
        other = vdi_export(m, xo.small, "raw")
        gets = export_gets(xo, live.path)
        a = await m.open(live, "/live")
        want = await a.read(0, MiB)
        b = await m.open(other, "/other")
        with trio.fail_after(10):
            assert await b.read(0, MiB) == get_export(xo, other.path)[:MiB]
        assert not a.feed.parked  # its restart could not give the same bytes
        assert len(await a.read(MiB, MiB)) == MiB and export_gets(xo, live.path) == gets + 1
        assert any("goes beyond the limit of 1 exports at once: every slot is held by an idle export that "
                   "could not be restarted" in r.getMessage() for r in caplog.records)
        assert want
        await a.release()
        await b.release()
        with trio.fail_after(5):  # the slots come back once the cancelled exports' tasks end
            while m.slots.free != 1 or m.slots.holders:
                await trio.sleep(0.05)
