"""The import manager driven by direct calls (no kernel), against a fresh simulator.

Each test goes through the same calls the FUSE adapter makes (create, write, flush, release, setattr,
rename, unlink) and then asks the simulator what XO has: the VDIs, their names and their raw content.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import signal
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.support import SimProcess, eventually, require_tool
from xofs.cache import Change, ObjectCache
from xofs.client.rest import RestClient
from xofs.errors import TasksUnknown, XofsError
from xofs.files import Caller, ImportEntry
from xofs.formats.vhd import build_footer
from xofs.import_format import parse_name, planned_vhd_length
from xofs.import_spool import clean_stale_spools
from xofs.imports import LEFTOVER_CHECKS, ImportFile, ImportManager, writer_was_killed

ME = Caller(pid=os.getpid())
CHUNK = 128 * 1024


# ---- helpers ------------------------------------------------------------------------------------------


@dataclass
class Env:
    sim: SimProcess
    manager: ImportManager
    cache: ObjectCache
    client: RestClient
    tmp: Path
    notified: list[tuple[str, list[str]]]

    @property
    def sr(self) -> str:
        return sr_ids(self.sim)[0]

    def entry(self, name: str, sr: str | None = None) -> ImportEntry:
        return ImportEntry(sr or self.sr, name)

    def vdis(self, **match: str) -> list[dict]:
        return vdis(self.sim, **match)


def sr_ids(sim: SimProcess) -> list[str]:
    """The simulator's non-ISO SRs, largest free space first."""
    srs = sim.get_json("/rest/v0/srs?fields=id,size,usage,content_type")
    srs = [s for s in srs if s["content_type"] != "iso"]
    return [s["id"] for s in sorted(srs, key=lambda s: s["usage"] - s["size"])]


def vdis(sim: SimProcess, **match: str) -> list[dict]:
    fields = "id,name_label,name_description,$SR,size,other_config"
    found = sim.get_json(f"/rest/v0/vdis?fields={urllib.parse.quote(fields)}")
    return [v for v in found if all(v.get(k) == val for k, val in match.items())]


def raw_export(sim: SimProcess, vdi_id: str) -> bytes:
    status, _, body = sim.request("GET", f"/rest/v0/vdis/{vdi_id}.raw")
    assert status == 200, (status, body[:300])
    return body


def make_raw(path: Path, size: int = 4 << 20, seed: int = 1) -> bytes:
    """A raw disk with a few random blocks and zeros elsewhere."""
    import random

    rng = random.Random(seed)
    data = bytearray(size)
    for start in range(0, size, 1 << 20):
        data[start + 4096 : start + 4096 + 200_000] = rng.randbytes(200_000)
    path.write_bytes(data)
    return bytes(data)


def make_vhd(tmp: Path, name: str = "disk.vhd", size: int = 4 << 20) -> tuple[bytes, bytes]:
    """(the dynamic VHD's bytes, the raw content qemu-img reads from it)."""
    require_tool("qemu-img")
    src = tmp / f"{name}.src.raw"
    make_raw(src, size)
    vhd = tmp / name
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", str(src), str(vhd)],
                   check=True)
    expected = tmp / f"{name}.expected.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(expected)], check=True)
    return vhd.read_bytes(), expected.read_bytes()


async def write_all(f: ImportFile, data: bytes, start: int = 0) -> None:
    for off in range(0, len(data), CHUNK):
        assert await f.write(start + off, data[off : off + CHUNK]) == len(data[off : off + CHUNK])


async def copy_in(env: Env, name: str, data: bytes, *, sr: str | None = None, mode: int = 0o644) -> ImportFile:
    """What `cp` does: create, write, close (flush + release)."""
    path = f"/srs/{sr or env.sr}/import/{name}"
    f = await env.manager.create(env.entry(name, sr), mode, ME, path)
    assert isinstance(f, ImportFile)
    try:
        await write_all(f, data)
        await f.flush(Caller())
    finally:
        await f.release()
    return f


async def refresh_cache(env: Env) -> None:
    objs = []
    for coll in ("srs", "vdis"):
        objs += await env.client.collection(coll)
    env.cache.replace_all(objs)


@asynccontextmanager
async def running(sim: SimProcess, tmp: Path, **kwargs) -> AsyncIterator[Env]:
    client = RestClient(sim.url, sim.token)
    cache = ObjectCache()
    notified: list[tuple[str, list[str]]] = []
    manager = ImportManager(client, cache, state_dir=tmp / "state", spool_dir=tmp / "spool", server_key=sim.url,
                            notify=lambda sr, names: notified.append((sr, names)), **kwargs)
    env = Env(sim, manager, cache, client, tmp, notified)
    await refresh_cache(env)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            yield env
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()


def spools(tmp: Path) -> list[Path]:
    return list((tmp / "spool").rglob("*.spool"))


async def expect_error(code: int, coro) -> XofsError:
    with pytest.raises(XofsError) as info:
        await coro
    assert info.value.errno == code, (os.strerror(info.value.errno), info.value.describe())
    return info.value


async def uploading_slowly(env: Env, name: str, data: bytes, nursery: trio.Nursery,
                           close: Callable[[ImportFile], Awaitable[None]]) -> tuple[ImportEntry, ImportFile]:
    """`name` written with `data`, and `close(file)` started in `nursery`; returns once the upload runs,
    which XO (the simulator, slowed to 1 MiB/s) takes about a second per MiB to finish."""
    env.sim.request("POST", "/_sim/faults", json.dumps({"import_bytes_per_second": 1 << 20}).encode(),
                    {"Content-Type": "application/json"})
    entry = env.entry(name)
    f = await env.manager.create(entry, 0o644, ME, f"/{name}")
    await write_all(f, data)
    nursery.start_soon(close, f)
    await eventually(lambda: env.manager.xattrs(entry)["user.xo.state"] == b"uploading", "the upload")
    return entry, f


# ---- names --------------------------------------------------------------------------------------------


