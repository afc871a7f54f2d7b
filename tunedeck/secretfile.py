"""Secrets kept in the data directory: made once at random, readable by their owner only (mode 0600), and shared
by every process that shares the data directory (the web server, the workers, the inference server).

Standard library only: tunedeck/settings.py reads the SECRET_KEY through it before Django is set up."""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def read_or_create_secret(path: Path | str, nbytes: int = 48) -> str:
    """The secret kept in `path`, made first if there is none. Processes that start at once agree on one secret:
    each writes its candidate to a private file of its own and links it into place, and only the first link
    wins, so no process ever reads a half-written file."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_urlsafe(nbytes) + "\n")
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(candidate, path)
            except FileExistsError:
                pass  # another process was first: its secret is the one
        finally:
            candidate.unlink(missing_ok=True)
    return _read_private(path)


def _read_private(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        try:  # copied in with looser permissions (a restore, a manual edit): only the owner may read it
            path.chmod(0o600)
        except PermissionError:
            pass
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise RuntimeError(f"The secret file {path} is empty: delete it and restart, and a new one is made.")
    return value
