"""XVA, the VM export format of XAPI's `/export/` handler, which XO's `GET /vms/<id>.xva` passes through.

An XVA is an uncompressed tar (XAPI compresses the whole stream on request):

- `ova.xml` first: an XML-RPC value `{version: {...}, objects: [{class, id, snapshot}, ...]}` holding the
  records of the VM, its VBDs, the exported VDIs and their SRs, every reference replaced by a short
  `Ref:<n>` id;
- then, for each VDI in the lexicographic order of its id, its content cut in 1 MiB chunks named
  `Ref:<n>/<8-digit chunk index>`, each followed by one checksum file: `<name>.checksum` (SHA-1, lower-case
  hex) or `<name>.xxhash` (XXH64, 16 upper-case hex digits, what recent XAPI writes). XAPI's importer wants
  exactly one checksum file per chunk; the Debian xva-img (1.4.2) reads only `.checksum`, hence the default.
  Only allocated chunks are written, plus the first and the last: the importer needs the last one to know
  where the disk ends. The last chunk is short when the disk size is not a multiple of 1 MiB.

The tar framing copies the recorded exports (`exports/vm-xva.*.body`): ustar headers, mode 0644, owner 0,
mtime 0, and the archive padded to whole 10 KiB records after its two zero blocks.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from xml.sax.saxutils import escape

import xxhash
import zstandard

from xofs.formats.disk import DiskContent

CHUNK_SIZE = 1024 * 1024
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
NULL_REF = "OpaqueRef:NULL"
EXPORT_VSN = 2
XAPI_API_VERSION = (2, 21)

Checksum = Literal["sha1", "xxhash"]
Compression = Literal["zstd", "gzip"]

_OUT_CHUNK = 1024 * 1024


# -- tar framing -------------------------------------------------------------------------------------------


def tar_header(name: str, size: int) -> bytes:
    """A ustar header for a regular file, framed like the recorded exports' (mode 0644, owner 0, mtime 0)."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"tar member name too long: {name!r}")
    header = bytearray(TAR_BLOCK)
    header[0:len(encoded)] = encoded
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % 0
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _padding(size: int) -> bytes:
    return bytes(-size % TAR_BLOCK)


def _member_length(size: int) -> int:
    return TAR_BLOCK + size + (-size % TAR_BLOCK)


def _end_of_archive(length_so_far: int) -> bytes:
    """Two zero blocks, then zeros up to the next whole record."""
    end = length_so_far + 2 * TAR_BLOCK
    return bytes(2 * TAR_BLOCK + (-end % TAR_RECORD))


# -- ova.xml -----------------------------------------------------------------------------------------------


def _xmlrpc(value: Any) -> str:
    """An XML-RPC <value> as XAPI writes it: strings bare, 64-bit integers already turned into strings."""
    if isinstance(value, bool):
        return f"<value><boolean>{int(value)}</boolean></value>"
    if isinstance(value, int):
        return f"<value><i4>{value}</i4></value>"
    if isinstance(value, float):
        return f"<value><double>{value!r}</double></value>"
    if isinstance(value, _DateTime):
        return f"<value><dateTime.iso8601>{value.text}</dateTime.iso8601></value>"
    if isinstance(value, Mapping):
        members = "".join(
            f"<member><name>{escape(str(k))}</name>{_xmlrpc(v)}</member>" for k, v in value.items())
        return f"<value><struct>{members}</struct></value>"
    if isinstance(value, (list, tuple)):
        return f"<value><array><data>{''.join(_xmlrpc(v) for v in value)}</data></array></value>"
    return f"<value>{escape(str(value))}</value>"


@dataclass(frozen=True)
class _DateTime:
    text: str

    @classmethod
    def of(cls, unix: float | None) -> _DateTime:
        when = datetime.fromtimestamp(unix or 0, UTC)
        return cls(when.strftime("%Y%m%dT%H:%M:%SZ"))


