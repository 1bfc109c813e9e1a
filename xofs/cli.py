"""The `xofs` command: each subcommand lives in the module that does its work (`add_arguments` + `run`).

Only the chosen subcommand's module is imported, so `xofs sim` does not load FUSE and `xofs mount` does
not load the simulator.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# subcommand -> (module providing add_arguments(parser) and run(namespace) -> int, one-line help)
SUBCOMMANDS = {
    "sim": ("xofs.sim.server", "run the XO simulator (REST v0 + JSON-RPC) on a local port"),
    "mount": ("xofs.mount", "mount an XO server as a file tree"),
    "umount": ("xofs.mount", "unmount an xofs mount"),
    "login": ("xofs.login", "sign in to XO with a password and store a token for `xofs mount`"),
    "status": ("xofs.status_cli", "show what a mount is doing: transfers, event feed, cache, errors"),
}


class OneLineParser(argparse.ArgumentParser):
    """An argument error in one line, as every other refusal of xofs (argparse adds the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="xofs", description="Xen Orchestra as a file tree.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == command:
            module = importlib.import_module(module_name)
            adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
            adder(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(args._module)
    runner = getattr(module, f"run_{args.command}", None) or module.run
    return int(runner(args) or 0)
