"""The options of `xofs mount`: each is a `--name` flag and also `-o name=value` (fstab's way).

`OPTIONS` is the one list: it makes the argparse flags and maps `-o` words onto them. A flag given on the
command line wins over the same option in `-o`. Other `-o` words are either passed to FUSE (the VFS flags
`nosuid`, `nodev`, `noexec`, `noatime`…), ignored because they are mount(8)'s own (`_netdev`, `nofail`,
`noauto`, `defaults`, `x-*`…), or refused with a message naming them, never silently dropped. A secret is
never an option: `-o token=…` is refused (command lines are world-readable in /proc).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xofs.proc_mounts import resolve_parent

# mount(8)'s own options, which reach a helper but mean nothing to the filesystem.
MOUNT_ONLY = frozenset({"_netdev", "nofail", "noauto", "auto", "user", "nouser", "users", "owner", "group",
                        "defaults", "rw", "loud", "silent",
                        # access times, which xofs never changes; libfuse refuses these two (helper 44)
                        "nodiratime", "strictatime",
                        # how a disk file system keeps its times and change counters: nothing to xofs (helper 47)
                        "lazytime", "nolazytime", "iversion", "noiversion"})
MOUNT_ONLY_PREFIXES = ("x-", "comment=")
# Options libfuse and the kernel understand, passed through as they are.
FUSE_FLAGS = frozenset({"default_permissions", "auto_unmount", "nosuid", "suid", "nodev", "dev", "noexec",
                        "exec", "noatime", "atime", "relatime", "sync", "async",
                        "dirsync", "allow_root"})
SECRETS = frozenset({"token", "password", "pass", "xo_token"})


class OptionError(Exception):
    """A bad option; the message is the one line the user sees."""


class BadValue(ValueError, argparse.ArgumentTypeError):
    """A value an option cannot take; the message says why (argparse shows it for --flags, and `-o` too)."""


def octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise BadValue(f"{text!r} is not an octal umask (such as 022 or 077)") from None
    if not 0 <= value <= 0o777:
        raise BadValue(f"{text} is not a umask (000 to 777, octal)")
    return value


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadValue(f"{text!r} is not a number") from None
    if not math.isfinite(value):  # "nan" and "inf" parse, and inf would reach status.json as `Infinity`
        raise BadValue(f"{text!r} is not a finite number")
    return value


def positive(text: str) -> float:
    value = number(text)
    if not value > 0:
        raise BadValue(f"{text} is not a positive number")
    return value


def non_negative(text: str) -> float:
    value = number(text)
    if not value >= 0:
        raise BadValue(f"{text} is negative")
    return value


def whole_number(least: int, most: int | None = None) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise BadValue(f"{text!r} is not a whole number") from None
        if value < least:
            raise BadValue(f"{text} is less than {least}")
        if most is not None and value > most:
            raise BadValue(f"{text} is more than {most}")
        return value

    check.__name__ = "whole number"
    return check


count = whole_number(1)  # slots: with none, every read or import would wait for ever
user_id = whole_number(0, (1 << 32) - 2)  # (uid_t)-1 means "no change" to the kernel; above, every stat failed


def byte_size(text: str) -> int:
    """`8G`, `512M`, `100000`: powers of 1024, more than 0."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    plain = text.strip().upper().removesuffix("B").removesuffix("I")
    digits, unit = (plain[:-1], plain[-1]) if plain and plain[-1] in units else (plain, "")
    try:
        value = int(float(digits) * units[unit])
    except (ValueError, OverflowError):  # OverflowError: "inf", "1e400"
        raise BadValue(f"{text!r} is not a size (such as 20G, 512M or 100000)") from None
    if value <= 0:
        raise BadValue(f"{text} is not a size larger than 0")
    return value


