"""Training checkpoints: the trained parameters, optimizer state, position in the data and RNG state.

A checkpoint is written to a temporary folder, flushed to disk and renamed into place, so a crash or a full disk
mid-write never leaves a half checkpoint that resume would pick up, and never touches the previous one. The two
newest are kept.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
from pathlib import Path

from .errors import TrainingError
from .methods import load_trainable_state, trainable_state
from .units import format_bytes

KEEP = 2

# "No space left", "quota exceeded" and "file too large" (a file-size limit): all mean the disk took no more.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# The same errors as Rust/C++ writers (safetensors, torch) word them, without an errno attribute.
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large",
                   "os error 28", "os error 122", "os error 27")


class DiskFullError(TrainingError):
    """The disk that holds the checkpoints (or the adapter) is full; what was saved before is intact."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _DISK_FULL_TEXT)


def describe_disk(path) -> str:
    """'/data/checkpoints (12.0 MiB free of 100.0 GiB)': the folder and how much room its file system has left."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return str(path)
    return f"{path} ({format_bytes(usage.free)} free of {format_bytes(usage.total)})"


def disk_full_message(what: str, path, exc: BaseException) -> str:
    return (
        f"The disk is full: could not write {what} to {describe_disk(path)}: {exc}. "
        "Free space on that disk (or raise the file-size limit) and retry the job; it resumes from its last "
        "complete checkpoint, which is intact."
    )


def _complete(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "trainable.pt").is_file()


def _step_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and _complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(root) -> Path | None:
    folders = _step_folders(Path(root)) if root else []
    return folders[-1] if folders else None


def _write(path: Path, data) -> None:
    """Writes bytes and forces them to disk, so the rename that publishes the folder never outruns its contents."""
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _torch_bytes(obj):
    import torch

    # Serialised in memory first: torch's own file writer reports a full disk as an opaque RuntimeError
    # ("unexpected pos ..."); a plain write raises OSError with the real errno.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(root, model, optimizer, state: dict, plan: dict) -> Path:
    """Writes the checkpoint for state['step']. On a full disk raises DiskFullError and leaves the earlier
    checkpoints exactly as they were (the partial folder is removed)."""
    import torch

    root = Path(root)
    final = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write(tmp / "trainable.pt", _torch_bytes(trainable_state(model)))
        _write(tmp / "optimizer.pt", _torch_bytes(optimizer.state_dict()))
        _write(tmp / "rng.pt", _torch_bytes({"torch": torch.get_rng_state(), "python": random.getstate()}))
        _write(tmp / "state.json", json.dumps({**state, "plan": plan}, default=str).encode())
        _fsync_dir(tmp)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise DiskFullError(disk_full_message(f"the checkpoint at step {state['step']}", root, exc)) from exc
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in _step_folders(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(folder: Path, model, optimizer) -> dict:
    import torch

    load_trainable_state(model, torch.load(folder / "trainable.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)  # plain tensors, ints and tuples: no pickle code
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    state = json.loads((folder / "state.json").read_text())
    state.pop("plan", None)
    return state


def clear(root) -> None:
    shutil.rmtree(root, ignore_errors=True)
