"""The simulator's starting inventory: a pool of XO objects in the exact shapes a real xo-server 5.207.2 sends.

`build_inventory(seed, vms)` is a pure function: the same seed and VM count give the same objects, the same
UUIDs and the same disk parameters. Every id is a UUIDv5 of a stable key (such as `VM:web-01`) in a namespace
made from the seed, so VM number i keeps its ids whatever the VM count, and another seed changes every id.

Key sets, key order and value types follow the objects recorded from a real XO
(`reference/real-xo/rest/*.fields-star.body`), produced by `xapi-object-to-xo.mjs`: keys whose value would be
`undefined` are simply absent, so a Halted VM has no `xenTools` and no `mainIpAddress`.

Besides the objects, the builder returns hidden facts that XO does not show but the simulator needs later:
what a VM's guest reports when it runs, which VDI is a suspended VM's memory image, and how each VDI's
content is generated (`Inventory.guests`, `.suspend_vdis`, `.disks`).
"""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

GiB = 1 << 30
MiB = 1 << 20

# Base time of the inventory (seconds): fixed, so that a seed always gives the same objects.
BASE_TIME = 1_795_000_000

VM_ROLES = [
    ("web", "public web frontend"), ("db", "postgres"), ("app", ""), ("test", ""),
    ("mail", "postfix + dovecot"), ("proxy", "haproxy"), ("dns", "unbound resolver"),
    ("ci-runner", "gitlab runner"), ("monitor", "prometheus + grafana"), ("backup", "borg repository"),
    ("git", "forgejo"), ("ldap", "openldap"), ("cache", "redis"), ("k8s-node", "kubernetes worker"),
    ("vpn", "wireguard"), ("files", "samba"), ("log", "loki"), ("build", "build host"),
]
# (name_label, os_version) of the guests the VMs run.
GUEST_OSES = [
    ("Debian Bookworm 12", {"name": "Debian GNU/Linux 12 (bookworm)", "uname": "6.1.0-31-amd64",
                            "distro": "debian", "major": "12", "minor": "9"}),
    ("Ubuntu Noble Numbat 24.04", {"name": "Ubuntu 24.04.1 LTS", "uname": "6.8.0-45-generic",
                                   "distro": "ubuntu", "major": "24", "minor": "04"}),
    ("Rocky Linux 9", {"name": "Rocky Linux 9.4 (Blue Onyx)", "uname": "5.14.0-427.13.1.el9_4.x86_64",
                       "distro": "rocky", "major": "9", "minor": "4"}),
]
HVM_BIOS_STRINGS = {
    "bios-vendor": "Xen", "bios-version": "", "system-manufacturer": "Xen", "system-product-name": "HVM domU",
    "system-version": "", "system-serial-number": "", "baseboard-manufacturer": "", "hp-rombios": "",
    "oem-1": "Xen", "oem-2": "MS_VM_CERT/SHA1/bdbeb6e0a816d43fa6d3fe8aaef04c2bad9d3e3d",
}
XEN_STORE_DATA = {"vm-data": "", "vm-data/mmio-hole-size": "268435456"}
ISO_IMAGES = [("debian-12.9.0-amd64-netinst.iso", 659554304), ("ubuntu-24.04.1-live-server-amd64.iso", 2773874688)]
# The VM-ish types whose objects keep the key order of a real XO VM (see `VM_KEY_ORDER`).
VM_TYPES = ("VM", "VM-snapshot", "VM-template", "VM-controller")

# The order in which `xapi-object-to-xo.mjs` writes a VM's keys; `order_vm_keys` restores it after a
# power-state change adds keys back.
VM_KEY_ORDER = [
    "type", "addresses", "auto_poweron", "bios_strings", "blockedOperations", "boot", "CPUs",
    "current_operations", "expNestedHvm", "isNestedVirtEnabled", "vulnerabilities", "viridian", "mainIpAddress",
    "high_availability", "isFirmwareSupported", "memory", "installTime", "name_description", "name_label",
    "needsVtpm", "other", "os_version", "power_state", "hasVendorDevice", "snapshots", "startDelay",
    "startTime", "secureBoot", "suspendSr", "tags", "VIFs", "VTPMs", "virtualizationMode", "xenTools",
    "managementAgentDetected", "pvDriversDetected", "pvDriversVersion", "pvDriversUpToDate", "$container",
    "$VBDs", "VGPUs", "$VGPUs", "nicType", "xenStoreData", "vga", "videoram", "coresPerSocket",
    "snapshot_time", "$snapshot_of", "suspendVdi", "isDefaultTemplate", "template_info", "cpuWeight",
    "PV_args", "id", "uuid", "$pool", "$poolId", "_xapiRef",
]
# A default template gets its pool-scoped id where XO computes it, just before `isDefaultTemplate`; every
# other VM-ish object gets `id` with the common keys at the end (`rest/vm-templates.single.Other.body`).
DEFAULT_TEMPLATE_KEY_ORDER = [k for k in VM_KEY_ORDER if k != "id"]
DEFAULT_TEMPLATE_KEY_ORDER.insert(DEFAULT_TEMPLATE_KEY_ORDER.index("isDefaultTemplate"), "id")