def readahead_size(text: str) -> int:
    """A `byte_size` of at least 2 MiB (export_stream.MIN_READAHEAD, not imported here: this module stays
    free of the daemon's imports): two of the kernel's 1 MiB reads of an export file."""
    value = byte_size(text)
    if value < 2 << 20:
        raise BadValue(f"{text} is less than 2M (two of the kernel's 1 MiB reads)")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in allowed:
            raise BadValue(f"{text!r} is not one of {', '.join(allowed)}")
        return text

    check.__name__ = "choice"
    return check


@dataclass(frozen=True)
class Option:
    name: str  # as in -o (underscores); the flag is --name with dashes
    help: str
    type: Callable[[str], Any] | None = str  # None: a switch, `-o name` alone
    default: Any = None
    metavar: str | None = None
    shown: str | None = None  # the default as --help shows it ("" when the help says it already)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS = [
    Option("token_file", "file holding the XO token (mode 0600)", Path, metavar="FILE"),
    Option("basic_file", "file holding `user:password`, exchanged for a session token at start (mode 0600)",
           Path, metavar="FILE"),
    Option("ca_file", "CA certificate(s) to check XO's TLS certificate against (XOA's self-signed one, say)",
           Path, metavar="FILE"),
    Option("insecure", "do not check XO's TLS certificate at all (dangerous; warned about at every start)", None),
    Option("events", "event source: the JSON-RPC `all` feed, or XO's REST event stream (XO 5.113+)",
           choice("jsonrpc", "sse"), "jsonrpc", metavar="jsonrpc|sse"),
    Option("read_only", "refuse every write, imports included", None),
    Option("uid", "owner shown for every file (default: the user who mounts)", user_id),
    Option("gid", "group shown for every file (default: the mounting user's group)", user_id),
    Option("umask", "permission bits to take away, octal (default 077: only the owner gets in; 022 with "
           "allow_other)", octal, None, "OCTAL"),
    Option("allow_other", "let other users in (implies default_permissions; needs user_allow_other in "
           "/etc/fuse.conf unless root)", None),
    Option("attr_ttl", "kernel cache lifetime while XO events flow, seconds", non_negative, 60.0, "SECONDS"),
    Option("fallback_ttl", "kernel cache lifetime while the event feed is down, seconds", non_negative, 1.0,
           "SECONDS"),
    Option("state_dir", "where xofs keeps what must outlive a mount (default $XOFS_STATE_DIR, else "
           "$XDG_STATE_HOME/xofs, else ~/.local/state/xofs)", Path, metavar="DIR"),
    Option("spool_dir", "scratch space for exports read out of order and for imports (default: <state "
           "dir>/spool)", Path, metavar="DIR"),
    Option("spool_size", "most disk the export spool may use, e.g. 20G", byte_size, 8 << 30, "SIZE", "8G"),
    Option("max_exports", "concurrent exports", count, 4, "N"),
    Option("readahead", "how far an export is received ahead of its reader, shared among the exports "
           "streaming at once (each gets at least 2M); memory per open export file: this plus 7 MiB at most "
           "(9 over HTTPS)",
           readahead_size, 8 << 20, "SIZE", "8M"),
    Option("max_uploads", "concurrent imports", count, 2, "N"),
    Option("import_wait", "at unmount, how long running imports get to finish, seconds", non_negative, 30.0,
           "SECONDS"),
    Option("connect_timeout", "seconds to connect to XO", positive, 10.0, "SECONDS"),
    Option("read_timeout", "seconds XO may stay silent during a request", positive, 60.0, "SECONDS"),
    Option("poll_interval", "while the event feed is down, read XO's objects again every this many seconds "
           "(0: never; the mount then shows what it last knew until the feed is back)", non_negative, 30.0,
           "SECONDS"),
    Option("keepalive", "seconds between checks that the event connection is alive: a silent one is taken for "
           "dead within twice that (with --events sse, never under 75 s, as XO pings every 30 s)",
           positive, 30.0, "SECONDS"),
    Option("log_level", "DEBUG, INFO, WARNING or ERROR (default $XOFS_LOG_LEVEL, else INFO)",
           choice("DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"),
           os.environ.get("XOFS_LOG_LEVEL", "INFO"), "LEVEL", ""),
    Option("log_file", "log here (default: standard error in the foreground, <state dir>/xofs.log once "
           "detached)", Path, metavar="FILE"),
    Option("syslog", "log to syslog (the journal under systemd) instead of a file", None),
    Option("syslog_socket", "the syslog socket", Path, Path("/dev/log"), "PATH"),
]
BY_NAME = {o.name: o for o in OPTIONS}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option as a flag; defaults stay None here so that `resolve` can tell what was given."""
    for option in OPTIONS:
        shown = option.shown if option.shown is not None else "" if option.default is None else str(option.default)
        default = f" (default {shown})" if shown and option.type is not None else ""
        if option.type is None:
            p.add_argument(option.flag, action="store_const", const=True, default=None, help=option.help)
        else:
            p.add_argument(option.flag, type=option.type, default=None, metavar=option.metavar,
                           help=option.help + default)
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="options as mount -o takes them, comma-separated: any of the above as name=value "
                        "(allow_other, token_file=/etc/xofs/token…), FUSE flags (nosuid, noatime…)")


def resolve(args: argparse.Namespace, *, sloppy: bool = False) -> set[str]:
    """Fill every option of `args` (flag, else `-o`, else default); returns the FUSE flags to pass on.

    Raises `OptionError` for an unknown word (unless `sloppy`, mount's `-s`), a bad value, or a secret.
    """
    given: dict[str, Any] = {}
    fuse: set[str] = set()
    for group in args.options:
        for word in (w.strip() for w in group.split(",")):
            if not word or word in MOUNT_ONLY or word.startswith(MOUNT_ONLY_PREFIXES):
                continue
            name, sep, value = word.partition("=")
            key = name.replace("-", "_")
            if key in SECRETS:
                raise OptionError(f"-o {name}=… refused: a secret on the command line is visible to every user "
                                  "(ps); put it in a file and use token_file=FILE")
            if key == "ro":
                given["read_only"] = True
            elif key in BY_NAME:
                given[key] = _convert(BY_NAME[key], value if sep else None, word)
            elif word in FUSE_FLAGS:
                fuse.add(word)
            elif not sloppy:
                raise OptionError(f"unknown mount option {word!r} (see xofs mount --help)")
    for option in OPTIONS:
        if getattr(args, option.name) is None:
            default = option.default if option.type is not None else False
            setattr(args, option.name, given.get(option.name, default))
    return fuse


# Variables of the environment that name files the daemon reads after it started (saved searches, stored
# tokens and xo-cli's configuration under the config home, the state directory).
PATH_VARIABLES = ("XOFS_STATE_DIR", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XOFS_SAVED_SEARCHES")


def pin_paths(args: argparse.Namespace, env: MutableMapping[str, str]) -> None:
    """Make every path among the options, the mount point and `PATH_VARIABLES` absolute, against the
    current directory: a detached daemon then leaves it (`chdir("/")`), so as not to keep the filesystem
    it was started from busy, and reads some of these files much later (a token file on a 401)."""
    for option in OPTIONS:
        value = getattr(args, option.name)
        if isinstance(value, Path):
            setattr(args, option.name, Path(os.path.abspath(value)))
    args.mountpoint = resolve_parent(args.mountpoint)  # a symbolic link to it is resolved too
    for name in PATH_VARIABLES:
        if env.get(name) and not os.path.isabs(env[name]):
            env[name] = os.path.abspath(env[name])


def _convert(option: Option, value: str | None, word: str) -> Any:
    if option.type is None:
        if value is not None and value.lower() not in ("1", "yes", "true", "on"):
            return False if value.lower() in ("0", "no", "false", "off") else _bad(word, "a yes or no")
        return True
    if value is None:
        raise OptionError(f"-o {option.name} needs a value: -o {option.name}=…")
    try:
        return option.type(value)
    except ValueError as err:
        return _bad(word, str(err))


def _bad(word: str, why: str) -> Any:
    raise OptionError(f"bad mount option {word!r}: {why}")
