"""Turning XO's free-form names into safe, stable, unique file names.

XO lets a `name_label` hold anything: `/`, NUL, control characters, a lone `.` or `..`, leading dots, or
thousands of bytes. The mapping (documented in docs/semantics.md, "Names"):

- `/` becomes `／` (U+FF0F FULLWIDTH SOLIDUS), as rclone does;
- NUL and other control characters C become the control picture U+2400+C (`␀`, `␊`, …), DEL becomes `␡`;
- a leading `.` becomes `．` (U+FF0E FULLWIDTH FULL STOP), so no entry is hidden, `.` or `..`;
- an empty name becomes `unnamed`; characters that cannot be encoded (lone surrogates) become `�`;
- a name longer than 255 bytes in UTF-8 is cut at a character boundary and gets `~<8 hex of the uuid>`;
- names that collide within one directory all get `~<8 hex of the uuid>` (the full uuid if even that
  collides), so each name stays the same whatever order XO lists the objects in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

NAME_MAX = 255  # bytes, the limit of Linux file names
_SUFFIX_LEN = 9  # "~" + 8 hex digits


def _char(c: str) -> str:
    code = ord(c)
    if c == "/":
        return "／"
    if code < 0x20:
        return chr(0x2400 + code)
    if code == 0x7F:
        return "␡"
    if 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    return c


def safe_name(label: object) -> str:
    """The file-name form of one label (not yet made unique or cut to length)."""
    text = label if isinstance(label, str) else ("" if label is None else str(label))
    name = "".join(_char(c) for c in text)
    if name.startswith("."):
        name = "．" + name[1:]
    return name or "unnamed"


def _fits(name: str, limit: int = NAME_MAX) -> bool:
    return len(name.encode("utf-8")) <= limit


def _cut(name: str, limit: int) -> str:
    """The longest prefix of `name` that takes at most `limit` bytes in UTF-8."""
    encoded = name.encode("utf-8")[:limit]
    return encoded.decode("utf-8", "ignore")


def _with_suffix(base: str, suffix: str, limit: int) -> str:
    return _cut(base, limit - len(suffix.encode("utf-8"))) + suffix


def unique_names(items: Iterable[tuple[str, object]], extension: str = "") -> dict[str, str]:
    """Map each `(object id, label)` to a safe name, unique among them: returns id → name.

    `extension` (like ".vhd") is appended after any suffix and counts against the length limit.
    """
    limit = NAME_MAX - len(extension.encode("utf-8"))
    wanted: dict[str, str] = {}
    for obj_id, label in items:
        base = safe_name(label)
        if not _fits(base, limit):
            base = _with_suffix(base, "~" + obj_id[:8], limit)
        wanted[obj_id] = base
    groups: dict[str, list[str]] = defaultdict(list)
    for obj_id, base in wanted.items():
        groups[base].append(obj_id)
    result: dict[str, str] = {}
    taken: set[str] = set()
    # Names nobody else wants go first, so a suffixed name can never steal one of them.
    for base, ids in sorted(groups.items(), key=lambda kv: len(kv[1]) > 1):
        for obj_id in sorted(ids):
            name = base
            if len(ids) > 1:
                name = _with_suffix(base, "~" + obj_id[:8], limit)
            n = 1
            while name in taken:  # only for labels that copy another name's suffix
                name = _with_suffix(base, f"~{obj_id}" + (f"~{n}" if n > 1 else ""), limit)
                n += 1
            taken.add(name)
            result[obj_id] = name + extension
    return result
