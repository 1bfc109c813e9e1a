"""A virtual disk's bytes as the format writers read them: `DiskContent`, its size, random access reads,
the blocks that may hold data, and a raw stream. The VHD and XVA writers take one; the simulator's disks
(`xofs.sim.disks`) are such contents.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

MiB = 1024 * 1024
BLOCK_SIZE = 2 * MiB  # the VHD block size, and the allocation granularity of generated disks
RAW_CHUNK = 1 * MiB
SECTOR = 512

_ZEROS_1MIB = bytes(RAW_CHUNK)


class DiskContent(ABC):
    """The bytes of a virtual disk of `size` bytes; blocks outside `allocated_blocks()` read as zeros."""

    size: int

    @abstractmethod
    def read(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes at `offset`; fewer only at the end of the disk, none beyond it."""

    @abstractmethod
    def allocated_blocks(self, block_size: int = BLOCK_SIZE) -> list[int]:
        """Sorted indexes of the `block_size` blocks that may hold non-zero data."""

    def iter_raw(self, chunk: int = RAW_CHUNK) -> Iterator[bytes]:
        """The whole disk, in `chunk`-sized pieces (the last may be shorter).

        Chunks outside allocated blocks are one shared zero buffer, so streaming an almost empty 100 GiB
        disk costs almost nothing but the consumer's time.
        """
        zeros = _ZEROS_1MIB if chunk == RAW_CHUNK else bytes(chunk)
        allocated = set(self.allocated_blocks(BLOCK_SIZE))
        for offset in range(0, self.size, chunk):
            n = min(chunk, self.size - offset)
            first, last = offset // BLOCK_SIZE, (offset + n - 1) // BLOCK_SIZE
            if any(b in allocated for b in range(first, last + 1)):
                yield self.read(offset, n)
            else:
                yield zeros if n == chunk else bytes(n)
