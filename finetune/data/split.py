"""Splitting a normalised file into train and validation, and how much of validation training already holds.

The split keeps a hash and a rank per row (about 17 bytes a row); the rows themselves are streamed twice."""
from __future__ import annotations

import json
import math
from array import array

import numpy as np

from finetune.errors import DatasetError

from .dedup import SIGNATURE_BATCH, HashIndex, MinHashIndex, batched, row_hash, similarity_words
from .normalised import AtomicOutput, normalised_lines

OVERLAP_MAX_VALIDATION_ROWS = 20_000
OVERLAP_MAX_TRAIN_ROWS_NEAR = 100_000


def split_dataset(normalised_path, train_out, val_out, *, fraction: float, seed: int) -> tuple[int, int]:
    """Splits a normalised file into train and validation files; returns (n_train, n_val).

    Each row is ranked by a hash keyed with the seed, and the lowest round(n * fraction) rows (at least one if
    fraction > 0 and there are two rows or more) go to validation, so the same file and seed always give the same
    split, identical rows land on the same side, and at least one row is left for training. Both files keep the
    original row order.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise DatasetError(f"The validation fraction must be a number, not {fraction!r}.") from None
    if not 0 <= fraction < 1 or math.isnan(fraction):
        raise DatasetError(f"The validation fraction must be at least 0 and below 1, not {fraction}.")
    key = str(int(seed)).encode()
    hashes = array("Q", (row_hash(line, key) for line in normalised_lines(normalised_path)))
    n = len(hashes)
    if n == 0:
        raise DatasetError("The dataset has no rows to split.")
    n_val = min(n - 1, round(n * fraction))
    if fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    in_val = np.zeros(n, dtype=bool)
    in_val[np.argsort(np.frombuffer(hashes, dtype=np.uint64), kind="stable")[:n_val]] = True
    with AtomicOutput(train_out) as train, AtomicOutput(val_out) as val:
        for i, line in enumerate(normalised_lines(normalised_path)):
            (val if in_val[i] else train).file.write(line)
        train.commit()
        val.commit()
    return n - n_val, n_val


def overlap_report(train_path, val_path, *, max_examples: int = 5) -> dict:
    """How many validation rows also appear in training: exactly (same normalised row) or nearly (MinHash
    Jaccard >= 0.8 on the lowercased text without punctuation). Row numbers are 1-based lines of each file.
    Near matching indexes at most OVERLAP_MAX_VALIDATION_ROWS validation rows and scans at most
    OVERLAP_MAX_TRAIN_ROWS_NEAR training rows; exact matching covers everything.
    """
    exact_index, near_index, val_rows = _index_validation(val_path)
    exact: set[int] = set()
    near: dict[int, tuple[int, float]] = {}
    examples: list[dict] = []
    train_rows = 0
    for batch in batched(enumerate(normalised_lines(train_path), start=1), SIGNATURE_BATCH):
        train_rows = batch[-1][0]
        unmatched = []
        for row, line in batch:
            val_row = exact_index.get(row_hash(line))
            if val_row is None:
                unmatched.append((row, line))
            elif val_row not in exact:
                exact.add(val_row)
                if len(examples) < max_examples:
                    examples.append({"kind": "exact", "train_row": row, "validation_row": val_row,
                                     "similarity": 1.0})
        unmatched = [(row, line) for row, line in unmatched if row <= OVERLAP_MAX_TRAIN_ROWS_NEAR]
        if not unmatched or not near_index._row_numbers:
            continue
        signatures = near_index.signatures([similarity_words(json.loads(line)) for _, line in unmatched])
        for (row, _), signature, keys in zip(unmatched, signatures, near_index.band_keys(signatures)):
            match = near_index.best_match(signature, keys)
            if match and match[0] not in near:
                near[match[0]] = (row, match[1])
    near_only = {v: m for v, m in near.items() if v not in exact}
    for val_row, (train_row, similarity) in sorted(near_only.items())[:max_examples]:
        examples.append({"kind": "near", "train_row": train_row, "validation_row": val_row,
                         "similarity": round(similarity, 3)})
    return {
        "exact": len(exact),
        "near": len(near_only),
        "validation_rows": val_rows,
        "train_rows": train_rows,
        "near_validation_rows_indexed": min(val_rows, OVERLAP_MAX_VALIDATION_ROWS),
        "near_train_rows_examined": min(train_rows, OVERLAP_MAX_TRAIN_ROWS_NEAR),
        "examples": examples,
    }


def _index_validation(val_path):
    exact_index = HashIndex()
    near_index = MinHashIndex(OVERLAP_MAX_VALIDATION_ROWS)
    val_rows = 0
    for batch in batched(enumerate(normalised_lines(val_path), start=1), SIGNATURE_BATCH):
        val_rows = batch[-1][0]
        for row, line in batch:
            exact_index.add(row_hash(line), row)
        batch = batch[: max(0, near_index.max_rows - len(near_index._row_numbers))]
        if batch:
            signatures = near_index.signatures([similarity_words(json.loads(line)) for _, line in batch])
            for (row, _), signature, keys in zip(batch, signatures, near_index.band_keys(signatures)):
                near_index.add(signature, keys, row)
    return exact_index, near_index, val_rows

