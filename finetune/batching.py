"""From a normalised file to the micro-batches the loop trains on: encode the rows, pack short ones together,
order them by length within shuffled windows; collate.py pads a micro-batch into tensors.

    rows, stats = load_encoded(path, tokenizer, spec)        # token ids and labels, the rows' counts
    rows = pack_if_planned(spec, model, device, rows, ...)   # several short examples per row, when the plan says
    batches = batch_order(len(rows), micro_batch, seed, epoch, lengths)
    ids, labels, mask = collate([rows[i] for i in batches[0]], pad_id, device)
"""
from __future__ import annotations

import math
import random

from .collate import collate, packed_positions  # noqa: F401  (callers import them from here too)
from .data import iter_examples
from .errors import TrainingError
from .methods import get_method
from .tokenize import IGNORE, encode_example, encode_preference
from .trainspec import TrainSpec


def load_encoded(path, tokenizer, spec: TrainSpec, limit: int | None = None):
    """Encodes a normalised file; returns (examples, stats). Examples with nothing left to learn are dropped."""
    examples, stats = [], {"rows": 0, "truncated": 0, "skipped_no_labels": 0, "tokens": 0, "trained_tokens": 0}
    method = get_method(spec.method)
    for example in iter_examples(path):
        if limit is not None and len(examples) >= limit:
            break
        stats["rows"] += 1
        problem = method.example_problem(example)
        if problem:
            raise TrainingError(problem)
        if method.paired:
            pair = encode_preference(example, tokenizer, spec.max_seq_len)
            if not any(l != IGNORE for l in pair["chosen"]["labels"]) or not any(
                l != IGNORE for l in pair["rejected"]["labels"]
            ):
                stats["skipped_no_labels"] += 1
                continue
            examples.append(pair)
            stats["tokens"] += len(pair["chosen"]["input_ids"]) + len(pair["rejected"]["input_ids"])
            continue
        encoded = encode_example(example, tokenizer, spec.max_seq_len, completion_only=spec.completion_only)
        stats["truncated"] += int(encoded.truncated)
        if encoded.trained_tokens == 0:
            stats["skipped_no_labels"] += 1
            continue
        examples.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
        examples[-1].update(method.example_fields(example))
        stats["tokens"] += len(encoded.input_ids)
        stats["trained_tokens"] += encoded.trained_tokens
    return examples, stats


def pack(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Concatenates short examples into rows of up to max_seq_len tokens (first-fit by length, no splitting).

    Each row keeps its examples' lengths in "segments": positions restart at every example and attention stays
    inside it (see packed_positions), so a packed row trains exactly as its examples would one by one."""
    rows: list[dict] = []
    for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
        for row in rows:
            if len(row["input_ids"]) + len(ex["input_ids"]) <= max_seq_len:
                row["input_ids"] += ex["input_ids"]
                row["labels"] += [IGNORE] + ex["labels"][1:]  # never predict an example's first token
                row["segments"].append(len(ex["input_ids"]))
                break
        else:
            rows.append({"input_ids": list(ex["input_ids"]), "labels": list(ex["labels"]),
                         "segments": [len(ex["input_ids"])]})
    return rows


def packing_isolates_examples(model, device) -> bool:
    """Checks on two short token runs that, packed into one row, each is computed exactly as when alone: true for
    architectures whose attention honours restarting position ids (transformers' packed-sequence masks)."""
    import torch

    first, second = [1, 2, 3, 4], [5, 6, 7]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0]
            row = torch.tensor([first + second], device=device)
            positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
            packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, len(first):]
        return torch.allclose(packed.float(), alone.float(), rtol=1e-2, atol=1e-2)
    except Exception:  # noqa: BLE001 - a model that rejects the arguments cannot pack either
        return False
    finally:
        model.train(was_training)


def batch_order(n: int, micro_batch: int, seed: int, epoch: int, lengths: list[int],
                window_batches: int = 64, min_windows: int = 16) -> list[list[int]]:
    """Micro-batches of similar length (little padding), in a shuffled order that depends only on seed+epoch.

    Rows are shuffled, then sorted by length within windows of `window_batches` micro-batches, but never fewer
    than `min_windows` windows per epoch: sorting a whole small dataset into one length order makes every
    micro-batch a run of near-identical rows (in templated data often one class or one phrasing), and that was
    measured to cost held-out accuracy (bench/train_quality.py). Below 2 micro-batches a window is a plain shuffle.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    indices = list(range(n))
    rng.shuffle(indices)
    window = micro_batch * length_window_batches(n, micro_batch, window_batches, min_windows)
    ordered = []
    for start in range(0, n, window):
        chunk = sorted(indices[start : start + window], key=lambda i: lengths[i])
        ordered.extend(chunk)
    batches = [ordered[i : i + micro_batch] for i in range(0, n, micro_batch)]
    rng.shuffle(batches)
    return batches


def length_window_batches(n: int, micro_batch: int, window_batches: int, min_windows: int = 16) -> int:
    """Micro-batches per length-sorting window: at most window_batches, and small enough for min_windows windows
    per epoch; 1 (no sorting across rows) when that leaves less than 2."""
    cap = max(1, math.ceil(n / micro_batch) // max(1, min_windows))
    size = min(max(1, window_batches), cap)
    return size if size >= 2 else 1


def pack_if_planned(spec: TrainSpec, model, device, train_rows, on_event):
    if not (spec.packing and get_method(spec.method).can_pack):
        return train_rows
    if packing_isolates_examples(model, device):
        return pack(train_rows, spec.max_seq_len)
    spec.packing = False
    on_event("packing_off", "Packing turned off: this model's attention cannot keep packed examples "
             "apart (it ignores restarting position ids), so they would attend to each other.", {})
    return train_rows

