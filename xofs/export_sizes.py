"""Safe upper bounds on the length of XO's exports, from what XO reports about the objects.

XO sends `.vhd` and `.xva` exports without a length (xo-api.md §1.3, §1.4, §7.4). A file on the mount must
never show a size smaller than what a read will give (an under-reported size makes rsync copy too few bytes
and exit 0: fuse-lessons §7), so until one full read measured an export, its size is a bound computed here.
Each formula is documented in docs/semantics.md (section "Export sizes"); every bound is larger than or equal
to the real length for every layout the formats allow, and only loosely so where XO gives no better hint.
"""

from __future__ import annotations

import functools
import logging
import mmap
from collections.abc import Callable

log = logging.getLogger(__name__)

MiB = 1 << 20
SECTOR = 512

# VHD (dynamic, as XAPI streams it): footer copy, dynamic header, BAT, then per allocated 2 MiB block a
# sector bitmap and the block, then the footer.
VHD_FOOTER = 512
VHD_HEADER = 1024
VHD_BLOCK = 2 * MiB
VHD_BLOCK_BITMAP = 512  # one bit per sector of a 2 MiB block, padded to a sector
VHD_BAT_ALIGN = 4096  # writers pad the BAT to a sector (XAPI) or a page (vhd-util): take the larger

# XVA: a tar (512-byte blocks) of ova.xml, then each disk in 1 MiB chunks, each chunk followed by a checksum
# file, then two zero blocks and padding to a whole 10 KiB tar record.
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
XVA_CHUNK = MiB
XVA_CHUNK_OVERHEAD = 3 * TAR_BLOCK  # the chunk's header, the checksum file's header, the checksum's block
# ova.xml holds the XML-RPC records of the VM and its VBDs, VDIs and SRs: a few KiB each in real exports.
OVA_XML_BASE = 2 * MiB
OVA_XML_PER_VBD = 128 * 1024
# A suspended VM's memory image is a VDI XO does not link to the VM: its RAM plus the device state.
SUSPEND_IMAGE_EXTRA = 64 * MiB
# When XO does not say how big a disk is (an object missing from the cache): the largest VHD there is.
UNKNOWN_DISK = 2 << 40

# Added to every bound shown: twice the largest read the kernel sends (libfuse's buffer holds 256 pages).
# A copy through the page cache (sendfile, splice) gets the short answer at the end of a stream zero-filled
# to the end of its request, and where the kernel kept the size shown (a `stat` overtook that read), it
# copies the zeros up to that size: past the request's end it then asks for more, and that read fails
# (EIO). A bound within the request would end such a copy padded, with success (xofs.fs, `XoFS.read`).
KERNEL_READ_MAX = 256 * mmap.PAGESIZE
BOUND_MARGIN = 2 * KERNEL_READ_MAX

# zstd: ZSTD_COMPRESSBOUND(n), plus room for the frame header and checksum.
ZSTD_FRAME = 64
# gzip: stored deflate blocks add 5 bytes per 64 KiB at worst; 1 KiB per MiB leaves a wide margin, plus
# the header and trailer.
GZIP_FRAME = 1024


def vhd_bound(virtual_size: int) -> int:
    """Upper bound of a dynamic VHD export of a disk of `virtual_size` bytes (every block allocated)."""
    blocks = -(-virtual_size // VHD_BLOCK)
    bat = _round_up(4 * blocks, VHD_BAT_ALIGN)
    return VHD_FOOTER + VHD_HEADER + bat + blocks * (VHD_BLOCK_BITMAP + VHD_BLOCK) + VHD_FOOTER


def xva_bound(disk_sizes: list[int], vbd_count: int) -> int:
    """Upper bound of an uncompressed XVA holding disks of these sizes (every chunk written)."""
    length = _round_up(TAR_BLOCK + OVA_XML_BASE + OVA_XML_PER_VBD * vbd_count, TAR_BLOCK)
    for size in disk_sizes:
        length += -(-size // XVA_CHUNK) * (XVA_CHUNK + XVA_CHUNK_OVERHEAD)
    return _round_up(length + 2 * TAR_BLOCK, TAR_RECORD)


def compressed_bound(length: int, method: str) -> int:
    """Upper bound of `length` bytes compressed with `method` (`zstd` or `gzip`), incompressible data included."""
    if method == "zstd":
        small = (128 * 1024 - length) >> 11 if length < 128 * 1024 else 0
        return length + (length >> 8) + small + ZSTD_FRAME
    if method == "gzip":
        return length + (length >> 10) + GZIP_FRAME
    raise ValueError(f"unknown compression {method!r}")


@functools.lru_cache(maxsize=64)  # a handful of distinct queries, asked for every listed export file
def compression_of(query: str) -> str | None:
    """The compression an export query asks for (`compress=zstd|gzip|true`), None for none."""
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "compress":
            if value == "zstd":
                return "zstd"
            if value in ("gzip", "true"):
                return "gzip"
    return None


def vm_disks(vm: dict, get: Callable[[str], dict | None]) -> tuple[list[int], int]:
    """The sizes of the disks an XVA of `vm` (a VM or VM-snapshot) may carry, and its number of VBDs.

    Every VBD's VDI counts (CD images too: XAPI leaves ISOs out, but a bound may count more), plus the
    memory image of a suspended VM or of a snapshot taken with memory.
    """
    sizes: list[int] = []
    vbds = vm.get("$VBDs") if isinstance(vm.get("$VBDs"), list) else []
    for vbd_id in vbds:
        vbd = get(vbd_id) if isinstance(vbd_id, str) else None
        if vbd is None:
            log.info("VM %s: VBD %s is not known; its disk counts as %d bytes", vm.get("id"), vbd_id, UNKNOWN_DISK)
            sizes.append(UNKNOWN_DISK)
            continue
        vdi_id = vbd.get("VDI")
        if not vdi_id:  # an empty CD drive
            continue
        sizes.append(_vdi_size(get(vdi_id), vdi_id, vm))
    suspend_vdi = vm.get("suspendVdi")
    if isinstance(suspend_vdi, str) and suspend_vdi:
        sizes.append(_vdi_size(get(suspend_vdi), suspend_vdi, vm))
    elif vm.get("power_state") == "Suspended":
        sizes.append(_memory_max(vm) + SUSPEND_IMAGE_EXTRA)
    return sizes, len(vbds)


def _vdi_size(vdi: dict | None, vdi_id: str, vm: dict) -> int:
    size = vdi.get("size") if vdi is not None else None
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    log.info("VM %s: the size of VDI %s is not known; it counts as %d bytes", vm.get("id"), vdi_id, UNKNOWN_DISK)
    return UNKNOWN_DISK


def _memory_max(vm: dict) -> int:
    memory = vm.get("memory") if isinstance(vm.get("memory"), dict) else {}
    values: list[int] = []
    for key in ("size", "static", "dynamic"):
        value = memory.get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool):
                values.append(v)
    return max(values, default=UNKNOWN_DISK)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit
