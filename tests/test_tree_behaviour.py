"""The tree's behaviour, run twice: on the XoFS object directly, and through a real kernel mount.

Both drivers look at the same shared simulator (seed 1), so what the REST API says is what both must show.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.drivers import DirectDriver, MountDriver
from tests.support import MountProcess, SimProcess
from xofs.names import unique_names

VIEWS = [".xofs", "by-name", "hosts", "pools", "search", "srs", "vdi-snapshots", "vdis", "vm-snapshots", "vms"]
NDJSON = [f"{c}.ndjson" for c in ("hosts", "pools", "srs", "vdi-snapshots", "vdis", "vm-snapshots", "vms")]


@pytest.fixture(scope="module")
def shared_mount(sim: SimProcess, tmp_path_factory) -> Iterator[MountProcess]:
    base = tmp_path_factory.mktemp("behaviour")
    mount = MountProcess(sim.url, base / "mnt", token=sim.token, log_path=base / "mount.log",
                         env={"XOFS_STATE_DIR": str(base / "state")})
    mount.start()
    yield mount
    mount.stop()


@pytest.fixture(params=["direct", "mount"])
async def drv(request, sim: SimProcess) -> AsyncIterator[DirectDriver | MountDriver]:
    if request.param == "mount":
        yield MountDriver(request.getfixturevalue("shared_mount").mountpoint)
        return
    from xofs.mount import MountOptions, assemble

    parts = assemble(sim.url, sim.token, MountOptions(state_dir=request.getfixturevalue("tmp_path")))
    async with parts.running(load_only=True):
        yield DirectDriver(parts.fs)


def rest(sim: SimProcess, path: str):
    return sim.get_json(path)


async def test_root_lists_one_entry_per_view(drv):
    assert await drv.listdir("/") == sorted(VIEWS + NDJSON)
    for view in VIEWS:
        st = await drv.stat(f"/{view}")
        assert st.is_dir and st.perm == 0o500 and st.uid == os.getuid()
    for name in NDJSON:
        st = await drv.stat(f"/{name}")
        assert not st.is_dir and st.perm == 0o400 and st.uid == os.getuid()


async def test_vms_lists_every_vm_with_its_export_files(drv, sim):
    ids = {o["id"] for o in rest(sim, "/rest/v0/vms?fields=id")}
    expected = sorted([*ids, *(f"{i}.xva" for i in ids), *(f"{i}.xva.zst" for i in ids),
                       *(f"{i}.xva.gz" for i in ids)])
    assert await drv.listdir("/vms") == expected


async def test_meta_json_is_the_rest_object_byte_for_byte(drv, sim):
    for coll in ("vms", "vdis", "srs", "hosts", "pools", "vm-snapshots", "vdi-snapshots"):
        for item in rest(sim, f"/rest/v0/{coll}?fields=id&limit=3"):
            status, _, body = sim.request("GET", f"/rest/v0/{coll}/{item['id']}")
            assert status == 200
            data = await drv.read(f"/{coll}/{item['id']}/meta.json")
            assert json.loads(data) == json.loads(body)
            assert data == body
            st = await drv.stat(f"/{coll}/{item['id']}/meta.json")
            assert st.size == len(data) and st.perm == 0o400


async def test_vm_disk_links_leave_out_cd_drives(drv, sim):
    for vm in rest(sim, "/rest/v0/vms?fields=id,$VBDs"):
        vbds = [sim.get_json(f"/rest/v0/vbds/{v}") for v in vm["$VBDs"]]
        disks = sorted(f"{v['VDI']}.vhd" for v in vbds if not v["is_cd_drive"] and "VDI" in v)
        assert await drv.listdir(f"/vms/{vm['id']}/vdis") == disks
        for name in disks:
            target = await drv.readlink(f"/vms/{vm['id']}/vdis/{name}")
            assert target == f"../../../vdis/{name}"


async def test_sr_directories(drv, sim):
    for sr in rest(sim, "/rest/v0/srs?fields=id,VDIs,content_type,size"):
        names = await drv.listdir(f"/srs/{sr['id']}")
        writable = sr["content_type"] != "iso" and sr["size"] > 0
        assert names == (["import", "meta.json", "vdis"] if writable else ["meta.json", "vdis"])
        links = await drv.listdir(f"/srs/{sr['id']}/vdis")
        assert links == sorted(f"{v}.vhd" for v in sr["VDIs"] if sim.request("GET", f"/rest/v0/vdis/{v}")[0] == 200
                               or sim.request("GET", f"/rest/v0/vdi-snapshots/{v}")[0] == 200)


async def test_by_name_links_point_at_the_objects(drv, sim):
    vms = rest(sim, "/rest/v0/vms?fields=id,name_label")
    names = unique_names((v["id"], v["name_label"]) for v in vms)
    assert await drv.listdir("/by-name/vms") == sorted(names.values())
    for obj_id, name in names.items():
        assert await drv.readlink(f"/by-name/vms/{name}") == f"../../vms/{obj_id}"
        assert (await drv.stat(f"/by-name/vms/{name}")).is_link


async def test_xattrs_name_the_xo_object(drv, sim):
    vm = rest(sim, "/rest/v0/vms?fields=id,name_label,type&limit=1")[0]
    for path in (f"/vms/{vm['id']}", f"/vms/{vm['id']}/meta.json"):
        assert await drv.getxattr(path, "user.xo.id") == vm["id"].encode()
        assert await drv.getxattr(path, "user.xo.type") == b"VM"
        assert await drv.getxattr(path, "user.xo.name_label") == vm["name_label"].encode()
        assert {"user.xo.id", "user.xo.type", "user.xo.name_label"} <= set(await drv.listxattr(path))
    with pytest.raises(OSError) as err:
        await drv.getxattr(f"/vms/{vm['id']}/meta.json", "security.capability")
    assert err.value.errno == errno.ENOTSUP
    for name in ("user.xo.nope", "user.foo"):  # any user.* name it lacks: ENODATA, never ENOTSUP
        with pytest.raises(OSError) as err:
            await drv.getxattr(f"/vms/{vm['id']}/meta.json", name)
        assert err.value.errno == errno.ENODATA, name
    # A symlink lists no attribute: Linux serves user.* ones on files and directories only.
    assert await drv.listxattr(f"/by-name/vms/{vm['name_label']}") == []


async def test_an_entry_whose_attributes_fail_is_left_out_of_the_listing(sim, tmp_path, monkeypatch):
    """Direct only: an export whose object vanished between the listing and readdir (forced here) is left
    out, with no lookup kept on it; the other entries are listed."""
    from xofs.errors import XofsError
    from xofs.mount import MountOptions, assemble

    parts = assemble(sim.url, sim.token, MountOptions(state_dir=tmp_path))
    async with parts.running(load_only=True):
        drv = DirectDriver(parts.fs)
        everything = await drv.listdir("/vms")
        doomed = next(name for name in everything if name.endswith(".xva"))
        real_attributes = parts.fs.attributes

        def attributes(inode):
            if inode.path[-1:] == (doomed,):
                raise XofsError(f"{doomed}: XO has no object any more", errno_=errno.ENOENT)
            return real_attributes(inode)

        monkeypatch.setattr(parts.fs, "attributes", attributes)
        assert await drv.listdir("/vms") == [name for name in everything if name != doomed]
        held = [inode for inode in parts.fs.tree.inodes.values() if inode.path == ("vms", doomed)]
        assert [inode.lookups for inode in held] == [1]  # the first listing's; the second took none


async def test_missing_paths_are_enoent(drv):
    for path in ("/nope", "/vms/00000000-0000-0000-0000-000000000000", "/by-name/nope", "/by-name/vms/nope"):
        with pytest.raises(FileNotFoundError if isinstance(drv, MountDriver) else OSError) as err:
            await drv.stat(path)
        assert err.value.errno == errno.ENOENT


async def test_nothing_outside_import_directories_can_be_changed(drv, sim):
    vm = rest(sim, "/rest/v0/vms?fields=id,name_label&limit=1")[0]
    before = sim.request("GET", f"/rest/v0/vms/{vm['id']}")[2]
    attempts = [
        lambda: drv.mkdir(f"/vms/{vm['id']}/newdir"),
        lambda: drv.mkdir("/newview"),
        lambda: drv.unlink(f"/vms/{vm['id']}/meta.json"),
        lambda: drv.unlink(f"/vms/{vm['id']}.xva"),
        lambda: drv.rename(f"/vms/{vm['id']}.xva", f"/vms/{vm['id']}.renamed"),
        lambda: drv.open_write(f"/vms/{vm['id']}/meta.json"),
        lambda: drv.chmod(f"/vms/{vm['id']}/meta.json", 0o644),
        lambda: drv.symlink("x", f"/vms/{vm['id']}/link"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as err:
            await attempt()
        assert err.value.errno in (errno.EPERM, errno.EACCES), err.value
    assert sim.request("GET", f"/rest/v0/vms/{vm['id']}")[2] == before


async def test_a_refused_change_names_the_xo_object_in_its_log_line(sim, tmp_path, caplog):
    """`rm` of a /by-name link or `rm -r` of a VM's directory: the log line names the VM, which the path of
    a link does not."""
    from xofs.mount import MountOptions, assemble

    caplog.set_level(logging.WARNING, "xofs")
    parts = assemble(sim.url, sim.token, MountOptions(state_dir=tmp_path))
    async with parts.running(load_only=True):
        drv = DirectDriver(parts.fs)
        name = (await drv.listdir("/by-name/vms"))[0]
        vm_id = (await drv.readlink(f"/by-name/vms/{name}")).rsplit("/", 1)[1]
        for attempt in (drv.unlink(f"/by-name/vms/{name}"), drv.rename(f"/by-name/vms/{name}", "/by-name/vms/x"),
                        drv.rmdir(f"/vms/{vm_id}")):
            caplog.clear()
            with pytest.raises(OSError) as err:
                await attempt
            assert err.value.errno == errno.EPERM
            (line,) = [r.getMessage() for r in caplog.records]
            assert line.endswith(f"(XO object {vm_id})"), line


async def test_statfs_adds_up_the_srs_and_leaves_file_counts_free(drv, sim):
    """`df` shows the SRs' space; `df -i` showed 100% of inodes used (none free) on every mount, which
    inode-usage alerts take for a full filesystem: files here are not a resource that runs out."""
    srs = [s for s in rest(sim, "/rest/v0/srs?fields=size,usage,content_type") if s["content_type"] != "iso"]
    frsize, blocks, bfree, files, ffree = await drv.statvfs()
    assert frsize == 1 << 20
    assert blocks == sum(s["size"] for s in srs if s["size"] >= 0) >> 20
    assert bfree == sum(max(s["size"] - s["usage"], 0) for s in srs if s["size"] >= 0) >> 20
    assert ffree > 1000 * (files - ffree) > 0


async def test_import_entries_are_never_kept_in_the_kernels_cache(fresh_sim, tmp_path):
    """Direct only: an import entry changes by the daemon's own doing (a refused write removes it) and its
    kernel invalidation comes a moment later from another thread, so the kernel must ask every time: with
    60 s, `stat` right after a refused write still found the entry (CI, once in many runs)."""
    from xofs.mount import MountOptions, assemble

    parts = assemble(fresh_sim.url, fresh_sim.token, MountOptions(state_dir=tmp_path))
    async with parts.running(load_only=True):
        drv = DirectDriver(parts.fs)
        sr = next(s["id"] for s in rest(fresh_sim, "/rest/v0/srs?fields=id,content_type")
                  if s["content_type"] != "iso")
        parent = await drv._resolve(f"/srs/{sr}/import")
        info, created = await parts.fs.create(parent, b"a.raw", 0o100644, os.O_WRONLY, drv.ctx)
        try:
            looked_up = await parts.fs.lookup(parent, b"a.raw", drv.ctx)
            for attrs in (created, looked_up):
                assert (attrs.entry_timeout, attrs.attr_timeout) == (0, 0)
        finally:
            await parts.fs.release(info.fh)
        meta = await parts.fs.lookup(await drv._resolve(f"/srs/{sr}"), b"meta.json", drv.ctx)
        assert meta.entry_timeout == meta.attr_timeout == parts.fs.freshness.ttl > 0


@contextlib.asynccontextmanager
async def vhd_served_directly(sim: SimProcess, tmp_path, vdi: str):
    """A mount's parts running on `sim` without a kernel mount, the invalidation worker started: (the parts,
    a DirectDriver, the inode of the VDI's `.vhd`, the size it shows before any read: a bound)."""
    from xofs.mount import MountOptions, assemble

    parts = assemble(sim.url, sim.token, MountOptions(state_dir=tmp_path))
    async with parts.running(load_only=True):
        parts.invalidator.start()
        try:
            drv = DirectDriver(parts.fs)
            ino = await drv._resolve(f"/vdis/{vdi}.vhd")
            yield parts, drv, ino, (await parts.fs.getattr(ino, drv.ctx)).st_size
        finally:
            parts.invalidator.stop()


