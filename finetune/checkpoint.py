"""Training checkpoints: the trained parameters, optimizer state, position in the data and RNG state.

A checkpoint is written to a temporary folder and renamed into place, so a crash mid-write never leaves a
half checkpoint that resume would pick up. The two newest are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from .methods import load_trainable_state, trainable_state

KEEP = 2


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


def save(root, model, optimizer, state: dict, plan: dict) -> Path:
    import torch

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']}"
    tmp = root / f".tmp-step-{state['step']}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(trainable_state(model), tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "plan": plan}, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _step_folders(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(folder: Path, model, optimizer) -> dict:
    import torch

    load_trainable_state(model, torch.load(folder / "trainable.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    state = json.loads((folder / "state.json").read_text())
    state.pop("plan", None)
    return state


def clear(root) -> None:
    shutil.rmtree(root, ignore_errors=True)