def test_names_give_format_and_label() -> None:
    assert parse_name("disk.vhd").format.value == "vhd"
    assert parse_name("Disk.VHD").label == "Disk"
    assert parse_name("a.b.raw").label == "a.b"
    assert parse_name("boot.iso").format.value == "raw"
    assert parse_name("x.img").format.value == "raw"
    temp = parse_name(".disk.vhd.Ab12Cd")
    assert (temp.format.value, temp.label, temp.temporary) == ("vhd", "disk", True)
    for bad in ("notes.txt", "disk", ".vhd", ".DS_Store", "._disk.vhd", "Thumbs.db", ".disk.txt.Ab12Cd"):
        with pytest.raises(XofsError) as info:
            parse_name(bad)
        assert info.value.errno == errno.EINVAL, bad


# ---- successful imports -------------------------------------------------------------------------------


async def test_raw_import_makes_one_vdi_with_the_content(fresh_sim, tmp_path) -> None:
    data = make_raw(tmp_path / "src.raw")
    async with running(fresh_sim, tmp_path) as env:
        await copy_in(env, "web disk.raw", data)
        [vdi] = env.vdis(name_label="web disk")
        assert vdi["$SR"] == env.sr and vdi["name_description"] == "imported by xofs"
        assert vdi["size"] == len(data)
        assert raw_export(fresh_sim, vdi["id"]) == data
        attrs = env.manager.entries(env.sr)["web disk.raw"]
        assert (attrs.size, attrs.mode) == (len(data), 0o644)
        xattrs = env.manager.xattrs(env.entry("web disk.raw"))
        assert xattrs["user.xo.vdi"] == vdi["id"].encode()
        assert xattrs["user.xo.state"] == b"imported"
    assert spools(tmp_path) == []


async def test_vhd_import_has_the_source_content(fresh_sim, tmp_path) -> None:
    image, expected = make_vhd(tmp_path)
    async with running(fresh_sim, tmp_path) as env:
        await copy_in(env, "disk.vhd", image)
        [vdi] = env.vdis(name_label="disk")
        assert raw_export(fresh_sim, vdi["id"]) == expected
    assert spools(tmp_path) == []


async def test_rsync_sequence_names_the_vdi_after_the_final_name(fresh_sim, tmp_path) -> None:
    image, expected = make_vhd(tmp_path)
    mtime = 1_600_000_000_123_456_789
    async with running(fresh_sim, tmp_path) as env:
        temp = env.entry(".disk.vhd.aB3xYz")
        f = await env.manager.create(temp, 0o600, ME, "/temp")
        await env.manager.setattr(temp, size=None, mode=0o644, mtime_ns=None, path="/temp")
        await write_all(f, image)
        await f.flush(Caller())
        await f.release()
        await env.manager.setattr(temp, size=None, mode=None, mtime_ns=mtime, path="/temp")
        await env.manager.rename(temp, "disk.vhd", "/temp")
        assert env.vdis(name_label=".disk.vhd.aB3xYz") == []
        [vdi] = env.vdis(name_label="disk")
        assert raw_export(fresh_sim, vdi["id"]) == expected
        entries = env.manager.entries(env.sr)
        assert list(entries) == ["disk.vhd"]
        assert (entries["disk.vhd"].size, entries["disk.vhd"].mtime_ns, entries["disk.vhd"].mode) == (
            len(image), mtime, 0o644)
    # A new mount (a new manager, same state directory) still lists it, with the writer's attributes.
    async with running(fresh_sim, tmp_path) as env:
        entries = env.manager.entries(env.sr)
        assert (entries["disk.vhd"].size, entries["disk.vhd"].mtime_ns) == (len(image), mtime)
        assert env.manager.xattrs(env.entry("disk.vhd"))["user.xo.vdi"] == vdi["id"].encode()


async def test_an_rsync_temporary_file_removed_instead_of_renamed_takes_its_vdi_along(fresh_sim, tmp_path) -> None:
    # rsync interrupted (Ctrl-C): it closes its temporary file, which imports what it held, then removes it.
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    async with running(fresh_sim, tmp_path) as env:
        await copy_in(env, "kept.raw", data)  # an import under its final name stays when removed
        temp = env.entry(".part.raw.Qe4cmZ")
        f = await env.manager.create(temp, 0o600, ME, "/temp")
        await write_all(f, data[: len(data) // 3])
        await f.flush(Caller())
        await f.release()
        assert len(env.vdis(name_label="part")) == 1
        await env.manager.unlink(temp, "/temp")
        assert env.vdis(name_label="part") == [] and ".part.raw.Qe4cmZ" not in env.manager.entries(env.sr)
        await env.manager.unlink(env.entry("kept.raw"), "/kept.raw")
        assert len(env.vdis(name_label="kept")) == 1


async def test_a_file_only_named_like_rsyncs_temporary_file_keeps_its_vdi_when_removed(fresh_sim, tmp_path,
                                                                                        monkeypatch) -> None:
    """`cp x .disk.img.backup` (or an rsync temporary file kept by an earlier mount, or imported long ago):
    removing it deleted its VDI, however old, attached or not. Only rsync abandoning a transfer it has just
    made (this mount, within a minute) takes the VDI along."""
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    async with running(fresh_sim, tmp_path) as env:
        await copy_in(env, ".backup.img.before", data)
    async with running(fresh_sim, tmp_path) as env:  # a remount: the first was imported by an earlier mount
        await env.manager.unlink(env.entry(".backup.img.before"), "/.backup.img.before")
        assert len(env.vdis(name_label="backup")) == 1
        monkeypatch.setattr("xofs.imports.ABANDON_WINDOW", 0.0)  # "imported a minute ago", without the wait
        await copy_in(env, ".later.img.backup", data)
        await trio.sleep(0.01)
        await env.manager.unlink(env.entry(".later.img.backup"), "/.later.img.backup")
        assert len(env.vdis(name_label="later")) == 1
        assert ".later.img.backup" not in env.manager.entries(env.sr)
        # Imported under another name and renamed to one like rsync's (helper 43): rsync renames its
        # temporary file only to its final name, never to it.
        await copy_in(env, "renamed.raw", data)
        await env.manager.rename(env.entry("renamed.raw"), ".x.raw.ABCDEF", "/renamed.raw")
        monkeypatch.setattr("xofs.imports.ABANDON_WINDOW", 60.0)
        await env.manager.unlink(env.entry(".x.raw.ABCDEF"), "/.x.raw.ABCDEF")
        assert len(env.vdis(name_label="x")) == 1


async def test_rename_of_an_imported_file_renames_the_vdi(fresh_sim, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "xofs.imports")
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    async with running(fresh_sim, tmp_path) as env:
        await copy_in(env, "old.raw", data)
        [vdi] = env.vdis(name_label="old")
        await env.manager.rename(env.entry("old.raw"), "new.img", "/old.raw")
        assert [v["id"] for v in env.vdis(name_label="new")] == [vdi["id"]]
        # Every change xofs makes in XO is logged, imports as renames and descriptions
        assert f"/old.raw renamed to new.img: VDI {vdi['id']} is now named 'new' in XO" in caplog.messages
        assert list(env.manager.entries(env.sr)) == ["new.img"]
        await expect_error(errno.EPERM, env.manager.rename(env.entry("new.img"), "new.vhd", "/new.img"))
        # An unsupported name: EPERM too (EINVAL made `mv` say "cannot move to a subdirectory of itself")
        await expect_error(errno.EPERM, env.manager.rename(env.entry("new.img"), "new.txt", "/new.img"))
        await expect_error(errno.EPERM, env.manager.rename(env.entry("new.img"), ".DS_Store", "/new.img"))


async def test_description_from_the_xattr_before_and_after_the_upload(fresh_sim, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "xofs.imports")
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    async with running(fresh_sim, tmp_path) as env:
        entry = env.entry("d.raw")
        f = await env.manager.create(entry, 0o644, ME, "/d.raw")
        await env.manager.setxattr(entry, "user.xo.name_description", b"web server, 2024", "/d.raw")
        await write_all(f, data)
        await f.flush(Caller())
        await f.release()
        [vdi] = env.vdis(name_label="d")
        assert vdi["name_description"] == "web server, 2024"
        await env.manager.setxattr(entry, "user.xo.name_description", b"retired", "/d.raw")
        assert env.vdis(name_label="d")[0]["name_description"] == "retired"
        assert f"VDI {vdi['id']} of /d.raw now has name_description 'retired'" in caplog.messages
        await expect_error(errno.EPERM, env.manager.setxattr(entry, "user.xo.vdi", b"x", "/d.raw"))


async def test_flush_before_writes_is_a_no_op(fresh_sim, tmp_path) -> None:
    """A shell redirection: the shell's copy of the descriptor is closed before the command writes."""
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    async with running(fresh_sim, tmp_path) as env:
        f = await env.manager.create(env.entry("s.raw"), 0o644, ME, "/s.raw")
        await f.flush(Caller())
        assert env.vdis(name_label="s") == []
        await write_all(f, data)
        await f.flush(Caller())
        await f.flush(Caller())  # the last descriptor's close: nothing new
        await f.release()
        [vdi] = env.vdis(name_label="s")
        assert raw_export(fresh_sim, vdi["id"]) == data


async def test_a_close_that_wrote_nothing_does_not_wait_for_the_upload(fresh_sim, tmp_path) -> None:
    """`touch`, or any open that writes nothing, while another descriptor's upload runs."""
    data = make_raw(tmp_path / "src.raw", 2 << 20)
    async with running(fresh_sim, tmp_path) as env:
        async with trio.open_nursery() as nursery:
            entry, writer = await uploading_slowly(env, "t.raw", data, nursery, lambda f: f.flush(Caller()))
            idle = await env.manager.open(entry, os.O_WRONLY, ME, "/t.raw")
            with trio.fail_after(0.5):  # the upload takes about 2 s
                await idle.flush(Caller())
            await idle.release()
            assert env.manager.xattrs(entry)["user.xo.state"] == b"uploading"
        await writer.release()
        [vdi] = env.vdis(name_label="t")
        assert raw_export(fresh_sim, vdi["id"]) == data


async def test_a_rename_during_the_upload_names_the_vdi_and_the_log_line(fresh_sim, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "xofs.imports")
    data = make_raw(tmp_path / "src.raw", 2 << 20)
    async with running(fresh_sim, tmp_path) as env:
        async with trio.open_nursery() as nursery:
            entry, writer = await uploading_slowly(env, "before.raw", data, nursery, lambda f: f.flush(Caller()))
            await env.manager.rename(entry, "after.raw", "/before.raw")
        await writer.release()
        [vdi] = env.vdis(name_label="after")
        assert raw_export(fresh_sim, vdi["id"]) == data
        assert any(r.getMessage().startswith("imported /after.raw as VDI") for r in caplog.records)
        assert f"VDI {vdi['id']} of /after.raw now has name_label 'after'" in caplog.messages


async def test_reopen_and_change_replaces_the_vdi(fresh_sim, tmp_path) -> None:
    """qemu-img's pattern: write an empty image, close, reopen read-write, fill it, close."""
    image, expected = make_vhd(tmp_path)
    empty = tmp_path / "empty.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(empty), "4M"], check=True)
    async with running(fresh_sim, tmp_path) as env:
        await copy_in(env, "q.vhd", empty.read_bytes())
        [first] = env.vdis(name_label="q")
        f = await env.manager.open(env.entry("q.vhd"), os.O_RDWR, ME, "/q.vhd")
        assert (await f.read(0, 8)) == b"conectix"
        await write_all(f, image)
        await f.flush(Caller())
        await f.release()
        [second] = env.vdis(name_label="q")
        assert second["id"] != first["id"]
        assert raw_export(fresh_sim, second["id"]) == expected


@pytest.mark.parametrize("rewrite", ["truncate", "fails in XO"])
async def test_a_failed_rewrite_of_a_whole_image_keeps_its_earlier_vdi(fresh_sim, tmp_path, rewrite) -> None:
    """QA: within the 5 s a finished import's spool is kept, `truncate -s 1M` of a VHD (refused at its
    close), or `rsync --inplace -I` whose upload XO refused, deleted the VDI of the whole image imported a
    second before. Only an empty earlier image (qemu-img's first pass) is deleted with a failed rewrite."""
    image, expected = make_vhd(tmp_path)
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    async with running(fresh_sim, tmp_path) as env:
        name = "w.vhd" if rewrite == "truncate" else "w.raw"
        await copy_in(env, name, image if rewrite == "truncate" else data)
        [first] = env.vdis(name_label="w")
        entry = env.entry(name)
        f = await env.manager.open(entry, os.O_RDWR, ME, f"/{name}")
        if rewrite == "truncate":
            await env.manager.setattr(entry, size=1 << 20, mode=None, mtime_ns=None, path=f"/{name}")
        else:
            status, _, _ = fresh_sim.request("POST", "/_sim/faults", json.dumps({"fail_next_import": 1}).encode(),
                                             {"Content-Type": "application/json"})
            assert status == 200
            await f.write(0, b"changed")
        with pytest.raises(XofsError):
            await f.flush(Caller())
        await f.release()
        [kept] = env.vdis(name_label="w")
        assert kept["id"] == first["id"]
        assert raw_export(fresh_sim, first["id"]) == (expected if rewrite == "truncate" else data)


async def test_a_failed_rewrite_of_an_empty_image_removes_its_vdi(fresh_sim, tmp_path) -> None:
    """qemu-img's pattern, failing: its first close imported an empty image, a VDI nobody wants."""
    empty = tmp_path / "empty.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", str(empty), "4M"], check=True)
    async with running(fresh_sim, tmp_path) as env:
        await copy_in(env, "q.vhd", empty.read_bytes())
        assert len(env.vdis(name_label="q")) == 1
        f = await env.manager.open(env.entry("q.vhd"), os.O_RDWR, ME, "/q.vhd")
        status, _, _ = fresh_sim.request("POST", "/_sim/faults", json.dumps({"fail_next_import": 1}).encode(),
                                         {"Content-Type": "application/json"})
        assert status == 200
        await f.write(512 * 3, bytes(512))  # a change that keeps it a valid, empty VHD
        with pytest.raises(XofsError):
            await f.flush(Caller())
        await f.release()
        assert env.vdis(name_label="q") == []


