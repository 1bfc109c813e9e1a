"""`xofs status [MOUNTPOINT] [--json]`: what a mount is doing, read from its `/.xofs/status.json`.

Without a mount point, every xofs mount in /proc/mounts is shown. On a terminal, live transfers get
progress bars that update in place until they are all done (or Ctrl-C; `--watch` goes on regardless);
otherwise the status is printed once, in plain lines. `--json` prints the status file itself (a list of
them when there are several mounts), for scripts.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from pathlib import Path
from typing import Any

from xofs.proc_mounts import mount_points

REFRESH = 0.5  # seconds between two redraws on a terminal
BAR = 24


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", nargs="?", type=Path, help="an xofs mount (default: every xofs mount)")
    p.add_argument("--json", action="store_true", help="print the status as JSON, once")
    p.add_argument("--watch", action="store_true", help="on a terminal, keep updating even with no transfer")


class StatusError(Exception):
    """The status of a mount cannot be read; the message says why in one line."""


def read_status(mountpoint: Path) -> dict[str, Any]:
    path = mountpoint / ".xofs" / "status.json"
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        if not mountpoint.is_dir():
            raise StatusError(f"{mountpoint} does not exist or is not a directory") from None
        raise StatusError(f"{mountpoint} is not an xofs mount (it has no .xofs/status.json)") from None
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise StatusError(f"the xofs daemon of {mountpoint} is gone: unmount it (fusermount3 -u "
                              f"{mountpoint})") from None
        raise StatusError(f"cannot read {path}: {err.strerror}") from None
    except ValueError:
        raise StatusError(f"{path} is not JSON") from None


def run(args: argparse.Namespace) -> int:
    mounts = [args.mountpoint] if args.mountpoint else mount_points("fuse.xofs")
    if not mounts:
        print("xofs status: no xofs mount", file=sys.stderr)
        return 1
    try:
        if args.json:
            statuses = [read_status(m) for m in mounts]
            print(json.dumps(statuses[0] if args.mountpoint else statuses, indent=2))
            return 0
        if sys.stdout.isatty():
            return _live(mounts, args.watch)
        print("\n".join(line for m in mounts for line in render(read_status(m), bars=False)))
    except StatusError as err:
        print(f"xofs status: {err}", file=sys.stderr)
        return 1
    return 0


def _live(mounts: list[Path], watch: bool) -> int:
    """Redraw in place until no transfer is left (or forever with `watch`); Ctrl-C ends it quietly."""
    drawn = 0
    previous: dict[str, tuple[float, int]] = {}
    try:
        while True:
            statuses = [read_status(m) for m in mounts]
            now = time.monotonic()
            for s in statuses:
                for t in s.get("transfers", []):
                    _instant_rate(t, previous, now)
            lines = [line for s in statuses for line in render(s, bars=True)]
            out = (f"\x1b[{drawn}F\x1b[J" if drawn else "") + "\n".join(lines) + "\n"
            sys.stdout.write(out)
            sys.stdout.flush()
            drawn = len(lines)
            if not watch and not any(s.get("transfers") for s in statuses):
                return 0
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
    words = [t["kind"], t["path"], t["phase"]]
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
