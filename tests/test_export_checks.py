"""The structural checks of exports that ended cleanly (xofs/export_checks.py): whole exports pass however
their bytes are split; exports cut anywhere fail, the framing of a compressed stream included."""

from __future__ import annotations

import gzip
import io
import random
import subprocess
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import trio
import zstandard

from tests.support import require_tool
from tests.test_formats import TIMESTAMP, UUID, _vm_with_disks
from xofs.export_checks import ExportMalformed, GzipCheck, TarCheck, VhdCheck, ZstdCheck, check_for
from xofs.export_stream import RECEIVE, ExportFeed, ExportSlots, ReceiveBuffers
from xofs.formats import vhd, xva
from xofs.sim.disks import GeneratedDisk

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
EXPORTS = Path("/work/shared/reference/real-xo/exports")


def feed(check, data: bytes, pieces: int | str = "random") -> None:
    """Feed `data` in pieces of that size (or of random sizes), then end it."""
    view, at = memoryview(data), 0
    rng = random.Random(len(data))
    while at < len(data):
        n = rng.choice((1, 3, 511, 512, 4096, 65536, MiB)) if pieces == "random" else pieces
        check.feed(view[at:at + n])
        at += n
    check.finish(len(data))


def passes(make, data: bytes) -> None:
    for pieces in ("random", 1 if len(data) < 64 << 10 else 4093, MiB):
        feed(make(), data, pieces)


def fails(make, data: bytes, match: str) -> None:
    with pytest.raises(ExportMalformed, match=match):
        feed(make(), data)


@pytest.fixture(scope="module")
def vhd_stream() -> bytes:
    disk = GeneratedDisk(1, "check", 24 * MiB + 4096, 0.5)
    return b"".join(vhd.dynamic_vhd_stream(disk, uuid=UUID, timestamp=TIMESTAMP))


def test_a_whole_vhd_passes_and_one_cut_anywhere_fails(vhd_stream):
    passes(lambda: VhdCheck("vdis/x.vhd"), vhd_stream)
    block = 512 + 2 * MiB
    end = len(vhd_stream)
    cuts = [0, 100, 511, 512, 1000, 1536, 1540, 2047, end - 512, end - 512 - block, end - 1, end - 511,
            end - 512 - 1, 2048 + block, *random.Random(1).sample(range(2048, end), 20)]
    for cut in cuts:
        with pytest.raises(ExportMalformed, match=r"export vdis/x\.vhd is not a whole VHD: .*"):
            feed(VhdCheck("vdis/x.vhd"), vhd_stream[:cut])


def test_a_vhd_cut_where_a_block_ends_says_what_its_block_table_needs(vhd_stream):
    end = len(vhd_stream)
    fails(lambda: VhdCheck("vdis/x.vhd"), vhd_stream[:end - 512],
          rf"ended after {end - 512} bytes, before the end of the blocks its block table maps and its footer "
          rf"\({end} bytes\): it was cut short")


def test_a_vhd_whose_last_bytes_are_not_its_footer_fails(vhd_stream):
    damaged = vhd_stream[:-512] + vhd_stream[-1024:-512]
    fails(lambda: VhdCheck("x"), damaged, "its last 512 bytes .* are not its footer")


def test_what_is_not_a_dynamic_vhd_fails_at_its_start(vhd_stream):
    check = VhdCheck("x")
    with pytest.raises(ExportMalformed, match="its first 512 bytes are not a VHD footer copy"):
        check.feed(memoryview(b"\0" * 4096))
    fixed = bytearray(vhd_stream[:512])
    fixed[60:64] = (2).to_bytes(4, "big")
    fixed[64:68] = vhd.vhd_checksum(bytes(fixed), 64).to_bytes(4, "big")
    with pytest.raises(ExportMalformed, match="disk type 2 is neither dynamic nor differencing"):
        VhdCheck("x").feed(memoryview(bytes(fixed)))
    header = bytearray(vhd_stream[:4096])
    header[512 + 40] ^= 1  # its checksum no longer matches
    with pytest.raises(ExportMalformed, match="its dynamic header at offset 512: invalid header checksum"):
        VhdCheck("x").feed(memoryview(bytes(header)))


