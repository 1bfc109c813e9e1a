"""`xofs mount` and `xofs umount`: the command line and the life of a mount.

Start-up checks everything that can fail before anything is mounted (token, mount point, server,
credentials) and says what went wrong in one line. Then the cache is filled, the mount goes live, and
one trio nursery owns every background task (event feed, export and import work); SIGTERM or SIGINT, or
`fusermount3 -u`, unmounts cleanly. Without `--foreground` the daemon detaches once the mount is live and
the command exits 0 (or non-zero, with the reason, if it never got there).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from xofs.cache import Change, ObjectCache
from xofs.client.events import EventFeed
from xofs.client.rest import RestClient
from xofs.errors import XoAuthError, XofsError
from xofs.exports import ExportManager
from xofs.fs import Freshness, XoFS
from xofs.imports import ImportManager
from xofs.invalidator import Invalidator
from xofs.sync import Syncer
from xofs.tree import Tree
from xofs.views import load_views

log = logging.getLogger("xofs")


def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="the XO server, e.g. https://xo.example.org")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--token-file", type=Path, help="file holding an XO authentication token "
                   "(otherwise the XOFS_TOKEN environment variable)")
    p.add_argument("--foreground", "-f", action="store_true", help="stay attached to the terminal")
    p.add_argument("--read-only", action="store_true", help="refuse every write, imports included")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="FUSE mount options, comma-separated (e.g. allow_other)")
    p.add_argument("--state-dir", type=Path, help="where xofs keeps what must outlive a mount "
                   "(default $XOFS_STATE_DIR, else $XDG_STATE_HOME/xofs)")
    p.add_argument("--spool-dir", type=Path, help="local scratch space for exports read out of order "
                   "and for imports (default: <state dir>/spool)")
    p.add_argument("--attr-ttl", type=float, default=60.0, help="kernel cache lifetime while XO events "
                   "flow, seconds (default 60)")
    p.add_argument("--fallback-ttl", type=float, default=1.0, help="kernel cache lifetime while the event "
                   "feed is down, seconds (default 1)")
    p.add_argument("--max-exports", type=int, default=4, help="concurrent exports per server (default 4)")
    p.add_argument("--max-uploads", type=int, default=2, help="concurrent imports (default 2)")
    p.add_argument("--log-level", default=os.environ.get("XOFS_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default INFO, or $XOFS_LOG_LEVEL)")
    p.add_argument("--log-file", type=Path, help="log here (default: standard error in the foreground, "
                   "<state dir>/xofs.log once detached)")


def add_umount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", type=Path)


def run_umount(args: argparse.Namespace) -> int:
    proc = subprocess.run(["fusermount3", "-u", str(args.mountpoint)], stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        print(f"xofs umount: {proc.stderr.strip() or 'fusermount3 failed'}", file=sys.stderr)
    return proc.returncode


class StartupError(Exception):
    """Something that keeps the mount from starting; its message is the one line the user sees."""


def read_token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except OSError as err:
            raise StartupError(f"cannot read the token file {args.token_file}: {err.strerror}") from None
        if not token:
            raise StartupError(f"the token file {args.token_file} is empty")
        return token
    token = os.environ.get("XOFS_TOKEN", "").strip()
    if not token:
        raise StartupError("no XO token: pass --token-file FILE or set XOFS_TOKEN")
    return token


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def check_mountpoint(path: Path) -> None:
    if not path.exists():
        raise StartupError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise StartupError(f"mount point {path} is not a directory")
    if is_mounted(path):
        raise StartupError(f"{path} is already a mount point (unmount it first: fusermount3 -u {path})")


def state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return args.state_dir
    if os.environ.get("XOFS_STATE_DIR"):
        return Path(os.environ["XOFS_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "xofs"


def fuse_options(args: argparse.Namespace) -> set[str]:
    options = {"fsname=xofs", "subtype=xofs", "auto_unmount", "default_permissions"}
    if args.read_only:
        options.add("ro")
    for group in args.options:
        options.update(o.strip() for o in group.split(",") if o.strip())
    return options


_configured_level = "INFO"


def setup_logging(level: str, log_file: Path | None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Until the mount is live only warnings are shown, so a failed start says one line, not a retry log.
    root.setLevel(max(logging.getLevelName(level.upper()), logging.WARNING))
    global _configured_level
    _configured_level = level.upper()
    for noisy in ("httpx", "httpcore", "trio-websocket", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_mount(args: argparse.Namespace) -> int:
    try:
        token = read_token(args)
        check_mountpoint(args.mountpoint)
    except StartupError as err:
        print(f"xofs: {err}", file=sys.stderr)
        return 2
    if args.foreground:
        setup_logging(args.log_level, args.log_file)
        return _run(args, token, ready_fd=None)
    return _daemonize(args, token)


def _daemonize(args: argparse.Namespace, token: str) -> int:
    """Fork; the parent exits 0 once the child says the mount is live, or prints why it is not."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace").strip()
        if message == "ok":
            return 0
        print(message or "xofs: the mount daemon died before the mount was live", file=sys.stderr)
        return 1
    os.close(read_fd)
    os.setsid()
    log_file = args.log_file or state_dir(args) / "xofs.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    setup_logging(args.log_level, log_file)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    code = _run(args, token, ready_fd=write_fd)
    os._exit(code)