def _strings(mapping: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (mapping or {}).items()}


def _vm_record(vm: Mapping[str, Any], vbd_refs: list[str], suspend_vdi: str) -> dict[str, Any]:
    """The XAPI VM record behind an XO VM object, as far as the XO object tells it."""
    memory = vm.get("memory", {})
    static = memory.get("static", [0, 0])
    dynamic = memory.get("dynamic", static)
    cpus = vm.get("CPUs", {})
    mode = vm.get("virtualizationMode", "hvm")
    boot = vm.get("boot", {})
    platform = {
        "cores-per-socket": vm.get("coresPerSocket"), "vga": vm.get("vga"), "videoram": vm.get("videoram"),
        "nic_type": vm.get("nicType"), "viridian": _flag(vm.get("viridian")),
        "secureboot": _flag(vm.get("secureBoot")), "nested-virt": _flag(vm.get("isNestedVirtEnabled")),
    }
    return {
        "uuid": vm["uuid"],
        "allowed_operations": [],
        "current_operations": {},
        "name_label": vm.get("name_label", ""),
        "name_description": vm.get("name_description", ""),
        "power_state": vm.get("power_state", "Halted"),
        "user_version": "1",
        "is_a_template": False,
        "is_default_template": False,
        "suspend_VDI": suspend_vdi,
        "resident_on": NULL_REF,
        "affinity": NULL_REF,
        "memory_overhead": "0",
        "memory_target": str(memory.get("size", dynamic[1])),
        "memory_static_max": str(static[1]),
        "memory_dynamic_max": str(dynamic[1]),
        "memory_dynamic_min": str(dynamic[0]),
        "memory_static_min": str(static[0]),
        "VCPUs_params": {"weight": str(vm["cpuWeight"])} if "cpuWeight" in vm else {},
        "VCPUs_max": str(cpus.get("max", 1)),
        "VCPUs_at_startup": str(cpus.get("number", 1)),
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "consoles": [],
        "VIFs": [],
        "VBDs": vbd_refs,
        "VUSBs": [],
        "crash_dumps": [],
        "VTPMs": [],
        "PV_bootloader": "pygrub" if mode == "pv" else "",
        "PV_kernel": "",
        "PV_ramdisk": "",
        "PV_args": "",
        "PV_bootloader_args": "",
        "PV_legacy_args": "",
        "HVM_boot_policy": "" if mode == "pv" else "BIOS order",
        "HVM_boot_params": _strings(boot),
        "HVM_shadow_multiplier": 1.0,
        "platform": {k: str(v) for k, v in platform.items() if v is not None},
        "PCI_bus": "",
        "other_config": _strings(vm.get("other")),
        "domid": "-1",
        "domarch": "",
        "last_boot_CPU_flags": {},
        "is_control_domain": False,
        "metrics": NULL_REF,
        "guest_metrics": NULL_REF,
        "last_booted_record": "",
        "recommendations": "",
        "xenstore_data": _strings(vm.get("xenStoreData")),
        "ha_always_run": False,
        "ha_restart_priority": vm.get("high_availability", ""),
        "is_a_snapshot": vm.get("type") == "VM-snapshot",
        "snapshot_of": NULL_REF,
        "snapshots": [],
        "snapshot_time": _DateTime.of(vm.get("snapshot_time")),
        "transportable_snapshot_id": "",
        "blobs": {},
        "tags": list(vm.get("tags", [])),
        "blocked_operations": _strings(vm.get("blockedOperations")),
        "snapshot_info": {},
        "snapshot_metadata": "",
        "parent": NULL_REF,
        "children": [],
        "bios_strings": _strings(vm.get("bios_strings")),
        "protection_policy": NULL_REF,
        "is_snapshot_from_vmpp": False,
        "snapshot_schedule": NULL_REF,
        "is_vmss_snapshot": False,
        "appliance": NULL_REF,
        "start_delay": str(vm.get("startDelay", 0)),
        "shutdown_delay": "0",
        "order": "0",
        "VGPUs": [],
        "attached_PCIs": [],
        "suspend_SR": NULL_REF,
        "version": "0",
        "generation_id": "",
        "hardware_platform_version": "0",
        "has_vendor_device": bool(vm.get("hasVendorDevice", False)),
        "requires_reboot": False,
        "reference_label": "",
        "domain_type": mode,
        "NVRAM": {},
    }