async def test_settled_import_cannot_change_in_place_but_can_be_overwritten(fresh_sim, tmp_path) -> None:
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    async with running(fresh_sim, tmp_path, rewrite_grace=0) as env:
        await copy_in(env, "o.raw", data)
        [first] = env.vdis(name_label="o")
        f = await env.manager.open(env.entry("o.raw"), os.O_WRONLY, ME, "/o.raw")
        await expect_error(errno.EPERM, f.write(0, b"x" * 512))
        await f.release()
        await expect_error(errno.EACCES, env.manager.open(env.entry("o.raw"), os.O_RDONLY, ME, "/o.raw"))
        # `cp` over it (O_TRUNC): a new import; the first VDI is left alone.
        f = await env.manager.open(env.entry("o.raw"), os.O_WRONLY | os.O_TRUNC, ME, "/o.raw")
        await write_all(f, data[: 512 * 1024])
        await f.flush(Caller())
        await f.release()
        found = {v["id"]: v for v in env.vdis(name_label="o")}
        assert first["id"] in found and len(found) == 2


async def test_unlink_of_an_imported_file_keeps_the_vdi(fresh_sim, tmp_path) -> None:
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    async with running(fresh_sim, tmp_path) as env:
        await copy_in(env, "k.raw", data)
        await env.manager.unlink(env.entry("k.raw"), "/k.raw")
        assert env.manager.entries(env.sr) == {}
        assert len(env.vdis(name_label="k")) == 1
    async with running(fresh_sim, tmp_path) as env:
        assert env.manager.entries(env.sr) == {}


async def test_vdi_deleted_in_xo_drops_the_entry(fresh_sim, tmp_path) -> None:
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    async with running(fresh_sim, tmp_path) as env:
        await copy_in(env, "gone.raw", data)
        [vdi] = env.vdis(name_label="gone")
        status, _, _ = fresh_sim.request("DELETE", f"/rest/v0/vdis/{vdi['id']}")
        assert status in (200, 204)
        env.manager.on_changes([Change(vdi["id"], "VDI", vdi, None)])
        assert env.manager.entries(env.sr) == {}
        assert (env.sr, ["gone.raw"]) in env.notified
        await copy_in(env, "gone2.raw", data)
    # After a remount, a record whose VDI XO no longer has is dropped too.
    [vdi2] = vdis(fresh_sim, name_label="gone2")
    fresh_sim.request("DELETE", f"/rest/v0/vdis/{vdi2['id']}")
    async with running(fresh_sim, tmp_path) as env:
        assert env.manager.entries(env.sr) == {}


async def test_empty_file_imports_nothing_and_stays_listed(fresh_sim, tmp_path) -> None:
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        f = await env.manager.create(env.entry("e.raw"), 0o644, ME, "/e.raw")
        await f.flush(Caller())
        await f.release()
        assert env.manager.entries(env.sr)["e.raw"].size == 0
        assert env.manager.xattrs(env.entry("e.raw"))["user.xo.state"] == b"empty"
        assert len(env.vdis()) == before


async def test_concurrent_imports_into_two_srs_with_an_upload_limit(fresh_sim, tmp_path) -> None:
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    fresh_sim.request("POST", "/_sim/faults", json.dumps({"latency_ms": 300}).encode(),
                      {"Content-Type": "application/json"})
    async with running(fresh_sim, tmp_path, max_uploads=1) as env:
        sr_a, sr_b = sr_ids(fresh_sim)[:2]
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, env.manager._limiter.borrowed_tokens)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as copies:
                copies.start_soon(functools.partial(copy_in, env, "a.raw", data, sr=sr_a))
                copies.start_soon(functools.partial(copy_in, env, "b.raw", data, sr=sr_b))
                await eventually(lambda: env.manager._limiter.statistics().tasks_waiting == 1,
                                 "the second upload to wait")
            nursery.cancel_scope.cancel()
        assert peak == 1
        assert [v["$SR"] for v in env.vdis(name_label="a")] == [sr_a]
        assert [v["$SR"] for v in env.vdis(name_label="b")] == [sr_b]