def order_vm_keys(vm: dict[str, Any]) -> dict[str, Any]:
    """The same VM with its keys in XO's order (unknown keys last)."""
    order = DEFAULT_TEMPLATE_KEY_ORDER if vm.get("isDefaultTemplate") else VM_KEY_ORDER
    ordered = {k: vm[k] for k in order if k in vm}
    if len(ordered) != len(vm):
        ordered.update(vm)
    return ordered


@dataclass(frozen=True)
class DiskSpec:
    """How a VDI's content is made: generated from (seed, key) with `fill` of its blocks allocated."""

    key: str
    size: int
    fill: float


@dataclass
class Guest:
    """What a VM's guest tools report while it runs (XO shows it only for Running and Paused VMs)."""

    ip: str
    os_version: dict[str, str]
    memory_usage: int | None  # None: the guest does not report memory in use (common with recent tools)


@dataclass
class Inventory:
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    guests: dict[str, Guest] = field(default_factory=dict)  # VM id -> guest facts
    suspend_vdis: dict[str, str] = field(default_factory=dict)  # suspended VM id -> its memory image VDI
    disks: dict[str, DiskSpec] = field(default_factory=dict)  # VDI id -> content
    user: dict[str, Any] = field(default_factory=dict)  # the admin user (public properties)


class Ids:
    """Deterministic UUIDs (version 5, as `uuid.uuid5` makes them) and OpaqueRefs for a seed."""

    def __init__(self, seed: int) -> None:
        self.namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"https://xofs.invalid/sim/{seed}").bytes

    def uuid(self, key: str) -> str:
        # `uuid.uuid5` without its UUID objects: a big inventory makes over 100 000 of these
        digest = bytearray(hashlib.sha1(self.namespace + key.encode()).digest()[:16])
        digest[6] = (digest[6] & 0x0F) | 0x50
        digest[8] = (digest[8] & 0x3F) | 0x80
        x = digest.hex()
        return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"

    def ref(self, key: str) -> str:
        return "OpaqueRef:" + self.uuid("ref:" + key)


def vm_name(i: int) -> tuple[str, str]:
    """(name_label, name_description) of the i-th VM: web-01, db-01, app-01, test-01, mail-01, …, web-02, …"""
    role, description = VM_ROLES[i % len(VM_ROLES)]
    return f"{role}-{i // len(VM_ROLES) + 1:02d}", description


