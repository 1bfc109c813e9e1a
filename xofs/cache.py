"""The in-memory copy of XO's objects that every listing and attribute is answered from.

Filled at start with one request per collection, then kept fresh by the `all` event feed. Every change
comes out as a `Change` (old and new object), which the tree turns into kernel invalidations. Objects of
types no view shows (tasks, messages, metrics) are not kept, and malformed objects are skipped with one
log line each, so a bad answer from the server can never take the mount down.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import orjson

from xofs.client.rest import item_problem

log = logging.getLogger(__name__)

# The one empty dict and the one empty list that every object with an empty field points at: XO objects
# have many (`tags`, `current_operations`, `VTPMs`…), 146,000 of them for 10,000 VMs.
_EMPTY: dict[type, dict | list] = {dict: {}, list: []}

# What an XO id may be, since it becomes a file name and part of a REST path: XO's are UUIDs,
# `<pool uuid>-<template uuid>`, or OpaqueRefs. Anything else (`..`, `a/b`, a newline, `?`, 3,000
# characters) would make a file name the kernel or the tools refuse, or a request for another path.
_SAFE_ID = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,199}")

# The REST collection that holds each XO type we keep (collections are single-type, xo-api.md §1.1).
COLLECTIONS: dict[str, str] = {
    "VM": "vms",
    "VM-snapshot": "vm-snapshots",
    "VDI": "vdis",
    "VDI-snapshot": "vdi-snapshots",
    "SR": "srs",
    "host": "hosts",
    "pool": "pools",
    "VBD": "vbds",
}
KEPT_TYPES = frozenset(COLLECTIONS)


@dataclass(frozen=True)
class Change:
    """One object's change: `old` is None for an added object, `new` is None for a removed one."""

    obj_id: str
    type: str
    old: dict | None
    new: dict | None

    def changed_fields(self) -> set[str]:
        """Top-level keys whose value differs (all keys of the object when it appeared or vanished)."""
        old, new = self.old or {}, self.new or {}
        return {k for k in old.keys() | new.keys() if old.get(k, _MISSING) != new.get(k, _MISSING)}


_MISSING = object()


def _json_of(value: object) -> bytes | None:
    """The JSON of a dict or list, which tells equal ones apart exactly (`1`, `1.0` and `true` are equal
    in Python, not in JSON); None when it has none (a lone surrogate)."""
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return None


def _share_values(container: dict | list, strings: dict[str, str], learn: bool) -> None:
    """Replace, in place and at any depth, each string by its equal in `strings` and each empty dict or
    list by the shared one; `learn` adds the strings `strings` does not hold yet."""
    for key, value in container.items() if type(container) is dict else enumerate(container):
        kind = type(value)
        if kind is str:
            shared = strings.setdefault(value, value) if learn else strings.get(value)
            if shared is not None and shared is not value:
                container[key] = shared
        elif kind is dict or kind is list:
            if value:
                _share_values(value, strings, learn)
            else:
                container[key] = _EMPTY[kind]


def valid_object(obj: object, obj_id: str | None = None) -> str | None:
    """Why `obj` cannot be kept, or None when it is a usable XO object (of any type)."""
    if not isinstance(obj, dict):
        return f"not an object ({type(obj).__name__})"
    oid = obj.get("id")
    if not isinstance(oid, str) or not _SAFE_ID.fullmatch(oid):
        return f"bad id {oid!r:.80}"
    if obj_id is not None and oid != obj_id:
        return f"id {oid!r} under key {obj_id!r:.80}"
    if not isinstance(obj.get("type"), str):
        return f"bad type {obj.get('type')!r:.80}"
    return item_problem(obj)  # the key types listings are checked for: events get the same checks


