"""Whether an export that ended cleanly ended where its own format says it ends.

XO passes XAPI's stream through. When XAPI answers XO without a length (the recordings have such an answer:
`vdi-raw.xapi-sent-no-content-length`) and stops early (a crash, a cancelled task), XO sees a clean end
and ends its own chunked answer cleanly: the HTTP framing cannot tell that cut from the real end. A `.raw`
is checked by its length (the VDI's size); the other formats are checked here, by their own structure, as
their bytes go by:

- `.vhd`, a dynamic or differencing VHD (what XAPI exports): the stream must reach the end of the last
  block its block table maps, and end with a footer identical to its leading footer copy (what vhd-lib
  checks of a VHD file, and XO's end-to-end tests of an export: `conectix` in the last 512 bytes);
- `.xva`, a tar: walked header by header (each header's checksum checked, each member skipped by its
  size), it must reach the end-of-archive mark, two zero blocks, and end there or at the end of that
  10 KiB record (its padding);
- `.xva.zst` and `.xva.gz`: the compressed framing must end at the end of a frame (zstd, walked block by
  block) or of a gzip member (its CRC and length checked), and what it decompresses to must be a whole
  `.xva`: XAPI compresses its tar through a pipe, so a tar cut short still compresses into a well-formed
  stream. Decompressing costs the daemon CPU, small beside what compressing costs XAPI: measured on the
  2-core build machine, 0.17 s per GiB of tar for zstd, 0.5 s for gzip (the `.vhd` check 0.002 s, the
  `.xva` walk 0.02 s), in pieces of 512 KiB as the socket hands them over. The decompressing checks run
  in a worker thread: very compressible data (uniform, not zero, which XAPI does not skip) can take one
  of them a second per piece.

Each check sees every byte once, in order, and holds little whatever the export's size: a few KiB, and
for zstd the decompressor's window (2 MiB at the zstd tool's default level). A check that
fails raises `ExportMalformed` (EIO); the feed then fails its reads, so a copy ends in an error instead of
a short file, and the wrong length is never learnt as exact.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import zstandard

from xofs.errors import XofsError
from xofs.formats.vhd import (
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_SIZE,
    VhdError,
    mapped_end,
    parse_dynamic_header,
    parse_footer,
    vhd_checksum,
)

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # GNU tar's and Python's blocking factor, and the simulator's (XAPI pads nothing)
_ZERO_BLOCK = bytes(TAR_BLOCK)
_NO_DATA_TYPES = b"123456"  # tar members whose size field says nothing about data (links, devices, dirs)
_PAX_NEXT = ord("x")  # a pax header whose records apply to the member after it (its size, for one)
_PAX_LIMIT = 1 << 20  # a pax header's records, read whole: writers put a few hundred bytes there
_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # the low 4 bits are free
_OUT_PIECE = 1 << 20  # decompressed bytes handed to the tar check at a time


class ExportMalformed(XofsError):
    """An export's bytes, or where they ended, do not make the file its format says it is."""


class StreamCheck(Protocol):
    costly: bool  # it decompresses: fed in a worker thread, not in the thread that answers the kernel

    def feed(self, data: memoryview) -> None:
        """The next bytes of the stream; raises ExportMalformed as soon as they cannot be right."""

    def finish(self, length: int) -> None:
        """The stream ended cleanly after `length` bytes; raises ExportMalformed if it should not have."""


def check_for(label: str, fmt: str, compression: str | None) -> StreamCheck | None:
    """The check of an export of format `fmt` (`compression`: None, "zstd" or "gzip"), for log lines about
    `label`; None for formats whose end is checked otherwise (`.raw`: by its size) or not known here."""
    if fmt == "vhd" and compression is None:
        return VhdCheck(label)
    if fmt == "xva":
        tar = TarCheck(label, "XVA" if compression is None else f"XVA inside the {compression} stream")
        if compression is None:
            return tar
        if compression == "zstd":
            return ZstdCheck(label, tar)
        if compression == "gzip":
            return GzipCheck(label, tar)
    return None


