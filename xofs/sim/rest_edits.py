"""Changes through REST: `PATCH /rest/v0/vms/<id>`, `PATCH /rest/v0/vdis/<id>` and the DELETEs.

PATCH bodies go through Express's `json()` parser (only for a JSON content type: any other body counts as
`{}`), then the object lookup (404), then tsoa's check of the body against the route's schema: a key the
schema does not know is refused (422), as is a value of the wrong type. VMs take XO's camelCase names
(`nameLabel`, `nameDescription`, …); VDIs take `name_label`, `name_description` and `size` (which only
grows). Every success is a 204. The deletes have XO's side effects (through the model): a VM is hard shut
down if it runs, then destroyed with its snapshots and disks.
"""

from __future__ import annotations

import json
from typing import Any

from xofs.sim.model import SimError, SimModel
from xofs.sim.rest_http import Request, RestError

# UpdateVmRequestBody: REST name -> (model field for `vm_set`, or None when the simulator cannot apply
# it, and the JSON types tsoa accepts).
VM_PATCH_FIELDS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "nameLabel": ("name_label", ("string",)),
    "nameDescription": ("name_description", ("string",)),
    "tags": ("tags", ("string[]",)),
    "autoPoweron": ("auto_poweron", ("boolean",)),
    "blockedOperations": ("blockedOperations", ("object",)),
    "highAvailability": ("high_availability", ("best-effort", "restart", "")),
    "startDelay": ("startDelay", ("number",)),
    "cpus": ("CPUs", ("number",)),
    "coresPerSocket": ("coresPerSocket", ("number", "string", "null")),
    "cpuWeight": ("cpuWeight", ("number", "null")),
    "hasVendorDevice": ("hasVendorDevice", ("boolean",)),
    "secureBoot": ("secureBoot", ("boolean",)),
    "viridian": ("viridian", ("boolean",)),
    "expNestedHvm": ("expNestedHvm", ("boolean",)),
    "nicType": ("nicType", ("string", "null")),
    "vga": ("vga", ("std", "cirrus")),
    "videoram": ("videoram", (1, 2, 4, 8, 16)),
    "xenStoreData": ("xenStoreData", ("object",)),
    "affinityHost": (None, ("string", "null")),
    "cpuCap": (None, ("number", "null")),
    "cpuMask": (None, ("number[]",)),
    "cpusStaticMax": (None, ("number", "string")),
    "creation": (None, ("object",)),
    "hvmBootFirmware": (None, ("string", "null")),
    "memory": (None, ("number", "string")),
    "memoryMax": (None, ("number", "string")),
    "memoryMin": (None, ("number", "string")),
    "memoryStaticMax": (None, ("number", "string")),
    "nestedVirt": (None, ("boolean",)),
    "notes": (None, ("string", "null")),
    "PV_args": (None, ("string",)),
    "suspendSr": (None, ("string", "null")),
    "uefiMode": (None, ("setup", "user")),
    "virtualizationMode": (None, ("pv", "hvm")),
    "resourceSet": (None, ("string", "null")),
    "share": (None, ("boolean",)),
}
VDI_PATCH_FIELDS: dict[str, tuple[str, ...]] = {
    "name_label": ("string",), "name_description": ("string",), "size": ("number",),
}
_MESSAGES = {"string": "invalid string value", "boolean": "invalid boolean value", "number": "invalid float number",
             "object": "invalid object", "string[]": "invalid array", "number[]": "invalid array"}


def _is(value: Any, kind: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "object":
        return isinstance(value, dict)
    if kind == "string[]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "number[]":
        return isinstance(value, list) and all(_is(v, "number") for v in value)
    return value == kind and type(value) is type(kind)  # an enum member


def check_body(body: dict[str, Any], schema: dict[str, tuple[Any, ...]]) -> None:
    """tsoa's validation of a body with `additionalProperties: false`: all failures in one 422."""
    fields: dict[str, Any] = {}
    for key, value in body.items():
        kinds = schema.get(key)
        if kinds is None:
            fields[f"body.{key}"] = {"message": f'"{key}" is an excess property and therefore is not allowed',
                                     "value": value}
        elif not any(_is(value, kind) for kind in kinds):
            named = [k for k in kinds if k in _MESSAGES]
            message = _MESSAGES[named[0]] if len(kinds) == 1 and named else "Value does not match any allowed schema"
            fields[f"body.{key}"] = {"message": message, "value": value}
    if fields:
        raise RestError(422, fields, data={})


async def read_json_body(req: Request) -> dict[str, Any]:
    """Express `json()`: the parsed body for a JSON content type, else `{}` (the body is not even read)."""
    mime = req.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime != "application/json" and not mime.endswith("+json"):
        await req.drain()
        return {}
    raw = await req.read_body()
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        # body-parser's SyntaxError carries status 400, but XO's error handler only knows its own errors.
        raise RestError(500, f"Unexpected token in JSON: {error}") from error
    if not isinstance(value, dict):
        raise RestError(422, {"body": {"message": "invalid object", "value": value}}, data={})
    return value


class Editor:
    """PATCH and DELETE on VMs and VDIs, applied through the model."""

    def __init__(self, model: SimModel) -> None:
        self.model = model

    async def patch_vm(self, req: Request, vm_id: str) -> None:
        body = await read_json_body(req)
        vm = self.model.get_typed(vm_id, "VM")
        check_body(body, {k: kinds for k, (_, kinds) in VM_PATCH_FIELDS.items()})
        changes: dict[str, Any] = {}
        for key, value in body.items():
            field = VM_PATCH_FIELDS[key][0]
            if field is None:
                raise SimError.not_implemented()
            changes[field] = value
        if changes:
            self.model.vm_set(vm["id"], **changes)

    async def patch_vdi(self, req: Request, vdi_id: str) -> None:
        body = await read_json_body(req)
        vdi = self.model.get_typed(vdi_id, "VDI")
        check_body(body, VDI_PATCH_FIELDS)
        # One XAPI call per field, in this order, none rolled back when a later one fails.
        if "name_label" in body:
            self.model.vdi_set(vdi["id"], name_label=body["name_label"])
        if "name_description" in body:
            self.model.vdi_set(vdi["id"], name_description=body["name_description"])
        if "size" in body:
            self.model.vdi_set(vdi["id"], size=int(body["size"]))

    async def patch_legacy(self, req: Request, type_: str, obj_id: str) -> None:
        """The legacy router's PATCH (before 5.111; `rest-api.mjs` at e6573e26a9^): `name_description`,
        `name_label` and `tags`, each set through XAPI, and every other key (`nameLabel` among them) ignored.
        It answered 204 without waiting for the sets (it awaited the array of their promises, not them), so
        a value XAPI refuses (a number for a name) fails unseen: nothing changes."""
        try:
            body = await read_json_body(req)
        except RestError as error:
            if error.status != 422:
                raise
            body = {}  # JSON that is no object: no key of it is read
        obj = self.model.get_typed(obj_id, type_)
        setter = self.model.vm_set if type_ == "VM" else self.model.vdi_set
        for key in ("name_description", "name_label", "tags"):
            value = body.get(key)
            if isinstance(value, str) if key != "tags" else (
                    isinstance(value, list) and all(isinstance(tag, str) for tag in value)):
                setter(obj["id"], **{key: value})

    def delete(self, type_: str, obj_id: str) -> None:
        obj = self.model.get_typed(obj_id, type_)
        if type_ in ("VDI", "VDI-snapshot"):
            self.model.vdi_delete(obj["id"])
        else:
            self.model.vm_delete(obj["id"])
