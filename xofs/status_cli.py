"""`xofs status [MOUNTPOINT…] [--json]`: what mounts are doing, read from their `/.xofs/status.json`.

Without a mount point, every xofs mount in /proc/mounts is shown; a path inside a mount shows that mount.
On a terminal, live transfers get progress bars that update in place until they are all done (or Ctrl-C;
`--watch` goes on regardless); otherwise the status is printed once, in plain lines. `--json` prints the
status file itself (a list of them unless one mount point was given), for scripts.

A mount whose status cannot be read gets one line saying why (on standard error; an entry with an `error`
in JSON), the others are shown all the same, and the exit status is 1. Each mount is read in a thread of
its own that is waited for `--timeout` seconds at most: a read on the mount of a stopped or stuck daemon
blocks in the kernel until the daemon answers, and this is the command run to look at such a daemon. A
thread left waiting so ends with the process.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from xofs.log_lines import one_line
from xofs.options import positive
from xofs.proc_mounts import mount_points

REFRESH = 0.5  # seconds between two redraws on a terminal
BAR = 24
TIMEOUT = 5.0  # seconds to wait for a daemon's answer: a healthy one answers in milliseconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoints", nargs="*", type=Path, metavar="MOUNTPOINT",
                   help="an xofs mount, or a path inside one (default: every xofs mount)")
    p.add_argument("--json", action="store_true", help="print the status as JSON, once")
    p.add_argument("--watch", action="store_true", help="on a terminal, keep updating even with no transfer")
    p.add_argument("--timeout", type=positive, default=TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for a daemon's answer (default {TIMEOUT:g})")


class StatusError(Exception):
    """The status of a mount cannot be read; the message says why in one line."""


def read_status(mountpoint: Path, mounts: list[Path] | None = None) -> dict[str, Any]:
    """The status file of the mount at `mountpoint`; `mounts`: the xofs mounts, if read already (to tell
    another user's mount from a private directory when the kernel refuses)."""
    path = mountpoint / ".xofs" / "status.json"
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):  # a file outside the mounts: not a directory
        if not mountpoint.exists():
            raise StatusError(f"{mountpoint} does not exist or is not a directory") from None
        raise StatusError(f"{mountpoint} is not an xofs mount (it has no .xofs/status.json)") from None
    except OSError as err:
        if err.errno == errno.EACCES:
            if not os.access(mountpoint.parent, os.X_OK):
                raise StatusError(f"{mountpoint} cannot be reached: a directory above it lets only its owner in "
                                  "(run xofs status as the mount's user)") from None
            if Path(os.path.abspath(mountpoint)) in (mount_points("fuse.xofs") if mounts is None else mounts):
                raise StatusError(f"{mountpoint} is another user's mount, made without --allow-other: only that "
                                  "user can look into it (run xofs status as them)") from None
            raise StatusError(f"{mountpoint} is not an xofs mount (its owner lets no one else in)") from None
        if err.errno == errno.ENOTCONN:
            raise StatusError(f"the xofs daemon of {mountpoint} is gone: unmount it (fusermount3 -u "
                              f"{mountpoint})") from None
        raise StatusError(f"cannot read {path}: {err.strerror}") from None
    except ValueError:
        raise StatusError(f"{path} is not JSON") from None


def mount_of(path: Path, mounts: list[Path]) -> Path | None:
    """The mount that holds `path`: the longest of `mounts` that is `path` or one of its parents."""
    holders = [m for m in mounts if m == path or m in path.parents]
    return max(holders, key=lambda m: len(m.parts), default=None)


class MountReader:
    """Reads the status of the mount that holds one path, in a daemon thread waited for `timeout` seconds.

    `mountpoint` is known at once when the path names a mount (or a path in one) as written, without
    asking any filesystem, so that a stuck daemon can be named; otherwise the thread resolves symbolic links
    first. A read still waiting is not started again: `outcome()` then says at once that it does not answer.
    """

    def __init__(self, path: Path, mounts: list[Path], timeout: float) -> None:
        self.path, self.mounts, self.timeout = path, mounts, timeout
        held = mount_of(Path(os.path.abspath(path)), mounts)
        self.mountpoint = held or path
        self._resolve = held is None
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._outcome: dict[str, Any] | StatusError = StatusError("not read yet")

    def start(self) -> None:
        if self._thread is None:
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._read, name=f"status of {self.mountpoint}", daemon=True)
            self._thread.start()

    def _read(self) -> None:
        try:
            if self._resolve:  # not in a mount as written: through symbolic links, maybe
                self._resolve = False
                self.mountpoint = mount_of(Path(os.path.realpath(self.path)), self.mounts) or self.path
            self._outcome = read_status(self.mountpoint, self.mounts)
        except StatusError as err:
            self._outcome = err

    def outcome(self) -> dict[str, Any] | StatusError:
        """The status, or the error saying why there is none; waits until `timeout` after the read began."""
        self.start()
        assert self._thread is not None
        self._thread.join(max(0.0, self._started + self.timeout - time.monotonic()))
        if self._thread.is_alive():
            return StatusError(not_answering(self.mountpoint, self.timeout))
        self._thread = None
        return self._outcome


def not_answering(mountpoint: Path, timeout: float) -> str:
    pid = daemon_pid(mountpoint)
    if pid is None:
        return f"the daemon of {mountpoint} does not answer within {timeout:g} s"
    said = f"the daemon of {mountpoint} (pid {pid}) does not answer within {timeout:g} s: "
    if _state(pid) in ("T", "t"):
        return said + f"it is stopped (kill -CONT {pid} resumes it)"
    return said + f"kill -USR1 {pid} writes where it waits to its log"


def daemon_pid(mountpoint: Path) -> int | None:
    """The pid of the daemon of a mount, found without asking the daemon: the parent of the `fusermount3`
    that libfuse leaves running for `auto_unmount` (every xofs mount has it), whose last argument is the
    mount point. Only the command lines of `fusermount3` processes are read: reading another process's
    command line can wait for its memory, and one faulting on the stuck mount would hang us."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                if f.read().strip() != "fusermount3":
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
            with open(f"/proc/{entry.name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if argv[-2:] == [b"--", os.fsencode(mountpoint)] and parent > 1:
            return parent
    return None


def _state(pid: int) -> str:
    """A process's state letter in /proc (R, S, D, T for stopped…), or "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:  # `xofs status | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


def _run(args: argparse.Namespace) -> int:
    mounts = mount_points("fuse.xofs")
    targets = args.mountpoints or list(dict.fromkeys(mounts))  # a mount point mounted over twice: once
    if not targets:
        print("xofs status: no xofs mount", file=sys.stderr)
        return 1
    readers = [MountReader(t, mounts, args.timeout) for t in targets]
    if not args.json and sys.stdout.isatty():
        return _live(readers, args.watch)
    for r in readers:
        r.start()  # all at once: several stuck daemons cost one timeout, not one each
    outcomes = [r.outcome() for r in readers]
    failed = False
    if args.json:
        entries = []
        for r, outcome in zip(readers, outcomes, strict=True):
            if isinstance(outcome, StatusError):
                print(f"xofs status: {outcome}", file=sys.stderr)
                failed = True
                outcome = {"mountpoint": str(r.mountpoint), "error": str(outcome)}
            entries.append(outcome)
        print(json.dumps(entries[0] if len(args.mountpoints) == 1 else entries, indent=2))
        return 1 if failed else 0
    for outcome in outcomes:
        if isinstance(outcome, StatusError):
            sys.stdout.flush()
            print(f"xofs status: {outcome}", file=sys.stderr)
            failed = True
        else:
            print("\n".join(render(outcome, bars=False)), flush=True)
    return 1 if failed else 0