def host_count(vms: int) -> int:
    return max(2, min(16, vms // 25))


def build_inventory(seed: int, vms: int) -> dict[str, dict[str, Any]]:
    """The inventory's objects keyed by id (see `build` for the hidden facts too)."""
    return build(seed, vms).objects


def build(seed: int, vms: int) -> Inventory:
    return _Builder(seed, vms).build()


class _Builder:
    def __init__(self, seed: int, vms: int) -> None:
        self.seed = seed
        self.n_vms = vms
        self.ids = Ids(seed)
        self.inv = Inventory()
        # Objects are collected per type, then emitted in the order a real XO lists them.
        self.by_type: dict[str, list[dict[str, Any]]] = {}
        self.pool_id = self.ids.uuid("pool")

    # -- helpers -------------------------------------------------------------------------------------------

    def common(self, key: str) -> dict[str, Any]:
        """The keys every XAPI-backed object ends with."""
        oid = self.ids.uuid(key)
        return {"id": oid, "uuid": oid, "$pool": self.pool_id, "$poolId": self.pool_id,
                "_xapiRef": self.ids.ref(key)}

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind = "VDI*" if obj["type"].startswith("VDI") else obj["type"]
        self.by_type.setdefault(kind, []).append(obj)
        return obj

    def rng(self, key: str) -> random.Random:
        return random.Random(f"{self.seed}:{key}")

    # -- the build -----------------------------------------------------------------------------------------

    def build(self) -> Inventory:
        self.hosts = [self.ids.uuid(f"host:{h}") for h in range(host_count(self.n_vms))]
        self.network_id = self.ids.uuid("network:0")
        self.nfs_id = self.ids.uuid("SR:nfs")
        self.iso_id = self.ids.uuid("SR:iso")
        self.local_srs = [self.ids.uuid(f"SR:local:{h}") for h in range(len(self.hosts))]
        self.sr_vdis: dict[str, list[str]] = {sr: [] for sr in [self.nfs_id, *self.local_srs, self.iso_id]}
        self.sr_pbds: dict[str, list[str]] = {sr: [] for sr in self.sr_vdis}
        self.host_pbds: dict[str, list[str]] = {h: [] for h in self.hosts}
        self.resident: dict[str, list[str]] = {h: [] for h in self.hosts}
        self.vifs: list[str] = []
        self.vdi_objs: dict[str, dict[str, Any]] = {}
        self.dom0_refs = [self.ids.ref(f"dom0:{h}") for h in range(len(self.hosts))]

        for h in range(len(self.hosts)):
            self.resident[self.hosts[h]].append(self.ids.uuid(f"dom0:{h}"))
            self.add_dom0(h)
        self.add_pbds()
        self.iso_vdis = [self.add_vdi(f"iso:{n}", name, "", size, self.iso_id, fill=1.0, thick=True)
                         for n, (name, size) in enumerate(ISO_IMAGES)]
        for i in range(self.n_vms):
            self.add_vm(i)
        spare = self.add_vdi("spare", "spare disk", "unattached", 2 * GiB, self.nfs_id, fill=0.01)
        spare["$VBDs"] = []
        self.add_templates()
        self.add_srs()
        for h in range(len(self.hosts)):
            self.add_host(h)
        self.add_pool()
        self.add_sms()
        self.add_network()

        # The order of a real XO's listing (XAPI's record order): VDIs and their snapshots interleaved as
        # created, ISO images last.
        isos = {v["id"] for v in self.iso_vdis}
        disks = self.by_type.pop("VDI*", [])
        self.by_type["VDI*"] = [v for v in disks if v["id"] not in isos] + [v for v in disks if v["id"] in isos]
        order = ["host", "SR", "PBD", "VDI*", "VBD", "pool", "SM", "VIF", "PIF", "network", "VM-controller",
                 "VM", "VM-snapshot", "VM-template"]
        for type_ in order:
            for obj in self.by_type.get(type_, []):
                self.inv.objects[obj["id"]] = obj
        self.inv.user = {"id": self.ids.uuid("user:admin"), "email": "admin@admin.net", "groups": [],
                         "permission": "admin", "preferences": {}}
        return self.inv

    # -- infrastructure ------------------------------------------------------------------------------------

    def add_pool(self) -> None:
        self.put({
            "auto_poweron": False, "crashDumpSr": self.nfs_id, "current_operations": {},
            "default_SR": self.nfs_id, "HA_enabled": False, "haRebootVmOnInternalShutdown": True, "haSrs": [],
            "master": self.hosts[0], "tags": [], "name_description": "", "name_label": "lab-pool",
            "migrationCompression": False,
            "otherConfig": {"memory-ratio-hvm": "0.25", "memory-ratio-pv": "0.25", "auto_poweron": "false",
                            **self.xo_client_info()},
            "cpus": {"cores": 16 * len(self.hosts), "sockets": len(self.hosts)}, "suspendSr": self.nfs_id,
            "zstdSupported": True, "vtpmSupported": True, "platform_version": "3.4.0",
            "id": self.pool_id, "type": "pool", "uuid": self.pool_id, "$pool": self.pool_id,
            "$poolId": self.pool_id, "_xapiRef": self.ids.ref("pool"),
        })

    def xo_client_info(self) -> dict[str, str]:
        """The mark xo-server leaves on every pool it connects to (`markPool` in `xo-mixins/xen-servers.mjs`):
        `xo:clientInfo:<its appliance id>` → JSON of when it last connected and its network interfaces."""
        rng = self.rng("xo-appliance")
        appliance_id = "".join(rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(11))
        mac = "02:fc:00:00:00:0a"
        interfaces = {"eth0": [
            {"address": "192.168.10.10", "netmask": "255.255.255.0", "family": "IPv4", "mac": mac,
             "internal": False, "cidr": "192.168.10.10/24"},
            {"address": "fe80::fc:ff:fe00:a", "netmask": "ffff:ffff:ffff:ffff::", "family": "IPv6", "mac": mac,
             "internal": False, "cidr": "fe80::fc:ff:fe00:a/64", "scopeid": 2},
        ]}
        info = {"lastConnected": BASE_TIME * 1000 - rng.randrange(3_600_000), "networkInterfaces": interfaces}
        return {f"xo:clientInfo:{appliance_id}": json.dumps(info, separators=(",", ":"))}

    def add_host(self, h: int) -> None:
        name = f"xcp-{h + 1:02d}"
        host_id = self.hosts[h]
        pif = self.ids.uuid(f"PIF:{h}")
        c = self.common(f"host:{h}")
        self.put({
            "CPUs": {
                "cpu_count": "16", "socket_count": "1", "vendor": "GenuineIntel", "speed": "1995.380",
                "modelname": "Intel(R) Xeon(R) CPU D-1548 @ 2.00GHz", "family": "6", "model": "86",
                "stepping": "3",
                "flags": "fpu de tsc msr pae mce cx8 apic sep mca cmov pat clflush acpi mmx fxsr sse sse2 ht "
                         "syscall nx lm",
                "features_pv": "1fc9cbf5-f6f83203-2991cbf5-00000123",
                "features_hvm": "1fcbfbff-f7fa3223-2d93fbff-00000123",
                "features_pv_host": "1fc9cbf5-f6f83203-2991cbf5-00000123",
                "features_hvm_host": "1fcbfbff-f7fa3223-2d93fbff-00000123",
            },
            "address": f"192.168.10.{21 + h}",
            "bios_strings": {"bios-vendor": "American Megatrends Inc.", "system-manufacturer": "Supermicro",
                             "system-product-name": "X10SDV-TLN4F"},
            "build": "release/8.3.0", "chipset_info": {"iommu": True}, "enabled": True,
            "controlDomain": self.ids.uuid(f"dom0:{h}"), "cpus": {"cores": 16, "sockets": 1},
            "current_operations": {}, "hostname": name, "iscsiIqn": f"iqn.2026-01.lan.example:{name}",
            "zstdSupported": True,
            "license_params": {"restrict_zstd_export": "false", "restrict_vtpm": "false", "sku_type": "free",
                               "expiry": "20380119T03:14:07Z", "sockets": "1", "license_type": "", "grace": "no"},
            "license_server": {"address": "localhost", "port": "27000"}, "license_expiry": 2147483647,
            "logging": {}, "name_description": f"rack A, slot {h + 1}", "name_label": name,
            "memory": {"usage": 24696061952, "size": 67645734912}, "multipathing": False,
            "otherConfig": {"agent_start_time": f"{BASE_TIME - 86340}.", "boot_time": f"{BASE_TIME - 86400}.",
                            "iscsi_iqn": f"iqn.2026-01.lan.example:{name}", "multipathing": "false",
                            "multipathhandle": "dmp", "rpm_patch_installation_time": f"{BASE_TIME - 87400}."},
            "patches": [], "powerOnMode": "", "power_state": "Running", "residentVms": self.resident[host_id],
            "startTime": BASE_TIME - 86400, "supplementalPacks": [], "agentStartTime": BASE_TIME - 86340,
            "rebootRequired": False, "tags": [], "version": "8.3.0", "productBrand": "XCP-ng",
            "hvmCapable": True, "certificates": [], "PIFs": [pif], "$PIFs": [pif], "PCIs": [], "$PCIs": [],
            "PGPUs": [], "$PGPUs": [], "$PBDs": self.host_pbds[host_id],
            "id": c["id"], "type": "host", "uuid": c["uuid"], "$pool": c["$pool"], "$poolId": c["$poolId"],
            "_xapiRef": c["_xapiRef"],
        })
        pc = self.common(f"PIF:{h}")
        self.put({
            "type": "PIF", "attached": True, "isBondMaster": False, "isBondSlave": False, "device": "eth0",
            "deviceName": "Ethernet Connection X552/X557-AT 10GBASE-T", "dns": "192.168.10.1",
            "disallowUnplug": False, "gateway": "192.168.10.1", "ip": f"192.168.10.{21 + h}", "ipv6": [],
            "mac": f"0c:c4:7a:00:00:{h + 1:02x}", "management": True, "carrier": True, "mode": "Static",
            "ipv6Mode": "None", "mtu": 1500, "netmask": "255.255.255.0", "physical": True,
            "primaryAddressType": "IPv4", "vlan": -1, "speed": 1000, "$host": host_id,
            "$network": self.network_id, **pc,
        })

    def add_network(self) -> None:
        c = self.common("network:0")
        self.put({
            "automatic": True, "bridge": "xenbr0", "current_operations": {}, "defaultIsLocked": False,
            "MTU": 1500, "name_description": "", "name_label": "Pool-wide network associated with eth0",
            "other_config": {"automatic": "true"}, "tags": [],
            "PIFs": [self.ids.uuid(f"PIF:{h}") for h in range(len(self.hosts))], "VIFs": self.vifs,
            "nbd": False, "insecureNbd": False, "isBonded": False,
            "id": c["id"], "type": "network", "uuid": c["uuid"], "$pool": c["$pool"], "$poolId": c["$poolId"],
            "_xapiRef": c["_xapiRef"],
        })

    def add_sms(self) -> None:
        for key, name, description, sm_type, driver, formats in [
            ("nfs", "NFS VHD", "NFS VHD SR driver", "nfs", "nfsSR", ["vhd", "raw", "qcow2"]),
            ("lvm", "Local LVHD", "Local LVHD SR driver", "lvm", "lvmSR", ["vhd", "raw", "qcow2"]),
            ("iso", "ISO", "ISO SR driver", "iso", "isoSR", []),
        ]:
            c = self.common(f"SM:{key}")
            self.put({
                "type": "SM", "uuid": c["uuid"], "name_description": description, "name_label": name,
                "SM_type": sm_type, "configuration": {}, "vendor": "Citrix Systems Inc",
                "features": {"SR_PROBE": 1, "VDI_CREATE": 1}, "driver_filename": f"/opt/xensource/sm/{driver}",
                "required_cluster_stack": [], "supported_image_formats": formats,
                "id": c["id"], "$pool": c["$pool"], "$poolId": c["$poolId"], "_xapiRef": c["_xapiRef"],
            })

    def add_pbds(self) -> None:
        for h, host_id in enumerate(self.hosts):
            for sr_key, sr_id, config in [
                ("nfs", self.nfs_id, {"server": "192.168.10.5", "serverpath": "/export/vms", "nfsversion": "4.1"}),
                ("local", self.local_srs[h], {"device": "/dev/disk/by-id/scsi-3600-part3"}),
                ("iso", self.iso_id, {"location": "192.168.10.5:/export/iso", "type": "nfs_iso"}),
            ]:
                c = self.common(f"PBD:{sr_key}:{h}")
                self.put({
                    "type": "PBD", "attached": True, "host": host_id, "SR": sr_id, "device_config": config,
                    "otherConfig": {"storage_driver_domain": self.dom0_refs[h]}, **c,
                })
                self.sr_pbds[sr_id].append(c["id"])
                self.host_pbds[host_id].append(c["id"])

    def add_srs(self) -> None:
        srs = [("SR:nfs", self.nfs_id, "nfs-vms", "NFS on filer-02", "user", "nfs", True, "thin",
                2 * 1024 * GiB, {}, {})]
        for h, sr_id in enumerate(self.local_srs):
            srs.append((f"SR:local:{h}", sr_id, "Local storage", f"on xcp-{h + 1:02d}", "user", "lvm", False,
                        "thick", 500 * GiB, {},
                        {"allocation": "thick", "use_vhd": "true", "devserial": "scsi-3600"}))
        srs.append(("SR:iso", self.iso_id, "ISO library", "NFS ISO share", "iso", "iso", True, None, 100 * GiB,
                    {"auto-scan": "true"}, {}))
        for key, sr_id, name, description, content, sr_type, shared, strategy, size, other, sm in srs:
            vdis = [self.vdi_objs[v] for v in self.sr_vdis[sr_id]]
            obj: dict[str, Any] = {
                "type": "SR", "content_type": content,
                "physical_usage": sum(v["usage"] for v in vdis),
            }
            if strategy is not None:
                obj["allocationStrategy"] = strategy
            host = self.hosts[self.local_srs.index(sr_id)] if not shared else self.pool_id
            obj.update({
                "current_operations": {}, "inMaintenanceMode": False, "name_description": description,
                "name_label": name, "size": size, "shared": shared, "SR_type": sr_type, "tags": [],
                "usage": sum(v["size"] for v in vdis), "VDIs": self.sr_vdis[sr_id], "other_config": other,
                "sm_config": sm, "$container": host, "$PBDs": self.sr_pbds[sr_id], **self.common(key),
            })
            self.put(obj)

    # -- VMs -----------------------------------------------------------------------------------------------

    def vm_base(self, key: str, type_: str, *, name: str, description: str, cpus: int, memory: int,
                other: dict[str, str], tags: list[str]) -> dict[str, Any]:
        """A halted HVM VM-ish object; callers adjust it for its state and type."""
        return {
            "type": type_, "addresses": {}, "auto_poweron": False, "bios_strings": dict(HVM_BIOS_STRINGS),
            "blockedOperations": {}, "boot": {"order": "cd", "firmware": "uefi"},
            "CPUs": {"max": cpus * 2, "number": cpus}, "current_operations": {}, "expNestedHvm": False,
            "isNestedVirtEnabled": False, "vulnerabilities": {"xsa468": False}, "viridian": False,
            "high_availability": "", "isFirmwareSupported": True,
            "memory": {"dynamic": [memory, memory], "static": [memory // 2, memory], "size": memory},
            "installTime": BASE_TIME - 30 * 86400, "name_description": description, "name_label": name,
            "needsVtpm": False, "other": other, "os_version": None, "power_state": "Halted",
            "hasVendorDevice": False, "snapshots": [], "startDelay": 0, "startTime": None, "secureBoot": False,
            "tags": tags, "VIFs": [], "VTPMs": [], "virtualizationMode": "hvm", "$container": self.pool_id,
            "$VBDs": [], "VGPUs": [], "$VGPUs": [], "nicType": "e1000", "xenStoreData": dict(XEN_STORE_DATA),
            "vga": "std", "videoram": 8, "coresPerSocket": cpus, "cpuWeight": 256,
            **self.common(key),
        }

    def add_dom0(self, h: int) -> None:
        memory = 4 * GiB
        self.put({
            "type": "VM-controller", "addresses": {}, "auto_poweron": False, "bios_strings": {},
            "blockedOperations": {}, "boot": {}, "CPUs": {"max": 8, "number": 8}, "current_operations": {},
            "expNestedHvm": False, "isNestedVirtEnabled": False, "viridian": False, "high_availability": "",
            "isFirmwareSupported": True,
            "memory": {"dynamic": [memory, memory], "static": [memory // 2, memory], "size": memory},
            "installTime": BASE_TIME - 30 * 86400, "name_description": "",
            "name_label": f"Control domain on host: xcp-{h + 1:02d}", "needsVtpm": False,
            "other": {"storage_driver_domain": self.dom0_refs[h], "is_system_domain": "true", "perfmon": ""},
            "os_version": None, "power_state": "Running", "hasVendorDevice": False, "snapshots": [],
            "startDelay": 0, "startTime": BASE_TIME - 86400, "secureBoot": False, "tags": [], "VIFs": [],
            "VTPMs": [], "virtualizationMode": "pv", "xenTools": False, "$container": self.hosts[h],
            "$VBDs": [], "VGPUs": [], "$VGPUs": [], "xenStoreData": {}, "coresPerSocket": 8, "PV_args": "",
            **self.common(f"dom0:{h}"),
        })

    def power_state(self, i: int, rng: random.Random) -> str:
        # The first four VMs mirror the recorded pool: web-01 Running, db-01 Halted, app-01 Suspended,
        # test-01 Paused; the rest are mostly running.
        if i < 4:
            return ["Running", "Halted", "Suspended", "Paused"][i]
        roll = rng.random()
        return "Running" if roll < 0.65 else "Halted" if roll < 0.9 else "Paused" if roll < 0.95 else "Suspended"

    def add_vm(self, i: int) -> None:
        name, description = vm_name(i)
        key = f"VM:{name}"
        rng = self.rng(key)
        state = self.power_state(i, rng)
        cpus = [2, 4, 2, 1][i] if i < 4 else rng.choice([1, 2, 2, 4, 8])
        memory = [2, 4, 2, 1][i] * GiB if i < 4 else rng.choice([1, 2, 4, 8]) * GiB
        template_name, os_version = GUEST_OSES[0] if i < 4 else rng.choice(GUEST_OSES)
        other = {"base_template_name": template_name, "mac_seed": self.ids.uuid(f"mac_seed:{key}"),
                 "import_task": "OpaqueRef:NULL", "install-methods": "cdrom,nfs,http,ftp",
                 "linux_template": "true"}
        tags = ["env=prod", "web"] if i == 0 else [] if i < 4 else rng.choice(
            [[], [], ["env=prod"], ["env=staging"], ["env=prod", name.split("-")[0]]])
        vm = self.vm_base(key, "VM", name=name, description=description, cpus=cpus, memory=memory,
                          other=other, tags=tags)
        vm_id = vm["id"]
        host = self.hosts[i % len(self.hosts)]
        ip = f"10.0.{12 + i // 200}.{34 + i % 200}"
        self.inv.guests[vm_id] = Guest(
            ip=ip, os_version=dict(os_version),
            memory_usage=None if i < 4 or i % 3 else int(memory * rng.uniform(0.2, 0.8)))

        # Disks: root (+ data), on the shared SR, or on the host's local SR for some halted VMs.
        sizes = [[10, 20], [8], [4], [1]][i] if i < 4 else (
            [rng.randint(1, 100)] + ([rng.randint(1, 100)] if rng.random() < 0.4 else []))
        local = i == 1 or (i >= 4 and state == "Halted" and rng.random() < 0.3)
        if local:  # db-01's disk is on xcp-01's local storage, as recorded; the others' on their host's
            host = self.hosts[0 if i == 1 else i % len(self.hosts)]
        sr = self.local_srs[self.hosts.index(host)] if local else self.nfs_id
        attached = state in ("Running", "Paused")
        disks = []
        for n, gib in enumerate(sizes):
            role = "root" if n == 0 else "data"
            vdi = self.add_vdi(f"{key}:disk{n}", f"{name} {role}", f"{role} disk" if i == 0 else "", gib * GiB,
                               sr, fill=rng.uniform(0.05, 0.6), thick=local)
            vbd = self.add_vbd(f"{key}:vbd{n}", vm_id, vdi, device=f"xvd{'ab'[n]}", position=str(n),
                               bootable=n == 0, attached=attached)
            disks.append((vdi, vbd))
            vm["$VBDs"].append(vbd["id"])
        # CD drive: empty on web-01, holding an ISO on db-01, random elsewhere.
        cd = [True, True, False, False][i] if i < 4 else rng.random() < 0.5
        if cd:
            iso = self.iso_vdis[0] if i == 1 or (i >= 4 and rng.random() < 0.3) else None
            vbd = self.add_vbd(f"{key}:cd", vm_id, iso, device="xvdd", position="3", bootable=False,
                               attached=attached, cd=True)
            vm["$VBDs"].append(vbd["id"])
        vm["VIFs"].append(self.add_vif(f"{key}:vif0", vm_id, attached=attached))

        if state in ("Running", "Paused"):
            self.set_running(vm, host, state, rng)
        elif local:
            vm["$container"] = host
        if state == "Suspended":  # XAPI cleared resident_on: the container is the pool
            vm["power_state"] = "Suspended"
            vm["suspendSr"] = self.nfs_id
            image = self.add_vdi(f"{key}:suspend", "Suspend image", "Suspend image", memory + 4 * MiB,
                                 self.nfs_id, fill=1.0, vdi_type="suspend")
            image["usage"] = image["chainPhysicalUsage"] = image["size"]
            self.inv.suspend_vdis[vm_id] = image["id"]
        vm = self.put(order_vm_keys(vm))
        if i == 0 or (i >= 4 and rng.random() < 0.2):
            label = f"{name} before upgrade" if i == 0 else f"{name} {rng.choice(['pre-patch', 'nightly'])}"
            # web-01's snapshot predates its data disk: it holds the root disk only, as recorded
            self.add_snapshot(vm, disks[:1] if i == 0 else disks, cd, label, BASE_TIME - rng.randint(1, 20) * 86400)

    def set_running(self, vm: dict[str, Any], host: str, state: str, rng: random.Random) -> None:
        guest = self.inv.guests[vm["id"]]
        vm.update(running_fields(guest, state, BASE_TIME - rng.randint(1, 48) * 3600, host))
        if guest.memory_usage is not None:
            vm["memory"] = {**vm["memory"], "usage": guest.memory_usage}
        self.resident[host].append(vm["id"])

    def add_snapshot(self, vm: dict[str, Any], disks: list[tuple[dict[str, Any], dict[str, Any]]], cd: bool,
                     label: str, when: int) -> None:
        key = f"snapshot:{vm['name_label']}"
        other = {**vm["other"], "mac_seed": self.ids.uuid(f"mac_seed:{key}")}
        snap = self.vm_base(key, "VM-snapshot", name=label, description=vm["name_description"],
                            cpus=vm["CPUs"]["number"], memory=vm["memory"]["dynamic"][1], other=other,
                            tags=list(vm["tags"]))
        del snap["vulnerabilities"]
        snap["snapshot_time"] = when
        snap["$snapshot_of"] = vm["id"]
        snap = order_vm_keys(snap)
        for n, (vdi, _) in enumerate(disks):
            copy = self.add_vdi(f"{key}:disk{n}", vdi["name_label"], vdi["name_description"], vdi["size"],
                                vdi["$SR"], fill=0.5 * self.inv.disks[vdi["id"]].fill, snapshot_of=vdi,
                                when=when)
            vbd = self.add_vbd(f"{key}:vbd{n}", snap["id"], copy, device=f"xvd{'ab'[n]}", position=str(n),
                               bootable=n == 0, attached=False)
            snap["$VBDs"].append(vbd["id"])
        if cd:
            vbd = self.add_vbd(f"{key}:cd", snap["id"], None, device="xvdd", position="3", bootable=False,
                               attached=False, cd=True)
            snap["$VBDs"].append(vbd["id"])
        mac = next((vif["MAC"] for vif in self.by_type.get("VIF", ()) if vif["id"] in vm["VIFs"]), None)
        snap["VIFs"].append(self.add_vif(f"{key}:vif0", snap["id"], attached=False, mac=mac))
        vm["snapshots"].append(snap["id"])
        self.put(snap)

    def add_templates(self) -> None:
        custom = self.vm_base(
            "template:debian-custom", "VM-template", name="Debian 12 cloud-init (custom)",
            description="custom template", cpus=2, memory=2 * GiB,
            other={"install-methods": "cdrom,nfs,http,ftp", "linux_template": "true", "install-arch": "amd64",
                   "base_template_name": "Debian Bookworm 12",
                   "mac_seed": self.ids.uuid("mac_seed:template:debian-custom")}, tags=[])
        del custom["vulnerabilities"]
        custom["isDefaultTemplate"] = False
        custom["template_info"] = {"arch": "amd64", "disks": [], "install_methods": ["cdrom", "nfs", "http", "ftp"]}
        self.put(order_vm_keys(custom))
        for key, name, description, methods, disk_size in [
            ("other-media", "Other install media", "Template which allows VM installation from install media",
             "cdrom", 32 * GiB),
            ("debian-12", "Debian Bookworm 12", "Template which allows VM installation from install media",
             "cdrom,nfs,http,ftp", 10 * GiB),
        ]:
            disks_xml = (f'<provision><disk device="0" size="{disk_size}" sr="" bootable="true" type="system"/>'
                         "</provision>")
            tpl = self.vm_base(f"template:{key}", "VM-template", name=name, description=description, cpus=2,
                               memory=2 * GiB, tags=[],
                               other={"install-methods": methods, "default_template": "true", "disks": disks_xml})
            del tpl["vulnerabilities"]
            tpl["isDefaultTemplate"] = True
            tpl["template_info"] = {
                "disks": [{"device": "0", "size": disk_size, "bootable": True, "type": "system", "SR": ""}],
                "install_methods": methods.split(","),
            }
            # Default templates have the same UUID in every pool, so XO scopes their id by pool.
            tpl["id"] = f"{self.pool_id}-{tpl['uuid']}"
            self.put(order_vm_keys(tpl))

    # -- disks ---------------------------------------------------------------------------------------------

    def add_vdi(self, key: str, name: str, description: str, size: int, sr: str, *, fill: float,
                thick: bool = False, vdi_type: str = "user", snapshot_of: dict[str, Any] | None = None,
                when: int | None = None) -> dict[str, Any]:
        fill = round(fill, 4)
        if sr == self.iso_id:
            usage = size
        elif thick:  # LVM allocates the whole disk plus the VHD metadata
            usage = size + 16 * MiB
        else:  # thin: the allocated 2 MiB blocks
            usage = -(-int(size * fill) // (2 * MiB)) * 2 * MiB
        c = self.common(key)
        obj: dict[str, Any] = {
            "type": "VDI" if snapshot_of is None else "VDI-snapshot", "cbt_enabled": False, "missing": False,
            "name_description": description, "name_label": name, "size": size, "snapshots": [], "tags": [],
            "usage": usage, "VDI_type": vdi_type, "current_operations": {}, "other_config": {}, "$SR": sr,
            "$VBDs": [],
        }
        if snapshot_of is None:
            obj["chainPhysicalUsage"] = usage
        else:
            obj["snapshot_time"] = when
            obj["$snapshot_of"] = snapshot_of["id"]
            snapshot_of["snapshots"].append(c["id"])
        obj.update(c)
        self.put(obj)
        self.vdi_objs[c["id"]] = obj
        self.sr_vdis[sr].append(c["id"])
        self.inv.disks[c["id"]] = DiskSpec(key=c["id"], size=size, fill=fill)
        return obj

    def add_vbd(self, key: str, vm_id: str, vdi: dict[str, Any] | None, *, device: str, position: str,
                bootable: bool, attached: bool, cd: bool = False) -> dict[str, Any]:
        c = self.common(key)
        obj: dict[str, Any] = {"type": "VBD", "attached": attached, "bootable": bootable, "device": device,
                               "is_cd_drive": cd, "position": position, "read_only": cd}
        if vdi is not None:  # an empty CD drive has no VDI key at all
            obj["VDI"] = vdi["id"]
            vdi["$VBDs"].append(c["id"])
        obj["VM"] = vm_id
        obj.update(c)
        return self.put(obj)

    def add_vif(self, key: str, vm_id: str, *, attached: bool, mac: str | None = None) -> str:
        """A VIF of `vm_id` on the network; a snapshot's keeps its VM's MAC (`mac`), as XAPI copies it."""
        c = self.common(key)
        mac_bytes = uuid.UUID(c["id"]).bytes[:4]
        mac = mac or "2a:1c:" + ":".join(f"{b:02x}" for b in mac_bytes)
        self.put({
            "type": "VIF", "allowedIpv4Addresses": [], "allowedIpv6Addresses": [], "attached": attached,
            "device": "0", "lockingMode": "network_default",
            "MAC": mac, "MTU": 1500, "other_config": {},
            "txChecksumming": True, "$network": self.network_id, "$VM": vm_id, **c,
        })
        self.vifs.append(c["id"])
        return c["id"]


def running_fields(guest: Guest, state: str, start_time: int, host: str) -> dict[str, Any]:
    """The keys a Running or Paused VM has (added on start, removed on shutdown)."""
    return {
        "power_state": state, "addresses": {"0/ipv4/0": guest.ip, "0/ipv6/0": "fe80::a8b1:1ff:fe2c:3d4e"},
        "mainIpAddress": guest.ip, "os_version": dict(guest.os_version), "startTime": start_time,
        "xenTools": {"major": 9, "minor": 4, "version": 9.4}, "managementAgentDetected": True,
        "pvDriversDetected": True, "pvDriversVersion": "9.4.0-146", "pvDriversUpToDate": True,
        "$container": host,
    }


# The keys `running_fields` adds that a halted VM lacks entirely (the others get halted values).
RUNNING_ONLY_KEYS = ("mainIpAddress", "xenTools", "managementAgentDetected", "pvDriversDetected",
                     "pvDriversVersion", "pvDriversUpToDate")
