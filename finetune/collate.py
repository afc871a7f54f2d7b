"""A micro-batch as tensors: rows padded to the longest (collate), and the position ids that keep packed examples
apart (packed_positions). Imports nothing of the project but the label constant, so the losses (finetune/losses.py)
and the methods' own loss hooks can use it without importing the batching and the method registry."""
from __future__ import annotations

from .tokenize import IGNORE


def collate(rows: list[dict], pad_id: int, device):
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def packed_positions(rows: list[dict], width: int, device):
    """Position ids that restart at every packed example (and at the padding). With these and no 2-D attention
    mask, transformers builds a block-diagonal causal mask (flash-attention: variable-length kernels), so no
    token attends across an example boundary. None for rows that were not packed."""
    import torch

    if not any("segments" in r for r in rows):
        return None
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        at = 0
        for n in r.get("segments", [len(r["input_ids"])]) + [width - len(r["input_ids"])]:
            positions[i, at : at + n] = torch.arange(n)
            at += n
    return positions.to(device)
