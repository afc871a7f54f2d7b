"""Token statistics: each normalised example counted the way training renders it, and a summary of the counts.

The tokenizer is passed in; nothing here imports transformers.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

# The cut-offs whose truncation counts are kept: the usual max sequence lengths and model contexts.
TRUNCATION_POINTS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
# The lengths of this many longest examples are kept, so the examples a plan's max sequence length cuts are counted
# one by one wherever it falls among them (autotune.select.truncated_count), not interpolated in a coarse
# histogram bin (issue 35: one example of 230,243 tokens among 46 read as "36 examples (78 %)" over 8,192).
LONGEST_KEPT = 1000


def token_stats(lengths: Iterable[int], truncation_points=TRUNCATION_POINTS, bins: int = 20) -> dict:
    """Summary of per-example token counts. Percentiles are actual lengths (the smallest length with at least
    p% of examples at or below it); the histogram has at most `bins` equal-width integer bins, each
    [edges[i], edges[i+1]); `truncated` counts the examples longer than each cut-off; `longest` lists the lengths
    of the LONGEST_KEPT longest examples, longest first (all of them in a smaller dataset)."""
    values = np.fromiter((int(n) for n in lengths), dtype=np.int64)
    if values.size == 0:
        return {"count": 0, "min": 0, "p50": 0, "p95": 0, "p99": 0, "max": 0, "mean": 0.0,
                "histogram": {"edges": [], "counts": []}, "truncated": {str(p): 0 for p in truncation_points},
                "longest": []}
    low, high = int(values.min()), int(values.max())
    width = max(1, math.ceil((high - low + 1) / bins))
    n_bins = math.ceil((high - low + 1) / width)
    edges = [low + width * i for i in range(n_bins + 1)]
    counts = np.bincount((values - low) // width, minlength=n_bins)
    p50, p95, p99 = np.percentile(values, [50, 95, 99], method="inverted_cdf")
    return {
        "count": int(values.size),
        "min": low,
        "p50": int(p50),
        "p95": int(p95),
        "p99": int(p99),
        "max": high,
        "mean": round(float(values.mean()), 2),
        "histogram": {"edges": edges, "counts": [int(c) for c in counts]},
        "truncated": {str(p): int((values > p).sum()) for p in _points_upto(truncation_points, high)},
        "longest": [int(n) for n in -np.sort(-values)[:LONGEST_KEPT]],
    }


def _points_upto(points, longest: int) -> list[int]:
    """The cut-offs up to the first that cuts nothing (the larger ones would all say 0)."""
    kept = []
    for point in sorted(points):
        kept.append(point)
        if point >= longest:
            break
    return kept


def _render_without_template(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _render_batch(conversations: list[list[dict]], tokenizer, tools: list) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        return [_render_without_template(c) for c in conversations]  # base models without a template
    if any(tools):
        return [tokenizer.apply_chat_template(c, tools=t, tokenize=False) for c, t in zip(conversations, tools)]
    rendered = tokenizer.apply_chat_template(conversations, tokenize=False)
    return [rendered] if isinstance(rendered, str) else list(rendered)


def _encoded_lengths(texts: list[str], tokenizer, add_special_tokens: bool) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # The Rust tokenizer without offsets: same ids as tokenizer(...), nearly twice as fast.
        return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]
    return [len(ids) for ids in encoded]


def rendered_conversations(example: dict) -> list[list[dict]]:
    """Every conversation training runs for an example: one for a chat, prompt + chosen and prompt + rejected for
    a preference pair; none for text. A turn's weight is not rendered (training masks by it)."""
    if "chosen" in example:
        return [list(example["prompt"]) + [{"role": "assistant", "content": example[side]}]
                for side in ("chosen", "rejected")]
    if "messages" not in example:
        return []
    return [[{k: v for k, v in m.items() if k != "weight"} if "weight" in m else m for m in example["messages"]]]


def _batch_lengths(batch: list[dict], tokenizer) -> list[int]:
    """Preference pairs count the longer of prompt + chosen and prompt + rejected: both run in training."""
    lengths = [0] * len(batch)
    chats, texts = [], []
    for i, example in enumerate(batch):
        conversations = rendered_conversations(example)
        if not conversations:
            texts.append((i, example.get("text", "")))
        chats += [(i, c, example.get("tools")) for c in conversations]
    if chats:
        # The chat template already writes any BOS it wants; adding special tokens again would double it.
        rendered = _render_batch([c for _, c, _ in chats], tokenizer, [t for _, _, t in chats])
        for (i, _, _), n in zip(chats, _encoded_lengths(rendered, tokenizer, add_special_tokens=False)):
            lengths[i] = max(lengths[i], n)
    if texts:
        for (i, _), n in zip(texts, _encoded_lengths([t for _, t in texts], tokenizer, add_special_tokens=True)):
            lengths[i] = n
    return lengths


def token_lengths(examples: Iterable[dict], tokenizer, batch_size: int = 1000) -> Iterator[int]:
    """Token count of each normalised example as training renders it: chats through the tokenizer's chat
    template (plain "role: content" lines if it has none), text as is with the tokenizer's special tokens,
    preference as the longer of the prompt followed by the chosen and by the rejected answer. Encodes in batches with the fast tokenizer."""
    batch: list[dict] = []
    for example in examples:
        batch.append(example)
        if len(batch) >= batch_size:
            yield from _batch_lengths(batch, tokenizer)
            batch = []
    if batch:
        yield from _batch_lengths(batch, tokenizer)

