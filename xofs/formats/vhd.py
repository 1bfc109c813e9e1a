"""VHD (Microsoft Virtual Hard Disk), the way XO, XAPI and qemu-img's `vpc` driver use it.

Three jobs:

- **Checking an upload's footer as XO does.** XO reads the first 512 bytes of a VHD import as the footer copy
  and checks it (`packages/vhd-lib`: checksum first, then cookie, data offset, version, sizes, disk type).
  `check_import_footer` runs the same checks in the same order and fails with XO's words, including the
  diff that Node's `assert` appends, so the simulator's 500s read like the real ones.
- **Streaming a dynamic VHD of a disk** (`dynamic_vhd_stream`) without holding it: footer copy, dynamic
  header, BAT, then a sector bitmap and a 2 MiB block per allocated block, then the footer. The layout
  follows the recorded export (`vdi-vhd.test-01-root`), which is qemu-img's `vpc` output with
  `force_size=on`: creator `qem2` 5.3 on `Wi2k`, maximal CHS geometry (so readers take the size from the
  footer), BAT at 1536 padded to a sector, blocks packed right after it in disk order.
- **Reading an uploaded dynamic or differencing VHD back into a sparse raw file** (`vhd_to_raw`), for the
  simulator's imports. It reads the stream forward only, so an HTTP body can be fed to it directly.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from xofs.formats.disk import BLOCK_SIZE, SECTOR, DiskContent

FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FILE_FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
FEATURES_RESERVED = 0x00000002  # the spec's "reserved" feature bit, always set
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
BAT_UNUSED = 0xFFFFFFFF

DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4

VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, where VHD timestamps count from

# What the recorded export carries (qemu-img `vpc` with force_size=on).
CREATOR_APPLICATION = b"qem2"
CREATOR_VERSION = 0x00050003
CREATOR_HOST_OS = b"Wi2k"
MAX_GEOMETRY = (65535, 16, 255)
TABLE_OFFSET = FOOTER_SIZE + HEADER_SIZE

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")  # the 85 meaningful bytes; the rest is reserved
_HEADER = struct.Struct(">8sQQIIII16sII")  # up to the parent's unicode name
_STREAM_CHUNK = 1024 * 1024


class VhdError(Exception):
    """A VHD that XO or XAPI would refuse; the message says why, in XO's words where XO has them."""


@dataclass(frozen=True)
class Footer:
    """The 512-byte VHD footer (also copied at the start of dynamic and differencing VHDs)."""

    cookie: bytes
    features: int
    file_format_version: int
    data_offset: int | None  # None for all ones, as fixed VHDs have
    timestamp: int  # seconds since 2000-01-01
    creator_application: bytes
    creator_version: int
    creator_host_os: bytes
    original_size: int
    current_size: int
    geometry: tuple[int, int, int]  # cylinders, heads, sectors per track
    disk_type: int
    checksum: int
    uuid: bytes
    saved_state: int