async def test_a_measured_size_reaches_the_kernel_at_the_release_after_the_answer(fresh_sim, tmp_path,
                                                                                  monkeypatch):
    """Direct only: the invalidation worker is slowed down, as on a busy machine. The read that learnt the
    `.vhd`'s exact length answers first (for a page-cache read, the kernel then shrinks the file to the
    answer's end itself, which an invalidation in between would prevent). The size shown before (a bound)
    is held until the file's last release, not its flush (a child process closing an inherited descriptor
    flushes while the copy goes on: QA 57), and the release tells the kernel the length, waiting for the
    worker: the kernel sends it as the close returns, before `rsync` run right after a `cat` looks."""
    import pyfuse3

    from tests.test_exports import disk_bytes, import_raw

    vdi = import_raw(fresh_sim, disk_bytes(3 * (1 << 20) + 5, 4), "measure-me")
    carried_out: list[int] = []

    def slow_invalidate_inode(ino: int, attr_only: bool = False) -> None:
        time.sleep(0.3)
        carried_out.append(ino)

    monkeypatch.setattr(pyfuse3, "invalidate_inode", slow_invalidate_inode)
    async with vhd_served_directly(fresh_sim, tmp_path, vdi) as (parts, drv, ino, bound):
        info = await parts.fs.open(ino, os.O_RDONLY, drv.ctx)
        length = 0
        try:
            while len(data := await parts.fs.read(info.fh, length, 1 << 20)) == 1 << 20:
                length += len(data)
            length += len(data)  # the short answer at the end, which measured the length
            assert ino not in carried_out  # not waited for
            assert await parts.fs.read(info.fh, length, 1 << 20) == b""
            await parts.fs.flush(info.fh)
            assert ino not in carried_out and (await parts.fs.getattr(ino, drv.ctx)).st_size == bound
        finally:
            await parts.fs.release(info.fh)
        assert ino in carried_out  # the release waited
        assert (await parts.fs.getattr(ino, drv.ctx)).st_size == length < bound


