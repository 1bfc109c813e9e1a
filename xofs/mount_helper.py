"""`mount.xofs`: the helper mount(8) runs for `xofs` entries of /etc/fstab, so `mount -a`, `mount /mnt/xo`
and systemd's mount units work:

    https://xo.example.org  /mnt/xo  xofs  _netdev,token_file=/etc/xofs/token,allow_other  0 0

mount(8) calls `/sbin/mount.xofs SPEC DIR [-sfnv] [-N NAMESPACE] [-o OPTIONS]`. Every `-o` word is an
`xofs mount` option (`xofs.options`), a FUSE flag, or one of mount(8)'s own (`_netdev`, `nofail`,
`noauto`…), which are ignored; `-s` (sloppy) drops unknown words instead of failing, `-f` (fake) checks
the options, the mount point and the credentials' source, and mounts nothing (XO is not asked), `-n` and
`-v` change nothing here. The daemon detaches once the mount is live, so `mount` returns then, or fails
with the reason in one line. `umount DIR` needs no helper: the kernel ends the FUSE connection and the
daemon exits on its own.
"""

from __future__ import annotations

import sys

from xofs.cli import OneLineParser, build_parser


def main(argv: list[str] | None = None) -> int:
    helper = OneLineParser(prog="mount.xofs", description="mount(8) helper for xofs fstab entries")
    helper.add_argument("spec", help="the XO server's URL, fstab's first field")
    helper.add_argument("dir", help="the mount point")
    helper.add_argument("-o", dest="options", action="append", default=[], help="mount options")
    helper.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options")
    helper.add_argument("-f", dest="fake", action="store_true",
                        help="check the options, mount point and credentials; mount nothing, ask XO nothing")
    helper.add_argument("-n", dest="no_mtab", action="store_true", help="accepted; there is no mtab to write")
    helper.add_argument("-v", dest="verbose", action="store_true", help="accepted")
    helper.add_argument("-N", dest="namespace", help="mount namespace (not supported)")
    helper.add_argument("-t", dest="type", help="accepted (always xofs)")
    ns = helper.parse_args(sys.argv[1:] if argv is None else argv)
    if ns.namespace:
        print("mount.xofs: mounting into another namespace (-N) is not supported", file=sys.stderr)
        return 1
    mount_argv = ["mount", ns.spec, ns.dir, *(arg for group in ns.options for arg in ("-o", group))]
    args = build_parser("mount").parse_args(mount_argv)
    from xofs.mount import run_mount

    return run_mount(args, sloppy=ns.sloppy, fake=ns.fake)
