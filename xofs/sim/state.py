"""What the simulator keeps across restarts (`xofs sim --state-dir DIR`).

The inventory itself is never saved: it is rebuilt from `--seed` and `--vms`. The state directory holds what
changed since, as a journal of the model's own mutations, in order, one JSON object a line:

- `{"op": "add", "obj": {...}}`, `{"op": "update", "id": ..., "changes": {...}}` (a null value removes the
  key), `{"op": "remove", "id": ...}`: XO objects;
- `{"op": "token", "token": {...}}`: a token record created or changed;
- `{"op": "disk", "id": <vdi>, "spec": {...}}`: where a VDI's content comes from (a generated disk, or a
  file under `disks/`);
- `{"op": "guest", "id": <vm>, "guest": {...}}` and `{"op": "suspend", "id": <vm>, "vdi": <vdi> | null}`:
  hidden facts about VMs.

Replaying the same seed, then this journal, gives the same state. `meta.json` records the seed and VM count
the journal applies to; starting with others is refused rather than mixing two inventories.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

FORMAT = 1


class StateMismatch(Exception):
    """The state directory was made for another seed or VM count."""


class StateStore:
    """The journal of one state directory (created if missing)."""

    def __init__(self, directory: Path, *, seed: int, vms: int) -> None:
        self.directory = directory
        self.disks_dir = directory / "disks"
        self.disks_dir.mkdir(parents=True, exist_ok=True)
        self.journal_path = directory / "journal.jsonl"
        meta_path = directory / "meta.json"
        meta = {"format": FORMAT, "seed": seed, "vms": vms}
        if meta_path.exists():
            saved = json.loads(meta_path.read_text())
            if saved != meta:
                raise StateMismatch(
                    f"{directory} holds the state of `--seed {saved.get('seed')} --vms {saved.get('vms')}` "
                    f"(format {saved.get('format')}), not of `--seed {seed} --vms {vms}`")
        else:
            meta_path.write_text(json.dumps(meta) + "\n")
        self._journal: TextIO | None = None

    def entries(self) -> Iterator[dict[str, Any]]:
        """The saved changes, oldest first. A torn last line (a crash mid-write) is ignored."""
        if not self.journal_path.exists():
            return
        with self.journal_path.open() as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    return

    def append(self, entry: dict[str, Any]) -> None:
        if self._journal is None:
            # it holds the tokens made (`token.create`): the simulator's user's alone
            self._journal = open(os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a")
        self._journal.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._journal.flush()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
