"""Disk contents and the VHD and XVA formats, checked with the real tools: qemu-img, xva-img, zstd, node.

The recorded real-XO exchanges are the reference for what must match byte for byte (VHD metadata, tar
framing, XO's error messages); qemu-img and xva-img are the judges of everything else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import xmlrpc.client
from collections.abc import Iterable
from pathlib import Path

import pytest
import xxhash

from tests.support import require_tool
from xofs.formats import vhd, xva
from xofs.formats.disk import BLOCK_SIZE, DiskContent
from xofs.sim.disks import MAX_SPREAD_BLOCKS, FileDisk, GeneratedDisk

MiB = 1024 * 1024
GiB = 1024 * MiB
REFERENCE = Path("/work/shared/reference/real-xo")
EXPORTS = REFERENCE / "exports"
UUID = bytes(range(16))
TIMESTAMP = 1_700_000_000


def write_stream(path: Path, chunks: Iterable[bytes]) -> int:
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
    return path.stat().st_size


def raw_bytes(disk: DiskContent) -> bytes:
    return b"".join(disk.iter_raw())


def sparse_file(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True)


def reference_error(name: str) -> str:
    return json.loads((REFERENCE / "imports" / f"{name}.body").read_text())["error"]


# -- disk contents -----------------------------------------------------------------------------------------


def test_generated_disk_is_deterministic_and_keyed():
    a = GeneratedDisk(1, "disk-a", 64 * MiB, 0.3)
    again = GeneratedDisk(1, "disk-a", 64 * MiB, 0.3)
    other_key = GeneratedDisk(1, "disk-b", 64 * MiB, 0.3)
    other_seed = GeneratedDisk(2, "disk-a", 64 * MiB, 0.3)
    assert a.allocated_blocks() == again.allocated_blocks()
    assert raw_bytes(a) == raw_bytes(again)
    assert raw_bytes(a) != raw_bytes(other_key)
    assert raw_bytes(a) != raw_bytes(other_seed)


def test_generated_disk_starts_like_a_real_disk():
    disk = GeneratedDisk(1, "vdi-1234", 10 * GiB, 0.1)
    mbr = disk.read(0, 512)
    assert b"vdi-1234" in mbr[:440]
    assert mbr[510:512] == b"\x55\xaa"
    status, ptype, first_lba, count = struct.unpack_from("<B3xB3xII", mbr, 446)
    assert (ptype, first_lba, count) == (0x83, 2048, 10 * GiB // 512 - 2048)
    assert disk.read(512, MiB - 512) == bytes(MiB - 512)  # the gap before the first partition
    assert disk.read(MiB, 64).startswith(b"xofs-sim disk=vdi-1234")


def test_generated_disk_blocks_differ_and_reads_agree_with_the_stream():
    disk = GeneratedDisk(3, "k", 200 * MiB, 0.2)
    blocks = disk.allocated_blocks()
    assert blocks[0] == 0 and len(blocks) == round(0.2 * 100) + 1
    contents = {disk.read(b * BLOCK_SIZE, BLOCK_SIZE) for b in blocks}
    assert len(contents) == len(blocks)
    raw = raw_bytes(disk)
    assert len(raw) == disk.size
    for offset, n in [(0, 4096), (blocks[1] * BLOCK_SIZE - 100, 300), (blocks[-1] * BLOCK_SIZE + 5, MiB)]:
        assert disk.read(offset, n) == raw[offset:offset + n]
    allocated = set(blocks)
    for b in range(disk.size // BLOCK_SIZE):
        if b not in allocated:
            assert raw[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE] == bytes(BLOCK_SIZE)
    assert disk.allocated_blocks(MiB) == sorted({c for b in blocks for c in (2 * b, 2 * b + 1)})


def test_blank_generated_disk():
    disk = GeneratedDisk(1, "blank", 8 * MiB, 0)
    assert disk.allocated_blocks() == []
    assert raw_bytes(disk) == bytes(8 * MiB)


def test_100_gib_generated_disk_streams_without_memory_growth():
    disk = GeneratedDisk(1, "big", 100 * GiB, 0.5)
    blocks = disk.allocated_blocks()
    assert len(blocks) == MAX_SPREAD_BLOCKS + 1
    tracemalloc.start()
    try:
        start = time.perf_counter()
        total = nonzero = 0
        for chunk in disk.iter_raw():
            total += len(chunk)
            nonzero += any(chunk[:4096])  # allocated chunks start with a stamp or pattern bytes
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 100 * GiB
    assert nonzero == 2 * len(blocks)  # each allocated 2 MiB block is two non-zero 1 MiB chunks
    assert peak < 32 * MiB
    print(f"\n100 GiB generated disk: raw stream at {total / elapsed / 1e9:.1f} GB/s, peak {peak / MiB:.1f} MiB")


def test_file_disk_finds_data_with_seek_data(tmp_path):
    path = sparse_file(tmp_path / "disk.raw", 64 * MiB, {5 * MiB: b"x" * 4096, 63 * MiB: b"end"})
    disk = FileDisk(path)
    assert disk.size == 64 * MiB
    assert disk.allocated_blocks() == [2, 31]
    assert disk.allocated_blocks(MiB) == [5, 63]
    assert disk.read(5 * MiB, 4) == b"xxxx"
    assert disk.read(64 * MiB - 10, 100) == bytes(10)
    assert raw_bytes(disk) == path.read_bytes()


# -- VHD export --------------------------------------------------------------------------------------------


def test_vhd_metadata_matches_the_recorded_export(tmp_path):
    """The recorded 1 GiB VDI with 8 MiB of data: our footer, header, BAT and bitmap are XAPI's bytes."""
    head = (EXPORTS / "vdi-vhd.test-01-root.body.head4096").read_bytes()
    tail = (EXPORTS / "vdi-vhd.test-01-root.body.tail512").read_bytes()
    recorded = vhd.parse_footer(head)
    disk = FileDisk(sparse_file(tmp_path / "d.raw", GiB, {0: os.urandom(8 * MiB)}))
    stream = b"".join(vhd.dynamic_vhd_stream(disk, uuid=recorded.uuid,
                                             timestamp=recorded.timestamp + vhd.VHD_EPOCH))
    assert len(stream) == vhd.dynamic_vhd_length(disk) == 8_394_752  # the recorded body length
    assert stream[:4096] == head
    assert stream[-512:] == tail


