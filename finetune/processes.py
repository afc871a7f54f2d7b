"""Child processes the workers start and must be able to end: a distributed run's torchrun and ranks, a vLLM
server. Each runs in a session of its own, so signalling its group reaches everything it started."""
from __future__ import annotations

import os
from pathlib import Path


def signal_group(pid: int, sig, *, or_process: bool = False) -> None:
    """Sends sig to the process group pid leads. or_process: when there is no such group (the process has not
    called setsid yet, or has left), the process itself. Gone or not ours: nothing to do."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        if not or_process:
            return
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def process_alive(pid: int) -> bool:
    """Alive and not a zombie (a killed process is a zombie until its parent reaps it)."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False
    try:  # no /proc (macOS): existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
