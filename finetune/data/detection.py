"""Which layout a file is in: guessed from the fields of its first rows, or given by the user (schema=), and the
options (schema, column_map) checked against the layout registry before anything is read."""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator

from finetune.errors import DatasetError

from .fields import Fields
from .problems import describe_columns
from .registry import LAYOUTS, SCHEMAS, by_precedence, known_fields

DETECTION_ROWS = 50  # parsed rows looked at to guess the schema
DETECTION_MAX_RECORDS = 1000  # give up guessing after this many unreadable rows
SAMPLE_ROWS = 3  # rows kept in the report, so a column mapping can be previewed without opening the file again
SAMPLE_ROW_CHARS = 16_384  # a sample row longer than this as JSON keeps its values shortened
SAMPLE_VALUE_CHARS = 1000


class UnknownLayout(DatasetError):
    """No layout fits the file's columns: the columns (and the first rows) go with it, so a caller can offer a
    column mapping."""

    def __init__(self, message: str, columns: list[str], sample: list[dict]):
        super().__init__(message)
        self.columns, self.sample = columns, sample


def layouts_of_row(record: dict, fields: Fields) -> list[str]:
    """The schemas one row fits, by the fields it has, the more specific first."""
    def has(name):
        return fields.column(name) in record

    return [layout.name for layout in by_precedence() if layout.fits(has)]


def schema_candidates(records: list[dict], fields: Fields) -> list[str]:
    """Schemas whose fields the sampled rows have, most rows first, ties by specificity."""
    counts = Counter()
    for record in records:
        counts.update(layouts_of_row(record, fields))
    return sorted(counts, key=lambda s: (-counts[s], LAYOUTS[s].precedence))


def check_options(schema, column_map):
    """Refuses an unknown schema or column_map field at once (the web calls this before storing an upload)."""
    if schema is not None and schema not in SCHEMAS:
        raise DatasetError(f"Unknown schema {schema!r}; choose one of {', '.join(SCHEMAS)}.")
    if column_map is None:
        return
    if not isinstance(column_map, dict):
        raise DatasetError("column_map must map our field names to your column names, e.g. "
                           '{"prompt": "question", "completion": "answer"}.')
    fields = known_fields()
    for ours, theirs in column_map.items():
        if ours not in fields:
            raise DatasetError(f"column_map names the field {ours!r}, which no schema uses; the fields are "
                               f"{', '.join(fields)}.")
        if not isinstance(theirs, str) or not theirs:
            raise DatasetError(f"column_map must give a column name for {ours!r}, not {theirs!r}.")


def take_sample(records: Iterator) -> list:
    head, dicts = [], 0
    for item in records:
        head.append(item)
        dicts += isinstance(item[1], dict)
        if dicts >= DETECTION_ROWS or len(head) >= DETECTION_MAX_RECORDS:
            break
    return head


def sample_columns(head: list) -> list[str]:
    columns: dict[str, None] = {}
    for _, record in head:
        if isinstance(record, dict):
            columns.update(dict.fromkeys(map(str, record)))
    return list(columns)


def sample_rows(head: list) -> list[dict]:
    """The first readable rows as JSON-safe {"row", "record"} (values shortened in a long row, "shortened" set)."""
    sample = []
    for row, record in head:
        if not isinstance(record, dict):
            continue
        safe = {str(k): _json_safe(v) for k, v in record.items()}
        entry = {"row": row, "record": safe}
        if len(json.dumps(safe, ensure_ascii=False)) > SAMPLE_ROW_CHARS:
            entry = {"row": row, "record": {k: _shortened(v) for k, v in list(safe.items())[:50]}, "shortened": True}
        sample.append(entry)
        if len(sample) >= SAMPLE_ROWS:
            break
    return sample


def _json_safe(value, depth: int = 0):
    """What a database JSON column stores: no NaN, no bytes or dates (Parquet), not nested without end."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < 20 and isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if depth < 20 and isinstance(value, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in value]
    return str(value)


def _shortened(value):
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) <= SAMPLE_VALUE_CHARS:
        return value
    return text[:SAMPLE_VALUE_CHARS] + "…"


def resolve_schema(schema, head, candidates, columns):
    """(detected, chosen): the user's schema wins over the detected one; raises when neither can be had."""
    detected = candidates[0] if candidates else None
    chosen = schema or detected
    if chosen is not None:
        return detected, chosen
    parsed = any(isinstance(record, dict) for _, record in head)
    if not parsed and len(head) < DETECTION_MAX_RECORDS:
        return None, None  # every row is broken; the problems say why
    if not parsed:
        first = head[0][1]
        raise DatasetError(f"None of the first {len(head)} rows could be read (row {head[0][0]}: {first.message})")
    # The layouts named by their fields first, then those described in words (kto: "a chat layout plus ...").
    layouts = sorted(by_precedence(), key=lambda layout: not layout.required)
    expected = "; ".join(f"{layout.name}: {layout.describe()}" for layout in layouts)
    raise UnknownLayout(
        f"The columns {describe_columns(columns)} match no known schema (expected {expected}). Choose a "
        "schema and map your columns to its fields with column_map, e.g. "
        '{"prompt": "question", "completion": "answer"}.', columns, sample_rows(head),
    )