# ---- refused content and failures: no VDI, no spool, no entry ---------------------------------------------


async def assert_nothing_left(env: Env, label: str, before: int) -> None:
    assert env.vdis(name_label=label) == []
    assert len(env.vdis()) == before
    assert spools(env.tmp) == []
    assert env.manager.entries(env.sr) == {}


async def test_unsupported_names_are_refused_at_create(fresh_sim, tmp_path) -> None:
    async with running(fresh_sim, tmp_path) as env:
        not_utf8 = b"bad\xff\xfename.raw".decode("utf-8", "surrogateescape")  # as the mount passes it on
        for name in ("notes.txt", ".DS_Store", "._disk.vhd", not_utf8):
            err = await expect_error(errno.EINVAL, env.manager.create(env.entry(name), 0o644, ME, f"/{name}"))
            assert name in err.describe()
        assert "not valid UTF-8" in err.describe()


async def test_fixed_vhd_fails_its_first_write(fresh_sim, tmp_path) -> None:
    require_tool("qemu-img")
    fixed = tmp_path / "fixed.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(fixed), "2M"], check=True)
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        f = await env.manager.create(env.entry("fixed.vhd"), 0o644, ME, "/fixed.vhd")
        err = await expect_error(errno.EINVAL, f.write(0, fixed.read_bytes()[:CHUNK]))
        assert "invalid footer checksum" in err.describe()
        await expect_error(errno.EINVAL, f.flush(Caller()))
        await f.release()
        await assert_nothing_left(env, "fixed", before)


async def test_bad_checksum_fails_the_first_write(fresh_sim, tmp_path) -> None:
    image, _ = make_vhd(tmp_path)
    broken = bytearray(image)
    broken[64] ^= 0xFF
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        f = await env.manager.create(env.entry("disk.vhd"), 0o644, ME, "/disk.vhd")
        await expect_error(errno.EINVAL, f.write(0, bytes(broken[:CHUNK])))
        await f.release()
        await assert_nothing_left(env, "disk", before)