class ObjectCache:
    """XO objects by id, with a per-type index. Not thread-safe: used from the trio thread only.

    orjson shares the keys of the objects it parses, not their values: the ids objects point at (`$pool`,
    `$VBDs`, `VDI`…), enumerations and names are repeated in every object, some 48 MB of copies for 10,000
    VMs; and many fields hold the same dict or list in object after object (`bios_strings`, `memory`,
    `boot`…), some 20 MB more. The cache keeps one copy of each string value, of each such field (equal as
    JSON, so `1` and `true` stay apart) and of the empty dict and list, learned from each full read; events'
    objects are made to share them too. The objects stay what XO sent, value for value; since they share
    parts, nothing may change one in place (nothing does: a change is a new object).
    """

    def __init__(self) -> None:
        self._objects: dict[str, dict] = {}
        self._strings: dict[str, str] = {}  # every string value of the objects of the last full read
        self._containers: dict[bytes, dict | list] = {}  # fields several objects of it held, by their JSON
        self._by_type: dict[str, dict[str, dict]] = {t: {} for t in KEPT_TYPES}
        self.changed_at: dict[str, float] = {}  # last time each object changed, for st_mtime
        self.type_changed_at: dict[str, float] = {}  # last time an object of each type changed, came or went
        self.type_version: dict[str, int] = dict.fromkeys(KEPT_TYPES, 0)  # bumped on every change of a type
        self.loaded = False
        self.last_event = 0.0

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, obj_id: str) -> dict | None:
        return self._objects.get(obj_id)

    def of_type(self, type_: str) -> dict[str, dict]:
        """The live id → object map of one type (do not mutate it)."""
        return self._by_type.get(type_, {})

    def counts(self) -> dict[str, int]:
        return {t: len(objs) for t, objs in self._by_type.items()}

    def share_values(self, objects: Iterable[object]) -> None:
        """Make the objects of a full re-read share their string values, and the fields that several of them
        hold, with each other and with the cache, in place. Call it as each collection arrives, before
        `replace_all`: the copies it frees are then reused while the next collections are parsed (at the
        end, they would only leave holes in memory). Some 0.3 s per 10,000 VMs for the strings, 0.6 s for
        the fields (one orjson.dumps of each)."""
        fields: list[tuple[dict, str, bytes]] = []
        count: dict[bytes, int] = {}
        strings = self._strings
        for obj in objects:
            if type(obj) is not dict:
                continue
            for name, value in obj.items():
                kind = type(value)
                if kind is str:
                    shared = strings.setdefault(value, value)
                    if shared is not value:
                        obj[name] = shared
                elif kind is dict or kind is list:
                    if not value:
                        obj[name] = _EMPTY[kind]
                        continue
                    _share_values(value, strings, learn=True)
                    key = _json_of(value)
                    if key is not None:
                        fields.append((obj, name, key))
                        count[key] = count.get(key, 0) + 1
        for obj, name, key in fields:
            shared = self._containers.get(key)
            if shared is None and count[key] > 1:
                shared = self._containers[key] = obj[name]
            if shared is not None:
                obj[name] = shared

    def replace_all(self, objects: Iterable[dict]) -> list[Change]:
        """Swap in a full re-read (start, or resync after a reconnect); returns what differs from before."""
        fresh: dict[str, dict] = {}
        for obj in objects:
            problem = valid_object(obj)
            if problem:
                log.warning("skipping a malformed object from XO: %s", problem)
                continue
            if obj["type"] not in KEPT_TYPES:
                continue
            if obj["id"] in fresh:
                log.warning("XO listed object %s twice; keeping the last one", obj["id"])
            fresh[obj["id"]] = obj
        changes = [Change(i, o["type"], o, None) for i, o in self._objects.items() if i not in fresh]
        for obj_id, obj in fresh.items():
            old = self._objects.get(obj_id)
            if old is not None and old["type"] != obj["type"]:  # gone from one type, new in another
                changes.append(Change(obj_id, old["type"], old, None))
                old = None
            if old != obj:
                changes.append(Change(obj_id, obj["type"], old, obj))
        now = time.time()
        for change in changes:
            self._store(change, now)
        if self.loaded and changes:  # forget the strings only objects now gone had
            self._strings, self._containers = {}, {}
            self.share_values(self._objects.values())
        self.loaded = True
        return changes

    def apply(self, kind: str, items: object) -> list[Change]:
        """Apply one `all` notification (`enter`: added or updated; `exit`: removed, value 0)."""
        self.last_event = time.time()
        if not isinstance(items, dict) or kind not in ("enter", "exit"):
            log.warning("ignoring an event of kind %r with items of type %s", kind, type(items).__name__)
            return []
        changes: list[Change] = []
        for obj_id, obj in items.items():
            if kind == "exit":
                old = self._objects.get(obj_id)
                if old is not None:
                    changes.append(Change(obj_id, old["type"], old, None))
                continue
            problem = valid_object(obj, obj_id)
            if problem:
                log.warning("skipping a malformed object in an XO event: %s", problem)
                continue
            old = self._objects.get(obj_id)
            if obj["type"] not in KEPT_TYPES:
                if old is not None:  # the object changed type (a VM turned into a template): it left our view
                    changes.append(Change(obj_id, old["type"], old, None))
                continue
            if old is not None and old["type"] != obj["type"]:
                changes.append(Change(obj_id, old["type"], old, None))
                old = None
            if old != obj:
                _share_values(obj, self._strings, learn=False)  # between full reads the strings stay as learned
                for name, value in obj.items():
                    if type(value) is dict or type(value) is list:
                        shared = self._containers.get(_json_of(value) or b"")
                        if shared is not None:
                            obj[name] = shared
                changes.append(Change(obj_id, obj["type"], old, obj))
        now = time.time()
        for change in changes:
            self._store(change, now)
        return changes

    def _store(self, change: Change, now: float) -> None:
        """`now`: time.time(), one float for a whole batch (not 52,000 of them at start)."""
        self.type_version[change.type] += 1
        self.type_changed_at[change.type] = now
        if change.new is None:
            self._objects.pop(change.obj_id, None)
            self._by_type[change.type].pop(change.obj_id, None)
            self.changed_at.pop(change.obj_id, None)
        else:
            self._objects[change.obj_id] = change.new
            self._by_type[change.type][change.obj_id] = change.new
            self.changed_at[change.obj_id] = now

    def __iter__(self) -> Iterator[dict]:
        return iter(self._objects.values())