def _report(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        if message != "ok":
            print(message, file=sys.stderr)
        return
    os.write(ready_fd, message.encode())
    os.close(ready_fd)
    if message == "ok":
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)


def _run(args: argparse.Namespace, token: str, ready_fd: int | None) -> int:
    try:
        trio.run(_serve, args, token, ready_fd)
    except StartupError as err:
        _report(ready_fd, f"xofs: cannot mount {args.url}: {err}")
        return 1
    return 0


@dataclass
class MountOptions:
    """Everything that shapes a mount besides the server and the token."""

    state_dir: Path
    spool_dir: Path | None = None
    attr_ttl: float = 60.0
    fallback_ttl: float = 1.0
    read_only: bool = False
    max_exports: int = 4
    max_uploads: int = 2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MountOptions:
        return cls(state_dir=state_dir(args), spool_dir=args.spool_dir, attr_ttl=args.attr_ttl,
                   fallback_ttl=args.fallback_ttl, read_only=args.read_only, max_exports=args.max_exports,
                   max_uploads=args.max_uploads)


@dataclass
class Parts:
    """A mount's pieces, wired together; `running()` runs their background work."""

    url: str
    client: RestClient
    cache: ObjectCache
    tree: Tree
    fs: XoFS
    syncer: Syncer
    feed: EventFeed
    exports: ExportManager
    imports: ImportManager
    invalidator: Invalidator

    @asynccontextmanager
    async def running(self, *, load_only: bool = False) -> AsyncIterator[trio.Nursery]:
        """Start the services, fill the cache (from the event feed, or with one plain load), yield the
        nursery that owns them, and stop everything on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.exports.run)
                await nursery.start(self.imports.run)
                if load_only:
                    await self.syncer.load()
                else:
                    await self._start_feed(nursery)
                try:
                    yield nursery
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.client.aclose()

    async def _start_feed(self, nursery: trio.Nursery) -> None:
        try:
            with trio.fail_after(15):
                await nursery.start(self.feed.run)
        except trio.TooSlowError:
            # The REST API works but the event feed does not (yet): serve from a plain load with short
            # kernel cache lifetimes while the feed keeps trying.
            log.warning("XO event feed not available after 15 s; kernel caches last %.0f s until it is",
                        self.fs.freshness.fallback_ttl)
            await self.syncer.load()
            nursery.start_soon(self.feed.run)
        except XoAuthError as err:
            raise StartupError(f"the event feed refused the token: {err.describe()}") from None


def assemble(url: str, token: str, options: MountOptions) -> Parts:
    """Build and wire every piece of a mount (nothing runs yet, nothing is mounted)."""
    url = url.rstrip("/")
    client = RestClient(url, token)
    cache = ObjectCache()
    freshness = Freshness(connected_ttl=options.attr_ttl, fallback_ttl=options.fallback_ttl)
    invalidator = Invalidator()
    spool = options.spool_dir or options.state_dir / "spool"
    server_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    # The services need to reach the filesystem's invalidation queue, which exists only once the
    # filesystem does: they get a late-bound callback.
    fs_ref: list[XoFS] = []
    exports = ExportManager(client, cache, spool_dir=spool / "exports", max_exports=options.max_exports,
                            on_size_known=lambda export: fs_ref[0].export_size_known(export))
    imports = ImportManager(client, cache, state_dir=options.state_dir, spool_dir=spool / "imports",
                            server_key=server_key, max_uploads=options.max_uploads, read_only=options.read_only,
                            notify=lambda sr_id, names: fs_ref[0].import_entries_changed(sr_id, names))
    tree = Tree(cache, load_views(), imports)
    fs = XoFS(tree, exports=exports, imports=imports, invalidator=invalidator, freshness=freshness,
              read_only=options.read_only)
    fs_ref.append(fs)

    def on_changes(changes: list[Change]) -> None:
        exports.on_changes(changes)
        imports.on_changes(changes)

    syncer = Syncer(client, cache, tree, freshness, fs.apply_invalidations, on_changes=on_changes)
    feed = EventFeed(url, token, syncer)
    return Parts(url, client, cache, tree, fs, syncer, feed, exports, imports, invalidator)


async def _serve(args: argparse.Namespace, token: str, ready_fd: int | None) -> None:
    parts = assemble(args.url, token, MountOptions.from_args(args))
    try:
        await parts.client.check()
    except XoAuthError as err:
        await parts.client.aclose()
        raise StartupError(f"{err.describe()} (check the token)") from None
    except XofsError as err:
        await parts.client.aclose()
        raise StartupError(err.describe()) from None

    async with parts.running() as nursery:
        pyfuse3.init(parts.fs, str(args.mountpoint), fuse_options(args))
        try:
            parts.invalidator.start()
            nursery.start_soon(_terminate_on_signals)
            logging.getLogger().setLevel(_configured_level)
            log.info("mounted %s on %s (%d objects)", parts.url, args.mountpoint, len(parts.cache))
            _report(ready_fd, "ok")
            await pyfuse3.main()
        finally:
            parts.invalidator.stop()
            pyfuse3.close(unmount=True)
    log.info("unmounted %s", args.mountpoint)


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
