"""A row's fields under the user's column_map, and reading one field with the problem it raises when it is wrong.

Layouts name fields in our terms ("prompt", "completion"); column_map says which column of the user's file holds
each, and messages name the column the way the user knows it.
"""
from __future__ import annotations

import json

from .problems import RowProblem, type_name

MISSING = object()  # a field the row does not have (distinct from a null value)

# Common column names read as our fields when the file has no column of our name and the user mapped neither:
# Dolly's instruction/context/response, MetaMathQA's query/response, and "answer" for the answer. A field gets an
# alias only when exactly one of its aliases is a column, so detection never has to guess between two.
ALIASES = {
    "instruction": ("query",),
    "input": ("context",),
    "output": ("response", "answer"),
    "completion": ("response", "answer"),
}


class Fields:
    """Our field names resolved to the user's columns; `label` names a field the way the user knows it."""

    def __init__(self, column_map: dict[str, str] | None):
        self.columns = dict(column_map or {})

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def get(self, record: dict, name: str):
        return record.get(self.columns.get(name, name), MISSING)

    def label(self, name: str) -> str:
        column = self.columns.get(name, name)
        return f"'{column}'" if column == name else f"'{column}' (used as {name})"


def aliased(fields: Fields, columns) -> dict[str, str]:
    """Our field -> the file's column for the ALIASES that apply to a file with these columns."""
    present = set(columns)
    taken = set(fields.columns.values())  # a column the user mapped means what the user said
    found = {}
    for ours, names in ALIASES.items():
        if ours in fields.columns or ours in present:
            continue
        candidates = [name for name in names if name in present and name not in taken]
        if len(candidates) == 1:
            found[ours] = candidates[0]
    return found


def required_value(record: dict, fields: Fields, name: str):
    value = fields.get(record, name)
    if value is MISSING:
        raise RowProblem("missing_field", f"The row has no {fields.label(name)} field.")
    if value is None:
        raise RowProblem("missing_field", f"The {fields.label(name)} field is empty (null).")
    return value


def text_field(record: dict, fields: Fields, name: str, *, optional: bool = False) -> str:
    value = fields.get(record, name)
    if optional and (value is MISSING or value is None):
        return ""
    value = required_value(record, fields, name)
    if not isinstance(value, str):
        raise RowProblem("wrong_type", f"The {fields.label(name)} field should be text, but it is "
                                       f"{type_name(value)}.")
    return value


def maybe_json_list(value):
    """A message list stored as JSON text (CSV cells, some exports) is parsed; anything else is returned as is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(parsed, list):
            return parsed
    return value
