"""What a file written into an import directory is: its format and VDI name from its file name, and
whether its content is a disk image XO will take.

Both checks run before anything is sent to XO, so that a wrong file fails on the write or the close that
caused it, with EINVAL and the reason, instead of after a long upload (xo-api.md §1.5 lists XO's own
checks; `xofs.formats.vhd.check_import_footer` repeats them with XO's words).
"""

from __future__ import annotations

import errno
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from xofs.errors import XofsError
from xofs.formats.vhd import (
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_COOKIE,
    HEADER_SIZE,
    block_size_valid,
    mapped_end,
    vhd_checksum,
)


class ImageFormat(Enum):
    VHD = "vhd"  # a dynamic or differencing VHD (XO refuses fixed ones)
    RAW = "raw"  # the disk's bytes, sent with raw=true; the VDI's size is the file's size


EXTENSIONS = {".vhd": ImageFormat.VHD, ".raw": ImageFormat.RAW, ".img": ImageFormat.RAW, ".iso": ImageFormat.RAW}

# rsync writes `.NAME.XXXXXX` (six random letters or digits), then renames it to NAME (fuse-lessons §7).
_RSYNC_TEMP = re.compile(r"\.(?P<final>.+)\.[A-Za-z0-9]{6}")
# Files desktops and file managers drop into every directory they touch: never disk images.
_JUNK = re.compile(r"\.DS_Store|\._.*|Thumbs\.db|desktop\.ini|\.goutputstream-.*|\.directory", re.I)


@dataclass(frozen=True)
class ImportName:
    """What a file name says: the image format and the VDI's name_label."""

    format: ImageFormat
    label: str  # the final file name without its extension
    temporary: bool  # rsync's temporary name for a file it will rename to the final one


def parse_name(name: str) -> ImportName:
    """The format and label for a name in an import directory; EINVAL (with the reason) for other names.

    A name rsync uses while it copies takes the format and label of the name it will be renamed to, so
    the VDI is named right from the start and the rename changes nothing in XO.
    """
    if _JUNK.fullmatch(name):
        raise XofsError(f"{name!r} is desktop metadata, not a disk image: it is not imported", errno_=errno.EINVAL)
    parsed = _parse_final(name)
    if parsed is not None:
        return parsed
    temp = _RSYNC_TEMP.fullmatch(name)
    if temp is not None:
        final = _parse_final(temp["final"])
        if final is not None:
            return ImportName(final.format, final.label, temporary=True)
    raise XofsError(f"{name!r} is not a disk image name: import directories take "
                    f"{', '.join(sorted(EXTENSIONS))} files", errno_=errno.EINVAL)


def _parse_final(name: str) -> ImportName | None:
    stem, ext = os.path.splitext(name)
    fmt = EXTENSIONS.get(ext.lower())
    if fmt is None or not stem or _JUNK.fullmatch(name):
        return None
    return ImportName(fmt, stem, temporary=False)


# -- content checks -----------------------------------------------------------------------------------------

_DYNAMIC_HEADER = struct.Struct(">8sQQIII")  # cookie, data offset, table offset, version, entries, block size


def check_complete_vhd(path: str | os.PathLike[str], size: int, data_offset: int) -> None:
    """Make sure the VHD in `path` is whole: a footer at its end, and every block it maps inside the file.

    A copy that stopped early (a killed `cp`, a truncated source) passes XO's check of the leading footer
    copy but would fail late in XAPI; caught here, nothing is uploaded. Raises XofsError(EINVAL).
    """
    def bad(why: str) -> XofsError:
        return XofsError(f"incomplete or damaged VHD ({size} bytes): {why}", errno_=errno.EINVAL)

    if size < FOOTER_SIZE + HEADER_SIZE + FOOTER_SIZE:
        raise bad("too short for a dynamic VHD (footer copy, header, footer)")
    with open(path, "rb") as f:
        f.seek(size - FOOTER_SIZE)
        footer = f.read(FOOTER_SIZE)
        if footer[:8] != FOOTER_COOKIE or int.from_bytes(footer[64:68], "big") != vhd_checksum(footer, 64):
            raise bad("no valid footer in its last 512 bytes (truncated?)")
        f.seek(data_offset)
        header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[:8] != HEADER_COOKIE:
            raise bad(f"no dynamic disk header at offset {data_offset}")
        _, _, table_offset, _, entries, block_size = _DYNAMIC_HEADER.unpack_from(header)
        if not block_size_valid(block_size):
            raise bad(f"its block size {block_size} is not a power of two of at least 512 bytes, which XO's VHD "
                      f"code (vhd-lib) refuses")
        end = size - FOOTER_SIZE
        if table_offset + 4 * entries > end:
            raise bad(f"its block table ({entries} entries at offset {table_offset}) runs past the end")
        f.seek(table_offset)
        table = f.read(4 * entries)
    last = mapped_end(table, block_size)
    if last is not None and last > end:
        raise bad("a block of its table lies past the end of the file (truncated?)")


def _block_table(read: Callable[[int, int], bytes], available: int) -> tuple[bytes, int] | None:
    """A dynamic VHD's block table and block size, from its leading footer copy and its header, read from
    the file's first `available` bytes; None while those do not cover them, or when the header does not
    parse."""
    if available < FOOTER_SIZE:
        return None
    data_offset = int.from_bytes(read(0, FOOTER_SIZE)[16:24], "big")
    if data_offset + HEADER_SIZE > available:
        return None
    header = read(data_offset, HEADER_SIZE)
    if header[:8] != HEADER_COOKIE:
        return None
    _, _, table_offset, _, entries, block_size = _DYNAMIC_HEADER.unpack_from(header)
    if not block_size_valid(block_size) or table_offset + 4 * entries > available:
        return None
    return read(table_offset, 4 * entries), block_size


def vhd_maps_blocks(read: Callable[[int, int], bytes], size: int) -> bool:
    """Whether the dynamic VHD in the file's first `size` bytes maps any block (qemu-img's empty image maps
    none). True when its header or block table cannot be read: only an image known empty counts as one."""
    table = _block_table(read, size)
    return table is None or mapped_end(*table) is not None


def planned_vhd_length(read: Callable[[int, int], bytes], available: int) -> int | None:
    """The length a dynamic VHD will have once written in order, from its leading footer copy, its header
    and its block table: the end of the last block the table maps, plus the trailing footer.

    `read(offset, n)` reads the file, whose first `available` bytes are written. None while those do not
    yet cover the table, and when they say nothing sure (no block mapped, a header that does not parse).
    A writer that writes in order (cp, rsync, dd) leaves exactly this length; others are caught by the
    caller (a write out of order, or past this length, or a close at another length).
    """
    table = _block_table(read, available)
    last = None if table is None else mapped_end(*table)
    return None if last is None else last + FOOTER_SIZE