@pytest.mark.timeout(300)
def test_qemu_reads_our_vhd_as_the_raw_content(tmp_path):
    qemu_img = require_tool("qemu-img")
    disks: list[DiskContent] = [
        GeneratedDisk(1, "several-blocks", 64 * MiB, 0.2),
        GeneratedDisk(2, "last-block-partial", 5 * MiB + 512, 1.0),
        GeneratedDisk(3, "empty", 10 * MiB, 0),
        FileDisk(sparse_file(tmp_path / "end.raw", 16 * MiB, {16 * MiB - 4096: b"last sector" * 372})),
    ]
    for i, disk in enumerate(disks):
        vhd_path, raw_path = tmp_path / f"{i}.vhd", tmp_path / f"{i}.raw"
        length = write_stream(vhd_path, vhd.dynamic_vhd_stream(disk, uuid=UUID, timestamp=TIMESTAMP))
        assert length == vhd.dynamic_vhd_length(disk)
        info = json.loads(run(qemu_img, "info", "--output=json", "-f", "vpc", vhd_path).stdout)
        assert info["virtual-size"] == disk.size, disk
        run(qemu_img, "convert", "-f", "vpc", "-O", "raw", vhd_path, raw_path)
        assert raw_path.read_bytes() == raw_bytes(disk), disk


