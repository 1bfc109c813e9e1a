"""What xofs remembers of finished imports, so they stay listed across remounts.

After an import the entry keeps the size, mtime and mode its writer gave it; that is what lets a second
`rsync -a` or `cp -u` see an up-to-date file and transfer nothing. One JSON file per server and SR under
the state directory (`<state>/imports/<server>/<sr-uuid>.json`), rewritten atomically on every change; mounts
that share the state directory each rewrite only their own records.
Nothing here is needed for correctness in XO: losing it only makes the next rsync import again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

VERSION = 1
LOCK_WAIT = 1.0  # seconds a save waits for another mount's lock: it runs on the trio thread


@dataclass
class ImportRecord:
    """A finished import: the VDI it made and the attributes the writer gave the file."""

    vdi: str
    size: int
    mtime_ns: int
    mode: int
    name_description: str | None = None


def server_dir_name(server_key: str) -> str:
    """A directory name for a server: readable, and unique through a hash of the whole key."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", server_key).strip("_")[:60]
    return f"{readable}-{hashlib.sha256(server_key.encode()).hexdigest()[:12]}"


class ImportStore:
    def __init__(self, state_dir: Path, server_key: str) -> None:
        self.directory = state_dir / "imports" / server_dir_name(server_key)

    def _path(self, sr_id: str) -> Path:
        return self.directory / f"{sr_id}.json"

    def load(self, sr_id: str) -> dict[str, ImportRecord]:
        """The records of one SR (none if the file is missing or unreadable, which is logged)."""
        path = self._path(sr_id)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("ignoring the import records in %s: %s", path, err)
            return {}
        records: dict[str, ImportRecord] = {}
        entries = data.get("entries") if isinstance(data, dict) and data.get("version") == VERSION else None
        if not isinstance(entries, dict):
            log.warning("ignoring the import records in %s: not a version %d file", path, VERSION)
            return {}
        for name, fields in entries.items():
            try:
                records[name] = ImportRecord(**fields)
            except TypeError as err:
                log.warning("ignoring the import record of %r in %s: %s", name, path, err)
        return records

    def save(self, sr_id: str, records: dict[str, ImportRecord], *, known: Collection[str] = ()) -> None:
        """Write the SR's records of this mount: `records` replace those of the names in `known` (every
        name the mount had as an import), and the file's other records stay. Two mounts of one XO that share
        a state directory each keep theirs (a plain replace dropped the other's: its next `cp -u` imported
        again). Atomic, under a lock on the directory (waited for at most LOCK_WAIT, then done without it); a
        failure is logged, not raised (module docstring)."""
        path = self._path(sr_id)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / ".lock", "a") as lock:
                _lock(lock, path)
                others = {n: r for n, r in self.load(sr_id).items() if n not in known and n not in records}
                merged = {**others, **records}
                if not merged:
                    path.unlink(missing_ok=True)
                    return
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                body = {"version": VERSION, "entries": {n: asdict(r) for n, r in sorted(merged.items())}}
                tmp.write_text(json.dumps(body, indent=1))
                os.replace(tmp, path)
        except OSError as err:
            log.warning("cannot save the import records in %s: %s", path, err)


def _lock(lock: IO[str], path: Path) -> None:
    """Take the directory's lock, waiting at most LOCK_WAIT: a mount that holds it while stopped (SIGSTOP,
    a debugger) must not hang this one, whose every FUSE request waits while a save does."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                log.warning("saving the import records in %s without a lock: another process has held %s for "
                            "over %.0f s", path, lock.name, LOCK_WAIT)
                return
            time.sleep(0.01)
        except OSError as err:  # a network filesystem without locks (ENOLCK): save unlocked
            log.debug("saving the import records in %s without a lock: %s", path, err.strerror)
            return
