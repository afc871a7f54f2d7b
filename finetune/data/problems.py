"""Row problems and the words of error messages: what every other module of the package reports with."""
from __future__ import annotations

from finetune.units import format_bytes

# Any kind but `duplicate` makes a dataset invalid unless the user consents to dropping those rows.
PROBLEM_KINDS = (
    "malformed_json",
    "missing_field",
    "unknown_role",
    "empty_assistant",
    "turn_order",
    "non_utf8",
    "wrong_type",
    "unsupported",
    "too_long",
    "nul_byte",
    "duplicate",
)


class RowProblem(Exception):
    """One row's problem; raised by the readers and the layouts' normalisers, collected by process_dataset."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def type_name(value) -> str:
    """A value's type the way a person who wrote the file would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    return f"a {type(value).__name__}"


def describe_columns(columns: list[str], limit: int = 10) -> str:
    shown = [repr(c if len(c) <= 40 else c[:37] + "...") for c in columns[:limit]]
    more = f" and {len(columns) - limit} more" if len(columns) > limit else ""
    return ", ".join(shown) + more


def human_bytes(n: int) -> str:
    """Sizes in dataset messages: '1000 bytes', '4.9 KiB'."""
    return format_bytes(n, byte_word="bytes")