class _Collector:
    """Gathers a fixed number of bytes that may come spread over several pieces of the stream."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.want = 0

    def expect(self, n: int) -> None:
        self.buf.clear()
        self.want = n

    def take(self, data: memoryview, at: int) -> int:
        """Take what is still wanted from `data[at:]`; returns the new position in `data`."""
        n = min(self.want - len(self.buf), len(data) - at)
        self.buf += data[at:at + n]
        return at + n

    @property
    def full(self) -> bool:
        return len(self.buf) == self.want


class VhdCheck:
    """A dynamic or differencing VHD: leading footer copy, dynamic header, block table, blocks, footer."""

    costly = False

    def __init__(self, label: str) -> None:
        self.label = label
        self._pos = 0  # bytes seen
        self._first = b""  # the leading footer copy
        self._header_at: int | None = None
        self._table: tuple[int, int] | None = None  # where the block table starts and ends
        self._block_size = 0
        self._carry = b""  # a table entry split between two pieces
        self._end = 0  # where the metadata and the blocks the table maps end (the footer follows)
        self._collect = _Collector()
        self._collect.expect(FOOTER_SIZE)
        self._tail = b""  # the last FOOTER_SIZE bytes seen

    def _bad(self, why: str) -> ExportMalformed:
        return ExportMalformed(f"export {self.label} is not a whole VHD: {why}")

    def feed(self, data: memoryview) -> None:
        start, end = self._pos, self._pos + len(data)
        if self._header_at is None or self._collect.want:
            self._read_metadata(data, start, end)
        if self._table is not None and self._header_at is not None and not self._collect.want:
            self._read_table(data, start, end)
        self._tail = bytes(data[-FOOTER_SIZE:]) if len(data) >= FOOTER_SIZE else (self._tail + data)[-FOOTER_SIZE:]
        self._pos = end

    def _read_metadata(self, data: memoryview, start: int, end: int) -> None:
        """The leading footer copy, then the dynamic header wherever the footer places it."""
        if not self._first:
            self._collect.take(data, 0)
            if not self._collect.full:
                return
            self._first = bytes(self._collect.buf)
            self._check_first_footer()
            self._collect.expect(HEADER_SIZE)
        assert self._header_at is not None
        if end <= self._header_at:
            return
        self._collect.take(data, max(self._header_at - start, 0))
        if not self._collect.full:
            return
        try:
            header = parse_dynamic_header(bytes(self._collect.buf))
        except VhdError as err:
            raise self._bad(f"its dynamic header at offset {self._header_at}: {err}") from None
        self._collect.expect(0)
        table_end = header.table_offset + 4 * header.max_table_entries
        if header.table_offset < self._header_at + HEADER_SIZE:
            raise self._bad(f"its block table (offset {header.table_offset}) overlaps its header")
        self._table = (header.table_offset, table_end)
        self._block_size = header.block_size
        self._end = table_end

    def _check_first_footer(self) -> None:
        footer = parse_footer(self._first)
        if footer.cookie != FOOTER_COOKIE or footer.checksum != vhd_checksum(self._first, 64):
            raise self._bad("its first 512 bytes are not a VHD footer copy")
        if footer.disk_type not in (DISK_TYPE_DYNAMIC, DISK_TYPE_DIFFERENCING) or footer.data_offset is None:
            raise self._bad(f"disk type {footer.disk_type} is neither dynamic nor differencing")
        if footer.data_offset < FOOTER_SIZE:
            raise self._bad(f"its header offset {footer.data_offset} overlaps its footer copy")
        self._header_at = footer.data_offset

    def _read_table(self, data: memoryview, start: int, end: int) -> None:
        assert self._table is not None
        table_start, table_end = self._table
        a, b = max(table_start, start), min(table_end, end)
        if a >= b:
            return
        piece = self._carry + bytes(data[a - start:b - start])
        whole = len(piece) - len(piece) % 4
        self._carry = piece[whole:]
        last = mapped_end(piece[:whole], self._block_size)
        if last is not None:
            self._end = max(self._end, last)

    def finish(self, length: int) -> None:
        if self._table is None or self._pos < self._table[1]:
            raise self._bad(f"it ended after {length} bytes, inside its footer copy, header or block table")
        if length < self._end + FOOTER_SIZE:
            raise self._bad(f"it ended after {length} bytes, before the end of the blocks its block table maps "
                            f"and its footer ({self._end + FOOTER_SIZE} bytes): it was cut short")
        if self._tail != self._first:
            raise self._bad(f"its last 512 bytes (it ended after {length}) are not its footer: it was cut short")


class TarCheck:
    """A tar stream (an XVA): walked from header to header up to its end-of-archive mark."""

    costly = False

    def __init__(self, label: str, what: str) -> None:
        self.label = label
        self.what = what
        self._pos = 0
        self._next = 0  # where the next header (or zero block) starts
        self._collect = _Collector()
        self._collect.expect(TAR_BLOCK)
        self._zero_blocks = 0
        self._ended = False  # two zero blocks seen: what follows is padding to the end of a record
        self._members = 0
        self._pax_length = 0  # a pax header's records being gathered (their length; 0 when none)
        self._pax_size: int | None = None  # the size its records gave the next member

    def _bad(self, why: str) -> ExportMalformed:
        return ExportMalformed(f"export {self.label} is not a whole {self.what}: {why}")

    def feed(self, data: memoryview) -> None:
        start, end = self._pos, self._pos + len(data)
        while not self._ended and self._next + len(self._collect.buf) < end:
            self._collect.take(data, self._next + len(self._collect.buf) - start)
            if not self._collect.full:
                break
            if self._pax_length:
                self._pax_records(bytes(self._collect.buf))
            else:
                self._block(bytes(self._collect.buf))
            self._collect.expect(-(-self._pax_length // TAR_BLOCK) * TAR_BLOCK or TAR_BLOCK)
        self._pos = end

    def _block(self, block: bytes) -> None:
        at = self._next
        self._next += TAR_BLOCK
        if block == _ZERO_BLOCK:
            self._zero_blocks += 1
            self._ended = self._zero_blocks == 2
            return
        if self._zero_blocks:
            raise self._bad(f"a tar header at offset {at} follows a lone zero block")
        stored = block[148:156].split(b"\0", 1)[0].strip()
        try:
            checksum = int(stored or b"-1", 8)
        except ValueError:
            checksum = -1
        counted = block[:148] + b" " * 8 + block[156:]  # the checksum field counts as spaces
        unsigned = sum(counted)
        signed = unsigned - 256 * sum(1 for x in counted if x > 127)  # old tars summed signed chars
        if checksum not in (unsigned, signed):
            raise self._bad(f"the tar header at offset {at} (member {self._members + 1}) has a wrong checksum")
        size = 0 if block[156] in _NO_DATA_TYPES else _tar_size(block[124:136])
        if size is None:
            raise self._bad(f"the tar header at offset {at} has no valid size")
        self._members += 1
        if block[156] == _PAX_NEXT:
            if size > _PAX_LIMIT:
                raise self._bad(f"the pax header at offset {at} holds {size} bytes of records, more than "
                                f"{_PAX_LIMIT} (not an XVA's)")
            self._pax_length = size  # its records are read before the walk goes on
            return
        if self._pax_size is not None:
            if block[156] not in _NO_DATA_TYPES:
                size = self._pax_size  # a member of 8 GiB or more has its size in the pax record only
            self._pax_size = None
        self._next += -(-size // TAR_BLOCK) * TAR_BLOCK

    def _pax_records(self, data: bytes) -> None:
        """The records ("LENGTH KEY=VALUE\n") of a pax header: only `size` matters to the walk."""
        at = self._next - TAR_BLOCK
        records, self._pax_length = data[:self._pax_length], 0
        self._next += len(data)
        while records:
            length = records.split(b" ", 1)[0]
            n = int(length) if length.isdigit() else 0
            record = records[len(length) + 1:n]
            if len(records) < n or not record.endswith(b"\n") or b"=" not in record:
                raise self._bad(f"the pax header at offset {at} has a malformed record")
            key, _, value = record[:-1].partition(b"=")
            if key == b"size":
                if not value.isdigit():
                    raise self._bad(f"the pax header at offset {at} gives no valid size")
                self._pax_size = int(value)
            records = records[n:]

    def finish(self, length: int) -> None:
        if not self._ended:
            where = ("inside its end-of-archive mark" if self._zero_blocks else
                     f"before the tar header or end mark due at offset {self._next}")
            raise self._bad(f"it ended after {length} bytes ({self._members} members), {where}: it was cut short")
        # A tar ends right after its end mark (XAPI's writer, ocaml-tar), or pads it to a whole record (GNU
        # tar, Python, and the simulator, as the recordings of its fake XAPI: 10 KiB). An end anywhere else
        # is a cut in that padding: every member is whole, but the length (which would be learnt as exact)
        # and the bytes are not XO's.
        ends = (self._next, -(-self._next // TAR_RECORD) * TAR_RECORD)
        if length not in ends:
            raise self._bad(f"it ended after {length} bytes, inside the padding after its end-of-archive mark "
                            f"(a whole archive ends at {ends[0]} or {ends[1]}): it was cut short")


def _tar_size(field: bytes) -> int | None:
    """A tar header's size field: octal digits, or base-256 (first byte 0x80) for large members."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return None


