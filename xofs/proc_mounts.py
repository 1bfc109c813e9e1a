"""What is mounted where, from /proc/mounts: the one reader of it for the daemon, the CLI and the tests."""

from __future__ import annotations

import os
from pathlib import Path

# /proc/mounts writes these four characters of a mount point as octal escapes (the kernel's `mangle`)
ESCAPES = {"\\040": " ", "\\011": "\t", "\\012": "\n", "\\134": "\\"}


def mount_points(fstype: str | None = None) -> list[Path]:
    """Every mount point (of one filesystem type, such as `fuse.xofs`, if given), as the kernel lists them."""
    found = []
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and (fstype is None or fields[2] == fstype):
                found.append(Path(unescape(fields[1])))
    return found


def unescape(field: str) -> str:
    for code, char in ESCAPES.items():
        field = field.replace(code, char)
    return field


def is_mounted(path: str | Path, fstype: str | None = None) -> bool:
    """Whether `path` is a mount point (of `fstype`, if given). Only its parent is resolved: looking at the
    mount point itself would ask the mounted filesystem, and a hung daemon would hang the caller."""
    return resolve_parent(path) in mount_points(fstype)


def resolve_parent(path: str | Path, depth: int = 0) -> Path:
    """`path` with its parent resolved, and itself if it is a symbolic link: `readlink` of a mount point
    is answered without asking the mounted filesystem, unlike `stat` or `realpath`."""
    path = Path(os.path.abspath(path))
    resolved = Path(os.path.realpath(path.parent)) / path.name
    try:
        target = os.readlink(resolved)
    except OSError:  # no link (or no such path)
        return resolved
    if depth > 40:  # a loop of links: ELOOP's limit
        return resolved
    return resolve_parent(resolved.parent / target, depth + 1)
