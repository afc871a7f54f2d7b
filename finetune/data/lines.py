"""Reading rows under the size caps, and the problems a row's raw bytes can have (too long, a NUL byte).

Two caps: `max_row_bytes` (ReadContext, default DEFAULT_MAX_ROW_BYTES) is what one row may have; a longer row is
that row's problem and the rest of the file is read. Streaming formats (JSON Lines, plain text) skip such a line
to its end without holding it. CSV and JSON arrays cannot skip part of a record in the middle of a parse, so they
hold at most HARD_MAX_ROW_BYTES of one record and refuse the file past that.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .problems import RowProblem, human_bytes

READ_CHUNK = 1024 * 1024
# What one row (a line of JSON Lines, a document of plain text, a CSV record, an element of a JSON array) may have:
# a row of a megabyte is some 250,000 tokens, far past any context, and checking it costs more than it is worth.
DEFAULT_MAX_ROW_BYTES = 1024 * 1024
# The most one record of a CSV file or a JSON array is read into memory before the file is refused.
HARD_MAX_ROW_BYTES = 16 * 1024 * 1024


@dataclass
class ReadContext:
    """What a reader needs besides the stream, and what it tells the report (notes about how it read the file)."""

    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LongLine:
    """A line longer than the cap, read through to its end but not kept: only its size."""

    size: int


def capped_lines(stream, cap: int) -> Iterator[bytes | LongLine]:
    """The lines of a binary stream; one with more than `cap` bytes (its line break not counted) is a LongLine."""
    while True:
        line = stream.readline(cap + 1)
        if not line:
            return
        if len(line) <= cap or (len(line) == cap + 1 and line.endswith(b"\n")):
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = stream.readline(READ_CHUNK)
            if not line:
                break
            size += len(line)
        yield LongLine(size)


def too_long(size: int, cap: int, what: str) -> RowProblem:
    return RowProblem("too_long", f"The {what} is {human_bytes(size)}, more than the {human_bytes(cap)} one row may "
                                  "have, so it was skipped (a file without line breaks, or a whole document in one "
                                  "row?). Split it into smaller examples.")


def nul_byte(position: int, what: str) -> RowProblem:
    """A NUL (zero) byte in text: a corrupted or partly binary row, named as such instead of refusing the file."""
    return RowProblem("nul_byte", f"The {what} has a NUL byte (a zero byte, \\x00) at byte {position + 1}: part of "
                                  "the row is corrupted or binary. Remove that byte or the row.")