def _flag(value: Any) -> str | None:
    return None if value is None else str(bool(value)).lower()


def _vbd_record(vbd: Mapping[str, Any], vm_ref: str, vdi_ref: str) -> dict[str, Any]:
    cd = bool(vbd.get("is_cd_drive"))
    return {
        "uuid": vbd["uuid"],
        "allowed_operations": [],
        "current_operations": {},
        "VM": vm_ref,
        "VDI": vdi_ref,
        "device": vbd.get("device") or "",
        "userdevice": str(vbd.get("position", "0")),
        "bootable": bool(vbd.get("bootable")),
        "mode": "RO" if vbd.get("read_only") or cd else "RW",
        "type": "CD" if cd else "Disk",
        "unpluggable": False,
        "storage_lock": False,
        "empty": vdi_ref == NULL_REF,
        "other_config": {},
        "currently_attached": False,
        "status_code": "0",
        "status_detail": "",
        "runtime_properties": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        "qos_supported_algorithms": [],
        "metrics": NULL_REF,
    }


def _vdi_record(vdi: Mapping[str, Any], sr_ref: str, vbd_refs: list[str], size: int) -> dict[str, Any]:
    return {
        "uuid": vdi["uuid"],
        "name_label": vdi.get("name_label", ""),
        "name_description": vdi.get("name_description", ""),
        "allowed_operations": [],
        "current_operations": {},
        "SR": sr_ref,
        "VBDs": vbd_refs,
        "crash_dumps": [],
        "virtual_size": str(size),
        "physical_utilisation": str(vdi.get("usage", size)),
        "type": vdi.get("VDI_type", "user"),
        "sharable": False,
        "read_only": False,
        "other_config": _strings(vdi.get("other_config")),
        "storage_lock": False,
        "location": vdi["uuid"],
        "managed": True,
        "missing": bool(vdi.get("missing", False)),
        "parent": NULL_REF,
        "xenstore_data": {},
        "sm_config": {},
        "is_a_snapshot": vdi.get("type") == "VDI-snapshot",
        "snapshot_of": NULL_REF,
        "snapshots": [],
        "snapshot_time": _DateTime.of(vdi.get("snapshot_time")),
        "tags": list(vdi.get("tags", [])),
        "allow_caching": False,
        "on_boot": "persist",
        "metadata_of_pool": NULL_REF,
        "metadata_latest": False,
        "is_tools_iso": False,
        "cbt_enabled": bool(vdi.get("cbt_enabled", False)),
    }


def _sr_record(sr: Mapping[str, Any], vdi_refs: list[str]) -> dict[str, Any]:
    return {
        "uuid": sr["uuid"],
        "name_label": sr.get("name_label", ""),
        "name_description": sr.get("name_description", ""),
        "allowed_operations": [],
        "current_operations": {},
        "VDIs": vdi_refs,
        "PBDs": [],
        "virtual_allocation": str(sr.get("usage", 0)),
        "physical_utilisation": str(sr.get("physical_usage", 0)),
        "physical_size": str(sr.get("size", 0)),
        "type": sr.get("SR_type", ""),
        "content_type": sr.get("content_type", "user"),
        "shared": bool(sr.get("shared", False)),
        "other_config": _strings(sr.get("other_config")),
        "tags": list(sr.get("tags", [])),
        "sm_config": _strings(sr.get("sm_config")),
        "blobs": {},
        "local_cache_enabled": False,
        "introduced_by": NULL_REF,
        "clustered": False,
        "is_tools_sr": False,
    }


