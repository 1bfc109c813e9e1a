"""The simulator's state: XO objects, users and tokens, the operations XO performs on them, and their events.

Everything that serves the simulator over the network (the JSON-RPC socket in `jsonrpc.py`, the REST app in
`rest.py`) goes through `SimModel`. Objects are plain dicts in the exact JSON shape a real xo-server 5.207.2
sends; treat what `get` returns as read-only. Every mutation replaces the object by a new dict (copy on
write), so a dict handed to a client or queued in an event batch never changes afterwards.

Events follow XO's object collection (`xo.mjs` `_watchObjects`): changes are buffered and flushed once per
tick as at most one `("enter", {id: obj})` followed by at most one `("exit", {id: 0})`, all types mixed and
deduplicated (an add then a remove in one tick gives nothing).
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import math
import random
import re
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from xofs.sim import inventory
from xofs.sim.faults import SocketFaults
from xofs.sim.inventory import RUNNING_ONLY_KEYS, VM_TYPES, Guest, order_vm_keys, running_fields
from xofs.sim.state import StateStore

if TYPE_CHECKING:
    from xofs.sim.disks import FileDisk, GeneratedDisk

    DiskContent = GeneratedDisk | FileDisk

log = logging.getLogger(__name__)

ADMIN_EMAIL = "admin@admin.net"
ADMIN_PASSWORD = "admin"
DEFAULT_TOKEN_VALIDITY_MS = 30 * 86400_000
MAX_TOKEN_VALIDITY_MS = int(0.5 * 365.25 * 86400_000)
CLI_TOKEN_VALIDITY_MS = 10 * 365 * 86400_000  # tokens given with --token do not expire in practice
THROTTLING_DELAY_S = 2.0
TASK_LINGER_S = 0.2  # a finished XAPI task stays visible this long before its `exit`, as in the recordings
SUBSCRIBER_BUFFER = 1000  # event batches a slow subscriber may lag behind before it is dropped
COMMON_KEYS = ("id", "uuid", "$pool", "$poolId", "_xapiRef")


class _Null:
    """The type of `NULL`."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()  # in `SimModel.update` changes: set the key to JSON null (None removes the key)


class SimError(Exception):
    """An XO API error (`xo-common/api-errors.js`): JSON-RPC sends `to_json()`, REST maps `http_status`."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        """The JSON-RPC error object, keys in XO's order; `data` is absent when undefined."""
        out: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.data is not None:
            out["data"] = self.data
        return out

    @property
    def http_status(self) -> int:
        """The REST status of this error (`generic-error-handler.middleware.mts`)."""
        return {0: 501, 1: 404, 2: 403, 3: 401, 5: 403, 10: 422, 16: 409, 25: 409, 26: 403, 28: 503}.get(
            self.code, 500)

    @classmethod
    def not_implemented(cls) -> SimError:
        return cls(0, "not implemented")

    @classmethod
    def no_such_object(cls, obj_id: str, type_: str | Sequence[str] | None = None) -> SimError:
        # XO formats the type with a JS template: a list of types reads "VM,VM-snapshot".
        label = type_ if isinstance(type_, str) else ",".join(type_) if type_ else "object"
        data: dict[str, Any] = {"id": obj_id}
        if type_ is not None:
            data["type"] = type_ if isinstance(type_, str) else list(type_)
        return cls(1, f"no such {label} {obj_id}", data)

    @classmethod
    def unauthorized(cls, permission: str | None = None) -> SimError:
        data: dict[str, Any] = {"object": {}}
        if permission is not None:
            data = {"permission": permission, "object": {}}
        return cls(2, "not enough permissions", data)

    @classmethod
    def invalid_credentials(cls) -> SimError:
        return cls(3, "invalid credentials")

    @classmethod
    def forbidden_operation(cls, operation: str, reason: str | None = None) -> SimError:
        data = {"operation": operation} if reason is None else {"operation": operation, "reason": reason}
        return cls(5, f"forbidden operation: {operation}", data)

    @classmethod
    def invalid_parameters(cls, errors: list[dict[str, Any]] | None = None, message: str | None = None) -> SimError:
        return cls(10, message or "invalid parameters", {} if errors is None else {"errors": errors})

    @classmethod
    def vm_bad_power_state(cls, vm_id: str, expected: str, actual: str) -> SimError:
        return cls(13, f"VM state is {actual} but should be {expected}",
                   {"objectId": vm_id, "expected": expected, "actual": actual})

    @classmethod
    def object_already_exists(cls, obj_id: str, type_: str) -> SimError:
        return cls(16, f"{type_} already exists", {"objectId": obj_id, "objectType": type_})

    @classmethod
    def vdi_in_use(cls, vdi_id: str, operation: str) -> SimError:
        return cls(17, "VDI in use", {"objectId": vdi_id, "operation": operation})

    @classmethod
    def incorrect_state(cls, *, actual: Any, expected: Any, obj: str, prop: str) -> SimError:
        return cls(25, "incorrect state", {"actual": actual, "expected": expected, "object": obj, "property": prop})


class TooFastError(Exception):
    """XO's plain `Error('too fast authentication tries')`: a user failed to sign in less than 2 s ago."""

    def __init__(self) -> None:
        super().__init__("too fast authentication tries")


def parse_duration_ms(value: int | float | str) -> float:
    """XO's `parseDuration` (the `ms` package): a number of ms, or a string such as "1 hour", "30 days"."""
    if isinstance(value, bool):
        raise TypeError(f"not a valid duration: {value}")
    if isinstance(value, int | float):
        return float(value)
    units = {"ms": 1, "msec": 1, "msecs": 1, "millisecond": 1, "milliseconds": 1,
             "s": 1e3, "sec": 1e3, "secs": 1e3, "second": 1e3, "seconds": 1e3,
             "m": 6e4, "min": 6e4, "mins": 6e4, "minute": 6e4, "minutes": 6e4,
             "h": 36e5, "hr": 36e5, "hrs": 36e5, "hour": 36e5, "hours": 36e5,
             "d": 864e5, "day": 864e5, "days": 864e5, "w": 6048e5, "week": 6048e5, "weeks": 6048e5,
             "y": 315576e5, "yr": 315576e5, "yrs": 315576e5, "year": 315576e5, "years": 315576e5}
    match = re.fullmatch(r"\s*(-?(?:\d+)?\.?\d+)\s*([a-z]*)\s*", value.lower())
    if value and match and (match.group(2) or "ms") in units:
        return float(match.group(1)) * units[match.group(2) or "ms"]
    raise TypeError(f"not a valid duration: {value}")