def test_the_recorded_export_of_a_real_xo_passes():
    """XAPI's VHD export as a real xo-server passed it on (8 394 752 bytes; its head and tail recorded, its
    blocks' data, which the check never looks at, replaced by zeros), and cut short by one block."""
    head = (EXPORTS / "vdi-vhd.test-01-root.body.head4096").read_bytes()
    tail = (EXPORTS / "vdi-vhd.test-01-root.body.tail512").read_bytes()
    body = head + bytes(8_394_752 - len(head) - len(tail)) + tail
    passes(lambda: VhdCheck("x"), body)
    short = head + bytes(8_394_752 - 2 * MiB - 512 - len(head) - len(tail)) + tail
    fails(lambda: VhdCheck("x"), short, r"before the end of the blocks its block table maps and its footer "
          r"\(8394752 bytes\)")


@pytest.fixture(scope="module")
def xva_stream() -> bytes:
    vm, disks, vbds, srs = _vm_with_disks()
    return b"".join(xva.xva_stream(vm, disks, vbds=vbds, srs=srs))


def _member_ends(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers()]


def test_a_whole_xva_passes_and_one_cut_anywhere_fails(xva_stream):
    passes(lambda: TarCheck("vms/x.xva", "XVA"), xva_stream)
    ends = _member_ends(xva_stream)
    last = ends[-1]
    cuts = [0, 511, 512, *ends[:40:7], *ends[-3:], last + 512, last + 1023,
            *random.Random(2).sample(range(last), 20)]
    for cut in cuts:
        with pytest.raises(ExportMalformed, match=r"export vms/x\.xva is not a whole XVA: it ended after"):
            feed(TarCheck("vms/x.xva", "XVA"), xva_stream[:cut])
    fails(lambda: TarCheck("x", "XVA"), xva_stream[:last],
          rf"it ended after {last} bytes \({len(ends)} members\), before the tar header or end mark due at "
          rf"offset {last}: it was cut short")
    feed(TarCheck("x", "XVA"), xva_stream[:last + 1024])  # two zero blocks end it; the padding is optional
    assert len(xva_stream) > last + 1024 + 512 and len(xva_stream) % 10240 == 0
    for cut in (last + 1024 + 512, last + 1024 + 1, len(xva_stream) - 512, len(xva_stream) - 1):
        # inside the padding to a whole record (QA: the copy was short, and its length learnt as exact)
        fails(lambda: TarCheck("x", "XVA"), xva_stream[:cut],
              rf"it ended after {cut} bytes, inside the padding after its end-of-archive mark \(a whole archive "
              rf"ends at {last + 1024} or {len(xva_stream)}\): it was cut short")


def test_any_tar_passes_and_damage_fails(xva_stream):
    """Other writers' tars (pax headers, long names, directories, GNU format) walk the same way."""
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
            for name, size in (("d" * 150 if fmt != tarfile.USTAR_FORMAT else "dir", 0), ("a/" + "n" * 90, 3000),
                               ("empty", 0), ("b", 512)):
                info = tarfile.TarInfo(name)
                info.size = size
                tar.addfile(info, io.BytesIO(bytes(size)))
            info = tarfile.TarInfo("sub")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        passes(lambda: TarCheck("x", "XVA"), out.getvalue())
    damaged = bytearray(xva_stream)
    second = _member_ends(xva_stream)[0]
    damaged[second + 10] ^= 0xFF  # a letter of the first chunk's name: its header's checksum is wrong
    fails(lambda: TarCheck("x", "XVA"), bytes(damaged), rf"the tar header at offset {second} \(member 2\) has a "
          "wrong checksum")


def _cut_tar(xva_stream: bytes) -> bytes:
    """The tar XAPI would have written had it stopped after its tenth member: a clean end of the pipe."""
    return xva_stream[:_member_ends(xva_stream)[9]]


