"""Record readers, one per file format: each turns a decoded byte stream into (row number, dict | RowProblem).

Row numbers are 1-based: the physical line for JSONL and plain text (the line a document starts on), the line on
which the record starts for CSV/TSV (the header is line 1), and the record index for JSON arrays and Parquet.
JSONL, CSV, TSV and JSON arrays are streamed and Parquet is read a record batch at a time, so memory does not grow
with the file. A single JSON object (e.g. pretty-printed) is one example, or, when it is not an example itself and
holds exactly one list of objects under one key, that list is the examples; it is read whole (at most
MAX_JSON_OBJECT_BYTES). Plain text is plaintext.py's. A row longer than the row cap or holding a NUL byte is that
row's problem (lines.py); the rest of the file is read.

To read a new format: a reader function here, its READERS entry, and a rule in opening.sniff_format.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from finetune.errors import DatasetError

from .detection import layouts_of_row
from .fields import Fields
from .lines import HARD_MAX_ROW_BYTES, READ_CHUNK, LongLine, ReadContext, capped_lines, nul_byte, too_long
from .plaintext import BOM, text_documents
from .problems import RowProblem, describe_columns, human_bytes, type_name

# The format names reports show.
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "txt")
# A single JSON object cannot be streamed row by row; it is read whole up to this size.
MAX_JSON_OBJECT_BYTES = 256 * 1024 * 1024


@dataclass
class Source:
    format: str
    compressed: bool
    records: Iterator  # of (row_number, dict | RowProblem)
    fraction: Callable[[], float]
    columns: list[str] | None = None
    notes: list[str] = field(default_factory=list)  # how the file was read, for the report (ReadContext.notes)


def bounded_lines(stream) -> Iterator:
    """Lines of a text stream for the CSV parser, each bounded: a record cannot be skipped in the middle of a
    parse, so a line past HARD_MAX_ROW_BYTES refuses the file rather than exhaust memory."""
    number = 0
    while True:
        line = stream.readline(HARD_MAX_ROW_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > HARD_MAX_ROW_BYTES:
            raise DatasetError(f"Line {number} is longer than {human_bytes(HARD_MAX_ROW_BYTES)}; rows that long are "
                               "not supported (is the file missing its line breaks?).")
        yield line


def _jsonl_records(stream, context: ReadContext) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(capped_lines(stream, context.max_row_bytes), start=1):
        if isinstance(line, LongLine):
            yield number, too_long(line.size, context.max_row_bytes, "line")
            continue
        if number == 1 and line.startswith(BOM):
            line = line[len(BOM):]
        if not line.strip():
            continue  # blank lines (a trailing one especially) are not rows
        if b"\x00" in line:
            yield number, nul_byte(line.index(b"\x00"), "line")
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = line[exc.start:exc.start + 4]
            yield number, RowProblem(
                "non_utf8", f"The line has bytes that are not valid UTF-8 ({bad!r} at byte {exc.start + 1}); "
                "save the file as UTF-8."
            )
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            yield number, RowProblem("malformed_json", "The line is not valid JSON: it is nested too deeply.")
            continue
        except json.JSONDecodeError as exc:
            yield number, RowProblem("malformed_json", f"The line is not valid JSON: {exc.msg} at column "
                                                       f"{exc.colno}.")
            continue
        except ValueError as exc:  # e.g. an integer with too many digits
            yield number, RowProblem("malformed_json", f"The line is not valid JSON: {exc}.")
            continue
        yield number, _object_or_problem(value, "line")


def _json_object_records(stream) -> Iterator[tuple[int, object]]:
    """A single JSON object: one example, or the examples listed under its one key that holds a list of objects."""
    raw = stream.read(MAX_JSON_OBJECT_BYTES + 1)
    if len(raw) > MAX_JSON_OBJECT_BYTES:
        raise DatasetError(f"The file is one JSON object larger than {human_bytes(MAX_JSON_OBJECT_BYTES)}; convert "
                           "it to JSON Lines (one example per line) so it can be read row by row.")
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"The file has bytes that are not valid UTF-8 at byte {exc.start + 1}; save it as "
                           "UTF-8.") from exc
    except RecursionError as exc:
        raise DatasetError("The JSON object cannot be read: it is nested too deeply.") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"The file starts with '{{' but is neither JSON Lines (one object per line) nor one JSON object: "
            f"{exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from exc
    except ValueError as exc:
        raise DatasetError(f"The JSON object cannot be read: {exc}.") from exc
    listed = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if layouts_of_row(value, Fields(None)) or not listed:
        yield 1, value
        return
    if len(listed) > 1:
        raise DatasetError(f"The JSON object holds several lists of objects ({describe_columns(listed)}); put the "
                           "examples of one of them in a file of their own.")
    yield from enumerate(value[listed[0]], start=1)


def _object_or_problem(value, what: str):
    if isinstance(value, dict):
        return value
    return RowProblem("wrong_type", f"Each {what} must be a JSON object with named fields, but this one is "
                                    f"{type_name(value)}.")


class _TextBuffer:
    """A sliding window over a text stream, for decoding a JSON array one element at a time."""

    _NON_SPACE = re.compile(r"\S")

    def __init__(self, stream):
        self.stream = stream
        self.buf = ""
        self.pos = 0
        self.eof = False

    def more(self) -> bool:
        chunk = self.stream.read(READ_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def next_char(self) -> str:
        """Skips whitespace; returns the next character without consuming it, or "" at the end."""
        while True:
            match = self._NON_SPACE.search(self.buf, self.pos)
            if match:
                self.pos = match.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self.more():
                return ""

    def decode(self, decoder: json.JSONDecoder) -> tuple[object, str]:
        """The next JSON value and its raw text."""
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                # Most likely the element continues in the next chunk; a real error shows once no more can come.
                if self.eof or len(self.buf) - self.pos > HARD_MAX_ROW_BYTES or not self.more():
                    raise
                continue
            if end == len(self.buf) and not self.eof and self.more():
                continue  # a number at the very end of the window may have more digits to come
            raw, self.pos = self.buf[self.pos:end], end
            return value, raw


def _array_element(value, raw: str, cap: int):
    """An element of a JSON array, or its problem: too long, or a raw NUL byte inside it."""
    size = len(raw.encode("utf-8", "surrogateescape")) if len(raw) * 4 > cap else len(raw)
    if size > cap:
        return too_long(size, cap, "array element")
    if "\x00" in raw:
        return nul_byte(len(raw[:raw.index("\x00")].encode("utf-8", "surrogateescape")), "array element")
    return _object_or_problem(value, "array element")


def _json_array_records(stream, context: ReadContext) -> Iterator[tuple[int, object]]:
    # surrogateescape keeps invalid UTF-8 bytes inside strings; they surface as a non_utf8 row problem later.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape")
    buf = _TextBuffer(text)
    # Not strict: a raw control character inside a string (a NUL byte especially) is that element's problem, not a
    # broken array that stops the whole file.
    decoder = json.JSONDecoder(strict=False)
    if buf.next_char() != "[":
        raise DatasetError("The file looks like a JSON array but does not start with '['.")
    buf.pos += 1
    if buf.next_char() == "]":
        raise DatasetError("The file is empty: the JSON array has no rows.")
    index = 0
    while True:
        index += 1
        try:
            if buf.next_char() == "":
                raise ValueError("the file ends before the array is closed with ']'")
            value, raw = buf.decode(decoder)
        except RecursionError as exc:
            raise DatasetError(f"The JSON array cannot be read: record {index} is nested too deeply.") from exc
        except ValueError as exc:
            raise DatasetError(
                f"The JSON array is malformed at record {index} ({exc}), so the rest of the file cannot be read. "
                "Fix the file, or convert it to JSONL (one object per line) so single bad rows can be skipped."
            ) from exc
        yield index, _array_element(value, raw, context.max_row_bytes)
        separator = buf.next_char()
        if separator == ",":
            buf.pos += 1
        elif separator == "]":
            buf.pos += 1
            break
        else:
            found = repr(separator) if separator else "the end of the file"
            raise DatasetError(f"The JSON array is malformed after record {index}: expected ',' or ']' but found "
                               f"{found}.")
    if buf.next_char() != "":
        raise DatasetError("The file has more content after the JSON array's closing ']'.")


def _delimited_records(stream, context: ReadContext, delimiter: str, name: str):
    """Returns (header, records). Row numbers are the physical line where each record starts."""
    if csv.field_size_limit() < HARD_MAX_ROW_BYTES:
        csv.field_size_limit(HARD_MAX_ROW_BYTES)  # the default (128 KiB) refuses long but legitimate answers
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(bounded_lines(text), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DatasetError(f"The {name} header cannot be read: {exc}.") from exc
    if not header or not any(h.strip() for h in header):
        raise DatasetError(f"The {name} file has no header row naming its columns.")
    header = [h.strip() for h in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise DatasetError(f"The {name} header names the column {', '.join(map(repr, repeated))} more than once.")
    return header, _delimited_rows(reader, header, name, context.max_row_bytes)


def _delimited_rows(reader, header: list[str], name: str, cap: int) -> Iterator[tuple[int, object]]:
    previous_end = reader.line_num
    seen_any = False
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DatasetError(f"The {name} file cannot be read at line {reader.line_num}: {exc}.") from exc
        start, previous_end = previous_end + 1, reader.line_num
        if not values or (len(values) == 1 and not values[0].strip() and len(header) > 1):
            continue  # blank line
        seen_any = True
        if len(values) > len(header):
            yield start, RowProblem(
                "wrong_type", f"The row has {len(values)} values but the header names {len(header)} columns "
                f"(an unquoted {'tab' if reader.dialect.delimiter == chr(9) else 'comma'} inside a value?)."
            )
            continue
        yield start, _bad_cell(header, values, start, cap) or dict(zip(header, values))
    if not seen_any:
        raise DatasetError(f"The {name} file has a header row but no data rows.")


def _bad_cell(header: list[str], values: list[str], line: int, cap: int) -> RowProblem | None:
    """A record too long, or a cell with bytes that are not UTF-8 (cp1252 exports are the usual cause) or with a NUL
    byte, named by its column and line."""
    size = sum(len(v) for v in values)
    if size * 4 > cap:  # characters are 1 to 4 bytes: count exactly only where it matters
        size = sum(len(v.encode("utf-8", "surrogateescape")) for v in values)
        if size > cap:
            return too_long(size, cap, "row")
    for column, value in zip(header, values):
        if "\x00" in value:
            return RowProblem("nul_byte", f"Column {column!r} on line {line} has a NUL byte (a zero byte, \\x00) at "
                                          f"character {value.index(chr(0)) + 1}: part of the row is corrupted or "
                                          "binary. Remove that byte or the row.")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start:exc.end].encode("utf-8", "surrogateescape")
            return RowProblem(
                "non_utf8", f"Column {column!r} on line {line} has bytes that are not valid UTF-8 ({bad!r} at "
                f"character {exc.start + 1}); the file looks saved as Windows-1252 or Latin-1. Save it as UTF-8."
            )
    return None


def parquet_source(path: Path, compressed: bool, cap: int) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetError(f"The Parquet file cannot be read: {exc}") from exc
    meta = parquet.metadata
    expanded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if expanded > cap:
        raise DatasetError(
            f"The Parquet file expands to {human_bytes(expanded)}, more than the {human_bytes(cap)} allowed. "
            "Split it into smaller files."
        )
    if meta.num_rows == 0:
        raise DatasetError("The file is empty: the Parquet file has no rows.")
    state = {"read": 0}

    def records():
        try:
            for batch in parquet.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    state["read"] += 1
                    yield state["read"], record
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DatasetError(f"The Parquet file cannot be read past row {state['read']}: {exc}") from exc

    return Source("parquet", compressed, records(), lambda: state["read"] / meta.num_rows,
                   list(parquet.schema_arrow.names))



@dataclass(frozen=True)
class Reader:
    reports_as: str  # the format name the report shows
    # (stream, context) -> (header columns or None, records); context.notes collects what the report should say
    read: Callable[[BinaryIO, ReadContext], tuple[list[str] | None, Iterator]]


# One entry per format opening.sniff_format names. Parquet is not here: pyarrow reads it from a seekable file, not a
# stream, so opening.open_source hands it the path (parquet_source above).
READERS: dict[str, Reader] = {
    "jsonl": Reader("jsonl", lambda stream, context: (None, _jsonl_records(stream, context))),
    "json": Reader("json", lambda stream, context: (None, _json_array_records(stream, context))),
    "json_object": Reader("json", lambda stream, context: (None, _json_object_records(stream))),
    "csv": Reader("csv", lambda stream, context: _delimited_records(stream, context, ",", "CSV")),
    "tsv": Reader("tsv", lambda stream, context: _delimited_records(stream, context, "\t", "TSV")),
    "txt": Reader("txt", lambda stream, context: (None, text_documents(stream, context))),
}
