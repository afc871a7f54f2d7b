"""Pieces every command group's argument parser uses."""
from __future__ import annotations

import argparse


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an id (a whole number), got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive id, got {text!r}")
    return value


def command(sub, name, func, help_text, json_flag=False) -> argparse.ArgumentParser:
    """One subcommand; --json prints the API's answer as it is instead of a summary."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the API's JSON instead of a summary")
    return p
