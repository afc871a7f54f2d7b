"""Datasets: read every common file format, validate row by row, normalise, split, deduplicate, count tokens.

What goes in: JSONL, a JSON array, a single JSON object, CSV, TSV, Parquet or plain text, each optionally
gzip-compressed, in one of the layouts of layouts.py (auto-detected from the first rows, or given with `schema=`;
`column_map` maps our field -> your column). max_rows and max_seconds bound the rows and the time spent.

What comes out (docs/internals.md "Normalised examples"): normalised JSONL, one example a line, `{"messages": [...]}`,
`{"text": ...}` or `{"prompt": [...], "chosen": str, "rejected": str}`, KTO `{"messages": [...], "label": bool}`;
chats with tools add `"tools": [...]`; an assistant turn left untrained by its weight has `"weight": 0`. It is
written (atomically) only when the dataset comes out "ready".

Row problems (PROBLEM_KINDS) go in the report; whole-file problems (empty file, unknown format, gzip bomb, a broken
JSON array, unrecognised columns) raise finetune.errors.DatasetError with a message a user can act on. Warnings
(notes on how the file was read, duplicates, examples far longer than the context, {{placeholders}}) never refuse.

Where each concern lives:
    opening.py     gzip under a cap, sniffing the format          readers.py     one reader per file format
    lines.py       the row cap, NUL bytes                         plaintext.py   plain text documents
    registry.py    the Layout registry, SCHEMAS                   layouts.py     the layouts: one section each
    conversation.py  message lists, turn order, tools, weights    fields.py      column_map, aliases, a field
    dialogue.py    pairs with the prompt inside both answers      notices.py     long examples, placeholders
    detection.py   which layout a file is in, option checks       validation.py  row by row: problems, duplicates
    process.py     process_dataset and its report                 dedup.py       exact and near duplicates
    split.py       train/validation split, overlap                normalised.py  the normalised file
    tokens.py      token counts and statistics                    problems.py    RowProblem, message helpers
    mapping.py     a column mapping checked and previewed on the report's first rows (no file opened)

The web process imports this package: no torch or transformers at module level, in any of its modules.
"""
from . import layouts  # noqa: F401  (registers the built-in layouts)
from .detection import UnknownLayout, check_options
from .fields import Fields
from .mapping import best_layout, check_mapping, column_guesses, mappable_layouts, preview_mapping
from .normalised import iter_examples
from .problems import PROBLEM_KINDS, RowProblem
from .process import DatasetReport, process_dataset
from .readers import FORMATS
from .registry import LAYOUTS, SCHEMAS, TRAINING_SCHEMAS, Layout, register_layout
from .split import overlap_report, split_dataset
from .tokens import rendered_conversations, token_lengths, token_stats

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "PROBLEM_KINDS",
    "SCHEMAS",
    "TRAINING_SCHEMAS",
    "DatasetReport",
    "Fields",
    "Layout",
    "RowProblem",
    "UnknownLayout",
    "best_layout",
    "check_mapping",
    "check_options",
    "column_guesses",
    "iter_examples",
    "mappable_layouts",
    "overlap_report",
    "preview_mapping",
    "process_dataset",
    "register_layout",
    "rendered_conversations",
    "split_dataset",
    "token_lengths",
    "token_stats",
]
