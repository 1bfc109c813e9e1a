"""What the simulator's virtual disks contain: deterministic, sparse, and cheap at any size.

A disk is a `DiskContent`: a virtual size, random access reads, the list of blocks that may hold data
(every other block reads as zeros) and a raw stream. Exports in every format (raw, VHD, XVA) are built from
these four, so they never need the whole disk in memory.

`GeneratedDisk` makes up the content of the simulator's seeded disks: a first block that looks like the
start of a real disk (an MBR that names the disk) and a few blocks spread by a seeded RNG, all cut from a
few MiB of pseudo-random pattern shared by every disk of the same seed. `FileDisk` serves a sparse raw
file, which is what an imported disk becomes.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

from xofs.formats.disk import BLOCK_SIZE, SECTOR, DiskContent, MiB

# -- generated disks ---------------------------------------------------------------------------------------

PATTERN_SIZE = 4 * MiB
MAX_SPREAD_BLOCKS = 32  # so that even a 100 GiB disk has at most a few dozen allocated blocks
PARTITION_START = 1 * MiB  # where the first partition starts, as modern partitioning tools align it


@functools.lru_cache(maxsize=4)
def _pattern(seed: int) -> bytes:
    """PATTERN_SIZE pseudo-random bytes for a seed, shared by all the disks of that seed."""
    return random.Random(f"xofs-disk-pattern:{seed}").randbytes(PATTERN_SIZE)


def _digest(*parts: object) -> bytes:
    return hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=16).digest()


class GeneratedDisk(DiskContent):
    """A disk whose bytes follow from `(seed, key, size, fill)` alone, the same on every run.

    `fill` is the share of blocks to allocate (a VDI's usage over its size, say), capped at
    `MAX_SPREAD_BLOCKS` besides the first block. A `fill` of 0 gives a blank disk, as a freshly created VDI
    is. Otherwise block 0 starts with an MBR whose boot code area names the disk and whose one partition
    starts at 1 MiB, where pattern data begins.
    """

    def __init__(self, seed: int, key: str, size: int, fill: float) -> None:
        if size < 0:
            raise ValueError(f"negative disk size {size}")
        self.seed = seed
        self.key = key
        self.size = size
        self.fill = fill
        self._pattern = _pattern(seed)
        self._blocks = self._choose_blocks()

    def __repr__(self) -> str:
        return f"GeneratedDisk(seed={self.seed}, key={self.key!r}, size={self.size}, fill={self.fill})"

    def _choose_blocks(self) -> list[int]:
        nblocks = -(-self.size // BLOCK_SIZE)
        if self.fill <= 0 or nblocks == 0:
            return []
        wanted = min(MAX_SPREAD_BLOCKS, round(self.fill * nblocks), nblocks - 1)
        rng = random.Random(f"xofs-disk-blocks:{self.seed}:{self.key}")
        return [0, *sorted(rng.sample(range(1, nblocks), wanted))]

    def allocated_blocks(self, block_size: int = BLOCK_SIZE) -> list[int]:
        if block_size == BLOCK_SIZE:
            return list(self._blocks)
        indexes: set[int] = set()
        for b in self._blocks:
            start, end = b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, self.size)
            indexes.update(range(start // block_size, (end - 1) // block_size + 1))
        return sorted(indexes)

    def read(self, offset: int, n: int) -> bytes:
        end = min(offset + n, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        for b in range(first, last + 1):
            if b not in self._block_set:
                continue
            lo, hi = max(offset, b * BLOCK_SIZE), min(end, (b + 1) * BLOCK_SIZE)
            out[lo - offset:hi - offset] = self._block_bytes(b, lo - b * BLOCK_SIZE, hi - b * BLOCK_SIZE)
        return bytes(out)

    @functools.cached_property
    def _block_set(self) -> frozenset[int]:
        return frozenset(self._blocks)

    def _block_bytes(self, block: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of an allocated block: a window of the pattern, stamped with key and index."""
        if block == 0:
            data_start, overlays = PARTITION_START, [(0, self._mbr()), (PARTITION_START, self._stamp(0))]
        else:
            data_start, overlays = 0, [(0, self._stamp(block))]
        window = int.from_bytes(_digest(self.key, block), "big") % (PATTERN_SIZE - BLOCK_SIZE)
        window -= window % SECTOR
        piece = bytearray(hi - lo)
        a = max(lo, data_start)
        if a < hi:
            piece[a - lo:] = self._pattern[window + a:window + hi]
        for at, data in overlays:
            self._overlay(piece, lo, at, data)
        return bytes(piece)

    @staticmethod
    def _overlay(piece: bytearray, lo: int, at: int, data: bytes) -> None:
        """Write `data` (placed at block offset `at`) into `piece`, which holds block bytes from `lo`."""
        a, b = max(at, lo), min(at + len(data), lo + len(piece))
        if a < b:
            piece[a - lo:b - lo] = data[a - at:b - at]

    def _stamp(self, block: int) -> bytes:
        return f"xofs-sim disk={self.key} seed={self.seed} block={block:08d}\n".encode()

    def _mbr(self) -> bytes:
        """A classic MBR: boot code area naming the disk, one Linux partition from 1 MiB, 0x55AA."""
        mbr = bytearray(SECTOR)
        text = f"xofs-sim generated disk {self.key} (seed {self.seed}, {self.size} bytes)\n".encode()
        mbr[:min(len(text), 440)] = text[:440]
        mbr[440:444] = _digest("signature", self.key)[:4]
        total_sectors = self.size // SECTOR
        first_lba = PARTITION_START // SECTOR
        if total_sectors > first_lba:
            count = min(total_sectors - first_lba, 0xFFFFFFFF)
            # Status, CHS start (LBA-only marker), type 0x83 (Linux), CHS end, LBA start, sector count.
            lba_only = b"\xfe\xff\xff"
            mbr[446:462] = struct.pack("<B3sB3sII", 0, lba_only, 0x83, lba_only, first_lba, count)
        mbr[510:512] = b"\x55\xaa"
        return bytes(mbr)


# -- file-backed disks -------------------------------------------------------------------------------------


class FileDisk(DiskContent):
    """A disk held in a (sparse) raw file, such as one the simulator imported; its size is the file's."""

    def __init__(self, path: str | os.PathLike[str], size: int | None = None) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size if size is None else size

    def __repr__(self) -> str:
        return f"FileDisk({str(self.path)!r}, size={self.size})"

    def read(self, offset: int, n: int) -> bytes:
        end = min(offset + n, self.size)
        if offset >= end:
            return b""
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), end - offset, offset)
        # A file shorter than the disk (size given explicitly) reads as zeros past its end.
        return data + bytes(end - offset - len(data))

    def allocated_blocks(self, block_size: int = BLOCK_SIZE) -> list[int]:
        if self.size == 0:
            return []
        blocks: set[int] = set()
        for start, end in self._data_extents():
            end = min(end, self.size)
            if start < end:
                blocks.update(range(start // block_size, (end - 1) // block_size + 1))
        return sorted(blocks)

    def _data_extents(self) -> Iterator[tuple[int, int]]:
        """(start, end) of the file's data regions, from SEEK_DATA/SEEK_HOLE (all of it if unsupported)."""
        with open(self.path, "rb") as f:
            fd = f.fileno()
            file_size = os.fstat(fd).st_size
            pos = 0
            while pos < file_size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after pos
                        return
                    if e.errno == errno.EINVAL:  # the file system cannot tell: assume it is all data
                        yield pos, file_size
                        return
                    raise
                end = os.lseek(fd, start, os.SEEK_HOLE)
                yield start, end
                pos = end