def vhd_checksum(struct_bytes: bytes, checksum_offset: int) -> int:
    """The one's complement of the byte sum, the checksum field itself counted as zeros."""
    total = sum(struct_bytes) - sum(struct_bytes[checksum_offset:checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def parse_footer(b: bytes) -> Footer:
    """Unpack a footer without judging it (see `check_import_footer` for that)."""
    if len(b) < FOOTER_SIZE:
        raise VhdError(f"truncated VHD: the footer needs {FOOTER_SIZE} bytes, got {len(b)}")
    (cookie, features, version, data_offset, timestamp, app, app_version, host_os, original, current,
     cylinders, heads, sectors, disk_type, checksum, uuid, saved) = _FOOTER.unpack_from(b)
    return Footer(
        cookie=cookie, features=features, file_format_version=version,
        data_offset=None if data_offset == NO_DATA_OFFSET else data_offset, timestamp=timestamp,
        creator_application=app, creator_version=app_version, creator_host_os=host_os,
        original_size=original, current_size=current, geometry=(cylinders, heads, sectors),
        disk_type=disk_type, checksum=checksum, uuid=uuid, saved_state=saved,
    )


def chs_geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads and sectors per track for a disk size, by the VHD specification's algorithm."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total // spt
    else:
        spt = 17
        cyl_heads = total // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total // spt
    return cyl_heads // heads, heads, spt


def build_footer(
    size: int, *, disk_type: int = DISK_TYPE_DYNAMIC, uuid: bytes = bytes(16), timestamp: int = VHD_EPOCH,
    geometry: tuple[int, int, int] | None = None, data_offset: int | None = FOOTER_SIZE,
    creator_application: bytes = CREATOR_APPLICATION, creator_version: int = CREATOR_VERSION,
    creator_host_os: bytes = CREATOR_HOST_OS, cookie: bytes = FOOTER_COOKIE,
) -> bytes:
    """A 512-byte footer with a correct checksum. `timestamp` is Unix time; geometry defaults to the spec's.

    A fixed VHD has no header, so its `data_offset` is None (all ones).
    """
    if len(uuid) != 16:
        raise ValueError("a VHD uuid is 16 bytes")
    cylinders, heads, sectors = geometry if geometry is not None else chs_geometry(size)
    packed = _FOOTER.pack(
        cookie, FEATURES_RESERVED, FILE_FORMAT_VERSION,
        NO_DATA_OFFSET if data_offset is None else data_offset,
        max(timestamp - VHD_EPOCH, 0) & 0xFFFFFFFF, creator_application, creator_version, creator_host_os,
        size, size, cylinders, heads, sectors, disk_type, 0, uuid, 0,
    )
    footer = bytearray(packed.ljust(FOOTER_SIZE, b"\0"))
    footer[64:68] = vhd_checksum(footer, 64).to_bytes(4, "big")
    return bytes(footer)


# -- XO's import checks ------------------------------------------------------------------------------------


def _node_inspect(value: object) -> str:
    """How Node's util.inspect prints the primitives these checks compare."""
    if value is None:
        return "undefined"
    if isinstance(value, bytes):
        text = value.split(b"\0", 1)[0].decode("utf-8", "replace")
        escaped = "".join(
            {"'": "\\'", "\\": "\\\\", "\n": "\\n", "\t": "\\t"}.get(c)
            or (f"\\x{ord(c):02X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
            for c in text
        )
        return f"'{escaped}'"
    return str(value)


def _node_strict_equal_message(header: str, actual: object, expected: object) -> str:
    """The message of Node's failed `assert.strictEqual` for primitives, under `header`.

    Short pairs print as `a !== e`; longer ones as a `+ actual - expected` diff, with a caret under the first
    difference when they share more than two leading characters. (Recorded: `import-vhd-fixed` and
    `import-raw-false-with-raw-body`.)
    """
    a, e = _node_inspect(actual), _node_inspect(expected)
    if len(a) + len(e) <= 12 and not (actual == 0 and expected == 0):
        return f"{header}\n\n{a} !== {e}\n"
    indicator = ""
    if len(a) + len(e) < 80:
        i = 0
        while i < min(len(a), len(e)) and a[i] == e[i]:
            i += 1
        if i > 2:
            indicator = "\n  " + " " * i + "^"
    return f"{header}\n+ actual - expected\n\n+ {a}\n- {e}{indicator}"


_STRICT_EQUAL = "Expected values to be strictly equal:"
_FALSY = "The expression evaluated to a falsy value:\n\n  assert({})\n"


def check_import_footer(first_512: bytes) -> Footer:
    """The footer copy of an uploaded VHD, checked as XO checks it before it creates the VDI.

    A fixed VHD has data, not a footer, at offset 0, so it fails the checksum, as it does in XO.
    """
    if len(first_512) < FOOTER_SIZE:
        raise VhdError(f"truncated VHD: the footer needs {FOOTER_SIZE} bytes, got {len(first_512)}")
    footer = parse_footer(first_512)
    expected = vhd_checksum(first_512[:FOOTER_SIZE], 64)
    if footer.checksum != expected:
        raise VhdError(_node_strict_equal_message(
            f"invalid footer checksum {footer.checksum}, expected {expected}", footer.checksum, expected))
    for actual, wanted in (
        (footer.cookie, FOOTER_COOKIE),
        (footer.data_offset, FOOTER_SIZE),
        (footer.file_format_version, FILE_FORMAT_VERSION),
    ):
        if actual != wanted:
            raise VhdError(_node_strict_equal_message(_STRICT_EQUAL, actual, wanted))
    if not footer.original_size <= footer.current_size:
        raise VhdError(_FALSY.format("footer.originalSize <= footer.currentSize"))
    if footer.disk_type not in (DISK_TYPE_DIFFERENCING, DISK_TYPE_DYNAMIC):
        raise VhdError(_FALSY.format(
            "footer.diskType === DISK_TYPES.DIFFERENCING || footer.diskType === DISK_TYPES.DYNAMIC"))
    return footer


# -- export: a dynamic VHD of a disk -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where everything goes in a dynamic VHD of a disk."""

    size: int  # the footer's current size: the disk size rounded up to a sector
    entries: int  # BAT entries
    blocks: list[int]  # allocated block indexes, in disk order, as they are laid out
    data_start: int  # byte offset of the first block's bitmap

    @property
    def length(self) -> int:
        return self.data_start + len(self.blocks) * (SECTOR + BLOCK_SIZE) + FOOTER_SIZE


def _layout(disk: DiskContent) -> _Layout:
    size = -(-disk.size // SECTOR) * SECTOR
    entries = -(-size // BLOCK_SIZE)
    data_start = TABLE_OFFSET + -(-entries * 4 // SECTOR) * SECTOR
    return _Layout(size, entries, disk.allocated_blocks(BLOCK_SIZE), data_start)


def dynamic_vhd_length(disk: DiskContent) -> int:
    """The byte length of `dynamic_vhd_stream(disk, ...)`, known without reading the disk."""
    return _layout(disk).length


def _dynamic_header(entries: int) -> bytes:
    packed = _HEADER.pack(HEADER_COOKIE, NO_DATA_OFFSET, TABLE_OFFSET, HEADER_VERSION, entries, BLOCK_SIZE,
                          0, bytes(16), 0, 0)
    header = bytearray(packed.ljust(HEADER_SIZE, b"\0"))
    header[36:40] = vhd_checksum(header, 36).to_bytes(4, "big")
    return bytes(header)


def dynamic_vhd_stream(disk: DiskContent, *, uuid: bytes, timestamp: int) -> Iterator[bytes]:
    """A dynamic VHD of `disk`, as XAPI's `/export_raw_vdi/?format=vhd` sends it: for each block, its
    bitmap (after the metadata, for the first), then its data as read, never copied (a simulator joining
    them spent a fifth more CPU per GiB serving a FUSE daemon than curl), then any padding and the footer.

    Every allocated block is written whole (bitmap all ones), whatever it holds, so the length is known up
    front (`dynamic_vhd_length`). `timestamp` is Unix time. Same disk, uuid and timestamp, same bytes.
    """
    layout = _layout(disk)
    footer = build_footer(layout.size, uuid=uuid, timestamp=timestamp, geometry=MAX_GEOMETRY)
    bat = bytearray(b"\xff" * (layout.data_start - TABLE_OFFSET))
    for i, block in enumerate(layout.blocks):
        sector = (layout.data_start + i * (SECTOR + BLOCK_SIZE)) // SECTOR
        struct.pack_into(">I", bat, block * 4, sector)
    head = footer + _dynamic_header(layout.entries) + bat
    bitmap = b"\xff" * SECTOR
    last = len(layout.blocks) - 1
    for i, block in enumerate(layout.blocks):
        data = disk.read(block * BLOCK_SIZE, BLOCK_SIZE)
        yield head + bitmap if i == 0 else bitmap
        if data:
            yield data
        tail = bytes(BLOCK_SIZE - len(data)) + (footer if i == last else b"")  # padding: the last block only
        if tail:
            yield tail
    if last < 0:
        yield head + footer


# -- import: a dynamic or differencing VHD into a raw file -------------------------------------------------


class _Reader:
    """A forward-only reader that knows its position and says "truncated" when the stream ends early."""

    def __init__(self, src: BinaryIO) -> None:
        self.src = src
        self.pos = 0

    def read_exactly(self, n: int, what: str) -> bytes:
        parts = []
        remaining = n
        while remaining:
            data = self.src.read(remaining)
            if not data:
                raise VhdError(f"truncated VHD: {what} at offset {self.pos} needs {n} bytes, "
                               f"the stream ended after {n - remaining}")
            parts.append(data)
            remaining -= len(data)
        self.pos += n
        return b"".join(parts)

    def read_to_end(self) -> bytes:
        """Drain the stream; return its last FOOTER_SIZE bytes (fewer if it ends sooner)."""
        tail = b""
        while data := self.src.read(_STREAM_CHUNK):
            self.pos += len(data)
            tail = (tail + data)[-FOOTER_SIZE:]
        return tail

    def skip_to(self, offset: int, what: str) -> None:
        while self.pos < offset:
            self.read_exactly(min(offset - self.pos, _STREAM_CHUNK), what)


@dataclass(frozen=True)
class DynamicHeader:
    table_offset: int
    max_table_entries: int
    block_size: int


def parse_dynamic_header(b: bytes) -> DynamicHeader:
    """Unpack and check a dynamic disk header (cookie, checksum, version, block size); VhdError says why not."""
    cookie, _data_offset, table_offset, version, entries, block_size, checksum, *_ = _HEADER.unpack_from(b)
    if cookie != HEADER_COOKIE:
        raise VhdError(f"invalid VHD header cookie {cookie!r}, expected {HEADER_COOKIE!r}")
    expected = vhd_checksum(b, 36)
    if checksum != expected:
        raise VhdError(f"invalid header checksum {checksum}, expected {expected}")
    if version != HEADER_VERSION:
        raise VhdError(f"unsupported VHD header version {version:#010x}")
    if not block_size_valid(block_size):
        raise VhdError(f"invalid VHD block size {block_size}")
    return DynamicHeader(table_offset, entries, block_size)


def block_size_valid(block_size: int) -> bool:
    """A block size vhd-lib takes (its header check): a power of two of at least one sector."""
    return block_size >= SECTOR and block_size & (block_size - 1) == 0


def _open_source(src: BinaryIO | str | os.PathLike[str]) -> tuple[BinaryIO, bool]:
    if isinstance(src, (str, os.PathLike)):
        return open(src, "rb"), True
    return src, False


def vhd_to_raw(src: BinaryIO | str | os.PathLike[str], dst_path: str | os.PathLike[str], *,
               expected_size: int | None = None, uncache_every: int = 0) -> int:
    """Write the content of a dynamic or differencing VHD into a sparse raw file; return its virtual size.

    `src` is read forward only from its start, footer copy included (an upload body will do). Sectors a
    differencing VHD leaves to its parent read as zeros: there is no parent here. With `expected_size`
    (the size of the VDI being written), a larger VHD is refused and the raw file gets that size; otherwise
    it gets the VHD's. With `uncache_every`, the raw file's pages leave the page cache (written back
    first) each time that many more bytes are written: a disk being imported is not read again soon. On a
    `VhdError` the raw file is left half written, for the caller to discard.
    """
    stream, owned = _open_source(src)
    try:
        return _convert(_Reader(stream), Path(dst_path), expected_size, uncache_every)
    finally:
        if owned:
            stream.close()


def _convert(reader: _Reader, dst: Path, expected_size: int | None, uncache_every: int) -> int:
    footer = check_import_footer(reader.read_exactly(FOOTER_SIZE, "the footer copy"))
    size = footer.current_size
    if expected_size is not None and size > expected_size:
        raise VhdError(f"the VHD's virtual size {size} is larger than the VDI's size {expected_size}")
    assert footer.data_offset is not None  # check_import_footer made sure it is 512
    reader.skip_to(footer.data_offset, "the dynamic header")
    header = parse_dynamic_header(reader.read_exactly(HEADER_SIZE, "the dynamic header"))
    block_size = header.block_size
    if header.max_table_entries * block_size < size:
        raise VhdError(f"the BAT has {header.max_table_entries} entries of {block_size} bytes, "
                       f"too few for a virtual size of {size}")
    if header.table_offset < reader.pos:
        raise VhdError(f"the BAT offset {header.table_offset} overlaps the VHD header")
    reader.skip_to(header.table_offset, "the BAT")
    bat_bytes = header.max_table_entries * 4
    bat = struct.unpack(f">{header.max_table_entries}I", reader.read_exactly(bat_bytes, "the BAT"))
    bitmap = bitmap_size(block_size)
    blocks = _check_bat(bat, header.table_offset + bat_bytes, bitmap + block_size)

    with open(dst, "wb") as out:
        out.truncate(size if expected_size is None else expected_size)
        since_uncached = 0
        for offset, block in blocks:
            reader.skip_to(offset, f"block {block}")
            present = reader.read_exactly(bitmap, f"the bitmap of block {block}")
            data = reader.read_exactly(block_size, f"block {block}")
            _write_block(out, block * block_size, size, present, data)
            since_uncached += block_size
            if uncache_every and since_uncached >= uncache_every:
                out.flush()
                os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                since_uncached = 0
    trailer = reader.read_to_end()[-FOOTER_SIZE:]
    if len(trailer) < FOOTER_SIZE:
        raise VhdError(f"truncated VHD: the stream ended at offset {reader.pos}, before the footer")
    if trailer[:8] != FOOTER_COOKIE or parse_footer(trailer).checksum != vhd_checksum(trailer, 64):
        raise VhdError("invalid VHD: the last 512 bytes are not a valid footer")
    return size


def bitmap_size(block_size: int) -> int:
    """The bytes of the sector bitmap before each block of a dynamic VHD: a bit per sector, in whole
    sectors (at least one)."""
    return -(-(block_size // SECTOR) // 8 // SECTOR) * SECTOR or SECTOR


def mapped_end(table: bytes, block_size: int) -> int | None:
    """The end of the last block that a piece of a block table maps (its sector bitmap, then its data),
    None if the piece maps none. `table` holds whole 4-byte entries."""
    last = max((sector for (sector,) in struct.iter_unpack(">I", table) if sector != BAT_UNUSED), default=None)
    return None if last is None else last * SECTOR + bitmap_size(block_size) + block_size


def _check_bat(bat: tuple[int, ...], metadata_end: int, stride: int) -> list[tuple[int, int]]:
    """(byte offset, block index) of the used BAT entries, in file order; refuses overlaps."""
    blocks = sorted((entry * SECTOR, block) for block, entry in enumerate(bat) if entry != BAT_UNUSED)
    previous_end = metadata_end
    for offset, block in blocks:
        if offset < previous_end:
            raise VhdError(f"bad BAT entry for block {block}: sector {offset // SECTOR} overlaps "
                           f"{'the VHD metadata' if previous_end == metadata_end else 'another block'}")
        previous_end = offset + stride
    return blocks


def _write_block(out: io.BufferedWriter, at: int, size: int, bitmap: bytes, data: bytes) -> None:
    """Write the sectors the bitmap marks present and not all zeros, clipped to the virtual size."""
    data = data[:max(size - at, 0)]
    sectors = -(-len(data) // SECTOR)
    if bitmap[:-(-sectors // 8)] == b"\xff" * -(-sectors // 8):  # the usual case: every sector present
        _write_nonzero(out, at, data)
        return
    start = None
    for i in range(sectors + 1):
        present = i < sectors and bitmap[i >> 3] & (0x80 >> (i & 7))
        if present and start is None:
            start = i
        elif not present and start is not None:
            _write_nonzero(out, at + start * SECTOR, data[start * SECTOR:i * SECTOR])
            start = None


_ZERO_PAGE = bytes(64 * 1024)


def _write_nonzero(out: io.BufferedWriter, at: int, data: bytes) -> None:
    """Write `data` at `at`, leaving holes where whole 64 KiB pieces are zeros."""
    step = len(_ZERO_PAGE)
    for i in range(0, len(data), step):
        piece = data[i:i + step]
        if piece != _ZERO_PAGE[:len(piece)]:
            out.seek(at + i)
            out.write(piece)
