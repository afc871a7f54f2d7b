"""Row by row: every row normalised by the file's layout, its problems tallied, duplicates found, the usable
rows written; and whether the result is usable.

Any problem kind but `duplicate` makes the dataset invalid unless the caller passes drop_invalid=True (the user's
consent); duplicates are warnings, dropped only with drop_duplicates=True. Every dropped row is counted. A row with
"images", "audio" or "videos" is refused: Tunedeck trains text-only models, and the row would otherwise be learned
with its media silently missing. A row whose normalised example is longer than the row cap is too_long (the
readers of streaming formats catch long rows before reading them; this catches Parquet and single JSON objects).
Usable rows are also looked at for what the report should warn about (notices.py).
"""
from __future__ import annotations

import time
from collections import Counter

from finetune.errors import DatasetError

from .dedup import HashIndex, row_hash
from .detection import layouts_of_row
from .fields import Fields
from .lines import too_long
from .normalised import serialise
from .problems import RowProblem, describe_columns, type_name
from .registry import LAYOUTS

MEDIA_COLUMNS = ("images", "image", "audio", "audios", "videos", "video")
_PROGRESS_EVERY_ROWS = 2048


class Tally:
    def __init__(self, max_examples: int):
        self.max_examples = max_examples
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()
        self.examples: dict[str, list[dict]] = {}

    def add(self, row: int, kind: str, message: str):
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append({"row": row, "kind": kind, "message": message})

    def listed(self, *, duplicates: bool) -> list[dict]:
        rows = [e for kind, shown in self.examples.items() if (kind == "duplicate") == duplicates for e in shown]
        return sorted(rows, key=lambda e: (e["row"], e["kind"]))


class Budget:
    """The row and time limits of one file; checked as rows stream by, so a huge file stops early."""

    def __init__(self, max_rows: int | None, max_seconds: float | None):
        self.max_rows, self.max_seconds = max_rows, max_seconds
        self.started = time.monotonic()

    def check(self, rows: int):
        if self.max_rows is not None and rows > self.max_rows:
            raise DatasetError(f"The file has more than {self.max_rows:,} rows, the most one dataset may have; "
                               "split it into smaller files.")
        if self.max_seconds is not None and time.monotonic() - self.started > self.max_seconds:
            raise DatasetError(f"Checking the file took longer than {self.max_seconds / 60:.0f} minutes (stopped at "
                               f"row {rows:,}); split it into smaller files.")


def unsupported_media(record: dict) -> RowProblem | None:
    for column in MEDIA_COLUMNS:
        value = record.get(column)
        if value not in (None, "", [], {}):
            return RowProblem("unsupported", f"The row has {column!r} ({type_name(value)}): Tunedeck trains "
                                             "text-only models, so it would learn this row with the media missing. "
                                             f"Remove the {column!r} column (and markers such as <image>) or these "
                                             "rows.")
    return None


def other_layout(record, schema: str, fields: Fields, problem: RowProblem) -> RowProblem:
    """A row missing a field of the file's layout but fitting another one: say that layouts are mixed."""
    if problem.kind != "missing_field" or not isinstance(record, dict):
        return problem
    others = [s for s in layouts_of_row(record, fields) if s != schema]
    if not others:
        return problem
    return RowProblem("missing_field", f"{problem.message} The row is laid out as {others[0]} (it has "
                                       f"{describe_columns(list(map(str, record)), 6)}), but the file's first rows "
                                       f"are {schema}; one file must use one layout.")


def normalised_line(record, schema: str, fields: Fields, max_row_bytes: int) -> tuple[dict, bytes]:
    """A row's normalised example and its JSONL line; raises RowProblem."""
    if isinstance(record, RowProblem):
        raise record
    media = unsupported_media(record)
    if media:
        raise media
    try:
        example = LAYOUTS[schema].normalise(record, fields)
    except RowProblem as problem:
        raise other_layout(record, schema, fields, problem) from None
    line = serialise(example)
    if len(line) > max_row_bytes:
        raise too_long(len(line), max_row_bytes, "row")
    return example, line


def validate_rows(rows, schema, fields, output, tally, near, report, *, drop_invalid, drop_duplicates, progress,
                   fraction, budget, notices, max_row_bytes):
    seen = HashIndex()
    write = output.file.write
    total = valid = 0
    labels = Counter()
    for row, record in rows:
        total += 1
        if total % 256 == 0:
            budget.check(total)
            if progress and total % _PROGRESS_EVERY_ROWS == 0:
                progress(fraction())
        try:
            example, line = normalised_line(record, schema, fields, max_row_bytes)
        except RowProblem as problem:
            tally.add(row, problem.kind, problem.message)
            if drop_invalid:
                tally.dropped[problem.kind] += 1
            continue
        first = seen.add(row_hash(line), row)
        if first is not None:
            tally.add(row, "duplicate", f"The row is an exact duplicate of row {first} (after normalisation).")
            if drop_duplicates:
                tally.dropped["duplicate"] += 1
                continue
        else:
            near.check(row, example)
            notices.check(row, example)
        write(line)
        valid += 1
        report.tool_rows += int("tools" in example or any(
            "tool_calls" in m or m["role"] == "tool" for m in example.get("messages", ())))
        if "label" in example:
            labels["desirable" if example["label"] else "undesirable"] += 1
    budget.check(total)
    report.total_rows, report.valid_rows = total, valid
    report.kto_labels = dict(labels)


def invalid_reason(tally: Tally, total: int, valid: int, drop_invalid: bool) -> str | None:
    bad = {k: n for k, n in tally.counts.items() if k != "duplicate"}
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(bad.items()))
    if valid == 0:
        return f"No row is usable: all {total} rows have problems ({summary})."
    if bad and not drop_invalid:
        return (f"{sum(bad.values())} of {total} rows have problems ({summary}). Fix them, or drop those rows "
                "(drop_invalid) and use the rest.")
    return None