def test_qemu_maps_a_100_gib_vhd_to_the_allocated_blocks(tmp_path):
    qemu_img = require_tool("qemu-img")
    disk = GeneratedDisk(1, "big", 100 * GiB, 0.5)
    path = tmp_path / "big.vhd"
    assert write_stream(path, vhd.dynamic_vhd_stream(disk, uuid=UUID, timestamp=TIMESTAMP)) \
        == vhd.dynamic_vhd_length(disk)
    extents = json.loads(run(qemu_img, "map", "--output=json", "-f", "vpc", path).stdout)
    data = {e["start"] // BLOCK_SIZE + i for e in extents if e["data"]
            for i in range(e["length"] // BLOCK_SIZE)}
    assert sorted(data) == disk.allocated_blocks()


def test_vhd_stream_is_deterministic_and_sends_each_block_as_read():
    disk = GeneratedDisk(5, "det", 40 * MiB, 0.3)
    first = list(vhd.dynamic_vhd_stream(disk, uuid=UUID, timestamp=TIMESTAMP))
    second = list(vhd.dynamic_vhd_stream(GeneratedDisk(5, "det", 40 * MiB, 0.3), uuid=UUID,
                                         timestamp=TIMESTAMP))
    assert first == second
    blocks = len(disk.allocated_blocks())
    assert blocks > 2
    # Each block's data is a chunk of its own, never copied into one with its bitmap (2 MiB per block
    # copied in the simulator's only thread); the bitmap before it, the footer after the last.
    assert [len(c) for c in first if len(c) > 64 * 1024] == [vhd.BLOCK_SIZE] * blocks
    assert len(first) == 2 * blocks + 1
    other = b"".join(vhd.dynamic_vhd_stream(disk, uuid=bytes(16), timestamp=TIMESTAMP))
    assert other != b"".join(first)


# -- VHD import --------------------------------------------------------------------------------------------


def test_vhd_to_raw_reads_a_qemu_dynamic_vhd(tmp_path):
    qemu_img = require_tool("qemu-img")
    source = sparse_file(tmp_path / "src.raw", 48 * MiB,
                         {0: b"boot" * 128, 7 * MiB: os.urandom(3 * MiB), 48 * MiB - 512: b"z" * 512})
    target = tmp_path / "made.vhd"
    run(qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", target, str(48 * MiB))
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "vpc", source, target)
    size = json.loads(run(qemu_img, "info", "--output=json", target).stdout)["virtual-size"]
    out = tmp_path / "out.raw"
    with open(target, "rb") as stream:  # as a stream, the way an upload body comes
        assert vhd.vhd_to_raw(stream, out) == size
    content = out.read_bytes()
    assert len(content) == size >= 48 * MiB
    assert content[:48 * MiB] == source.read_bytes()
    assert content[48 * MiB:] == bytes(size - 48 * MiB)


def test_vhd_to_raw_round_trips_our_stream_sparsely(tmp_path):
    disk = GeneratedDisk(9, "round-trip", 256 * MiB + 512, 0.1)
    src = tmp_path / "d.vhd"
    write_stream(src, vhd.dynamic_vhd_stream(disk, uuid=UUID, timestamp=TIMESTAMP))
    out = tmp_path / "d.raw"
    assert vhd.vhd_to_raw(src, out) == disk.size
    assert out.read_bytes() == raw_bytes(disk)
    allocated = out.stat().st_blocks * 512
    assert allocated <= len(disk.allocated_blocks()) * BLOCK_SIZE + MiB


def test_vhd_to_raw_honours_the_bitmap_of_a_differencing_vhd(tmp_path):
    """Sectors a differencing VHD leaves to its parent are not in the bitmap: they come out as zeros."""
    disk = GeneratedDisk(4, "diff", 4 * MiB, 1.0)
    image = bytearray(b"".join(vhd.dynamic_vhd_stream(disk, uuid=UUID, timestamp=TIMESTAMP)))
    footer = bytearray(vhd.build_footer(disk.size, disk_type=vhd.DISK_TYPE_DIFFERENCING, uuid=UUID))
    image[:512] = image[-512:] = footer
    first_block = struct.unpack_from(">I", image, vhd.TABLE_OFFSET)[0] * 512
    image[first_block] = 0x7F  # sector 0 of block 0 belongs to the parent
    out = tmp_path / "diff.raw"
    vhd.vhd_to_raw(io.BytesIO(bytes(image)), out)
    expected = bytearray(raw_bytes(disk))
    expected[:512] = bytes(512)
    assert out.read_bytes() == bytes(expected)


def test_vhd_to_raw_refuses_broken_files(tmp_path):
    disk = GeneratedDisk(2, "broken", 8 * MiB, 1.0)
    good = b"".join(vhd.dynamic_vhd_stream(disk, uuid=UUID, timestamp=TIMESTAMP))
    out = tmp_path / "out.raw"

    def refused(data: bytes, **kwargs) -> str:
        with pytest.raises(vhd.VhdError) as info:
            vhd.vhd_to_raw(io.BytesIO(data), out, **kwargs)
        return str(info.value)

    assert "truncated" in refused(good[:300])
    assert "truncated" in refused(good[:len(good) // 2])
    assert "truncated" in refused(good[:-512])
    overlapping = bytearray(good)
    struct.pack_into(">I", overlapping, vhd.TABLE_OFFSET + 4, struct.unpack_from(">I", good, vhd.TABLE_OFFSET)[0])
    assert "bad BAT entry for block" in refused(bytes(overlapping))
    into_metadata = bytearray(good)
    struct.pack_into(">I", into_metadata, vhd.TABLE_OFFSET, 1)
    assert "overlaps the VHD metadata" in refused(bytes(into_metadata))
    bad_header = bytearray(good)
    bad_header[512 + 100] ^= 1
    assert "invalid header checksum" in refused(bytes(bad_header))
    assert refused(good, expected_size=4 * MiB) == \
        f"the VHD's virtual size {8 * MiB} is larger than the VDI's size {4 * MiB}"
    assert refused(good[:512] + bytes(len(good) - 512)).startswith("invalid VHD header cookie")


def test_vhd_to_raw_refuses_a_fixed_vhd_as_xo_does(tmp_path):
    qemu_img = require_tool("qemu-img")
    source = sparse_file(tmp_path / "src.raw", 4 * MiB, {0: b"\x01" * 512})
    fixed = tmp_path / "fixed.vhd"
    run(qemu_img, "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed", source, fixed)
    with pytest.raises(vhd.VhdError) as info:
        vhd.vhd_to_raw(fixed, tmp_path / "out.raw")
    expected = vhd.vhd_checksum(bytes(fixed.read_bytes()[:512]), 64)
    assert str(info.value) == (f"invalid footer checksum 16843009, expected {expected}\n+ actual - expected"
                               f"\n\n+ 16843009\n- {expected}")


# -- XO's footer checks ------------------------------------------------------------------------------------


def _sector_with(checksum_field: bytes, byte_sum: int) -> bytes:
    """512 bytes whose checksum field holds `checksum_field` and whose other bytes sum to `byte_sum`."""
    sector = bytearray(512)
    sector[64:68] = checksum_field
    i = 100
    while byte_sum:
        sector[i] = min(byte_sum, 255)
        byte_sum -= sector[i]
        i += 1
    return bytes(sector)


def test_fixed_vhd_fails_with_xos_recorded_message():
    # The recorded fixed VHD's first sector: "0000" where the checksum would be, bytes summing to 7692.
    with pytest.raises(vhd.VhdError) as info:
        vhd.check_import_footer(_sector_with(b"0000", 0xFFFFFFFF - 4294959603))
    assert str(info.value) == reference_error("import-vhd-fixed")


def test_raw_body_imported_as_vhd_fails_with_xos_recorded_message():
    with pytest.raises(vhd.VhdError) as info:
        vhd.check_import_footer(_sector_with(bytes(4), 0xFFFFFFFF - 4294966155))
    assert str(info.value) == reference_error("import-raw-false-with-raw-body")


def test_footer_checks_after_the_checksum():
    size = 16 * MiB

    def message(footer: bytes) -> str:
        with pytest.raises(vhd.VhdError) as info:
            vhd.check_import_footer(footer)
        return str(info.value)

    assert message(vhd.build_footer(size, cookie=b"notvhd!!")) == (
        "Expected values to be strictly equal:\n+ actual - expected\n\n+ 'notvhd!!'\n- 'conectix'")
    assert message(vhd.build_footer(size, data_offset=None)) == (
        "Expected values to be strictly equal:\n\nundefined !== 512\n")
    assert message(vhd.build_footer(size, disk_type=vhd.DISK_TYPE_FIXED)) == (
        "The expression evaluated to a falsy value:\n\n"
        "  assert(footer.diskType === DISK_TYPES.DIFFERENCING || footer.diskType === DISK_TYPES.DYNAMIC)\n")
    assert "truncated" in message(vhd.build_footer(size)[:100])
    footer = vhd.check_import_footer(vhd.build_footer(size, disk_type=vhd.DISK_TYPE_DIFFERENCING))
    assert footer.current_size == size and footer.disk_type == vhd.DISK_TYPE_DIFFERENCING


def test_footer_geometry_follows_the_spec(tmp_path):
    """qemu-img computes the specification's CHS geometry when it creates a VHD: ours must agree.

    (qemu rounds the size up to what the geometry covers, so compare on the size it settled on.)
    """
    qemu_img = require_tool("qemu-img")
    for size in (10 * MiB, 127 * MiB + 512, GiB, 40 * GiB):
        path = tmp_path / f"{size}.vhd"
        run(qemu_img, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", path, str(size))
        footer = vhd.parse_footer(path.read_bytes()[:512])
        assert footer.current_size >= size
        assert footer.geometry == vhd.chs_geometry(footer.current_size), size
    assert vhd.chs_geometry(200 * GiB) == (65535, 16, 255)  # beyond CHS: the maximum
    assert vhd.parse_footer(vhd.build_footer(GiB)).geometry == vhd.chs_geometry(GiB)


def test_node_assert_messages_are_reproduced(tmp_path):
    """Our rendering of Node's failed strictEqual, compared with the real node on the same values."""
    node = require_tool("node")
    cases = [[808464432, 4294959603, "m1"], [0, 4294966155, "m2"], [4294959700, 4294959603, "m3"],
             ["abcdefgh", "conectix", None], ["conectiy", "conectix", None], [1024, 512, None],
             [0, 65536, None]]
    script = tmp_path / "asserts.js"
    script.write_text(
        "const assert = require('assert')\n"
        f"const cases = {json.dumps(cases)}\n"
        "const out = cases.map(([a, e, m]) => {\n"
        "  try { assert.strictEqual(a, e, m === null ? undefined : m) } catch (err) { return err.message }\n"
        "})\n"
        "console.log(JSON.stringify(out))\n")
    from_node = json.loads(run(node, script).stdout)
    ours = [vhd._node_strict_equal_message(m or vhd._STRICT_EQUAL,
                                           a.encode() if isinstance(a, str) else a,
                                           e.encode() if isinstance(e, str) else e)
            for a, e, m in cases]
    assert ours == from_node


# -- XVA ---------------------------------------------------------------------------------------------------


def _reference_objects() -> tuple[dict, list[dict], list[dict], list[dict]]:
    rest = REFERENCE / "rest"
    vm = json.loads((rest / "vms.single.db-01.body").read_text())
    vbds = json.loads((rest / "vbds.fields-star.body").read_text())
    vdis = json.loads((rest / "vdis.fields-star.body").read_text())
    srs = json.loads((rest / "srs.fields-star.body").read_text())
    return vm, vbds, vdis, srs


def _vm_with_disks() -> tuple[dict, list[tuple[dict, DiskContent]], list[dict], list[dict]]:
    """db-01 with two disks: its root disk (shrunk, size not a multiple of 1 MiB) and a blank one."""
    vm, vbds, vdis, srs = _reference_objects()
    root = next(v for v in vdis if v["name_label"] == "db-01 root")
    blank = {**root, "id": "0b1a2c3d-0000-4000-8000-000000000001", "uuid": "0b1a2c3d-0000-4000-8000-000000000001",
             "name_label": "db-01 data", "$VBDs": ["0b1a2c3d-0000-4000-8000-0000000000b2"]}
    blank_vbd = {**next(b for b in vbds if b.get("VDI") == root["id"]), "VDI": blank["id"],
                 "id": "0b1a2c3d-0000-4000-8000-0000000000b2", "uuid": "0b1a2c3d-0000-4000-8000-0000000000b2",
                 "device": "xvdb", "position": "1", "bootable": False}
    disks = [(root, GeneratedDisk(1, root["id"], 96 * MiB + 4096, 0.3)),
             (blank, GeneratedDisk(1, blank["id"], 32 * MiB, 0))]
    return vm, disks, [*vbds, blank_vbd], srs


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


def test_xva_tar_framing_matches_the_recorded_export():
    body = (EXPORTS / "vm-xva.halted.db-01.body").read_bytes()
    assert xva.tar_header("ova.xml", 654) == body[:512]
    assert xva.tar_header("Ref:42/00000000", MiB) == body[1536:2048]


def test_xva_layout(tmp_path):
    vm, disks, vbds, srs = _vm_with_disks()
    data = b"".join(xva.xva_stream(vm, disks, vbds=vbds, srs=srs))
    assert len(data) == xva.xva_length(vm, disks, vbds=vbds, srs=srs)
    assert len(data) % (20 * 512) == 0
    members = _members(data)
    assert members[0].name == "ova.xml"
    root_chunks = sorted({0, 96, *disks[0][1].allocated_blocks(MiB)})
    by_dir: dict[str, list[str]] = {}
    for m in members[1:]:
        prefix, name = m.name.split("/")
        by_dir.setdefault(prefix, []).append(name)
        assert (m.mode, m.uid, m.gid, m.mtime) == (0o644, 0, 0, 0)
    ova = xmlrpc.client.loads("<methodResponse><params><param>"
                              + data[512:512 + members[0].size].decode().split("?>", 1)[1]
                              + "</param></params></methodResponse>")[0][0]
    assert ova["version"]["export_vsn"] == 2 and ova["version"]["hostname"] == "xcp-01"
    objects = {o["id"]: o for o in ova["objects"]}
    assert [o["class"] for o in ova["objects"]] == ["VM", "VBD", "VBD", "VBD", "VDI", "VDI", "SR"]
    vm_record = ova["objects"][0]["snapshot"]
    assert vm_record["uuid"] == vm["uuid"] and vm_record["name_label"] == "db-01"
    assert vm_record["memory_static_max"] == "4294967296"
    cd = next(objects[r]["snapshot"] for r in vm_record["VBDs"] if objects[r]["snapshot"]["type"] == "CD")
    assert cd["VDI"] == "OpaqueRef:NULL" and cd["empty"] is True
    vdi_refs = {o["snapshot"]["uuid"]: o["id"] for o in ova["objects"] if o["class"] == "VDI"}
    root_ref, blank_ref = vdi_refs[disks[0][0]["uuid"]], vdi_refs[disks[1][0]["uuid"]]
    assert objects[root_ref]["snapshot"]["virtual_size"] == str(96 * MiB + 4096)
    assert set(by_dir) == {root_ref, blank_ref}
    # Streamed in the lexicographic order of the prefixes; each chunk followed by its one checksum file.
    assert [m.name.split("/")[0] for m in members[1:]] == sorted(m.name.split("/")[0] for m in members[1:])
    assert by_dir[root_ref] == [n for c in root_chunks for n in (f"{c:08d}", f"{c:08d}.checksum")]
    assert by_dir[blank_ref] == ["00000000", "00000000.checksum", "00000031", "00000031.checksum"]
    sizes = {m.name: m.size for m in members}
    assert sizes[f"{root_ref}/00000096"] == 4096  # the short last chunk
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".checksum"):
                chunk = tar.extractfile(m.name.removesuffix(".checksum")).read()
                assert tar.extractfile(m).read() == hashlib.sha1(chunk).hexdigest().encode()


def test_xva_with_xxhash_checksums():
    vm, disks, vbds, srs = _vm_with_disks()
    data = b"".join(xva.xva_stream(vm, disks, vbds=vbds, srs=srs, checksum="xxhash"))
    assert len(data) == xva.xva_length(vm, disks, vbds=vbds, srs=srs, checksum="xxhash")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        names = tar.getnames()
        assert not any(n.endswith(".checksum") for n in names)
        for name in names:
            if name.endswith(".xxhash"):
                chunk = tar.extractfile(name.removesuffix(".xxhash")).read()
                digest = tar.extractfile(name).read()
                assert digest == b"%016X" % xxhash.xxh64_intdigest(chunk)


@pytest.mark.timeout(300)
def test_xva_img_extracts_the_disks(tmp_path):
    xva_img = require_tool("xva-img")
    tar = require_tool("tar")
    vm, disks, vbds, srs = _vm_with_disks()
    archive = tmp_path / "vm.xva"
    write_stream(archive, xva.xva_stream(vm, disks, vbds=vbds, srs=srs))
    extracted = tmp_path / "x"
    extracted.mkdir()
    run(tar, "-xf", archive, "-C", extracted)
    directories = sorted(p.name for p in extracted.iterdir() if p.is_dir())
    assert len(directories) == 2
    by_size = {d.size: d for _, d in disks}
    for name in directories:
        out = tmp_path / f"{name}.raw"
        run(xva_img, "-p", "disk-export", extracted / name, out)
        disk = by_size[out.stat().st_size]
        assert out.read_bytes() == raw_bytes(disk)
    # xva-img does check the checksums: a wrong one fails the export.
    tampered = extracted / directories[0] / "00000000.checksum"
    tampered.write_text("0" * 40)
    failed = subprocess.run([xva_img, "disk-export", str(extracted / directories[0]), str(tmp_path / "bad")],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "checksum" in failed.stderr


def test_xva_is_deterministic_and_chunked():
    vm, disks, vbds, srs = _vm_with_disks()
    first = list(xva.xva_stream(vm, disks, vbds=vbds, srs=srs))
    assert all(len(c) >= MiB for c in first)
    assert first == list(xva.xva_stream(vm, disks, vbds=vbds, srs=srs))


def test_compressed_xva_decompresses_to_the_plain_one(tmp_path):
    zstd = require_tool("zstd")
    vm, disks, vbds, srs = _vm_with_disks()
    plain = b"".join(xva.xva_stream(vm, disks, vbds=vbds, srs=srs))
    zst = tmp_path / "vm.xva.zst"
    write_stream(zst, xva.compress_stream(xva.xva_stream(vm, disks, vbds=vbds, srs=srs), "zstd"))
    assert subprocess.run([zstd, "-d", "-c", str(zst)], check=True, capture_output=True).stdout == plain
    gz = b"".join(xva.compress_stream(xva.xva_stream(vm, disks, vbds=vbds, srs=srs), "gzip"))
    assert gz[:2] == b"\x1f\x8b"
    assert gzip.decompress(gz) == plain
    with pytest.raises(ValueError):
        list(xva.compress_stream([b""], "bogus"))  # type: ignore[arg-type]


def test_the_daemon_loads_no_simulator_code():
    """The formats are the client's as much as the simulator's: the daemon's modules bring in none of
    `xofs.sim` (the VHD and XVA writers took `DiskContent` from it, so `xofs mount` loaded the simulator)."""
    probe = ("import sys, xofs.cli, xofs.daemon, xofs.mount, xofs.fs, xofs.exports, xofs.imports, "
             "xofs.formats.vhd, xofs.formats.xva; print(sorted(m for m in sys.modules if m.startswith('xofs.sim')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