def new_token() -> str:
    """32 random bytes in base64url: 43 characters, like XO's `generateToken`."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def now_s() -> int:
    return int(time.time())


class SimModel:
    """A simulated XO: objects, auth, XO operations with their side effects and errors, and events."""

    version = "5.207.2"
    xapi_latency = 0.05  # seconds a XAPI call takes; operations pay it before they act (a fault knob may raise it)

    def __init__(self, *, seed: int = 1, vms: int = 12, state_dir: Path | None = None,
                 tokens: Iterable[str] = (), legacy: bool = False) -> None:
        self.seed = seed
        self.legacy = legacy  # `--legacy`: the REST app answers like the pre-5.111 router (era L)
        inv = inventory.build(seed, vms)
        self._objects: dict[str, dict[str, Any]] = inv.objects
        self._by_type: dict[str, dict[str, None]] = {}
        self._by_ref: dict[str, str] = {}
        for obj_id, obj in self._objects.items():
            self._by_type.setdefault(obj["type"], {})[obj_id] = None
            self._by_ref[obj["_xapiRef"]] = obj_id
        self._guests: dict[str, Guest] = inv.guests
        self._suspend_vdis: dict[str, str] = inv.suspend_vdis
        self._disk_specs: dict[str, dict[str, Any]] = {k: {"gen": asdict(v)} for k, v in inv.disks.items()}
        self._disk_cache: dict[str, DiskContent] = {}
        self.user: dict[str, Any] = inv.user
        self.pool_id: str = next(iter(self._by_type["pool"]))
        self._tokens: dict[str, dict[str, Any]] = {}
        self._failures: dict[str, float] = {}
        self._pending: dict[str, str] = {}  # id -> "add" | "update" | "remove", in change order
        self._subscribers: list[trio.MemorySendChannel] = []
        self._sockets: set[Callable[[], None]] = set()
        self.socket_faults = SocketFaults()  # the websocket fault knobs (silence, raw frames)
        self._downloads: dict[str, Callable[[], Iterable[bytes]]] = {}
        self._timers: list[tuple[float, Callable[[], None]]] = []  # (monotonic deadline, what to do then)
        self._task_exits: dict[str, list[Callable[[], None]]] = {}  # task id -> what runs when it leaves
        self._dirty: trio.Event | None = None
        self._temp_dir: Path | None = None
        self._store: StateStore | None = None
        if state_dir is not None:
            self._store = StateStore(Path(state_dir), seed=seed, vms=vms)
            for entry in self._store.entries():
                self._replay(entry)  # applies without journaling again
            self._pending.clear()
        for token in tokens:
            if self._tokens.get(token, {}).get("expiration", 0) <= time.time() * 1000:
                self._put_token({"id": token, "user_id": self.user["id"], "created_at": int(time.time() * 1000),
                                 "expiration": int(time.time() * 1000) + CLI_TOKEN_VALIDITY_MS,
                                 "description": "--token"}, persist=False)

    # -- auth ----------------------------------------------------------------------------------------------

    def user_for_token(self, token: str) -> dict[str, Any] | None:
        """The user a token signs in, or None if it is unknown or expired."""
        record = self.token_record(token)
        return self.user if record is not None else None

    def token_record(self, token: str) -> dict[str, Any] | None:
        """The live token record `{id, user_id, created_at, expiration (ms), description?, client?}`."""
        record = self._tokens.get(token)
        if record is None or record["expiration"] <= time.time() * 1000:
            return None
        return record

    def user_for_password(self, login: str, password: str) -> dict[str, Any] | None:
        """The user with this email (XO's user name) and password; no throttling (see `authenticate`)."""
        if login == ADMIN_EMAIL and password == ADMIN_PASSWORD:
            return self.user
        return None

    def authenticate(self, credentials: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """XO's `authenticateUser`: `{token}`, or `{email|username, password}` → (user, the token used or None).

        Raises `ValueError('empty password')`, `TooFastError` when this user name failed less than 2 s ago
        (XO's throttling, checked before anything else), or `SimError` invalidCredentials (which starts
        the 2 s)."""
        password = credentials.get("password")
        if password == "":
            raise ValueError("empty password")
        username = credentials.get("email") or credentials.get("username")
        last = self._failures.get(username) if isinstance(username, str) else None
        if username and last is not None and last + THROTTLING_DELAY_S > time.monotonic():
            raise TooFastError()
        if isinstance(username, str) and isinstance(password, str):
            user = self.user_for_password(username, password)
            if user is not None:
                self._failures.pop(username, None)
                return user, None
        token = credentials.get("token")
        if token and isinstance(token, str):
            user = self.user_for_token(token)
            if user is not None:
                return user, token
        self._failures[str(username)] = time.monotonic()
        raise SimError.invalid_credentials()

    def create_token(self, user: dict[str, Any], *, description: str | None = None, client_id: str | None = None,
                     expires_in: int | float | str | None = None) -> str:
        """A new 43-character token; a live token of the same `client_id` is reused and extended instead.
        Raises `ValueError`/`TypeError` like XO for a duration under 1 minute, over 0.5 year, or unparsable."""
        duration = DEFAULT_TOKEN_VALIDITY_MS
        if expires_in is not None:
            duration = parse_duration_ms(expires_in)
            if duration < 60e3:
                raise ValueError(f"invalid expiresIn duration: {expires_in}")
            if duration > MAX_TOKEN_VALIDITY_MS:
                raise ValueError(f"too high expiresIn duration: {expires_in}")
        now = int(time.time() * 1000)
        if client_id is not None:
            for record in list(self._tokens.values()):
                if record.get("client", {}).get("id") == client_id and record["user_id"] == user["id"]:
                    if record["expiration"] > now:
                        updated = {**record, "expiration": now + int(duration)}
                        if description is None:
                            updated.pop("description", None)
                        else:
                            updated["description"] = description
                        self._put_token(updated)
                        return record["id"]
                    self._drop_token(record["id"])
        record = {"created_at": now, "id": new_token(), "user_id": user["id"], "expiration": now + int(duration)}
        if client_id is not None:
            record["client"] = {"id": client_id}
        if description is not None:
            record["description"] = description
        self._put_token(record)
        return record["id"]

    def expire_token(self, token: str) -> None:
        """Fault knob: the token expires now (sockets signed in with it close on their next message)."""
        record = self._tokens.get(token)
        if record is not None:
            self._put_token({**record, "expiration": int(time.time() * 1000) - 1})

    def _put_token(self, record: dict[str, Any], *, persist: bool = True) -> None:
        self._tokens[record["id"]] = record
        if persist:
            self._journal({"op": "token", "token": record})

    def _drop_token(self, token: str) -> None:
        self._tokens.pop(token, None)
        self._journal({"op": "untoken", "id": token})

    # -- objects -------------------------------------------------------------------------------------------

    def get(self, obj_id: str) -> dict[str, Any] | None:
        """The object with this id, or this XAPI OpaqueRef (as XO's `getObject`), or None."""
        obj = self._objects.get(obj_id)
        if obj is None and obj_id.startswith("OpaqueRef:"):
            ref_id = self._by_ref.get(obj_id)
            obj = self._objects.get(ref_id) if ref_id else None
        return obj

    def get_typed(self, obj_id: str, type_: str | Sequence[str]) -> dict[str, Any]:
        """The object if it has this type (or one of these types); else SimError noSuchObject."""
        obj = self.get(obj_id)
        types = (type_,) if isinstance(type_, str) else tuple(type_)
        if obj is None or obj["type"] not in types:
            raise SimError.no_such_object(obj_id, type_)
        return obj

    def by_type(self, type_: str) -> list[dict[str, Any]]:
        """Every object of this type, in XO's order: the last changed last. (xo-collection's index by type
        deletes and adds again the key of every object updated, so REST collections list it last; recorded:
        real-xo/rest/vms.fields-star*.body. `xo.getAllObjects` keeps the order the objects came in.)"""
        return [self._objects[i] for i in self._by_type.get(type_, ())]

    def all_objects(self) -> dict[str, dict[str, Any]]:
        """Every object by id (the live mapping: do not modify)."""
        return self._objects

    def add(self, obj: dict[str, Any], *, persist: bool = True) -> None:
        """Add (or replace) an object; queues an `enter`."""
        obj_id = obj["id"]
        old = self._objects.get(obj_id)
        if old is not None and old["type"] != obj["type"]:
            self._by_type[old["type"]].pop(obj_id, None)
        self._objects[obj_id] = obj
        self._by_type.setdefault(obj["type"], {})
        self._to_the_end(obj)  # new, or replaced: an update
        self._by_ref[obj["_xapiRef"]] = obj_id
        self._queue(obj_id, "update" if old is not None else "add")
        if persist:
            self._journal({"op": "add", "obj": obj})

    def update(self, obj_id: str, changes: dict[str, Any], *, persist: bool = True, announce: bool = True) -> None:
        """Merge `changes` into the object's top level; queues an `enter` (unless not `announce`d).

        A value of None removes the key (XO omits undefined values); `NULL` sets it to JSON null."""
        old = self._objects.get(obj_id)
        if old is None:
            raise SimError.no_such_object(obj_id)
        values = {k: None if v is NULL else v for k, v in changes.items() if v is not None}
        unset = [k for k, v in changes.items() if v is None]
        self._apply_update(obj_id, values, unset, announce=announce)
        if persist:
            self._journal({"op": "update", "id": obj_id, "set": values, "unset": unset})

    def _apply_update(self, obj_id: str, values: dict[str, Any], unset: list[str], *, announce: bool = True) -> None:
        new = {**self._objects[obj_id], **values}
        for key in unset:
            new.pop(key, None)
        if new["type"] in VM_TYPES:
            new = order_vm_keys(new)
        self._objects[obj_id] = new
        if announce:  # an object XO is not told of is not updated in its collection either
            self._to_the_end(new)
            self._queue(obj_id, "update")

    def touch(self, obj_id: str) -> None:
        """Re-emit an unchanged object, as XO does when a VM's metrics object changes."""
        if obj_id in self._objects:
            self._to_the_end(self._objects[obj_id])
            self._queue(obj_id, "update")

    def _to_the_end(self, obj: dict[str, Any]) -> None:
        """An updated object goes last in its type's order (see `by_type`)."""
        order = self._by_type[obj["type"]]
        order.pop(obj["id"], None)
        order[obj["id"]] = None

    def remove(self, obj_id: str, *, persist: bool = True) -> None:
        """Remove an object; queues an `exit`."""
        obj = self._objects.pop(obj_id, None)
        if obj is None:
            return
        self._by_type[obj["type"]].pop(obj_id, None)
        self._by_ref.pop(obj["_xapiRef"], None)
        self._queue(obj_id, "remove")
        if persist:
            self._journal({"op": "remove", "id": obj_id})

    def _edit(self, obj_id: str, key: str, fn: Callable[[Any], Any], *, announce: bool = True) -> None:
        """Replace one key by `fn(old value)` (for list fields such as `VDIs` or `$VBDs`)."""
        obj = self._objects.get(obj_id)
        if obj is not None:
            self.update(obj_id, {key: fn(obj.get(key))}, announce=announce)

    def _link(self, obj_id: str, key: str, item: str, *, announce: bool = True) -> None:
        self._edit(obj_id, key, lambda ids: [*(ids or []), item], announce=announce)

    def _unlink(self, obj_id: str, key: str, item: str, *, announce: bool = True) -> None:
        obj = self._objects.get(obj_id)
        if obj is not None and item in (obj.get(key) or ()):
            self._edit(obj_id, key, lambda ids: [i for i in ids if i != item], announce=announce)

    def new_ids(self) -> tuple[str, str]:
        """(uuid, OpaqueRef) for a new object: random, like XAPI's."""
        return str(uuid.uuid4()), f"OpaqueRef:{uuid.uuid4()}"

    def _common(self) -> dict[str, Any]:
        oid, ref = self.new_ids()
        return {"id": oid, "uuid": oid, "$pool": self.pool_id, "$poolId": self.pool_id, "_xapiRef": ref}

    # -- tasks ---------------------------------------------------------------------------------------------

    def start_task(self, name_label: str, name_description: str = "") -> str:
        """A pending XAPI `task` object (not persisted); finish it with `finish_task`."""
        c = self._common()
        pool = self._objects[self.pool_id]
        self.add({"allowedOperations": ["cancel"], "created": now_s(), "current_operations": {}, "finished": None,
                  "name_description": name_description, "name_label": name_label, "progress": 0, "result": "",
                  "status": "pending", "xapiRef": c["_xapiRef"], "$host": pool["master"], "id": c["id"],
                  "type": "task", "uuid": c["uuid"], "$pool": c["$pool"], "$poolId": c["$poolId"],
                  "_xapiRef": c["_xapiRef"]}, persist=False)
        return c["id"]

    def task_progress(self, task_id: str, progress: float) -> None:
        """A pending task's progress (0 to 1) moved on."""
        task = self._objects.get(task_id)
        if task is not None and task["status"] == "pending":
            value = round(min(progress, 1.0), 4)
            # A whole number is an int: frames are written by Python's encoder (`1.0`), Node writes `1`.
            self.update(task_id, {"progress": int(value) if value.is_integer() else value}, persist=False)

    def finish_task(self, task_id: str, *, status: str = "success", result: str = "",
                    with_exit: Callable[[], None] | None = None) -> None:
        """Mark a task finished; it leaves (`exit`) shortly after, as XAPI tasks do once XO destroys them.
        `with_exit` runs then too, so that its changes come in the batch of the task's exit."""
        if task_id not in self._objects:
            return
        self.update(task_id, {"allowedOperations": [], "finished": now_s(), "progress": 1, "result": result,
                              "status": status}, persist=False)
        if with_exit is not None:
            self._task_exits.setdefault(task_id, []).append(with_exit)
        self.call_later(TASK_LINGER_S, lambda: self.retire_task(task_id))

    def at_task_exit(self, task_id: str, action: Callable[[], None]) -> None:
        """Run `action` when this task leaves, so that its changes come in the batch of the task's exit;
        now if the task has left already."""
        if task_id in self._objects:
            self._task_exits.setdefault(task_id, []).append(action)
        else:
            action()

    def retire_task(self, task_id: str) -> None:
        """The task leaves now (XO destroyed it), and what waited for its exit runs."""
        self.remove(task_id, persist=False)
        for action in self._task_exits.pop(task_id, []):
            action()

    def task_with_result(self, ref: str) -> str | None:
        """The XAPI task whose result names this OpaqueRef (where XO reads what an `Async.*` call made)."""
        result = f"<value>{ref}</value>"
        return next((t["id"] for t in self.by_type("task") if t["result"] == result), None)

    def call_later(self, delay: float, action: Callable[[], None]) -> None:
        """Run `action` about `delay` seconds from now, from the model's `run` loop (XAPI work XO waits for)."""
        self._timers.append((time.monotonic() + delay, action))

    def _async_task(self, name_label: str, result: str = "") -> None:
        """The `Async.<class>.<call>` task XO's XAPI calls leave behind, already finished."""
        self.finish_task(self.start_task(name_label), result=result)

    # -- events --------------------------------------------------------------------------------------------

    def _queue(self, obj_id: str, kind: str) -> None:
        previous = self._pending.get(obj_id)
        if previous is None:
            self._pending[obj_id] = kind
        elif previous == "add" and kind == "remove":
            del self._pending[obj_id]  # came and went within one tick: nothing to tell
        elif previous == "remove" and kind == "add":
            self._pending[obj_id] = "update"
        elif previous != "add":
            self._pending[obj_id] = kind
        if self._dirty is not None:
            self._dirty.set()

    def subscribe(self) -> trio.MemoryReceiveChannel:
        """A channel of event batches `("enter", {id: obj})` / `("exit", {id: 0})`; close it to unsubscribe."""
        send, receive = trio.open_memory_channel(SUBSCRIBER_BUFFER)
        self._subscribers.append(send)
        return receive

    def flush_events(self) -> list[tuple[str, dict[str, Any]]]:
        """Send the buffered changes to every subscriber (one `enter` then one `exit`); returns the batches."""
        if not self._pending:
            return []
        entered = {i: self._objects[i] for i, kind in self._pending.items() if kind != "remove"}
        exited = {i: 0 for i, kind in self._pending.items() if kind == "remove"}
        self._pending = {}
        batches = [b for b in (("enter", entered), ("exit", exited)) if b[1]]
        for send in list(self._subscribers):
            try:
                for batch in batches:
                    send.send_nowait(batch)
            except trio.WouldBlock:
                log.warning("dropping an event subscriber that is %d batches behind", SUBSCRIBER_BUFFER)
                send.close()
                self._subscribers.remove(send)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(send)
        return batches

    def register_socket(self, close: Callable[[], None]) -> Callable[[], None]:
        """Record an open JSON-RPC socket's closer (for `close_all_sockets`); returns the unregister call."""
        self._sockets.add(close)
        return lambda: self._sockets.discard(close)

    def close_all_sockets(self) -> None:
        """Fault knob: every open JSON-RPC websocket is closed."""
        for close in list(self._sockets):
            close()

    async def run(self, *, churn: float = 0.0, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The model's background work: flush events once per tick, retire finished tasks, and (with `churn`
        > 0) give running VMs metric updates at about `churn` events per second. Runs until cancelled."""
        self._dirty = trio.Event()
        async with trio.open_nursery() as nursery:
            if churn > 0:
                nursery.start_soon(self._churn, churn)
            nursery.start_soon(self._run_timers)
            task_status.started()
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                await trio.sleep(0)  # one tick: changes made together go out together
                self.flush_events()

    async def _run_timers(self) -> None:
        """Run the `call_later` actions that are due (checked every 50 ms: precision is not needed)."""
        while True:
            await trio.sleep(0.05)
            self._fire_timers(time.monotonic())

    def _fire_timers(self, until: float) -> None:
        due = [timer for timer in self._timers if timer[0] <= until]
        self._timers = [timer for timer in self._timers if timer[0] > until]
        for _, action in due:
            action()

    async def _churn(self, rate: float) -> None:
        rng = random.Random(self.seed)
        running: list[str] = []
        listed_at = -math.inf
        while True:
            await trio.sleep(rng.expovariate(rate))
            if time.monotonic() - listed_at > 1:  # list running VMs once a second, not once an event
                # By id: the order of by_type changes with every update, and the seed must pick the same VMs.
                running = sorted(vm["id"] for vm in self.by_type("VM") if vm["power_state"] == "Running")
                listed_at = time.monotonic()
            vm = self._objects.get(rng.choice(running)) if running else None
            if vm is None or vm["power_state"] != "Running":
                continue
            memory = vm["memory"]
            if "usage" in memory:  # this guest reports memory in use: it moves
                usage = int(min(memory["size"], max(memory["size"] * 0.05, memory["usage"] * rng.uniform(0.95, 1.05))))
                self.update(vm["id"], {"memory": {**memory, "usage": usage}}, persist=False)
            else:  # guest metrics changed in fields XO does not show: XO re-emits the VM as it is
                self.touch(vm["id"])

    # -- one-shot downloads (`xo.getAllObjects({ndjson: true})`) -------------------------------------------

    def register_download(self, make_body: Callable[[], Iterable[bytes]]) -> str:
        """A one-shot URL path `/api/<random>` whose GET (no auth) is served from `make_body()`."""
        path = f"/api/{secrets.token_urlsafe(32)}"  # XO's generateToken(): 32 random bytes, base64url
        self._downloads[path] = make_body
        return path

    def take_download(self, path: str) -> Iterable[bytes] | None:
        """The body of a registered download, once; None for an unknown or already used path."""
        make_body = self._downloads.pop(path, None)
        return make_body() if make_body is not None else None

    # -- persistence ---------------------------------------------------------------------------------------

    def _journal(self, entry: dict[str, Any]) -> None:
        if self._store is not None:
            self._store.append(entry)

    def _replay(self, entry: dict[str, Any]) -> None:
        op = entry["op"]
        if op == "add":
            self.add(entry["obj"], persist=False)
        elif op == "update":
            self._apply_update(entry["id"], entry["set"], entry["unset"])
        elif op == "remove":
            self.remove(entry["id"], persist=False)
        elif op == "token":
            self._tokens[entry["token"]["id"]] = entry["token"]
        elif op == "untoken":
            self._tokens.pop(entry["id"], None)
        elif op == "disk":
            self._set_disk_spec(entry["id"], entry["spec"], persist=False)
        elif op == "guest":
            self._guests[entry["id"]] = Guest(**entry["guest"])
        elif op == "suspend":
            self._set_suspend_vdi(entry["id"], entry["vdi"], persist=False)

    def close(self) -> None:
        while self._timers:  # what XO still had to do (a disk to destroy) is done before the journal closes
            self._fire_timers(math.inf)
        if self._store is not None:
            self._store.close()
        if self._temp_dir is not None:  # imported disks of a run without --state-dir
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    # -- disks ---------------------------------------------------------------------------------------------

    def _set_disk_spec(self, vdi_id: str, spec: dict[str, Any] | None, *, persist: bool = True) -> None:
        old = self._disk_specs.pop(vdi_id, None)
        self._disk_cache.pop(vdi_id, None)
        if spec is not None:
            self._disk_specs[vdi_id] = spec
        if persist:
            self._journal({"op": "disk", "id": vdi_id, "spec": spec})
        self._forget_file(old)

    def _forget_file(self, spec: dict[str, Any] | None) -> None:
        """Delete an imported disk file once no VDI uses it any more (snapshots share their source's file)."""
        if spec is None or "file" not in spec:
            return
        if any(s.get("file") == spec["file"] for s in self._disk_specs.values()):
            return
        path = self._disk_file(spec["file"])
        if self._store is None or path.parent == self._store.disks_dir:
            path.unlink(missing_ok=True)

    def _disk_file(self, name: str) -> Path:
        return Path(name) if Path(name).is_absolute() else self._disks_dir() / name

    def _disks_dir(self) -> Path:
        if self._store is not None:
            return self._store.disks_dir
        if self._temp_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="xofs-sim-disks-"))
        return self._temp_dir

    def disk(self, vdi_id: str) -> DiskContent:
        """The content of a VDI or VDI-snapshot: generated for inventory disks, a file for imported ones."""
        cached = self._disk_cache.get(vdi_id)
        if cached is not None:
            return cached
        vdi = self.get_typed(vdi_id, ("VDI", "VDI-snapshot"))
        from xofs.sim.disks import FileDisk, GeneratedDisk

        spec = self._disk_specs.get(vdi["id"], {"gen": {"key": vdi["id"], "size": vdi["size"], "fill": 0.0}})
        if "file" in spec:
            content: Any = FileDisk(self._disk_file(spec["file"]), vdi["size"])
        else:
            gen = spec["gen"]
            content = GeneratedDisk(self.seed, gen["key"], vdi["size"], gen["fill"])
        self._disk_cache[vdi["id"]] = content
        return content

    def new_disk_path(self, vdi_id: str) -> Path:
        """A fresh file path for an import into this VDI to write raw content to (then `attach_disk_file`)."""
        return self._disks_dir() / f"{vdi_id}.{uuid.uuid4().hex[:8]}.raw"

    def attach_disk_file(self, vdi_id: str, path: Path, *, usage: int | None = None) -> None:
        """After a successful import: the VDI's content is now this raw file (`usage` defaults to its size)."""
        vdi = self.get_typed(vdi_id, ("VDI", "VDI-snapshot"))
        path = Path(path)
        name = path.name if path.parent == self._disks_dir() else str(path.resolve())
        self._set_disk_spec(vdi_id, {"file": name})
        usage = path.stat().st_size if usage is None else usage
        changes: dict[str, Any] = {"usage": usage}
        if "chainPhysicalUsage" in vdi:
            changes["chainPhysicalUsage"] = usage
        self.update(vdi_id, changes)

    def vm_disks(self, vm_id: str) -> list[tuple[dict[str, Any], dict[str, Any], DiskContent]]:
        """A VM's (or snapshot's, template's) disks as (VBD, VDI, content), by position; no CD drives."""
        vm = self.get_typed(vm_id, VM_TYPES)
        vbds = sorted(self._disk_vbds(vm), key=lambda v: int(v["position"]) if v["position"].isdigit() else 0)
        return [(vbd, self._objects[vbd["VDI"]], self.disk(vbd["VDI"])) for vbd in vbds]

    # -- XO operations: VDIs -------------------------------------------------------------------------------

    def create_vdi(self, sr_id: str, *, name_label: str, name_description: str | None = None, size: int,
                   other_config: dict[str, str] | None = None) -> dict[str, Any]:
        """XAPI `VDI.create` as XO calls it for an import: a user VDI with no content yet."""
        sr = self.get_typed(sr_id, "SR")
        vdi = {"type": "VDI", "cbt_enabled": False, "missing": False, "name_description": name_description or "",
               "name_label": name_label, "size": size, "snapshots": [], "tags": [], "usage": 0, "VDI_type": "user",
               "current_operations": {}, "other_config": dict(other_config or {}), "$SR": sr["id"], "$VBDs": [],
               "chainPhysicalUsage": 0, **self._common()}
        self.add(vdi)
        self._set_disk_spec(vdi["id"], {"gen": {"key": vdi["id"], "size": size, "fill": 0.0}})
        self.update(sr["id"], {"VDIs": [*sr["VDIs"], vdi["id"]], "usage": sr["usage"] + size})
        return vdi

    def vdi_set(self, vdi_id: str, *, name_label: str | None = None, name_description: str | None = None,
                size: int | str | None = None, tags: list[str] | None = None) -> None:
        """`vdi.set`: rename, describe, tag, or grow (never shrink) a VDI or VDI-snapshot."""
        vdi = self.get_typed(vdi_id, ("VDI", "VDI-snapshot"))
        changes: dict[str, Any] = {}
        if size is not None:
            new_size = parse_size(size)
            if new_size < vdi["size"]:
                raise SimError.invalid_parameters(
                    message=f"cannot set new size ({new_size}) below the current size ({vdi['size']})")
            if new_size != vdi["size"]:
                changes["size"] = new_size
                sr = self._objects[vdi["$SR"]]
                self.update(sr["id"], {"usage": sr["usage"] + new_size - vdi["size"]})
                spec = self._disk_specs.get(vdi["id"])
                if spec is not None and "gen" in spec:
                    self._set_disk_spec(vdi["id"], {"gen": {**spec["gen"], "size": new_size}})
                self._disk_cache.pop(vdi["id"], None)
        if name_label is not None:
            changes["name_label"] = name_label
        if name_description is not None:
            changes["name_description"] = name_description
        if tags is not None:
            changes["tags"] = list(tags)
        if changes:
            self.update(vdi["id"], changes)

    def vdi_delete(self, vdi_id: str) -> None:
        """`vdi.delete` (XAPI `VDI.destroy`): refused while a running VM uses it; unplugged VBDs go with it."""
        vdi = self.get_typed(vdi_id, ("VDI", "VDI-snapshot"))
        for vbd_id in vdi["$VBDs"]:
            vbd = self._objects.get(vbd_id)
            if vbd is not None and vbd["attached"]:
                raise SimError.vdi_in_use(vdi["id"], "destroy")
        self._destroy_vdi(vdi)

    def _destroy_vdi(self, vdi: dict[str, Any], *, task: bool = True) -> None:
        if task:
            self._async_task("Async.VDI.destroy")
        for vbd_id in vdi["$VBDs"]:
            vbd = self._objects.get(vbd_id)
            if vbd is not None:
                self._unlink(vbd["VM"], "$VBDs", vbd_id)
                self.remove(vbd_id)
        sr = self._objects.get(vdi["$SR"])
        if sr is not None:
            self.update(sr["id"], {"VDIs": [i for i in sr["VDIs"] if i != vdi["id"]],
                                   "usage": max(0, sr["usage"] - vdi["size"]),
                                   "physical_usage": max(0, sr["physical_usage"] - vdi["usage"])})
        if "$snapshot_of" in vdi:
            self._unlink(vdi["$snapshot_of"], "snapshots", vdi["id"])
        for snap_id in vdi["snapshots"]:
            if snap_id in self._objects:  # a snapshot outlives its source, which it no longer links to
                self.update(snap_id, {"$snapshot_of": None})
        self.remove(vdi["id"])
        self._set_disk_spec(vdi["id"], None)

    # -- XO operations: VMs --------------------------------------------------------------------------------

    def vm_set(self, vm_id: str, **fields: Any) -> None:
        """`vm.set` for the simple fields (name_label, name_description, tags, auto_poweron,
        blockedOperations, high_availability, startDelay, CPUs, cpuWeight, …); others: notImplemented."""
        vm = self.get_typed(vm_id, ("VM", "VM-snapshot", "VM-template"))
        changes: dict[str, Any] = {}
        for key, value in fields.items():
            if key in ("name_label", "name_description", "high_availability", "startDelay", "cpuWeight",
                       "hasVendorDevice", "secureBoot", "viridian", "expNestedHvm", "nicType", "vga",
                       "videoram"):
                changes[key] = value
            elif key == "tags":
                changes["tags"] = list(value)
            elif key == "auto_poweron":
                changes["auto_poweron"] = bool(value)
                changes["other"] = {**vm["other"], "auto_poweron": "true" if value else "false"}
            elif key == "blockedOperations":
                blocked = {**vm["blockedOperations"]}
                for op, reason in value.items():
                    if reason is None or reason is False:
                        blocked.pop(op, None)
                    else:
                        blocked[op] = "true" if reason is True else str(reason)
                changes["blockedOperations"] = blocked
            elif key == "CPUs":
                changes["CPUs"] = {**vm["CPUs"], "number": int(value)}
            elif key == "coresPerSocket":  # unset: XO writes the CPU count back (xen-orchestra#9111)
                changes["coresPerSocket"] = vm["CPUs"]["number"] if value is None else int(value)
            elif key == "xenStoreData":
                data = {**vm["xenStoreData"]}
                for k, v in value.items():
                    k = k if k.startswith("vm-data/") else f"vm-data/{k}"
                    if v is None:
                        data.pop(k, None)
                    else:
                        data[k] = v
                changes["xenStoreData"] = data
            else:
                raise SimError.not_implemented()
        if changes:
            self.update(vm["id"], changes)

    def vm_start(self, vm_id: str) -> None:
        """`vm.start`: boots a Halted VM, unpauses a Paused one, resumes a Suspended one."""
        vm = self.get_typed(vm_id, "VM")
        if "start" in vm["blockedOperations"]:
            raise SimError.forbidden_operation("Start", vm["blockedOperations"]["start"])
        state = vm["power_state"]
        if state == "Running":
            raise SimError.vm_bad_power_state(vm["id"], "halted", "running")
        if state == "Paused":
            self._async_task("Async.VM.unpause")
            self.update(vm["id"], {"power_state": "Running"})
            return
        self._async_task("Async.VM.resume" if state == "Suspended" else "Async.VM.start")
        if state == "Suspended":
            self._drop_suspend_image(vm["id"])
        host = self._pick_host(vm)
        guest = self._guest(vm)
        changes = running_fields(guest, "Running", now_s(), host)
        memory = {k: v for k, v in vm["memory"].items() if k != "usage"}
        if guest.memory_usage is not None:
            memory["usage"] = guest.memory_usage
        changes["memory"] = memory
        self.update(vm["id"], changes)
        self._link(host, "residentVms", vm["id"])
        self._plug_devices(vm, True)

    def vm_stop(self, vm_id: str, force: bool = False) -> None:
        """`vm.stop`: clean shutdown (Running VMs with PV drivers), or hard shutdown with `force`."""
        vm = self.get_typed(vm_id, "VM")
        state = vm["power_state"]
        if state == "Halted" or (not force and state != "Running"):
            raise SimError.vm_bad_power_state(vm["id"], "running", state.lower())
        if not force and "xenTools" not in vm:
            raise SimError.invalid_parameters(message="clean shutdown requires PV drivers")
        self._shutdown(vm, hard=force)

    def _shutdown(self, vm: dict[str, Any], *, hard: bool) -> None:
        self._async_task("Async.VM.hard_shutdown" if hard else "Async.VM.clean_shutdown")
        if vm["power_state"] == "Suspended":
            self._drop_suspend_image(vm["id"])
        host = vm["$container"]
        changes: dict[str, Any] = {key: None for key in RUNNING_ONLY_KEYS}
        changes.update({"power_state": "Halted", "addresses": {}, "os_version": NULL, "startTime": NULL,
                        "memory": {"dynamic": vm["memory"]["dynamic"], "static": vm["memory"]["static"],
                                   "size": vm["memory"]["dynamic"][1]},
                        "$container": self._halted_container(vm)})
        self.update(vm["id"], changes)
        if host in self._objects and self._objects[host]["type"] == "host":
            self._unlink(host, "residentVms", vm["id"])
        self._plug_devices(vm, False)

    def vm_snapshot(self, vm_id: str, name_label: str | None = None, *, description: str | None = None) -> str:
        """`vm.snapshot`: a VM-snapshot with a VDI-snapshot per disk, its VBDs and VIFs; returns its id."""
        vm = self.get_typed(vm_id, "VM")
        when = now_s()
        if name_label is None:
            stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            name_label = f"{vm['name_label']}_{stamp}"
        snap = {k: v for k, v in vm.items() if k not in RUNNING_ONLY_KEYS and k != "vulnerabilities"}
        snap.update(self._common())
        snap_id = snap["id"]
        snap.update({
            "type": "VM-snapshot", "addresses": {}, "name_label": name_label, "os_version": None,
            "power_state": "Halted", "snapshots": [], "startTime": None, "tags": list(vm["tags"]),
            "memory": {"dynamic": vm["memory"]["dynamic"], "static": vm["memory"]["static"],
                       "size": vm["memory"]["dynamic"][1]},
            "other": {**vm["other"], "mac_seed": str(uuid.uuid4())}, "VIFs": [], "$VBDs": [],
            "snapshot_time": when, "$snapshot_of": vm["id"], "$container": self._halted_container(vm),
        })
        if description is not None:
            snap["name_description"] = description
        self._async_task("Async.VM.snapshot", f"<value>{snap['_xapiRef']}</value>")
        # The new objects enter first, then those they change (each source disk and its SR, an ISO, the VM),
        # in the order of the recorded export frames.
        copies: list[tuple[dict[str, Any], dict[str, Any]]] = []
        isos: list[tuple[str, str]] = []
        for vbd_id in vm["$VBDs"]:
            vbd = self._objects.get(vbd_id)
            if vbd is None:
                continue
            new_vbd = {**vbd, **self._common(), "attached": False, "VM": snap_id}
            source = self._objects.get(vbd.get("VDI", ""))
            if source is not None and not vbd["is_cd_drive"]:
                copy = self._snapshot_vdi(source, when)
                new_vbd["VDI"] = copy["id"]
                copy["$VBDs"] = [new_vbd["id"]]
                self.add(copy)
                copies.append((source, copy))
            elif source is not None:
                isos.append((source["id"], new_vbd["id"]))
            self.add(new_vbd)
            snap["$VBDs"].append(new_vbd["id"])
        for vif_id in vm["VIFs"]:
            vif = self._objects.get(vif_id)
            if vif is not None:
                new_vif = {**vif, **self._common(), "attached": False, "$VM": snap_id}
                self.add(new_vif)
                # XO does not re-emit the network when a VIF comes or goes (recorded export frames)
                self._link(vif["$network"], "VIFs", new_vif["id"], announce=False)
                snap["VIFs"].append(new_vif["id"])
        self.add(order_vm_keys(snap))
        for source, copy in copies:
            self._count_vdi_snapshot(source, copy)
        for iso_id, vbd_id in isos:
            self._link(iso_id, "$VBDs", vbd_id)
        self._link(vm["id"], "snapshots", snap_id)
        return snap_id

    def _snapshot_vdi(self, source: dict[str, Any], when: int) -> dict[str, Any]:
        """A VDI-snapshot of `source`, not added yet; it reads what the disk holds now."""
        # Keys in XO's order: the VDI's own, then snapshot_time and $snapshot_of, then the common ones.
        copy = {k: v for k, v in source.items() if k not in COMMON_KEYS and k != "chainPhysicalUsage"}
        copy.update({"type": "VDI-snapshot", "snapshots": [], "tags": list(source["tags"]), "other_config": {},
                     "snapshot_time": when, "$snapshot_of": source["id"], **self._common()})
        spec = self._disk_specs.get(source["id"])
        if spec is not None:
            self._set_disk_spec(copy["id"], spec)
        return copy

    def _count_vdi_snapshot(self, source: dict[str, Any], copy: dict[str, Any]) -> None:
        """Link a new VDI-snapshot to its source and its SR."""
        self._link(source["id"], "snapshots", copy["id"])
        sr = self._objects[source["$SR"]]
        # The copy's usage counts on the SR as long as the copy exists (destroying it gives it back).
        self.update(sr["id"], {"VDIs": [*sr["VDIs"], copy["id"]], "usage": sr["usage"] + source["size"],
                               "physical_usage": sr["physical_usage"] + copy["usage"]})

    def vm_delete(self, vm_id: str, *, force: bool = False, delete_disks: bool = True,
                  bypass_blocked: bool | None = None, force_default_template: bool | None = None) -> None:
        """`vm.delete` (`VM_destroy`): hard shutdown if needed, then the VM, its snapshots and its disks
        (except disks another non-dom0 VM also uses). Blocked destroy → forbiddenOperation; a default
        template → incorrectState. `force` implies both bypasses, as in XO."""
        disks = self.vm_destroy(vm_id, force=force, bypass_blocked=bypass_blocked,
                                force_default_template=force_default_template)
        if delete_disks:
            self.destroy_vdis(disks)

    def vm_destroy(self, vm_id: str, *, force: bool = False, bypass_blocked: bool | None = None,
                   force_default_template: bool | None = None) -> list[str]:
        """`vm_delete` up to XAPI's `VM.destroy`: the VM, its VBDs, VIFs and snapshots (with their disks) go;
        returns the ids of its own disks, for `destroy_vdis` (XO destroys them once `VM.destroy` returned)."""
        vm = self.get_typed(vm_id, ("VM", "VM-snapshot", "VM-template"))
        blocked = vm["blockedOperations"].get("destroy")
        if blocked is not None and not (force if bypass_blocked is None else bypass_blocked):
            reason = "protected from accidental deletion" if blocked == "true" else blocked
            raise SimError.forbidden_operation(f"destroy is blocked: {reason}")
        if vm.get("isDefaultTemplate") and not (force if force_default_template is None else force_default_template):
            raise SimError.incorrect_state(actual=True, expected=False, obj=vm["uuid"], prop="isDefaultTemplate")
        if vm["power_state"] != "Halted":
            self._shutdown(vm, hard=True)
            vm = self._objects[vm["id"]]
        disks = [vbd["VDI"] for vbd in self._disk_vbds(vm)]
        self._async_task("Async.VM.destroy")
        self.remove(vm["id"])  # the recorded export frames list the VM first, then its devices
        for vbd_id in vm["$VBDs"]:
            vbd = self._objects.get(vbd_id)
            if vbd is not None:
                if "VDI" in vbd:
                    self._unlink(vbd["VDI"], "$VBDs", vbd_id)
                self.remove(vbd_id)
        for vif_id in vm["VIFs"]:
            vif = self._objects.get(vif_id)
            if vif is not None:
                self._unlink(vif["$network"], "VIFs", vif_id, announce=False)
                self.remove(vif_id)
        if "$snapshot_of" in vm:
            self._unlink(vm["$snapshot_of"], "snapshots", vm["id"])
        for snap_id in vm["snapshots"]:
            if snap_id in self._objects:
                self.vm_delete(snap_id, force=True)
        return disks

    def destroy_vdis(self, vdi_ids: list[str]) -> None:
        """XO's clean-up after `VM.destroy`: each of these disks that no other VM uses is destroyed (XO calls
        `Async.VDI.destroy` for all of them at once)."""
        vdis = [vdi for vdi in map(self._objects.get, vdi_ids) if vdi is not None and not self._used_elsewhere(vdi)]
        for _ in vdis:
            self._async_task("Async.VDI.destroy")
        for vdi in vdis:
            self._destroy_vdi(vdi, task=False)

    def _disk_vbds(self, vm: dict[str, Any]) -> list[dict[str, Any]]:
        """A VM's VBDs that hold a disk (not CD drives)."""
        vbds = [self._objects.get(vbd_id) for vbd_id in vm["$VBDs"]]
        return [v for v in vbds if v is not None and not v["is_cd_drive"] and v.get("VDI") in self._objects]

    def _used_elsewhere(self, vdi: dict[str, Any]) -> bool:
        """Whether another VM (not a dom0) still has this VDI in a VBD."""
        for vbd_id in vdi["$VBDs"]:
            vbd = self._objects.get(vbd_id)
            owner = self._objects.get(vbd["VM"]) if vbd is not None else None
            if owner is not None and owner["type"] != "VM-controller":
                return True
        return False

    # -- VM helpers ----------------------------------------------------------------------------------------

    def _guest(self, vm: dict[str, Any]) -> Guest:
        guest = self._guests.get(vm["id"])
        if guest is None:
            n = len(self._guests)
            guest = Guest(ip=f"10.0.99.{n % 250 + 2}", os_version=dict(inventory.GUEST_OSES[0][1]),
                          memory_usage=None)
            self._guests[vm["id"]] = guest
            self._journal({"op": "guest", "id": vm["id"], "guest": asdict(guest)})
        return guest

    def _pick_host(self, vm: dict[str, Any]) -> str:
        """Where a VM starts: the host of its local disks, else the least loaded host."""
        container = self._objects.get(vm["$container"])
        if container is not None and container["type"] == "host":
            return container["id"]
        hosts = self.by_type("host")
        return min(hosts, key=lambda h: len(h["residentVms"]))["id"]

    def _halted_container(self, vm: dict[str, Any]) -> str:
        """A halted VM's `$container`: the pool, or the host of the first local SR among its disks."""
        for vbd_id in vm["$VBDs"]:
            vbd = self._objects.get(vbd_id)
            vdi = self._objects.get(vbd.get("VDI", "")) if vbd is not None else None
            sr = self._objects.get(vdi["$SR"]) if vdi is not None else None
            if sr is not None and not sr["shared"] and sr["$container"] in self._objects:
                return sr["$container"]
        return self.pool_id

    def _plug_devices(self, vm: dict[str, Any], attached: bool) -> None:
        for dev_id in [*vm["$VBDs"], *vm["VIFs"]]:
            dev = self._objects.get(dev_id)
            if dev is not None and dev["attached"] != attached:
                self.update(dev_id, {"attached": attached})

    def _drop_suspend_image(self, vm_id: str) -> None:
        vdi_id = self._suspend_vdis.get(vm_id)
        if vdi_id is not None and vdi_id in self._objects:
            self._destroy_vdi(self._objects[vdi_id])
        self._set_suspend_vdi(vm_id, None)

    def _set_suspend_vdi(self, vm_id: str, vdi_id: str | None, *, persist: bool = True) -> None:
        if vdi_id is None:
            self._suspend_vdis.pop(vm_id, None)
        else:
            self._suspend_vdis[vm_id] = vdi_id
        if persist:
            self._journal({"op": "suspend", "id": vm_id, "vdi": vdi_id})


def parse_size(size: int | str) -> int:
    """XO's `parseSize`: an integer, or a human size such as "10G", "512 MiB", "1.5 GB" (powers of 1024)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*", size.lower())
    if match is None:
        raise SimError.invalid_parameters(message=f"invalid size: {size}")
    factor = 1024 ** " kmgtp".index(match.group(2) or " ")
    return int(math.floor(float(match.group(1)) * factor))


def iter_ndjson(objects: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    """Objects as NDJSON lines (compact JSON, one per line), as XO's `_createNdJsonStream`."""
    for obj in objects:
        yield json.dumps(obj, separators=(",", ":")).encode() + b"\n"