def _live(readers: list[MountReader], watch: bool) -> int:
    """Redraw in place until no transfer is left (or forever with `watch`); Ctrl-C ends it quietly.
    A mount that cannot be read has its one line among the others; it makes the exit status 1."""
    drawn = 0
    previous: dict[str, tuple[float, int]] = {}
    try:
        while True:
            for r in readers:
                r.start()
            outcomes = [r.outcome() for r in readers]
            statuses = [s for s in outcomes if not isinstance(s, StatusError)]
            now = time.monotonic()
            for s in statuses:
                for t in s.get("transfers", []):
                    _instant_rate(t, previous, now)
            lines = [line for s in outcomes
                     for line in ([f"xofs status: {s}"] if isinstance(s, StatusError) else render(s, bars=True))]
            out = (f"\x1b[{drawn}F\x1b[J" if drawn else "") + "\n".join(lines) + "\n"
            sys.stdout.write(out)
            sys.stdout.flush()
            drawn = len(lines)
            if not watch and not any(s.get("transfers") for s in statuses):
                return 1 if len(statuses) < len(outcomes) else 0
            time.sleep(REFRESH)
    except KeyboardInterrupt:
        return 0


def _instant_rate(transfer: dict[str, Any], previous: dict[str, tuple[float, int]], now: float) -> None:
    """Between two redraws the rate is what moved since the last one (smoothed), not the average."""
    key, done = transfer["path"], transfer.get("done") or 0
    before = previous.get(key)
    previous[key] = (now, done)
    if before is None or now <= before[0]:
        return
    rate = (done - before[1]) / (now - before[0])
    if transfer.get("rate"):
        rate = 0.5 * rate + 0.5 * transfer["rate"]
    transfer["rate"] = rate
    size = transfer.get("size")
    transfer["eta"] = (size - done) / rate if rate > 0 and size is not None and size >= done else None


def render(status: dict[str, Any], *, bars: bool) -> list[str]:
    """The status of one mount as lines: the mount, the feed, the cache, transfers, recent errors."""
    if not status.get("mounted"):
        return ["xofs: this mount is not running"]
    feed, cache = status["feed"], status["cache"]
    lines = [f"{status['url']} on {status['mountpoint']} (pid {status['pid']}, up {_duration(status['uptime'])}, "
             f"credentials from {status['credentials']})"]
    last = feed.get("last_event_age")
    lines.append(f"  events: {feed['kind']}, {feed['state']} for {_duration(feed['since'])}, "
                 f"last event {'never' if last is None else _duration(last) + ' ago'}, "
                 f"{feed['reconnects']} reconnect(s), {feed['events']} event(s)")
    read = feed.get("last_read_age")  # absent from the status of an older daemon
    if not feed["connected"] and read is not None:
        failed = feed.get("poll_failures", 0)
        lines.append(f"  objects read {_duration(read)} ago ({feed.get('polls', 0)} read(s) while the feed was "
                     f"down{f', {failed} failed' if failed else ''})")
    counts = ", ".join(f"{n} {t}" for t, n in cache["by_type"].items() if n)
    lines.append(f"  cache: {cache['objects']} objects ({counts})")
    transfers = status.get("transfers", [])
    lines.append(f"  transfers: {len(transfers) or 'none'}")
    lines += ["    " + _transfer(t, bars) for t in sorted(transfers, key=lambda t: t["path"])]
    errors = status.get("errors", [])
    if errors:
        lines.append("  recent errors:")
        lines += [f"    {time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['level']} {e['message']}"
                  for e in errors[-5:]]
    return lines


def _transfer(t: dict[str, Any], bars: bool) -> str:
    done, size = t.get("done") or 0, t.get("size")
    words = [t["kind"], one_line(t["path"]), t["phase"]]
    if size:
        fraction = min(done / size, 1.0)
        approx = "" if t.get("size_exact", True) else "≤"
        progress = f"{_bytes(done)} / {approx}{_bytes(size)} {fraction:4.0%}"
        if bars:
            filled = int(fraction * BAR)
            progress = "[" + "#" * filled + "." * (BAR - filled) + "] " + progress
        words.append(progress)
    else:
        words.append(_bytes(done))
    if t.get("rate"):
        words.append(f"{_bytes(t['rate'])}/s")
    if t.get("eta") is not None:
        words.append(f"ETA {_duration(t['eta'])}")
    if t.get("opener"):
        words.append(one_line(t["opener"]))  # a process names itself: no control character reaches the terminal
    return "  ".join(words)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