async def test_after_an_exports_end_the_size_told_stays_shown_until_the_close(fresh_sim, tmp_path):
    """Direct only. A copy through the page cache (sendfile, splice) gets the short answer at the end of an
    export zero-filled to the end of its request; where the kernel kept the size it held (a `stat` answered
    after the kernel sent that read: the daemon cannot see it), the copy takes the zeros, reads on past
    them and fails. Told the length before the close (a `stat` in between), the kernel would end such a copy
    there with success, padded (CI, and 1 in 80 copies with a `stat` every 2 ms on a loaded machine). So
    after the end, `getattr` shows the size the kernel was told last (the bound) until the reader's close,
    reads past the end fail, and the close tells the length."""
    import pyfuse3

    from tests.test_exports import disk_bytes, import_raw

    vdi = import_raw(fresh_sim, disk_bytes(3 * (1 << 20) + 5, 4), "held-size")
    status, _, body = fresh_sim.request("GET", f"/rest/v0/vdis/{vdi}.vhd")
    assert status == 200
    length = len(body)
    async with vhd_served_directly(fresh_sim, tmp_path, vdi) as (parts, drv, ino, bound):
        assert bound > length + (1 << 20)  # past the end of any read the kernel sends (BOUND_MARGIN)
        info = await parts.fs.open(ino, os.O_RDONLY, drv.ctx)
        try:
            offset = 0
            while len(data := await parts.fs.read(info.fh, offset, 1 << 20)) == 1 << 20:
                offset += len(data)
            assert offset + len(data) == length and bytes(data) == body[offset:]  # the short answer: the end
            assert parts.exports.attrs(parts.tree.inode(ino).node.content).size == length  # measured
            assert (await parts.fs.getattr(ino, drv.ctx)).st_size == bound  # held
            assert await parts.fs.getxattr(ino, b"user.xo.size_exact", drv.ctx) == b"false"
            assert await parts.fs.read(info.fh, length, 1 << 20) == b""  # end of file for a direct reader
            with pytest.raises(pyfuse3.FUSEError) as err:  # a page-cache copy past the zeros
                await parts.fs.read(info.fh, length + 8192, 1 << 20)
            assert err.value.errno == errno.EIO
            assert (await parts.fs.getattr(ino, drv.ctx)).st_size == bound
            await parts.fs.flush(info.fh)  # a child process closing an inherited descriptor: no close yet
            assert (await parts.fs.getattr(ino, drv.ctx)).st_size == bound
        finally:
            await parts.fs.release(info.fh)
        assert (await parts.fs.getattr(ino, drv.ctx)).st_size == length  # the release let it go
        assert await parts.fs.getxattr(ino, b"user.xo.size_exact", drv.ctx) == b"true"