@pytest.mark.parametrize("method", ["zstd", "gzip"])
def test_a_whole_compressed_xva_passes_and_one_cut_anywhere_fails(xva_stream, method):
    def make():
        label = f"vms/x.xva?compress={method}"
        return check_for(label, "xva", method)
    packed = b"".join(xva.compress_stream([xva_stream], method))
    passes(make, packed)
    for cut in [0, 3, 10, len(packed) - 1, len(packed) - 4, *random.Random(3).sample(range(len(packed)), 15)]:
        with pytest.raises(ExportMalformed, match=rf"is not a whole {method} stream: (it ended after|it does not)"):
            feed(make(), packed[:cut])
    # XAPI's tar cut short still compresses into a well-formed stream: the tar inside says so
    fails(make, b"".join(xva.compress_stream([_cut_tar(xva_stream)], method)),
          rf"is not a whole XVA inside the {method} stream: it ended after .* \(10 members\)")
    fails(make, b"".join(xva.compress_stream([xva_stream[:-512]], method)),
          rf"is not a whole XVA inside the {method} stream: .* inside the padding after its end-of-archive mark")


def test_several_zstd_frames_and_skippable_frames_pass(xva_stream):
    half = len(xva_stream) // 2
    parts = [zstandard.ZstdCompressor(level=1, write_checksum=True).compress(xva_stream[:half]),
             (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345",
             zstandard.ZstdCompressor(level=1, write_content_size=False).compress(xva_stream[half:])]
    passes(lambda: ZstdCheck("x", TarCheck("x", "XVA")), b"".join(parts))
    fails(lambda: ZstdCheck("x", TarCheck("x", "XVA")), b"".join(parts) + b"\0\0\0\0",
          f"no zstd frame starts at offset {len(b''.join(parts))}")


def test_several_gzip_members_pass_and_trailing_bytes_fail(xva_stream):
    half = len(xva_stream) // 2
    packed = gzip.compress(xva_stream[:half], 1) + gzip.compress(xva_stream[half:], 1)
    passes(lambda: GzipCheck("x", TarCheck("x", "XVA")), packed)
    fails(lambda: GzipCheck("x", TarCheck("x", "XVA")), packed + b"junk", "it does not inflate")
    damaged = bytearray(packed)
    damaged[-6] ^= 1  # the last member's CRC
    fails(lambda: GzipCheck("x", TarCheck("x", "XVA")), bytes(damaged), "it does not inflate")


def test_highly_compressible_content_is_inflated_in_bounded_pieces():
    """256 MiB of zeros in a few hundred KiB of gzip: the check never holds more than a piece of it."""
    out = io.BytesIO()
    info = tarfile.TarInfo("zeros")
    info.size = 256 * MiB
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    out.write(packer.compress(info.tobuf(tarfile.USTAR_FORMAT)))
    zeros = bytes(16 * MiB)
    for _ in range(16):
        out.write(packer.compress(zeros))
    out.write(packer.compress(bytes(1024)) + packer.flush())
    check = GzipCheck("x", TarCheck("x", "XVA"))
    pieces = []
    check._sink.write = lambda data: pieces.append(len(data)) or len(data)  # type: ignore[method-assign]
    check.feed(memoryview(out.getvalue()))
    assert sum(pieces) == 512 + 256 * MiB + 1024 and max(pieces) <= MiB


def test_which_exports_are_checked():
    assert check_for("vdis/x.raw", "raw", None) is None
    assert isinstance(check_for("vdis/x.vhd", "vhd", None), VhdCheck)
    assert isinstance(check_for("vms/x.xva", "xva", None), TarCheck)
    assert isinstance(check_for("vms/x.xva?compress=zstd", "xva", "zstd"), ZstdCheck)
    assert isinstance(check_for("vms/x.xva?compress=gzip", "xva", "gzip"), GzipCheck)
    assert check_for("vms/x.ova", "ova", None) is None


class _Body:
    """An export answer whose body is `pieces` (what ExportFeed needs of an ExportResponse)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def gather(self, n: int) -> None:
        pass

    async def receive_into(self, buffer: memoryview) -> int:
        if not self.pieces:
            return 0
        piece = self.pieces.pop(0)
        buffer[:len(piece)] = piece
        return len(piece)

    async def aclose(self) -> None:
        pass


class _SlowCheck:
    """A decompressing check at its worst: a piece of very compressible data takes it a while."""

    costly = True

    def __init__(self) -> None:
        self.fed = 0

    def feed(self, data: memoryview) -> None:
        time.sleep(1.0)
        self.fed += len(data)

    def finish(self, length: int) -> None:
        assert length == self.fed


async def test_a_costly_check_leaves_the_mount_answering():
    """The decompressing checks run in a worker thread: while one chews on a piece, every other operation
    of the mount (here a ticker) goes on (review: 0.4-4.5 s per piece on the trio thread)."""
    check = _SlowCheck()

    async def open_response():
        return _Body([b"a" * 4096, b"b" * 4096])

    feed = ExportFeed("vms/x.xva?compress=gzip", open_response, ExportSlots(4, 60.0), ReceiveBuffers(RECEIVE, 4),
                      readahead=4 * MiB, back_window=MiB, check=check)
    gaps = []

    async def tick() -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(0.01)
            gaps.append(trio.current_time() - last)
            last = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        await nursery.start(feed.run)
        assert await feed.read(0, 8192) == b"a" * 4096 + b"b" * 4096
        with trio.fail_after(5):
            assert await feed.length_beyond(8192) == 8192
        nursery.cancel_scope.cancel()
    assert check.fed == 8192 and max(gaps) < 0.5, max(gaps)  # on the trio thread: 1 s


def _with_size_in_pax_only(data: bytes, name: str) -> bytes:
    """`data` (a pax tar) with member `name`'s ustar size field zeroed, as a writer leaves it for a member of
    8 GiB or more, whose size is then in its pax record only."""
    out = bytearray(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        header = tar.getmember(name).offset_data - 512  # its ustar header (.offset is its pax header's)
    out[header + 124:header + 136] = b"00000000000\0"
    out[header + 148:header + 156] = b" " * 8
    out[header + 148:header + 156] = b"%06o\0 " % sum(out[header:header + 512])
    return bytes(out)


def test_a_member_sized_by_its_pax_record_is_walked_by_that_size(tmp_path):
    require_tool("tar")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, size in (("first", 700), ("big", 5000), ("last", 3)):
            info = tarfile.TarInfo(name)
            info.size = size
            info.pax_headers = {"size": str(size), "comment": "x" * 600}  # records over more than a block
            tar.addfile(info, io.BytesIO(bytes([7]) * size))
    crafted = _with_size_in_pax_only(out.getvalue(), "big")
    (tmp_path / "t.tar").write_bytes(crafted)
    listing = subprocess.run(["tar", "tvf", str(tmp_path / "t.tar")], capture_output=True, text=True,
                             check=True).stdout  # GNU tar reads the size from the pax record
    assert [line.split()[2] for line in listing.splitlines()] == ["700", "5000", "3"]
    passes(lambda: TarCheck("x", "XVA"), crafted)
    cut = len(crafted) - 10240 + 512  # inside the last member's pax records: still a cut
    fails(lambda: TarCheck("x", "XVA"), crafted[:cut], "before the tar header or end mark due at offset")


def test_a_malformed_pax_record_fails():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a")
        info.pax_headers = {"size": "0"}
        tar.addfile(info)
    data = out.getvalue()
    assert b"9 size=0\n" in data
    for bad, match in ((b"9 size=x\n", "gives no valid size"), (b"8 size=0\n", "has a malformed record"),
                       (b"9 size 0\n", "has a malformed record")):
        fails(lambda: TarCheck("x", "XVA"), data.replace(b"9 size=0\n", bad, 1), match)


def test_global_pax_headers_and_a_pax_size_on_a_directory_walk_as_tar_does(tmp_path):
    """A global header (`g`) is walked as a member with data; a `size` record before a directory says
    nothing about data, which a directory has none of (as GNU tar reads them)."""
    require_tool("tar")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "g" * 700}) as tar:
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        info.pax_headers = {"size": "1000"}
        tar.addfile(info)
        info = tarfile.TarInfo("file")
        info.size = 600
        tar.addfile(info, io.BytesIO(bytes(600)))
    (tmp_path / "t.tar").write_bytes(out.getvalue())
    listing = subprocess.run(["tar", "tvf", str(tmp_path / "t.tar")], capture_output=True, text=True, check=True)
    assert [line.split()[-1] for line in listing.stdout.splitlines()] == ["dir/", "file"]
    passes(lambda: TarCheck("x", "XVA"), out.getvalue())
