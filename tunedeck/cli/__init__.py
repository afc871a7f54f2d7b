"""`tunedeck`: the command-line client for a Tunedeck server's REST API (/api/v1) and its OpenAI-compatible
inference endpoints (/v1). Standard library and requests only; it never imports torch or the Django project.

One module per concern: client.py (login config, HTTP, CliError and the exit codes), output.py (tables, progress
bar), multipart.py (streamed uploads), arguments.py (shared argument types), then one module per command group,
each with its commands and an add_commands(sub) for its part of the parser: accounts.py (login, logout, base
models), datasets.py, jobs.py (plan, train, watch), versions.py (compare, download), deployments.py (deploy, chat).
main.py builds the parser from the groups. A new command goes into its group's module, or a new group module
listed in main.COMMAND_GROUPS."""
from .jobs import parse_setting
from .main import build_parser, main
from .multipart import MultipartStream

__all__ = ["MultipartStream", "build_parser", "main", "parse_setting"]