async def test_a_stream_ending_within_a_read_short_of_a_size_the_kernel_may_hold_fails(fresh_sim, tmp_path, caplog):
    """Direct only, the daemon's own check behind the export's: where a size the kernel may hold lies within
    the request that the stream's end answers short, a copy through the page cache would take the zeros up
    to that size and end there with success. The read fails instead (EIO), and the close tells the length.
    Bounds lie beyond any request (BOUND_MARGIN), a measured length that no longer holds fails in the export
    itself (test_exports.py): the size the kernel may hold is set here, as a lookup long ago would have."""
    import pyfuse3

    from tests.test_exports import disk_bytes, import_raw

    vdi = import_raw(fresh_sim, disk_bytes(3 * (1 << 20) + 5, 4), "within")
    status, _, body = fresh_sim.request("GET", f"/rest/v0/vdis/{vdi}.vhd")
    assert status == 200
    length = len(body)
    last = length - length % (1 << 20)
    async with vhd_served_directly(fresh_sim, tmp_path, vdi) as (parts, drv, ino, bound):
        info = await parts.fs.open(ino, os.O_RDONLY, drv.ctx)
        try:
            for offset in range(0, last, 1 << 20):
                assert len(await parts.fs.read(info.fh, offset, 1 << 20)) == 1 << 20
            parts.fs._last_told[ino] = length + 4096  # within [length, last + 1 MiB)
            with pytest.raises(pyfuse3.FUSEError) as err:
                await parts.fs.read(info.fh, last, 1 << 20)
            assert err.value.errno == errno.EIO
            # one line naming the path and the XO object
            assert f"/vdis/{vdi}.vhd: the stream ended at {length} bytes" in caplog.text
            assert f"(XO object {vdi})" in caplog.text
            assert (await parts.fs.getattr(ino, drv.ctx)).st_size == length + 4096  # held until the close
            await parts.fs.flush(info.fh)
        finally:
            await parts.fs.release(info.fh)
        assert (await parts.fs.getattr(ino, drv.ctx)).st_size == length