# -- the export plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DiskPlan:
    prefix: str  # the VDI's Ref:<n>, its directory in the tar
    content: DiskContent
    chunks: list[int]  # chunk indexes written: allocated ones, plus the first and the last


@dataclass(frozen=True)
class _Plan:
    ova_xml: bytes
    disks: list[_DiskPlan]  # in streaming order


def _chunks(content: DiskContent) -> list[int]:
    if content.size == 0:
        return []
    last = (content.size - 1) // CHUNK_SIZE
    return sorted({0, last, *content.allocated_blocks(CHUNK_SIZE)})


def _plan(vm: Mapping[str, Any], disks: Sequence[tuple[Mapping[str, Any], DiskContent]],
          vbds: Sequence[Mapping[str, Any]], srs: Sequence[Mapping[str, Any]], hostname: str,
          date: str) -> _Plan:
    counter = iter(range(1 << 30))
    refs: dict[str, str] = {}

    def ref(object_id: str) -> str:
        if object_id not in refs:
            refs[object_id] = f"Ref:{next(counter)}"
        return refs[object_id]

    vm_ref = ref(vm["id"])
    vdis_by_id = {vdi["id"]: (vdi, content) for vdi, content in disks}
    vbd_list = [vbd for vbd in vbds if vbd.get("VM") == vm["id"]]
    vbd_refs = [ref(vbd["id"]) for vbd in vbd_list]
    for vdi_id in vdis_by_id:
        ref(vdi_id)
    sr_list = [sr for sr in srs if any(vdi.get("$SR") == sr["id"] for vdi, _ in disks)]
    for sr in sr_list:
        ref(sr["id"])

    objects: list[dict[str, Any]] = []
    suspend_vdi = refs.get(vm.get("suspendVdi", ""), NULL_REF)
    objects.append({"class": "VM", "id": vm_ref, "snapshot": _vm_record(vm, vbd_refs, suspend_vdi)})
    for vbd in vbd_list:
        vdi_ref = refs.get(vbd.get("VDI", ""), NULL_REF)
        objects.append({"class": "VBD", "id": refs[vbd["id"]], "snapshot": _vbd_record(vbd, vm_ref, vdi_ref)})
    for vdi_id, (vdi, content) in vdis_by_id.items():
        sr_ref = refs.get(vdi.get("$SR", ""), NULL_REF)
        its_vbds = [refs[vbd["id"]] for vbd in vbd_list if vbd.get("VDI") == vdi_id]
        record = _vdi_record(vdi, sr_ref, its_vbds, content.size)
        objects.append({"class": "VDI", "id": refs[vdi_id], "snapshot": record})
    for sr in sr_list:
        its_vdis = [refs[vdi["id"]] for vdi, _ in disks if vdi.get("$SR") == sr["id"]]
        objects.append({"class": "SR", "id": refs[sr["id"]], "snapshot": _sr_record(sr, its_vdis)})

    version = {
        "hostname": hostname, "date": date, "product_version": "8.3.0", "product_brand": "XCP-ng",
        "build_number": "release/yangtze/master/58", "xapi_major": XAPI_API_VERSION[0],
        "xapi_minor": XAPI_API_VERSION[1], "export_vsn": EXPORT_VSN,
    }
    ova_xml = '<?xml version="1.0" ?>' + _xmlrpc({"version": version, "objects": objects})
    # XAPI streams the VDIs sorted on their tar prefix, as strings: Ref:10 comes before Ref:9.
    plans = sorted((_DiskPlan(refs[vdi["id"]], content, _chunks(content)) for vdi, content in disks),
                   key=lambda plan: plan.prefix)
    return _Plan(ova_xml.encode(), plans)


def _chunk_name(prefix: str, index: int) -> str:
    return f"{prefix}/{index:08d}"


