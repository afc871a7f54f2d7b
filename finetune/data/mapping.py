"""A column mapping chosen after the fact: checked against the file's columns (as the report recorded them),
previewed on the report's first rows, and the layout and columns a mapping form starts from.

Nothing here opens the user's file: the worker records the columns and the first rows (report["columns"],
report["sample_rows"]) when it processes it, and these work from that.
"""
from __future__ import annotations

from finetune.errors import DatasetError

from .fields import ALIASES, Fields, aliased
from .problems import RowProblem, describe_columns
from .registry import LAYOUTS, SCHEMAS
from .validation import normalised_line

PREVIEW_ROW_BYTES = 1024 * 1024


def mappable_layouts() -> list:
    """The layouts a form can map field by field (kto is "a chat layout plus a label": map it through the API)."""
    return [layout for layout in LAYOUTS.values() if layout.required]


def check_mapping(schema: str | None, column_map: dict[str, str], columns: list[str], *, complete: bool = True):
    """Raises DatasetError naming the first thing wrong: an unknown layout, a field the layout does not read, a
    column the file does not have, or (when complete) a layout whose fields are still not all there."""
    if schema is not None and schema not in SCHEMAS:
        raise DatasetError(f"Unknown schema {schema!r}; choose one of {', '.join(SCHEMAS)}.")
    layout = LAYOUTS.get(schema)
    for ours, theirs in column_map.items():
        if layout is not None and ours not in layout.fields:
            raise DatasetError(f"The {schema} layout has no field {ours!r}; its fields are "
                               f"{', '.join(layout.fields)}.")
        if theirs not in columns:
            raise DatasetError(f"column_map maps {ours!r} to {theirs!r}, but the file has no column {theirs!r}; its "
                               f"columns are {describe_columns(columns, 30)}.")
    if complete and layout is not None:
        fields = _fields(column_map, columns)
        if not layout.fits(lambda name: fields.column(name) in columns):
            raise DatasetError(f"The {schema} layout needs {layout.describe()}: choose the column that holds each "
                               "of them.")


def preview_mapping(sample: list[dict], schema: str, column_map: dict[str, str], columns: list[str]) -> list[dict]:
    """The sample rows normalised under the mapping: {"row", "example"} or {"row", "problem"} each."""
    fields = _fields(column_map, columns)
    shown = []
    for entry in sample:
        try:
            example, _ = normalised_line(entry["record"], schema, fields, PREVIEW_ROW_BYTES)
            shown.append({"row": entry["row"], "example": example})
        except RowProblem as problem:
            shown.append({"row": entry["row"], "problem": problem.message})
    return shown


def best_layout(columns: list[str], candidates: list[str] = ()) -> str | None:
    """The layout whose fields most of the columns are named after (or detection's candidate); None if none is."""
    for name in candidates:
        if name in LAYOUTS and LAYOUTS[name].required:
            return name
    present = set(columns)

    def named(layout):
        return sum(1 for f in layout.fields if f in present or any(a in present for a in ALIASES.get(f, ())))

    scored = [(named(layout), -index, layout.name) for index, layout in enumerate(mappable_layouts())]
    score, _, name = max(scored, default=(0, 0, None))
    return name if score else None


def column_guesses(schema: str, column_map: dict[str, str], columns: list[str]) -> dict[str, str]:
    """Each field of the layout -> the column a form preselects: the user's mapping, then the same name, then a
    common alias; "" when none is there."""
    fields = _fields({f: c for f, c in column_map.items() if c in columns}, columns)
    guesses = {}
    for name in LAYOUTS[schema].fields:
        column = fields.column(name)
        guesses[name] = column if column in columns else ""
    return guesses


def _fields(column_map: dict[str, str], columns: list[str]) -> Fields:
    """The mapping plus the common aliases (fields.ALIASES) that apply, as processing reads it."""
    return Fields({**aliased(Fields(column_map), columns), **column_map})