async def test_waiting_for_the_invalidation_worker_is_bounded_and_logged(monkeypatch, caplog):
    import pyfuse3
    import trio

    from xofs.invalidator import Invalidator

    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda ino, attr_only=False: time.sleep(1))  # stuck
    invalidator = Invalidator()
    invalidator.start()
    try:
        invalidator.inode(5, attr_only=True)
        started = trio.current_time()
        await invalidator.settled(timeout=0.2)
        assert trio.current_time() - started < 0.8
        assert "kernel invalidations still queued after 0.2 s (0 carried out so far)" in caplog.text
    finally:
        invalidator.stop()


async def test_an_open_meta_json_never_shows_a_size_below_the_version_it_reads(fresh_sim, tmp_path):
    """Direct only. Each open of a meta.json reads the version it opened; after a rename to a shorter name,
    `fstat` of the older descriptor gave the new, smaller size (helper 42: `wc -c <&3` said 2219 where the
    descriptor read 2279 bytes). The size shown covers the longest version still open."""
    from xofs.mount import MountOptions, assemble

    parts = assemble(fresh_sim.url, fresh_sim.token, MountOptions(state_dir=tmp_path))
    async with parts.running(load_only=True):
        drv = DirectDriver(parts.fs)
        vm = next(iter(parts.cache.of_type("VM").values()))
        ino = await drv._resolve(f"/vms/{vm['id']}/meta.json")
        first = await parts.fs.open(ino, os.O_RDONLY, drv.ctx)
        old = bytes(await parts.fs.read(first.fh, 0, 1 << 20))
        parts.syncer.apply("enter", {vm["id"]: {**vm, "name_label": "s"}})
        second = await parts.fs.open(ino, os.O_RDONLY, drv.ctx)
        new = bytes(await parts.fs.read(second.fh, 0, 1 << 20))
        assert len(new) < len(old) and bytes(await parts.fs.read(first.fh, 0, 1 << 20)) == old
        assert (await parts.fs.getattr(ino, drv.ctx)).st_size == len(old)
        await parts.fs.release(first.fh)
        assert (await parts.fs.getattr(ino, drv.ctx)).st_size == len(new)
        await parts.fs.release(second.fh)
        assert (await parts.fs.getattr(ino, drv.ctx)).st_size == len(new)


