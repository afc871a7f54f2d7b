"""The `tunedeck` command: its argument parser, built from each command group's add_commands, and main()."""
from __future__ import annotations

import argparse
import sys

from . import accounts, datasets, deployments, jobs, versions
from .client import EXIT_INTERRUPTED, CliError

# Each group's module adds its subcommands; `tunedeck --help` lists them in this order.
COMMAND_GROUPS = (accounts, datasets, jobs, versions, deployments)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunedeck",
        description="Command-line client for a Tunedeck server. Log in once; the URL and token are kept in "
        "~/.config/tunedeck/config.json (or $TUNEDECK_CONFIG); TUNEDECK_URL and TUNEDECK_TOKEN override them.",
        epilog="Exit codes: 0 ok, 1 API error or failed job, 2 usage, 3 server unreachable, 4 job cancelled.",
    )
    parser.add_argument("--version", action="version", version="tunedeck 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "compare" and not 2 <= len(args.ids) <= 4:
        parser.error("compare takes 2 to 4 version ids")
    try:
        code = args.func(args)
    except CliError as exc:
        print(f"tunedeck: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    return code or 0
