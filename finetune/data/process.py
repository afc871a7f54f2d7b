"""process_dataset: a user's file in, a report and (when it is usable) the normalised JSONL file out."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

from finetune.errors import DatasetError

from .dedup import NearDuplicates
from .detection import (
    check_options,
    resolve_schema,
    sample_columns,
    sample_rows,
    schema_candidates,
    take_sample,
)
from .fields import Fields, aliased
from .lines import DEFAULT_MAX_ROW_BYTES, ReadContext
from .normalised import AtomicOutput
from .notices import Notices
from .opening import open_source
from .registry import LAYOUTS
from .validation import Budget, Tally, invalid_reason, validate_rows


@dataclass
class DatasetReport:
    status: str  # "ready" | "invalid"
    format: str
    compressed: bool
    schema: str | None
    schema_detected: str | None
    schema_candidates: list[str]
    columns: list[str]
    total_rows: int = 0
    valid_rows: int = 0
    dropped_rows: int = 0
    dropped_counts: dict[str, int] = field(default_factory=dict)
    problem_counts: dict[str, int] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    # Not problems: notes on how the file was read (row None), then duplicates, long examples and placeholders.
    warnings: list[dict] = field(default_factory=list)
    warning_counts: dict[str, int] = field(default_factory=dict)  # {"long_example": n, "placeholder": n}
    near_duplicates: dict = field(default_factory=dict)
    reason: str | None = None
    tool_rows: int = 0  # rows with tool definitions or tool-call turns (need a chat template with tools support)
    kto_labels: dict = field(default_factory=dict)  # {"desirable": n, "undesirable": n} for kto
    sample_rows: list[dict] = field(default_factory=list)  # the first rows as read, for previewing a column mapping

    def to_dict(self) -> dict:
        return asdict(self)


def process_dataset(
    src_path,
    out_path,
    *,
    schema: str | None = None,
    column_map: dict[str, str] | None = None,
    drop_invalid: bool = False,
    drop_duplicates: bool = False,
    max_problem_examples: int = 5,
    progress: Callable[[float], None] | None = None,
    max_decompressed_bytes: int | None = None,
    file_name: str | None = None,
    max_rows: int | None = None,
    max_seconds: float | None = None,
    max_row_bytes: int | None = None,
    context_tokens: int | None = None,
) -> DatasetReport:
    """Reads `src_path` in any supported format, validates and normalises every row, writes the usable rows as
    normalised JSONL to `out_path` (only when the dataset is ready; atomically) and returns a DatasetReport.

    max_decompressed_bytes caps what a gzip file may expand to; the default is 100x the file size, at least
    64 MiB. file_name (the user's) makes *.txt/*.md plain text. max_rows and max_seconds stop the reading with a
    DatasetError once passed; a row over max_row_bytes (default 1 MiB) is that row's problem. context_tokens (the
    base model's context; default 8192) is what "far longer than the context" warnings measure against. Raises
    DatasetError for whole-file problems; row problems go in the report.
    """
    src_path, out_path = Path(src_path), Path(out_path)
    check_options(schema, column_map)
    budget = Budget(max_rows, max_seconds)
    row_cap = int(max_row_bytes or DEFAULT_MAX_ROW_BYTES)
    with ExitStack() as stack:
        source = open_source(src_path, max_decompressed_bytes, stack, file_name, schema, ReadContext(row_cap))
        head = take_sample(source.records)
        if not head:
            raise DatasetError("The file is empty: it has no rows.")
        columns = source.columns or sample_columns(head)
        fields, candidates, alias_note = _fields_and_candidates(column_map, columns, head, schema)
        detected, chosen = resolve_schema(schema, head, candidates, columns)
        output = stack.enter_context(AtomicOutput(out_path))
        report = DatasetReport(
            status="invalid", format=source.format, compressed=source.compressed, schema=chosen,
            schema_detected=detected, schema_candidates=candidates, columns=columns, sample_rows=sample_rows(head),
        )
        tally = Tally(max_problem_examples)
        near = NearDuplicates(max_problem_examples)
        notices = Notices(max_problem_examples, context_tokens)
        validate_rows(chain(head, source.records), chosen, fields, output, tally, near, report,
                       drop_invalid=drop_invalid, drop_duplicates=drop_duplicates, progress=progress,
                       fraction=source.fraction, budget=budget, notices=notices, max_row_bytes=row_cap)
        _fill_report(report, tally, near, notices, [*source.notes, alias_note], drop_invalid)
        if report.reason is None:
            report.status = "ready"
            output.commit()
        else:
            output.discard()
    if progress:
        progress(1.0)
    return report


def _fill_report(report: DatasetReport, tally: Tally, near: NearDuplicates, notices: Notices, notes: list,
                 drop_invalid: bool):
    """Problems, warnings (file notes first, then by row) and whether the dataset is usable (reason None)."""
    report.problem_counts = dict(tally.counts)
    report.dropped_counts = dict(tally.dropped)
    report.dropped_rows = sum(tally.dropped.values())
    report.errors = tally.listed(duplicates=False)
    listed = tally.listed(duplicates=True) + notices.warnings()
    report.warnings = [{"row": None, "kind": "note", "message": note} for note in notes if note] + sorted(
        listed, key=lambda e: (e["row"], e["kind"]))
    report.warning_counts = notices.counts()
    report.near_duplicates = near.report()
    report.reason = invalid_reason(tally, report.total_rows, report.valid_rows, drop_invalid)


def _fields_and_candidates(column_map, columns: list[str], head: list, schema: str | None):
    """Fields with the common column names (fields.ALIASES) the file's layout reads, the candidate layouts, and a
    note naming the aliases used (None when there are none)."""
    records = [r for _, r in head if isinstance(r, dict)]
    aliases = aliased(Fields(column_map), columns)
    candidates = schema_candidates(records, Fields({**(column_map or {}), **aliases}))
    layouts = [LAYOUTS[name] for name in (schema, *candidates) if name in LAYOUTS]
    used = {ours: theirs for ours, theirs in aliases.items() if any(ours in layout.fields for layout in layouts)}
    fields = Fields({**(column_map or {}), **used})
    if not used:
        return fields, candidates, None
    named = ", ".join(f"{theirs!r} as {ours}" for ours, theirs in used.items())
    return fields, candidates, (f"Columns read by their common names: {named}. If a column means something else, "
                                "map your columns to the fields with column_map.")