async def test_a_deleted_objects_directory_held_as_working_directory_is_an_empty_deleted_one(fresh_sim, tmp_path):
    """Direct only. `cd /mnt/xo/vms/<uuid>`, then XO deletes the VM: `ls`, `stat .` and `find .` there
    failed with ENOENT (helper 42). As on a local disk, the directory is now a deleted one: attributes with
    no links, and an empty listing."""
    import unittest.mock

    import pyfuse3

    from xofs.mount import MountOptions, assemble

    parts = assemble(fresh_sim.url, fresh_sim.token, MountOptions(state_dir=tmp_path))
    async with parts.running(load_only=True):
        drv = DirectDriver(parts.fs)
        vm = next(iter(parts.cache.of_type("VM").values()))
        ino = await drv._resolve(f"/vms/{vm['id']}")  # the kernel holds it (a shell's working directory)
        assert (await parts.fs.getattr(ino, drv.ctx)).st_nlink == 2
        parts.syncer.apply("exit", {vm["id"]: 0})
        assert vm["id"] not in await drv.listdir("/vms")
        attrs = await parts.fs.getattr(ino, drv.ctx)
        assert attrs.st_nlink == 0 and attrs.st_mode & 0o170000 == 0o040000
        fh = await parts.fs.opendir(ino, drv.ctx)
        listed: list = []
        with unittest.mock.patch.object(pyfuse3, "readdir_reply", lambda *args: listed.append(args) or True):
            await parts.fs.readdir(fh, 0, None)
        await parts.fs.releasedir(fh)
        assert listed == []
        with pytest.raises(pyfuse3.FUSEError):  # nothing in it
            await parts.fs.lookup(ino, b"meta.json", drv.ctx)