async def test_truncated_vhd_fails_at_close(fresh_sim, tmp_path) -> None:
    image, _ = make_vhd(tmp_path)
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        f = await env.manager.create(env.entry("disk.vhd"), 0o644, ME, "/disk.vhd")
        await write_all(f, image[: len(image) // 2])
        err = await expect_error(errno.EINVAL, f.flush(Caller()))
        assert "truncated" in err.describe()
        await f.release()
        await assert_nothing_left(env, "disk", before)


async def test_vhd_with_a_block_size_not_a_power_of_two_fails_at_close_before_any_upload(fresh_sim, tmp_path,
                                                                                        caplog) -> None:
    """vhd-lib (XO's VHD code) takes only power-of-two block sizes; the simulator's converter refuses others
    with XAPI's bare 500. Caught at the close with that reason (it was taken for a truncated file before),
    and nothing is sent, not even the upload a VHD written in order starts while it is written."""
    image, _ = make_vhd(tmp_path)
    crafted = bytearray(image)
    header = int.from_bytes(crafted[16:24], "big")  # the footer copy's data offset: the dynamic header
    crafted[header + 32:header + 36] = (3 << 20).to_bytes(4, "big")  # 3 MiB blocks
    crafted[header + 36:header + 40] = bytes(4)
    crafted[header + 36:header + 40] = (~sum(crafted[header:header + 1024]) & 0xFFFFFFFF).to_bytes(4, "big")
    caplog.set_level(logging.DEBUG, logger="xofs")
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        f = await env.manager.create(env.entry("odd.vhd"), 0o644, ME, "/odd.vhd")
        await write_all(f, bytes(crafted))
        err = await expect_error(errno.EINVAL, f.flush(Caller()))
        assert "block size 3145728 is not a power of two" in err.describe()
        await f.release()
        await assert_nothing_left(env, "odd", before)
    assert "upload" not in " ".join(r.getMessage() for r in caplog.records if "odd" in r.getMessage()).lower()


async def test_non_image_content_is_refused(fresh_sim, tmp_path) -> None:
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        f = await env.manager.create(env.entry("text.vhd"), 0o644, ME, "/text.vhd")
        await expect_error(errno.EINVAL, f.write(0, b"hello, this is not a disk\n" * 100))
        await f.release()
        await assert_nothing_left(env, "text", before)


async def test_vhd_larger_than_the_sr_free_space_fails_early(fresh_sim, tmp_path) -> None:
    async with running(fresh_sim, tmp_path) as env:
        sr = env.cache.get(env.sr)
        free = sr["size"] - sr["usage"]
        before = len(env.vdis())
        f = await env.manager.create(env.entry("huge.vhd"), 0o644, ME, "/huge.vhd")
        head = build_footer(free + (1 << 30)) + bytes(CHUNK - 512)
        err = await expect_error(errno.ENOSPC, f.write(0, head))
        assert env.sr in err.describe()
        await f.release()
        await assert_nothing_left(env, "huge", before)


async def test_raw_larger_than_the_sr_free_space_fails_early(fresh_sim, tmp_path) -> None:
    async with running(fresh_sim, tmp_path) as env:
        sr = env.cache.get(env.sr)
        free = sr["size"] - sr["usage"]
        entry = env.entry("huge.raw")
        f = await env.manager.create(entry, 0o644, ME, "/huge.raw")
        await f.write(0, b"x" * 4096)
        await expect_error(errno.ENOSPC, env.manager.setattr(entry, size=free + 1, mode=None, mtime_ns=None,
                                                             path="/huge.raw"))
        # The import ends, as on a write that fails so (`truncate -s 600G` left an empty entry listed).
        assert "huge.raw" not in env.manager.entries(env.sr)
        await expect_error(errno.ENOSPC, f.write(4096, b"x"))
        await f.release()
        await assert_nothing_left(env, "huge", len(env.vdis()))
        # A finished import (its spool still kept for a rewrite) is left as it was: its VDI, entry and record.
        await copy_in(env, "kept.raw", b"k" * 4096)
        [kept] = env.vdis(name_label="kept")
        entry = env.entry("kept.raw")
        f = await env.manager.open(entry, os.O_WRONLY, ME, "/kept.raw")
        await expect_error(errno.ENOSPC, env.manager.setattr(entry, size=free + 1, mode=None, mtime_ns=None,
                                                             path="/kept.raw"))
        await f.release()
        assert env.vdis(name_label="kept") == [kept]
        assert env.manager.xattrs(env.entry("kept.raw"))["user.xo.vdi"] == kept["id"].encode()
    async with running(fresh_sim, tmp_path) as env:  # the record too
        assert env.manager.xattrs(env.entry("kept.raw"))["user.xo.state"] == b"imported"


async def test_injected_xo_failure_is_eio_at_close(fresh_sim, tmp_path) -> None:
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    status, _, _ = fresh_sim.request("POST", "/_sim/faults", json.dumps({"fail_next_import": True}).encode(),
                                     {"Content-Type": "application/json"})
    assert status == 200
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        err = await expect_error(errno.EIO, copy_in(env, "f.raw", data))
        assert env.sr in err.describe() and "500 Internal Server Error" in err.describe()
        await assert_nothing_left(env, "f", before)


async def test_a_failed_import_never_deletes_a_vdi_of_the_same_name_made_meanwhile(fresh_sim, tmp_path,
                                                                                   caplog) -> None:
    # After a failed upload xofs looks, for a few seconds, for a VDI XO should have destroyed. Another
    # client's import of the same name that finished meanwhile carries no import mark any more: not ours,
    # and said so (it may also be ours, had XO read the whole image before the upload was cut).
    data = make_raw(tmp_path / "src.raw", 2 << 20)
    caplog.set_level(logging.INFO, logger="xofs.imports")
    async with running(fresh_sim, tmp_path) as env:
        async with trio.open_nursery() as nursery:
            async def close(f: ImportFile) -> None:
                await expect_error(errno.EIO, f.flush(Caller()))
                await f.release()

            entry, _ = await uploading_slowly(env, "f.raw", data, nursery, close)
            await trio.sleep(0.3)
            status, _, body = await trio.to_thread.run_sync(
                fresh_sim.request, "POST", f"/rest/v0/srs/{env.sr}/vdis?raw=true&name_label=f", b"x" * 4096,
                {"Content-Type": "application/octet-stream"})
            assert status == 201, body
            theirs = json.loads(body)["id"]
            await env.manager.unlink(entry, "/f.raw")  # cancels our upload: it fails
        await trio.sleep(sum(LEFTOVER_CHECKS) + 0.5)
        assert [v["id"] for v in vdis(fresh_sim, name_label="f")] == [theirs]
        assert f"VDI {theirs} named 'f' appeared on SR {env.sr} during the failed import, as a finished " \
            "import (XO removed its import mark): left in XO, since it may be another client's" in caplog.text


@pytest.mark.parametrize("answer", ["pending", "success", "failure", "unknown", "unanswered"])
async def test_a_marked_vdi_of_the_same_name_is_deleted_only_when_xapis_tasks_say_its_import_is_over(
        fresh_sim, tmp_path, caplog, answer) -> None:
    """Another import of the same name and length, still marked: under way (its task pending), just ended
    (XO marks the task `success` a moment before it removes the marks), or left by a failed one (its task
    failed, or gone). Only the last is deleted. Tasks that cannot be asked (the REST event stream; a silent
    feed) delete nothing. The event cache's idea of the tasks was wrong with the REST stream (XO's own
    tasks), a silent feed and that moment (helper 46): XAPI's tasks are asked at the time of the decision."""
    data = make_raw(tmp_path / "src.raw", 2 << 20)
    caplog.set_level(logging.INFO, logger="xofs.imports")
    async with running(fresh_sim, tmp_path) as env:
        asked: list[str] = []

        async def xapi_tasks() -> dict[str, dict]:
            [theirs] = [v for v in env.vdis(name_label="f") if v["other_config"]]
            asked.append(theirs["id"])
            task = theirs["other_config"]["xo:import:task"]
            if answer == "unknown":
                raise TasksUnknown("the event feed is XO's REST event stream, which cannot ask XAPI's tasks")
            if answer == "unanswered":
                raise XofsError("XO did not answer xo.getAllObjects within 10 s")
            return {task: {"status": answer, "name_label": "[XO] Importing content into VDI f on SR x"}}

        env.manager.xapi_tasks = xapi_tasks
        theirs_done: list = []
        async with trio.open_nursery() as nursery:
            async def close(f: ImportFile) -> None:
                await expect_error(errno.EIO, f.flush(Caller()))
                await f.release()

            entry, _ = await uploading_slowly(env, "f.raw", data, nursery, close)  # 1 MiB/s: 2 s each

            async def their_import() -> None:
                theirs_done.append(await trio.to_thread.run_sync(
                    fresh_sim.request, "POST", f"/rest/v0/srs/{env.sr}/vdis?raw=true&name_label=f", data,
                    {"Content-Type": "application/octet-stream"}, abandon_on_cancel=True))

            fresh_sim.request("POST", "/_sim/faults", json.dumps({"import_bytes_per_second": 100_000}).encode(),
                              {"Content-Type": "application/json"})  # theirs outlasts the search: 20 s
            nursery.start_soon(their_import)
            await eventually(lambda: len(env.vdis(name_label="f")) == 2, "their VDI")
            await env.manager.unlink(entry, "/f.raw")  # cancels our upload: it fails
            await eventually(lambda: asked, "XAPI's tasks to be asked", timeout=15)
            await trio.sleep(0.5)
            left = [v["id"] for v in env.vdis(name_label="f")]
            assert left == ([] if answer == "failure" else asked[:1]), left
            fresh_sim.request("DELETE", "/_sim/faults")
            nursery.cancel_scope.cancel()
        if answer == "failure":
            assert f"deleted VDI {asked[0]}: XO did not destroy it after the failed import of 'f'" in caplog.text
        elif answer == "unknown":
            assert f"VDI {asked[0]} named 'f' on SR {env.sr} is left in XO" in caplog.text
        else:
            assert "looking again until it can" in caplog.text


async def test_unlink_during_the_upload_cancels_it(fresh_sim, tmp_path) -> None:
    # More than loopback's socket buffers hold (a few MiB): a 1 MiB body could be in them whole when the
    # upload was cancelled, and the simulator, once its latency was over, read it all and made the VDI
    # (unmarked, as a finished import is, so not removed: it may be another client's).
    data = make_raw(tmp_path / "src.raw", 32 << 20)
    fresh_sim.request("POST", "/_sim/faults", json.dumps({"latency_ms": 1500}).encode(),
                      {"Content-Type": "application/json"})
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        entry = env.entry("u.raw")
        f = await env.manager.create(entry, 0o644, ME, "/u.raw")
        await write_all(f, data)
        async with trio.open_nursery() as nursery:
            async def close() -> None:
                await expect_error(errno.EIO, f.flush(Caller()))
                await f.release()

            nursery.start_soon(close)
            await trio.sleep(0.3)
            assert env.manager.xattrs(entry)["user.xo.state"] == b"uploading"
            await env.manager.unlink(entry, "/u.raw")
        fresh_sim.request("DELETE", "/_sim/faults")
        await trio.sleep(2)  # the simulator would have finished the import by now, had it gone on
        await assert_nothing_left(env, "u", before)


async def test_killed_writer_imports_nothing(fresh_sim, tmp_path) -> None:
    data = make_raw(tmp_path / "src.raw", 1 << 20)
    victim = subprocess.Popen(["sleep", "60"])
    victim.send_signal(signal.SIGKILL)
    while not writer_was_killed(victim.pid):  # a zombie until reaped: exiting, with the signal as status
        await trio.sleep(0.01)
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        f = await env.manager.create(env.entry("k.raw"), 0o644, Caller(pid=victim.pid), "/k.raw")
        await write_all(f, data)
        await expect_error(errno.EIO, f.flush(Caller()))
        await f.release()
        await assert_nothing_left(env, "k", before)
    victim.wait()


# ---- uploads that follow the writer (a VHD written in order) ---------------------------------------------


def test_planned_vhd_length_comes_from_the_block_table_once_it_is_in(tmp_path) -> None:
    image, _ = make_vhd(tmp_path, size=8 << 20)

    def read(offset: int, n: int) -> bytes:
        return image[offset:offset + n]

    assert planned_vhd_length(read, len(image)) == len(image)  # qemu-img's layout: the last block, the footer
    header = int.from_bytes(image[16:24], "big")
    table = int.from_bytes(image[header + 16:header + 24], "big")
    assert planned_vhd_length(read, table) is None  # the table is not all written yet
    assert planned_vhd_length(read, 511) is None
    blank = bytearray(image)
    entries = int.from_bytes(image[header + 28:header + 32], "big")
    blank[table:table + 4 * entries] = b"\xff" * (4 * entries)  # no block mapped: nothing sure to say
    assert planned_vhd_length(lambda o, n: bytes(blank[o:o + n]), len(blank)) is None
    broken = bytearray(image)
    broken[header:header + 8] = b"notcxspa"  # no dynamic header where the footer points
    assert planned_vhd_length(lambda o, n: bytes(broken[o:o + n]), len(broken)) is None


async def start_copy(env: Env, name: str, image: bytes) -> tuple[ImportFile, dict]:
    """What `cp` does, stopped halfway; returns the file and the VDI its upload began meanwhile."""
    f = await env.manager.create(env.entry(name), 0o644, ME, f"/{name}")
    await write_all(f, image[:len(image) // 2])
    label = parse_name(name).label
    await eventually(lambda: env.vdis(name_label=label), "the VDI of the upload that follows the writer")
    [early] = env.vdis(name_label=label)
    return f, early


async def finish_copy(f: ImportFile, image: bytes) -> None:
    """The rest of `start_copy`'s copy, and the close."""
    await write_all(f, image[len(image) // 2:], len(image) // 2)
    await f.flush(Caller())
    await f.release()


async def test_a_vhd_written_in_order_is_uploaded_while_it_is_written(fresh_sim, tmp_path) -> None:
    image, expected = make_vhd(tmp_path, size=8 << 20)
    async with running(fresh_sim, tmp_path) as env:
        f, early = await start_copy(env, "live.vhd", image)
        # XO made the VDI before the copy ended, told the whole length up front (the Content-Length).
        assert early["other_config"]["xo:import:length"] == str(len(image))
        await finish_copy(f, image)
        [vdi] = env.vdis(name_label="live")
        assert vdi["id"] == early["id"] and raw_export(fresh_sim, vdi["id"]) == expected
        assert env.manager.xattrs(env.entry("live.vhd"))["user.xo.vdi"] == vdi["id"].encode()
    assert spools(tmp_path) == []


async def test_a_write_out_of_order_gives_the_early_upload_up_and_the_close_uploads(fresh_sim, tmp_path) -> None:
    image, expected = make_vhd(tmp_path, size=8 << 20)
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        f, early = await start_copy(env, "redo.vhd", image)
        assert await f.write(0, image[:512]) == 512  # the same bytes again: already sent, so it stops
        await eventually(lambda: not env.vdis(name_label="redo"), "the early upload's VDI to go")
        await finish_copy(f, image)
        [vdi] = env.vdis(name_label="redo")
        assert vdi["id"] != early["id"] and raw_export(fresh_sim, vdi["id"]) == expected
        assert len(env.vdis()) == before + 1


async def test_a_writer_that_pauses_gives_the_early_upload_up(fresh_sim, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("xofs.imports.EARLY_STALL", 0.5)
    image, expected = make_vhd(tmp_path, size=8 << 20)
    async with running(fresh_sim, tmp_path) as env:
        f, _ = await start_copy(env, "slow.vhd", image)
        await eventually(lambda: not env.vdis(name_label="slow"), "the early upload's VDI to go")
        await finish_copy(f, image)
        [vdi] = env.vdis(name_label="slow")
        assert raw_export(fresh_sim, vdi["id"]) == expected


async def test_uploads_that_follow_their_writers_leave_a_slot_for_a_close(fresh_sim, tmp_path) -> None:
    """One program writing two VHDs at once (both uploaded while written, holding both upload slots) and
    then a third file: its close waited 20 s, until the writers' pause gave an upload up (helper 43). The
    uploads that follow writers now take a slot only while another is free for a close."""
    image, expected = make_vhd(tmp_path, size=8 << 20)
    raw = make_raw(tmp_path / "c.raw", 1 << 20)
    async with running(fresh_sim, tmp_path, max_uploads=2) as env:
        a, _ = await start_copy(env, "a.vhd", image)
        b = await env.manager.create(env.entry("b.vhd"), 0o644, ME, "/b.vhd")
        await write_all(b, image[:len(image) // 2])
        await trio.sleep(1)  # time enough for its upload to begin, had it taken the last slot
        assert env.manager._limiter.available_tokens == 1
        with trio.fail_after(10):
            await copy_in(env, "c.raw", raw)
        assert raw_export(fresh_sim, env.vdis(name_label="c")[0]["id"]) == raw
        for f in (a, b):
            await finish_copy(f, image)
        for label in ("a", "b"):
            [vdi] = env.vdis(name_label=label)
            assert raw_export(fresh_sim, vdi["id"]) == expected


async def test_unlink_or_a_stopping_mount_while_written_leaves_no_vdi(fresh_sim, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "xofs.imports")
    image, _ = make_vhd(tmp_path, size=8 << 20)
    async with running(fresh_sim, tmp_path) as env:
        before = len(env.vdis())
        f, _ = await start_copy(env, "gone.vhd", image)
        await env.manager.unlink(env.entry("gone.vhd"), "/gone.vhd")
        assert any(r.getMessage().endswith("/gone.vhd: stopped uploading while it is written (the file was "
                                           "removed); nothing is uploaded") for r in caplog.records)
        assert env.vdis(name_label="gone") == [] and len(env.vdis()) == before
        await expect_error(errno.EIO, f.flush(Caller()))
        await f.release()
        await start_copy(env, "left.vhd", image)
    await eventually(lambda: not vdis(fresh_sim, name_label="left"), "the VDI of the stopped mount's upload to go")
    assert spools(tmp_path) == []


def test_writer_was_killed_tells_a_signal_from_an_exit() -> None:
    normal = subprocess.Popen(["true"])
    alive = subprocess.Popen(["sleep", "60"])
    try:
        import time

        deadline = time.monotonic() + 10
        while not Path(f"/proc/{normal.pid}/stat").read_text().split(")")[1].split()[0] == "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not writer_was_killed(normal.pid)
        assert not writer_was_killed(alive.pid)
        assert not writer_was_killed(0)
    finally:
        alive.kill()
        alive.wait()
        normal.wait()


def test_stale_spools_of_dead_daemons_are_cleaned(tmp_path) -> None:
    d = tmp_path / "spools"
    d.mkdir()
    (d / "999999999-abc.spool").write_bytes(b"x")
    (d / "notes.txt").write_bytes(b"x")
    assert clean_stale_spools(d) == 1
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_import_records_are_saved_where_locks_are_refused(tmp_path, monkeypatch):
    """A state directory on a network filesystem without locks (flock: ENOLCK) must not lose the records
    (they are what keeps a later rsync from importing again)."""
    import fcntl

    from xofs.import_state import ImportRecord, ImportStore

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    store = ImportStore(tmp_path, "http://xo")
    record = ImportRecord("0c7f0d5e-1111-4222-8333-944455556666", 5, 1, 0o644)
    store.save("sr", {"a.raw": record}, known={"a.raw"})
    assert store.load("sr") == {"a.raw": record}


def test_import_records_are_saved_when_another_process_keeps_the_lock(tmp_path, caplog):
    """A save runs on the trio thread: a mount sharing the state directory that holds the lock while stopped
    (SIGSTOP, a debugger) must cost this one a bounded wait, not every FUSE request from then on."""
    import fcntl
    import time

    from xofs.import_state import LOCK_WAIT, ImportRecord, ImportStore

    store = ImportStore(tmp_path, "http://xo")
    store.directory.mkdir(parents=True)
    with open(store.directory / ".lock", "a") as held:  # another open file: flock locks it against the store
        fcntl.flock(held, fcntl.LOCK_EX)
        record = ImportRecord("0c7f0d5e-1111-4222-8333-944455556666", 5, 1, 0o644)
        started = time.monotonic()
        store.save("sr", {"a.raw": record}, known={"a.raw"})
        assert LOCK_WAIT <= time.monotonic() - started < LOCK_WAIT + 1
    assert store.load("sr") == {"a.raw": record}
    assert "another process has held" in caplog.text


async def test_an_upload_under_way_is_counted_once_in_the_sr_free_space(fresh_sim, tmp_path) -> None:
    """XO counts a new VDI in its SR's `usage` from the moment it makes it, at the start of the upload (the
    recordings' SR comes with the VDI's `enter`, usage up by its size): taking the uploads under way off
    the free space again refused a second import that fits with ENOSPC (helper 43)."""
    data = make_raw(tmp_path / "src.raw", 2 << 20)
    async with running(fresh_sim, tmp_path) as env, trio.open_nursery() as nursery:
        async def close(f: ImportFile) -> None:
            await f.flush(Caller())
            await f.release()

        await uploading_slowly(env, "first.raw", data, nursery, close)
        await refresh_cache(env)
        sr = env.cache.get(env.sr)
        assert len(env.vdis(name_label="first")) == 1  # XO made its VDI: the SR's usage counts it
        entry = env.entry("second.raw")
        f = await env.manager.create(entry, 0o644, ME, "/second.raw")
        fits = sr["size"] - sr["usage"] - (1 << 20)
        await env.manager.setattr(entry, size=fits, mode=None, mtime_ns=None, path="/second.raw")
        await f.release()  # closed without a flush: dropped, nothing uploaded