class _TarSink:
    """Where a decompressor writes: the tar check, fed as the bytes come out."""

    def __init__(self, tar: TarCheck) -> None:
        self.tar = tar
        self.length = 0

    def write(self, data: bytes) -> int:
        self.tar.feed(memoryview(data))
        self.length += len(data)
        return len(data)


class ZstdCheck:
    """A zstd stream: frames walked block by block (skippable frames skipped), its content checked as a
    tar. The walk, not the decompressor, decides where frames end: it needs no decompression to do so."""

    costly = True

    def __init__(self, label: str, tar: TarCheck) -> None:
        self.label = label
        self._sink = _TarSink(tar)
        self._writer = zstandard.ZstdDecompressor().stream_writer(self._sink, write_size=_OUT_PIECE)
        self._pos = 0
        self._collect = _Collector()
        self._collect.expect(4)
        self._state = "magic"  # what the collected bytes are: magic, skip-size, descriptor, header, block
        self._skip = 0  # bytes to pass over before the next thing to collect
        self._checksum = False  # the current frame ends with a 4-byte checksum
        self._frames = 0

    def _bad(self, why: str) -> ExportMalformed:
        return ExportMalformed(f"export {self.label} is not a whole zstd stream: {why}")

    def feed(self, data: memoryview) -> None:
        at = 0
        while at < len(data):
            if self._skip:
                n = min(self._skip, len(data) - at)
                self._skip -= n
                at += n
                continue
            at = self._collect.take(data, at)
            if self._collect.full:
                self._step(bytes(self._collect.buf), self._pos + at)
        self._pos += len(data)
        try:
            self._writer.write(data)
        except zstandard.ZstdError as err:
            raise self._bad(f"it does not decompress: {err}") from None

    def _step(self, got: bytes, after: int) -> None:
        """The collected bytes, ending at offset `after`, are complete: decide what comes next."""
        if self._state == "magic":
            magic = int.from_bytes(got, "little")
            if magic & 0xFFFFFFF0 == _SKIPPABLE_MAGIC:
                self._state, n = "skip-size", 4
            elif magic == _ZSTD_MAGIC:
                self._state, n = "descriptor", 1
            else:
                raise self._bad(f"no zstd frame starts at offset {after - 4}")
        elif self._state == "skip-size":
            self._skip = int.from_bytes(got, "little")
            self._frames += 1
            self._state, n = "magic", 4
        elif self._state == "descriptor":
            descriptor = got[0]
            single_segment = descriptor >> 5 & 1
            self._checksum = bool(descriptor >> 2 & 1)
            content_size = (0 if not single_segment else 1, 2, 4, 8)[descriptor >> 6]
            self._skip = (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size
            self._state, n = "block", 3
        else:  # a block header
            header = int.from_bytes(got, "little")
            kind, size = header >> 1 & 3, header >> 3
            if kind == 3:
                raise self._bad("a block of the reserved type")
            self._skip = 1 if kind == 1 else size
            if header & 1:  # the frame's last block
                self._skip += 4 if self._checksum else 0
                self._frames += 1
                self._state, n = "magic", 4
            else:
                n = 3
        self._collect.expect(n)

    def finish(self, length: int) -> None:
        if self._state != "magic" or self._collect.buf or self._skip or not self._frames:
            raise self._bad(f"it ended after {length} bytes, inside a frame: it was cut short")
        try:
            self._writer.flush()
        except zstandard.ZstdError as err:
            raise self._bad(f"it does not decompress: {err}") from None
        self._sink.tar.finish(self._sink.length)


class GzipCheck:
    """One or more gzip members, each inflated (zlib checks its CRC and length), the content checked as
    a tar."""

    costly = True

    def __init__(self, label: str, tar: TarCheck) -> None:
        self.label = label
        self._sink = _TarSink(tar)
        self._inflate = zlib.decompressobj(31)
        self._in_member = False  # bytes of a member came and its end did not yet
        self._members = 0

    def _bad(self, why: str) -> ExportMalformed:
        return ExportMalformed(f"export {self.label} is not a whole gzip stream: {why}")

    def feed(self, data: memoryview) -> None:
        pending: bytes | memoryview = data
        try:
            while pending:
                self._in_member = True
                out = self._inflate.decompress(pending, _OUT_PIECE)
                self._sink.write(out)
                pending = self._inflate.unconsumed_tail
                while len(out) == _OUT_PIECE and not pending and not self._inflate.eof:
                    out = self._inflate.decompress(b"", _OUT_PIECE)  # output held back by the limit
                    self._sink.write(out)
                    pending = self._inflate.unconsumed_tail
                if self._inflate.eof:
                    self._members += 1
                    self._in_member = False
                    pending = self._inflate.unused_data
                    self._inflate = zlib.decompressobj(31)
        except zlib.error as err:
            raise self._bad(f"it does not inflate: {err}") from None

    def finish(self, length: int) -> None:
        if self._in_member or not self._members:
            raise self._bad(f"it ended after {length} bytes, inside a member: it was cut short")
        self._sink.tar.finish(self._sink.length)