def _checksum_file(data: bytes, checksum: Checksum) -> tuple[str, bytes]:
    if checksum == "sha1":
        return ".checksum", hashlib.sha1(data).hexdigest().encode()
    return ".xxhash", b"%016X" % xxhash.xxh64_intdigest(data)


_CHECKSUM_LENGTH = {"sha1": 40, "xxhash": 16}


# -- public API --------------------------------------------------------------------------------------------


def xva_stream(vm: Mapping[str, Any], disks: Sequence[tuple[Mapping[str, Any], DiskContent]], *,
               vbds: Sequence[Mapping[str, Any]], srs: Sequence[Mapping[str, Any]] = (),
               hostname: str = "xcp-01", date: str = "2024-06-01", checksum: Checksum = "sha1",
               ) -> Iterator[bytes]:
    """The XVA of `vm` (an XO VM or VM-snapshot object) with the content of `disks`, in chunks of >= 1 MiB.

    `disks` pairs XO VDI objects with their content; `vbds` are XO VBD objects (those of other VMs are
    ignored, and a VBD whose VDI is not exported is written as empty); `srs` are the XO SRs of the disks.
    `hostname` and `date` fill ova.xml's version record. Nothing is held beyond a chunk or two; the same
    arguments give the same bytes.
    """
    plan = _plan(vm, disks, vbds, srs, hostname, date)
    pending = bytearray(tar_header("ova.xml", len(plan.ova_xml)) + plan.ova_xml + _padding(len(plan.ova_xml)))
    written = 0
    for disk in plan.disks:
        for index in disk.chunks:
            if len(pending) >= _OUT_CHUNK:  # flushed before, not after, so the end never travels alone
                written += len(pending)
                yield bytes(pending)
                pending.clear()
            offset = index * CHUNK_SIZE
            data = disk.content.read(offset, min(CHUNK_SIZE, disk.content.size - offset))
            name = _chunk_name(disk.prefix, index)
            suffix, digest = _checksum_file(data, checksum)
            pending += tar_header(name, len(data))
            pending += data
            pending += _padding(len(data))
            pending += tar_header(name + suffix, len(digest))
            pending += digest
            pending += _padding(len(digest))
    pending += _end_of_archive(written + len(pending))
    yield bytes(pending)


def xva_length(vm: Mapping[str, Any], disks: Sequence[tuple[Mapping[str, Any], DiskContent]], *,
               vbds: Sequence[Mapping[str, Any]], srs: Sequence[Mapping[str, Any]] = (),
               hostname: str = "xcp-01", date: str = "2024-06-01", checksum: Checksum = "sha1") -> int:
    """The byte length of the matching `xva_stream(...)`, computed without reading any disk."""
    plan = _plan(vm, disks, vbds, srs, hostname, date)
    length = _member_length(len(plan.ova_xml))
    for disk in plan.disks:
        for index in disk.chunks:
            size = min(CHUNK_SIZE, disk.content.size - index * CHUNK_SIZE)
            length += _member_length(size) + _member_length(_CHECKSUM_LENGTH[checksum])
    return length + len(_end_of_archive(length))


def compress_stream(chunks: Iterable[bytes], method: Compression) -> Iterator[bytes]:
    """`chunks` compressed as one zstd frame or one gzip member (XAPI's `use_compression=zstd|true`).

    Levels are those of the `zstd` and `gzip` tools XAPI pipes through (3 and 6). Output comes in pieces of
    at least 1 MiB, except the last.
    """
    if method == "zstd":
        compressor: Any = zstandard.ZstdCompressor(level=3).compressobj()
    elif method == "gzip":
        compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    else:
        raise ValueError(f"unknown compression {method!r}")
    pending = bytearray()
    for chunk in chunks:
        pending += compressor.compress(chunk)
        if len(pending) >= _OUT_CHUNK:
            yield bytes(pending)
            pending.clear()
    pending += compressor.flush()
    yield bytes(pending)
