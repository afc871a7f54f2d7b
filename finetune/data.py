"""Datasets: read every common file format, validate row by row, normalise, split, deduplicate, count tokens.

What goes in
    JSONL, a JSON array, a single JSON object, CSV, TSV, Parquet or plain text, each optionally gzip-compressed.
    The format is sniffed from the content (gzip magic 1f8b, Parquet magic PAR1, then the first non-blank
    character), except that a file named *.txt or *.md (file_name=) is always plain text: documents separated by
    one or more blank lines, each document one `text` row (row number = its first line). A single JSON object
    (e.g. pretty-printed) is one example, or, when it is not an example itself and holds exactly one list of
    objects under one key, that list is the examples; it is read whole (at most MAX_JSON_OBJECT_BYTES).
    A UTF-8 BOM, CRLF line endings and trailing blank lines are accepted. JSONL, CSV, TSV and JSON arrays are
    streamed; Parquet is read a record batch at a time. Memory does not grow with the file, except for the
    exact-duplicate index (16 to 32 bytes a row) and the split's per-row hash and ranking (about 17 bytes a row).
    Gzip input may expand to at most max_decompressed_bytes (default: 100x the file, at least 64 MiB), counted
    while streaming, so a gzip bomb stops early. max_rows and max_seconds bound the rows and the time spent.

Schemas (auto-detected from the first rows, or given with `schema=`; `column_map` maps our field -> your column)
    messages           {"messages": [{"role", "content"}, ...]}       roles system/user/assistant/tool; an
                       assistant turn may carry OpenAI "tool_calls" (its content may then be empty)
    sharegpt           {"conversations": [{"from", "value"}, ...]}   from human/user, gpt/assistant/model, system,
                       function_call (an assistant tool call: value is JSON {"name", "arguments"}), observation
                       (a tool result); LLaMA-Factory's layout, with optional "system" and "tools"
    prompt_completion  {"prompt", "completion"} (+ optional "system")
    alpaca             {"instruction", "input" (optional), "output"} (+ optional "system", "history": [[q, a], ...])
    text               {"text"}
    preference         {"prompt", "chosen", "rejected"}; prompt a string or a message list, chosen/rejected strings,
                       message lists ending in the assistant's answer, or one message object. Also LLaMA-Factory's
                       layouts: "conversations"/"messages" (ending with the user) + "chosen"/"rejected" message
                       objects, and alpaca's "instruction" (+ "input", "system", "history") + chosen/rejected text.
    kto                any chat layout above (messages, conversations, instruction/output, prompt/completion)
                       plus "kto_tag" or "label": true (a desirable answer) or false (an undesirable one)
    Every chat layout may carry "tools" (a list of function definitions, or that list as JSON text): it is kept
    and rendered through the chat template's tools support. A row with "images", "audio" or "videos" is refused:
    Tunedeck trains text-only models, and the row would otherwise be learned with its media silently missing.
    In CSV/TSV/Parquet a message-list field may hold the list as JSON text.

What comes out (docs/internals.md): normalised JSONL, one example a line, `{"messages": [...]}`, `{"text": ...}` or
`{"prompt": [...], "chosen": str, "rejected": str}`, KTO `{"messages": [...], "label": bool}`; chats with tools
add `"tools": [...]`.

Row numbers in problem reports are 1-based: the physical line number for JSONL, the physical line on which the
record starts for CSV/TSV (the header is line 1), and the record index for JSON arrays and Parquet.

Problem kinds: malformed_json, missing_field, unknown_role, empty_assistant, turn_order, non_utf8, wrong_type,
unsupported, duplicate. Any kind but `duplicate` makes the dataset invalid unless the caller passes drop_invalid=True (the
user's consent); duplicates are warnings, dropped only with drop_duplicates=True. Every dropped row is counted.

Near-duplicates (MinHash + LSH over 3-word shingles of lowercased text without punctuation, Jaccard >= 0.8) are
reported for the first NEAR_DUPLICATE_MAX_ROWS unique rows of a file, and between train and validation files by
overlap_report. They are information, not problems.

The normalised file is written (atomically, via a temporary file) only when the dataset comes out "ready".

Whole-file problems (empty file, unknown format, gzip bomb, a broken JSON array, unrecognised columns) raise
finetune.errors.DatasetError with a message a user can act on.

This module must stay importable by the web process: no torch or transformers at module level.
"""
from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import unicodedata
import zlib
from array import array
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from finetune.errors import DatasetError

PROBLEM_KINDS = (
    "malformed_json",
    "missing_field",
    "unknown_role",
    "empty_assistant",
    "turn_order",
    "non_utf8",
    "wrong_type",
    "unsupported",
    "duplicate",
)
SCHEMAS = ("messages", "sharegpt", "prompt_completion", "alpaca", "text", "preference", "kto")
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "txt")
PLAIN_TEXT_SUFFIXES = (".txt", ".md", ".text")
MEDIA_COLUMNS = ("images", "image", "audio", "audios", "videos", "video")

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
ZIP_MAGIC = b"PK\x03\x04"
BOM = b"\xef\xbb\xbf"

# A decompressed size cap of 100x the file on disk (real text rarely compresses past 10x) and never below 64 MiB,
# so small genuine files are not refused. Callers may pass max_decompressed_bytes to raise or lower it.
DEFAULT_MAX_EXPANSION = 100
DEFAULT_MIN_DECOMPRESSED_CAP = 64 * 1024 * 1024
# One row may not exceed this: a file with no newlines must not be read into memory as one line.
MAX_ROW_BYTES = 16 * 1024 * 1024
# A single JSON object cannot be streamed row by row; it is read whole up to this size.
MAX_JSON_OBJECT_BYTES = 256 * 1024 * 1024

_DETECTION_ROWS = 50  # parsed rows looked at to guess the schema
_DETECTION_MAX_RECORDS = 1000  # give up guessing after this many unreadable rows
_PROGRESS_EVERY_ROWS = 2048
_READ_CHUNK = 1024 * 1024

# Near-duplicate search: MinHash over 3-word shingles, LSH with 16 bands of 4, verified at Jaccard >= 0.8.
# Within one file only the first NEAR_DUPLICATE_MAX_ROWS unique rows are examined, which bounds time and memory.
NEAR_DUPLICATE_THRESHOLD = 0.8
NEAR_DUPLICATE_MAX_ROWS = 20_000
OVERLAP_MAX_VALIDATION_ROWS = 20_000
OVERLAP_MAX_TRAIN_ROWS_NEAR = 100_000
_NUM_PERM = 64
_BANDS = 16
_SHINGLE_WORDS = 3
_SIGNATURE_BATCH = 128

_MISSING = object()


class RowProblem(Exception):
    """One row's problem; raised inside the normalisers, collected by process_dataset."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


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
    warnings: list[dict] = field(default_factory=list)
    near_duplicates: dict = field(default_factory=dict)
    reason: str | None = None
    tool_rows: int = 0  # rows with tool definitions or tool-call turns (need a chat template with tools support)
    kto_labels: dict = field(default_factory=dict)  # {"desirable": n, "undesirable": n} for kto

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ opening files


class _CappedStream(io.RawIOBase):
    """Counts decompressed bytes and refuses to go past the cap, so a gzip bomb fails early and cheaply."""

    def __init__(self, inner, cap: int):
        self._inner = inner
        self._cap = cap
        self.total = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        try:
            n = self._inner.readinto(buffer)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"The gzip data is corrupt or cut short ({exc}).") from exc
        self.total += n
        if self.total > self._cap:
            raise DatasetError(
                f"The gzip file expands to more than {_human_bytes(self._cap)} (the limit is 100 times the "
                "compressed size, at least 64 MiB), which is refused as a likely gzip bomb; reading stopped there. "
                "If the data is genuine, upload it uncompressed or split it into smaller files."
            )
        return n


@dataclass
class _Source:
    format: str
    compressed: bool
    records: Iterator  # of (row_number, dict | RowProblem)
    fraction: Callable[[], float]
    columns: list[str] | None = None


def _decompression_cap(path: Path, max_decompressed_bytes: int | None) -> int:
    if max_decompressed_bytes is not None:
        return int(max_decompressed_bytes)
    return max(DEFAULT_MIN_DECOMPRESSED_CAP, DEFAULT_MAX_EXPANSION * path.stat().st_size)


def _open_decoded(path: Path, cap: int, stack: ExitStack):
    """Returns (binary stream of the decoded content, the raw file for progress, compressed?)."""
    raw = stack.enter_context(open(path, "rb"))
    if raw.read(2) != GZIP_MAGIC:
        raw.seek(0)
        return raw, raw, False
    raw.seek(0)
    gz = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    return io.BufferedReader(_CappedStream(gz, cap), buffer_size=_READ_CHUNK), raw, True


def _read_head(stream) -> bytes:
    """The first bytes that hold something other than whitespace (or everything, if there are none)."""
    head = stream.read(64 * 1024)
    while head and not head.lstrip(BOM).strip():
        more = stream.read(_READ_CHUNK)
        if not more:
            break
        head = head[-16:] + more  # the whitespace already seen does not matter
    return head


def _sniff_format(head: bytes) -> str:
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(ZIP_MAGIC):
        raise DatasetError("zip archives are not supported; upload the .jsonl/.csv inside (a gzip-compressed "
                           "file, .gz, is fine).")
    text = head[len(BOM):] if head.startswith(BOM) else head
    stripped = text.lstrip()
    if not stripped:
        raise DatasetError("The file is empty: it has no rows.")
    if b"\x00" in stripped[:8192]:
        raise DatasetError(
            "The file is binary and not a format Tunedeck reads (JSONL, JSON, CSV, TSV or Parquet, optionally "
            "gzip-compressed). If it is text, save it as UTF-8 (not UTF-16)."
        )
    first = stripped[:1]
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl" if _first_line_is_json(stripped) else "json_object"
    header = stripped.split(b"\n", 1)[0]
    return "tsv" if header.count(b"\t") > header.count(b",") else "csv"


def _first_line_is_json(text: bytes) -> bool:
    """JSON Lines has a whole object on its first line and starts every line with '{'; a pretty-printed object
    has neither. (Broken JSON Lines, every line starting with '{', stays JSON Lines: its rows are reported.)"""
    line, newline, rest = text.partition(b"\n")
    if not newline:
        return True  # one line (or one longer than the head): read as JSON Lines
    try:
        json.loads(line.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        following = rest.lstrip(b"\r\n")
        return following.startswith(b"{") or not following.strip()
    return True


def _is_plain_text_name(file_name: str | None) -> bool:
    return bool(file_name) and str(file_name).lower().removesuffix(".gz").endswith(PLAIN_TEXT_SUFFIXES)


def _open_source(path: Path, max_decompressed_bytes: int | None, stack: ExitStack,
                 file_name: str | None = None, schema: str | None = None) -> _Source:
    if not path.is_file():
        raise DatasetError(f"The dataset file {path.name} does not exist.")
    if path.stat().st_size == 0:
        raise DatasetError("The file is empty: it has no rows.")
    cap = _decompression_cap(path, max_decompressed_bytes)
    stream, raw, compressed = _open_decoded(path, cap, stack)
    head = _read_head(stream)
    if compressed and not head:
        raise DatasetError("The file is empty: the gzip archive holds no data.")
    fmt = "txt" if _is_plain_text_name(file_name) else _sniff_format(head)
    if fmt in ("csv", "tsv") and schema == "text" and not _header_has(head, "text"):
        fmt = "txt"  # schema=text on a file with no 'text' column: the user says it is plain text
    size = max(1, path.stat().st_size)
    if fmt == "parquet":
        parquet_path = _spill_to_disk(stream, head, stack) if compressed else path
        return _parquet_source(parquet_path, compressed, cap)
    if compressed:  # re-open: a gzip stream cannot be rewound cheaply through the cap wrapper
        stream, raw, _ = _open_decoded(path, cap, stack)
    else:
        stream.seek(0)

    def fraction():
        try:
            return min(1.0, raw.tell() / size)
        except (OSError, ValueError):
            return 0.0

    readers = {"jsonl": _jsonl_records, "json": _json_array_records, "txt": _text_documents}
    if fmt in readers:
        return _Source(fmt, compressed, readers[fmt](stream), fraction)
    if fmt == "json_object":
        return _Source("json", compressed, _json_object_records(stream), fraction)
    columns, records = _delimited_records(stream, "\t" if fmt == "tsv" else ",", fmt.upper())
    return _Source(fmt, compressed, records, fraction, columns)


def _header_has(head: bytes, column: str) -> bool:
    header = head.lstrip(BOM).lstrip().split(b"\n", 1)[0].decode("utf-8", "replace")
    return column in [c.strip().strip('"') for c in re.split(r"[,\t]", header)]


def _spill_to_disk(stream, head: bytes, stack: ExitStack) -> Path:
    """pyarrow needs a seekable file: decompress a gzipped Parquet file to a temporary one (still capped)."""
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunedeck-parquet-")))
    target = folder / "data.parquet"
    with open(target, "wb") as out:
        out.write(head)
        shutil.copyfileobj(stream, out, _READ_CHUNK)
    return target


# ------------------------------------------------------------------------------------------------ record readers


def _lines(stream) -> Iterator:
    """Lines of a binary or text stream, each bounded, so a file without line breaks cannot exhaust memory."""
    number = 0
    while True:
        line = stream.readline(MAX_ROW_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_ROW_BYTES:
            raise DatasetError(f"Line {number} is longer than {_human_bytes(MAX_ROW_BYTES)}; rows that long are "
                               "not supported (is the file missing its line breaks?).")
        yield line


def _jsonl_records(stream) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(_lines(stream), start=1):
        if number == 1 and line.startswith(BOM):
            line = line[len(BOM):]
        if not line.strip():
            continue  # blank lines (a trailing one especially) are not rows
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


def _text_documents(stream) -> Iterator[tuple[int, object]]:
    """Plain text: documents separated by one or more blank lines; each is one {"text"} row numbered by the line
    it starts on. Bytes that are not UTF-8 make that document a non_utf8 problem."""
    start, lines = 0, []
    for number, line in enumerate(_lines(stream), start=1):
        if number == 1 and line.startswith(BOM):
            line = line[len(BOM):]
        if line.strip():
            start = start or number
            lines.append(line)
            continue
        if lines:
            yield start, _text_document(b"".join(lines))
        start, lines = 0, []
    if lines:
        yield start, _text_document(b"".join(lines))


def _text_document(raw: bytes):
    try:
        return {"text": raw.decode("utf-8").replace("\r\n", "\n").strip("\n")}
    except UnicodeDecodeError as exc:
        return RowProblem("non_utf8", f"The text has bytes that are not valid UTF-8 ({raw[exc.start:exc.start + 4]!r} "
                                      f"at byte {exc.start + 1} of the document); save the file as UTF-8.")


def _json_object_records(stream) -> Iterator[tuple[int, object]]:
    """A single JSON object: one example, or the examples listed under its one key that holds a list of objects."""
    raw = stream.read(MAX_JSON_OBJECT_BYTES + 1)
    if len(raw) > MAX_JSON_OBJECT_BYTES:
        raise DatasetError(f"The file is one JSON object larger than {_human_bytes(MAX_JSON_OBJECT_BYTES)}; convert "
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
    if _record_schemas(value, _Fields(None)) or not listed:
        yield 1, value
        return
    if len(listed) > 1:
        raise DatasetError(f"The JSON object holds several lists of objects ({_describe_columns(listed)}); put the "
                           "examples of one of them in a file of their own.")
    yield from enumerate(value[listed[0]], start=1)


def _object_or_problem(value, what: str):
    if isinstance(value, dict):
        return value
    return RowProblem("wrong_type", f"Each {what} must be a JSON object with named fields, but this one is "
                                    f"{_type_name(value)}.")


class _TextBuffer:
    """A sliding window over a text stream, for decoding a JSON array one element at a time."""

    _NON_SPACE = re.compile(r"\S")

    def __init__(self, stream):
        self.stream = stream
        self.buf = ""
        self.pos = 0
        self.eof = False

    def more(self) -> bool:
        chunk = self.stream.read(_READ_CHUNK)
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

    def decode(self, decoder: json.JSONDecoder):
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                # Most likely the element continues in the next chunk; a real error shows once no more can come.
                if self.eof or len(self.buf) - self.pos > MAX_ROW_BYTES or not self.more():
                    raise
                continue
            if end == len(self.buf) and not self.eof and self.more():
                continue  # a number at the very end of the window may have more digits to come
            self.pos = end
            return value


def _json_array_records(stream) -> Iterator[tuple[int, object]]:
    # surrogateescape keeps invalid UTF-8 bytes inside strings; they surface as a non_utf8 row problem later.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape")
    buf = _TextBuffer(text)
    decoder = json.JSONDecoder()
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
            value = buf.decode(decoder)
        except RecursionError as exc:
            raise DatasetError(f"The JSON array cannot be read: record {index} is nested too deeply.") from exc
        except ValueError as exc:
            raise DatasetError(
                f"The JSON array is malformed at record {index} ({exc}), so the rest of the file cannot be read. "
                "Fix the file, or convert it to JSONL (one object per line) so single bad rows can be skipped."
            ) from exc
        yield index, _object_or_problem(value, "array element")
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


def _delimited_records(stream, delimiter: str, name: str):
    """Returns (header, records). Row numbers are the physical line where each record starts."""
    if csv.field_size_limit() < MAX_ROW_BYTES:
        csv.field_size_limit(MAX_ROW_BYTES)  # the default (128 KiB) refuses long but legitimate answers
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(_lines(text), delimiter=delimiter)
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
    return header, _delimited_rows(reader, header, name)


def _delimited_rows(reader, header: list[str], name: str) -> Iterator[tuple[int, object]]:
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
        yield start, _bad_cell(header, values, start) or dict(zip(header, values))
    if not seen_any:
        raise DatasetError(f"The {name} file has a header row but no data rows.")


def _bad_cell(header: list[str], values: list[str], line: int) -> RowProblem | None:
    """A cell with bytes that are not UTF-8, named by its column and line (cp1252 exports are the usual cause)."""
    for column, value in zip(header, values):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start:exc.end].encode("utf-8", "surrogateescape")
            return RowProblem(
                "non_utf8", f"Column {column!r} on line {line} has bytes that are not valid UTF-8 ({bad!r} at "
                f"character {exc.start + 1}); the file looks saved as Windows-1252 or Latin-1. Save it as UTF-8."
            )
    return None


def _parquet_source(path: Path, compressed: bool, cap: int) -> _Source:
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
            f"The Parquet file expands to {_human_bytes(expanded)}, more than the {_human_bytes(cap)} allowed. "
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

    return _Source("parquet", compressed, records(), lambda: state["read"] / meta.num_rows,
                   list(parquet.schema_arrow.names))


# ------------------------------------------------------------------------------------------------ schemas

# Detection order also breaks ties: the more specific schema first (preference before prompt_completion).
_REQUIRED_FIELDS = {
    "preference": ("prompt", "chosen", "rejected"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
_OPTIONAL_FIELDS = {"alpaca": ("input", "system", "history"), "prompt_completion": ("system",),
                    "messages": ("tools",), "sharegpt": ("system", "tools"), "kto": ("kto_tag", "label")}
KNOWN_FIELDS = sorted({f for fields in (*_REQUIRED_FIELDS.values(), *_OPTIONAL_FIELDS.values()) for f in fields})
# Layouts whose rows carry a conversation a preference or KTO row can be built on.
_CHAT_LAYOUTS = ("messages", "sharegpt", "alpaca", "prompt_completion")
# The order detection prefers on a tie: preference and KTO rows also match the chat layout they are built on.
_SCHEMA_ORDER = ("preference", "kto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # LLaMA-Factory: an assistant turn that calls a tool
    "tool": "tool",
    "observation": "tool",  # LLaMA-Factory: a tool's result
    "function": "tool",  # OpenAI's older name for a tool result
}


def _type_name(value) -> str:
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


class _Fields:
    """Our field names resolved to the user's columns; `label` names a field the way the user knows it."""

    def __init__(self, column_map: dict[str, str] | None):
        self.columns = dict(column_map or {})

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def get(self, record: dict, name: str):
        return record.get(self.columns.get(name, name), _MISSING)

    def label(self, name: str) -> str:
        column = self.columns.get(name, name)
        return f"'{column}'" if column == name else f"'{column}' (used as {name})"


def _required(record: dict, fields: _Fields, name: str):
    value = fields.get(record, name)
    if value is _MISSING:
        raise RowProblem("missing_field", f"The row has no {fields.label(name)} field.")
    if value is None:
        raise RowProblem("missing_field", f"The {fields.label(name)} field is empty (null).")
    return value


def _text_field(record: dict, fields: _Fields, name: str, *, optional: bool = False) -> str:
    value = fields.get(record, name)
    if optional and (value is _MISSING or value is None):
        return ""
    value = _required(record, fields, name)
    if not isinstance(value, str):
        raise RowProblem("wrong_type", f"The {fields.label(name)} field should be text, but it is "
                                       f"{_type_name(value)}.")
    return value


def _maybe_json_list(value):
    """A message list stored as JSON text (CSV cells, some exports) is parsed; anything else is returned as is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(parsed, list):
            return parsed
    return value


def _message_list(record: dict, fields: _Fields, name: str) -> list[dict]:
    raw = _required(record, fields, name)
    value = _maybe_json_list(raw)
    if isinstance(value, str) and value.lstrip().startswith("["):
        raise RowProblem("malformed_json", f"The {fields.label(name)} field holds text that starts like a JSON "
                                           "list of messages but is not valid JSON.")
    if not isinstance(value, (list, tuple)):
        raise RowProblem("wrong_type", f"The {fields.label(name)} field should be a list of messages, but it is "
                                       f"{_type_name(value)}.")
    if not value:
        raise RowProblem("turn_order", f"The {fields.label(name)} list is empty: a conversation needs a user turn "
                                       "and an assistant answer.")
    return [_parse_turn(turn, i, fields.label(name)) for i, turn in enumerate(value, start=1)]


def _parse_turn(turn, number: int, label: str) -> dict:
    if not isinstance(turn, dict):
        raise RowProblem("wrong_type", f"Turn {number} of {label} is {_type_name(turn)}, but each turn must be an "
                                       "object with a role and content.")
    role_key = "role" if "role" in turn else "from" if "from" in turn else None
    if role_key is None:
        raise RowProblem("missing_field", f"Turn {number} of {label} has no 'role' (or 'from') field.")
    role = turn[role_key]
    if not isinstance(role, str):
        raise RowProblem("wrong_type", f"Turn {number} of {label} has a '{role_key}' that is {_type_name(role)}, "
                                       "not text.")
    normal = _ROLE_ALIASES.get(role.strip().lower())
    if normal is None:
        raise RowProblem("unknown_role", f"Turn {number} of {label} has the role {role!r}; expected system, user "
                                         "or assistant (or human, gpt, model).")
    content_key = "content" if "content" in turn else "value" if "value" in turn else None
    if role.strip().lower() == "function_call":
        return {"role": "assistant", "content": "",
                "tool_calls": [_tool_call(turn.get(content_key), number, label)]}
    if normal == "assistant" and turn.get("tool_calls"):
        calls = turn["tool_calls"]
        if not isinstance(calls, list):
            raise RowProblem("wrong_type", f"Turn {number} of {label} has 'tool_calls' that is {_type_name(calls)}, "
                                           "not a list.")
        content = turn.get(content_key) if content_key else None
        text = "" if content is None else _turn_text(content, number, label, normal)
        return {"role": "assistant", "content": text, "tool_calls": [_tool_call(c, number, label) for c in calls]}
    if content_key is None:
        raise RowProblem("missing_field", f"Turn {number} of {label} ({normal}) has no 'content' (or 'value') "
                                          "field.")
    content = _turn_text(turn[content_key], number, label, normal)
    if normal == "tool" and isinstance(turn.get("name"), str):
        return {"role": "tool", "name": turn["name"], "content": content}
    return {"role": normal, "content": content}


def _tool_call(call, number: int, label: str) -> dict:
    """An OpenAI tool call {"type": "function", "function": {"name", "arguments"}}, from that form, from
    {"name", "arguments"}, or from that object as JSON text (LLaMA-Factory's function_call turn)."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except (ValueError, RecursionError):
            raise RowProblem("malformed_json", f"Turn {number} of {label} is a tool call whose text is not JSON "
                                               '{"name": ..., "arguments": ...}.') from None
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RowProblem("wrong_type", f"Turn {number} of {label} has a tool call without a function name; "
                                       'expected {"name": ..., "arguments": {...}}.')
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            raise RowProblem("malformed_json", f"Turn {number} of {label} calls {function['name']!r} with "
                                               "arguments that are not valid JSON.") from None
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _tools(record: dict, fields: _Fields) -> list[dict] | None:
    """Tool definitions: a list (or its JSON text) of OpenAI {"type": "function", "function": {...}} entries or
    bare {"name", "description", "parameters"} ones (LLaMA-Factory); None when the row has none."""
    raw = fields.get(record, "tools")
    if raw is _MISSING or raw is None or raw == "" or raw == []:
        return None
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            raise RowProblem("malformed_json", f"The {fields.label('tools')} field is not a JSON list of tool "
                                               "definitions.") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowProblem("wrong_type", f"The {fields.label('tools')} field should be a list of tool definitions, "
                                       f"but it is {_type_name(value)}.")
    tools = []
    for tool in value:
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowProblem("wrong_type", f"A tool in {fields.label('tools')} has no name.")
        tools.append({"type": "function", "function": function})
    return tools


def _turn_text(content, number: int, label: str, role: str) -> str:
    if content is None:
        if role == "assistant":
            raise RowProblem("empty_assistant", f"Turn {number} of {label} is an assistant turn with no content "
                                                "(null).")
        raise RowProblem("missing_field", f"Turn {number} of {label} ({role}) has no content (null).")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)  # OpenAI content parts, text only
    raise RowProblem("wrong_type", f"Turn {number} of {label} ({role}) has content that is {_type_name(content)}; "
                                   "it should be text.")


def _check_assistant_content(turns: list[dict], label: str):
    for number, turn in enumerate(turns, start=1):
        if turn["role"] == "assistant" and not turn["content"].strip() and not turn.get("tool_calls"):
            raise RowProblem("empty_assistant", f"Turn {number} of {label} is an assistant turn with empty content.")


def _check_turn_order(turns: list[dict], label: str, *, last: str):
    """System only first, then user/assistant alternating from the user, ending with `last`."""
    for number, turn in enumerate(turns[1:], start=2):
        if turn["role"] == "system":
            raise RowProblem("turn_order", f"Turn {number} of {label} is a system message; a system message may "
                                           "only come first.")
    dialogue = turns[1:] if turns[0]["role"] == "system" else turns
    offset = len(turns) - len(dialogue)
    if not dialogue:
        raise RowProblem("turn_order", f"{label} has only a system message and no user or assistant turns.")
    if dialogue[0]["role"] != "user":
        raise RowProblem("turn_order", f"Turn {offset + 1} of {label} is from the assistant; the conversation must "
                                       "start with the user.")
    for i in range(1, len(dialogue)):
        role, before = dialogue[i]["role"], dialogue[i - 1]["role"]
        if role == "tool":
            if before == "tool" or dialogue[i - 1].get("tool_calls"):
                continue  # results of the previous turn's tool calls
            raise RowProblem("turn_order", f"Turn {offset + i + 1} of {label} is a tool result that does not follow "
                                           "an assistant turn with tool calls.")
        if dialogue[i - 1].get("tool_calls"):
            raise RowProblem("turn_order", f"Turn {offset + i} of {label} calls a tool, but turn {offset + i + 1} "
                                           "is not the tool's result.")
        if role == before or (role == "user" and before == "tool"):
            raise RowProblem("turn_order", f"Turns {offset + i} and {offset + i + 1} of {label} are both from the "
                                           f"{role if role == before else 'user side'}; user and assistant turns "
                                           "must alternate.")
    if dialogue[-1]["role"] != last:
        if last == "assistant" and len(dialogue) == 1:
            raise RowProblem("turn_order", f"{label} has no assistant turn to learn from.")
        raise RowProblem("turn_order", f"{label} ends with a {dialogue[-1]['role']} turn; the last turn must be "
                                       f"the {last}'s.")


def _with_system_column(turns: list[dict], record: dict, fields: _Fields) -> list[dict]:
    """LLaMA-Factory keeps the system prompt in its own column beside the conversation."""
    system = _text_field(record, fields, "system", optional=True)
    if system.strip() and turns[0]["role"] != "system":
        return [{"role": "system", "content": system}, *turns]
    return turns


def _with_tools(example: dict, record: dict, fields: _Fields) -> dict:
    tools = _tools(record, fields)
    if tools:
        example["tools"] = tools
    return example


def _normalise_conversation(record: dict, fields: _Fields, name: str) -> dict:
    turns = _with_system_column(_message_list(record, fields, name), record, fields)
    label = fields.label(name)
    _check_assistant_content(turns, label)
    _check_turn_order(turns, label, last="assistant")
    return _with_tools({"messages": turns}, record, fields)


def _normalise_messages(record, fields):
    return _normalise_conversation(record, fields, "messages")


def _normalise_sharegpt(record, fields):
    return _normalise_conversation(record, fields, "conversations")


def _pair(system: str, prompt: str, answer: str) -> dict:
    turns = [{"role": "system", "content": system}] if system.strip() else []
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": turns}


def _answer(record: dict, fields: _Fields, name: str) -> str:
    value = _text_field(record, fields, name)
    if not value.strip():
        raise RowProblem("empty_assistant", f"The {fields.label(name)} field (the assistant's answer) is empty.")
    return value


def _normalise_prompt_completion(record, fields):
    prompt = _text_field(record, fields, "prompt")
    completion = _answer(record, fields, "completion")
    if not prompt.strip():
        raise RowProblem("missing_field", f"The {fields.label('prompt')} field is empty.")
    return _pair(_text_field(record, fields, "system", optional=True), prompt, completion)


def _alpaca_prompt(record, fields) -> list[dict]:
    """System, the history's [question, answer] pairs, then instruction + input as the last user turn."""
    instruction = _text_field(record, fields, "instruction")
    extra = _text_field(record, fields, "input", optional=True)
    if not instruction.strip() and not extra.strip():
        raise RowProblem("missing_field", f"The {fields.label('instruction')} field is empty.")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = _text_field(record, fields, "system", optional=True)
    turns = [{"role": "system", "content": system}] if system.strip() else []
    return turns + _alpaca_history(record, fields) + [{"role": "user", "content": prompt}]


def _alpaca_history(record, fields) -> list[dict]:
    history = _maybe_json_list(fields.get(record, "history"))
    if history is _MISSING or history is None or history == "":
        return []
    label = fields.label("history")
    if not isinstance(history, list):
        raise RowProblem("wrong_type", f"The {label} field should be a list of [question, answer] pairs, but it "
                                       f"is {_type_name(history)}.")
    turns = []
    for number, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowProblem("wrong_type", f"Entry {number} of {label} should be a [question, answer] pair of "
                                           f"texts, but it is {_type_name(pair)}.")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def _normalise_alpaca(record, fields):
    turns = _alpaca_prompt(record, fields) + [{"role": "assistant", "content": _answer(record, fields, "output")}]
    _check_assistant_content(turns, fields.label("history"))
    return {"messages": turns}


def _normalise_text(record, fields):
    text = _text_field(record, fields, "text")
    if not text.strip():
        raise RowProblem("missing_field", f"The {fields.label('text')} field is empty.")
    return {"text": text}


def _preference_prompt(record: dict, fields: _Fields) -> list[dict]:
    for name in ("messages", "conversations"):  # LLaMA-Factory: the conversation up to the user's last turn
        if fields.get(record, "prompt") is _MISSING and fields.get(record, name) is not _MISSING:
            turns = _with_system_column(_message_list(record, fields, name), record, fields)
            _check_turn_order(turns, fields.label(name), last="user")
            return turns
    if fields.get(record, "prompt") is _MISSING and fields.get(record, "instruction") is not _MISSING:
        return _alpaca_prompt(record, fields)
    value = _maybe_json_list(_required(record, fields, "prompt"))
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem("missing_field", f"The {fields.label('prompt')} field is empty.")
        return [{"role": "user", "content": value}]
    turns = _message_list(record, fields, "prompt")
    _check_turn_order(turns, fields.label("prompt"), last="user")
    return turns


def _preference_answer(record: dict, fields: _Fields, name: str) -> str:
    value = _maybe_json_list(_required(record, fields, name))
    label = fields.label(name)
    if isinstance(value, dict):
        value = [value]  # LLaMA-Factory: one message object {"from": "gpt", "value": ...}
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)) and value:
        turns = [_parse_turn(turn, i, label) for i, turn in enumerate(value, start=1)]
        if turns[-1]["role"] != "assistant":
            raise RowProblem("turn_order", f"{label} must end with the assistant's answer, but its last turn is "
                                           f"from the {turns[-1]['role']}.")
        text = turns[-1]["content"]
    else:
        raise RowProblem("wrong_type", f"The {label} field should be text or a list of messages ending in the "
                                       f"assistant's answer, but it is {_type_name(value)}.")
    if not text.strip():
        raise RowProblem("empty_assistant", f"The {label} answer is empty.")
    return text


def _normalise_preference(record, fields):
    prompt = _preference_prompt(record, fields)
    return {
        "prompt": prompt,
        "chosen": _preference_answer(record, fields, "chosen"),
        "rejected": _preference_answer(record, fields, "rejected"),
    }


def _kto_label(record, fields) -> bool:
    name = "kto_tag" if fields.get(record, "kto_tag") is not _MISSING else "label"
    value = _required(record, fields, name)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")  # CSV cells
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise RowProblem("wrong_type", f"The {fields.label(name)} field should be true (a desirable answer) or false "
                                   f"(an undesirable one), but it is {_type_name(value)}.")


def _normalise_kto(record, fields):
    """A chat row plus its KTO label; the chat may be in any of the chat layouts."""
    layout = next((s for s in _CHAT_LAYOUTS if all(fields.column(f) in record for f in _REQUIRED_FIELDS[s])), None)
    if layout is None:
        raise RowProblem("missing_field", "The row has a KTO label but no conversation (messages, conversations, "
                                          "instruction/output or prompt/completion).")
    example = _NORMALISERS[layout](record, fields)
    example["label"] = _kto_label(record, fields)
    return example


def _unsupported_media(record: dict) -> RowProblem | None:
    for column in MEDIA_COLUMNS:
        value = record.get(column)
        if value not in (None, "", [], {}):
            return RowProblem("unsupported", f"The row has {column!r} ({_type_name(value)}): Tunedeck trains "
                                             "text-only models, so it would learn this row with the media missing. "
                                             f"Remove the {column!r} column (and markers such as <image>) or these "
                                             "rows.")
    return None


_NORMALISERS = {
    "messages": _normalise_messages,
    "sharegpt": _normalise_sharegpt,
    "prompt_completion": _normalise_prompt_completion,
    "alpaca": _normalise_alpaca,
    "text": _normalise_text,
    "preference": _normalise_preference,
    "kto": _normalise_kto,
}


def _record_schemas(record: dict, fields: _Fields) -> list[str]:
    """The schemas one row fits, by the fields it has."""
    def has(name):
        return fields.column(name) in record

    fits = [s for s in _SCHEMA_ORDER if s in _REQUIRED_FIELDS and all(has(f) for f in _REQUIRED_FIELDS[s])]
    chat = any(s in _CHAT_LAYOUTS for s in fits)
    if has("chosen") and has("rejected") and "preference" not in fits and (
            has("messages") or has("conversations") or has("instruction")):
        fits.insert(0, "preference")
    if chat and (has("kto_tag") or has("label")):
        fits.insert(0, "kto")
    return fits


def _schema_candidates(records: list[dict], fields: _Fields) -> list[str]:
    """Schemas whose fields the sampled rows have, most rows first, ties by specificity."""
    counts = Counter()
    for record in records:
        counts.update(_record_schemas(record, fields))
    return sorted(counts, key=lambda s: (-counts[s], _SCHEMA_ORDER.index(s)))


def check_options(schema, column_map):
    """Refuses an unknown schema or column_map field at once (the web calls this before storing an upload)."""
    if schema is not None and schema not in SCHEMAS:
        raise DatasetError(f"Unknown schema {schema!r}; choose one of {', '.join(SCHEMAS)}.")
    if column_map is None:
        return
    if not isinstance(column_map, dict):
        raise DatasetError("column_map must map our field names to your column names, e.g. "
                           '{"prompt": "question", "completion": "answer"}.')
    for ours, theirs in column_map.items():
        if ours not in KNOWN_FIELDS:
            raise DatasetError(f"column_map names the field {ours!r}, which no schema uses; the fields are "
                               f"{', '.join(KNOWN_FIELDS)}.")
        if not isinstance(theirs, str) or not theirs:
            raise DatasetError(f"column_map must give a column name for {ours!r}, not {theirs!r}.")


# ------------------------------------------------------------------------------------------------ output


def _serialise(example: dict) -> bytes:
    text = json.dumps(example, ensure_ascii=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        where = _field_with_bad_text(example) or "a field"
        raise RowProblem("non_utf8", f"{where} contains bytes that are not valid UTF-8 (or an unpaired surrogate "
                                     "escape); save the file as UTF-8.") from None


def _field_with_bad_text(value, path: str = "") -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"The field {path}" if path else "The row"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _field_with_bad_text(item, f"{path}[{key!r}]" if path else repr(key))
        if found:
            return found
    return None


class _AtomicOutput:
    """Writes to a temporary file beside the target; only commit() makes the target appear."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        self.tmp = Path(name)
        self.file = os.fdopen(fd, "wb", buffering=_READ_CHUNK)

    def commit(self):
        self.file.close()
        os.replace(self.tmp, self.target)

    def discard(self):
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if not self.file.closed or self.tmp.exists():
            self.discard()


# ------------------------------------------------------------------------------------------------ duplicates


def _row_hash(line: bytes, key: bytes = b"") -> int:
    return int.from_bytes(hashlib.blake2b(line, digest_size=8, key=key).digest(), "little") or 1


class _HashIndex:
    """An open-addressing map from 64-bit row hash to row number: 16 bytes a row, a quarter of a Python dict."""

    def __init__(self, capacity: int = 1 << 14):
        self._keys = array("Q", bytes(8 * capacity))
        self._rows = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._size = 0

    def _slot(self, key: int) -> int:
        """The slot holding key, or the empty slot where it would go (0 marks an empty slot)."""
        keys, mask = self._keys, self._mask
        i = key & mask
        while keys[i] != key and keys[i] != 0:
            i = (i + 1) & mask
        return i

    def add(self, key: int, row: int) -> int | None:
        """Stores key -> row; returns the row stored earlier under the same key, if any."""
        i = self._slot(key)
        if self._keys[i] == key:
            return self._rows[i]
        self._keys[i] = key
        self._rows[i] = row
        self._size += 1
        if self._size * 2 > self._mask:
            self._grow()
        return None

    def get(self, key: int) -> int | None:
        i = self._slot(key)
        return self._rows[i] if self._keys[i] == key else None

    def _grow(self):
        old_keys, old_rows = self._keys, self._rows
        capacity = (self._mask + 1) * 2
        self._keys = array("Q", bytes(8 * capacity))
        self._rows = array("Q", bytes(8 * capacity))
        self._mask = capacity - 1
        self._size = 0
        for k, r in zip(old_keys, old_rows):
            if k:
                self.add(k, r)


@functools.lru_cache(maxsize=1)
def _punctuation_to_space() -> dict[int, str]:
    """Every punctuation and symbol character of the Basic Multilingual Plane mapped to a space (built once)."""
    return {cp: " " for cp in range(0x10000) if unicodedata.category(chr(cp))[0] in "PS"}


def similarity_words(example: dict) -> list[str]:
    """The words compared for near-duplicates: every message, prompt and answer, lowercased, punctuation gone."""
    if "text" in example:
        parts = [example["text"]]
    elif "messages" in example:
        parts = [m["content"] for m in example["messages"]]
    else:
        parts = [m["content"] for m in example.get("prompt", [])] + [example.get("chosen", ""),
                                                                     example.get("rejected", "")]
    return "\n".join(parts).lower().translate(_punctuation_to_space()).split()


class _MinHashIndex:
    """MinHash signatures with LSH banding; a candidate counts only if its estimated Jaccard >= the threshold."""

    def __init__(self, max_rows: int, threshold: float = NEAR_DUPLICATE_THRESHOLD):
        rng = np.random.default_rng(20240607)  # fixed: reports must not change between runs
        # Random affine maps of 32-bit shingle hashes, (a * x + b) mod 2**32 with odd a: bijections that estimate
        # Jaccard without bias (checked: std 0.05 at J=0.8 with 64 of them), and 32-bit products vectorise well.
        self._a = (rng.integers(0, 1 << 31, size=(_NUM_PERM, 1)) * 2 + 1).astype(np.uint32)
        self._b = rng.integers(0, 1 << 32, size=(_NUM_PERM, 1)).astype(np.uint32)
        self._band_mix = rng.integers(0, 1 << 63, size=_NUM_PERM // _BANDS, dtype=np.uint64) | np.uint64(1)
        self._signatures = np.zeros((min(max_rows, 1024), _NUM_PERM), dtype=np.uint32)
        self._row_numbers: list[int] = []
        self._buckets = [dict() for _ in range(_BANDS)]
        self.max_rows = max_rows
        self.threshold = threshold

    @property
    def full(self) -> bool:
        return len(self._row_numbers) >= self.max_rows

    def signatures(self, texts: list[list[str]]) -> np.ndarray:
        """One signature row per word list, vectorised over the whole batch (numpy's per-call cost dominates
        otherwise). Words are hashed with crc32, not Python's per-process hash, so reports repeat exactly."""
        texts = [words or [""] for words in texts]
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        flat = list(chain.from_iterable(texts))
        try:
            words = np.fromiter(map(zlib.crc32, map(str.encode, flat)), dtype=np.uint64, count=len(flat))
        except UnicodeEncodeError:  # an unpaired surrogate, only possible in a hand-made normalised file
            encoded = (w.encode("utf-8", "surrogatepass") for w in flat)
            words = np.fromiter(map(zlib.crc32, encoded), dtype=np.uint64, count=len(flat))
        shingles = words.copy()  # shingle i is hashed from words i, i+1, i+2, wrapping mod 2**64
        shingles[:-2] = (words[:-2] * np.uint64(0x9E3779B97F4A7C15) + words[1:-1] * np.uint64(0xC2B2AE3D27D4EB4F)
                         + words[2:])
        short = lengths < _SHINGLE_WORDS  # texts of one or two words are compared word by word
        if short.any():
            use_words = np.repeat(short, lengths)
            shingles[use_words] = words[use_words]
        hashed = ((shingles >> np.uint64(32)) ^ shingles).astype(np.uint32)
        permuted = self._a * np.append(hashed, np.uint32(0))[None, :] + self._b  # a spare column for reduceat
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        ends = starts + np.where(short, lengths, lengths - (_SHINGLE_WORDS - 1))
        bounds = np.empty(2 * len(texts), dtype=np.int64)
        bounds[0::2], bounds[1::2] = starts, ends
        return np.minimum.reduceat(permuted, bounds, axis=1)[:, 0::2].T.copy()

    def band_keys(self, signatures: np.ndarray) -> list[list[int]]:
        """Per signature, one bucket key for each band (its rows mixed into one 64-bit number)."""
        bands = signatures.reshape(len(signatures), _BANDS, -1).astype(np.uint64)
        return (bands * self._band_mix).sum(axis=2).tolist()

    def best_match(self, signature: np.ndarray, keys: list[int]) -> tuple[int, float] | None:
        """(row number, estimated Jaccard) of the most similar indexed row at or above the threshold."""
        candidates = {bucket[key] for bucket, key in zip(self._buckets, keys) if key in bucket}
        best = None
        for slot in candidates:
            similarity = float(np.count_nonzero(self._signatures[slot] == signature)) / _NUM_PERM
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (self._row_numbers[slot], similarity)
        return best

    def add(self, signature: np.ndarray, keys: list[int], row: int):
        slot = len(self._row_numbers)
        if slot >= len(self._signatures):
            grown = np.zeros((min(self.max_rows, 2 * len(self._signatures)), _NUM_PERM), dtype=np.uint32)
            grown[:slot] = self._signatures
            self._signatures = grown
        self._signatures[slot] = signature
        self._row_numbers.append(row)
        for bucket, key in zip(self._buckets, keys):
            bucket.setdefault(key, slot)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _NearDuplicates:
    """Near-duplicates within one file, over the first NEAR_DUPLICATE_MAX_ROWS unique rows, checked in batches."""

    def __init__(self, max_examples: int, max_rows: int | None = None):
        self.index = _MinHashIndex(NEAR_DUPLICATE_MAX_ROWS if max_rows is None else max_rows)
        self.max_examples = max_examples
        self.count = 0
        self.examples: list[dict] = []
        self.skipped = 0
        self._pending: list[tuple[int, list[str]]] = []

    def check(self, row: int, example: dict):
        if len(self.index._row_numbers) + len(self._pending) >= self.index.max_rows:
            self.skipped += 1
            return
        self._pending.append((row, similarity_words(example)))
        if len(self._pending) >= _SIGNATURE_BATCH:
            self._flush()

    def _flush(self):
        if not self._pending:
            return
        signatures = self.index.signatures([words for _, words in self._pending])
        for (row, _), signature, keys in zip(self._pending, signatures, self.index.band_keys(signatures)):
            match = self.index.best_match(signature, keys)
            if match:
                self.count += 1
                if len(self.examples) < self.max_examples:
                    self.examples.append({"row": row, "similar_to_row": match[0], "similarity": round(match[1], 3)})
            self.index.add(signature, keys, row)
        self._pending = []

    def report(self) -> dict:
        self._flush()
        examined = len(self.index._row_numbers)
        note = None
        if self.skipped:
            note = (f"Only the first {examined} unique rows were checked for near-duplicates; "
                    f"{self.skipped} later rows were not.")
        return {
            "method": f"minhash-lsh over {_SHINGLE_WORDS}-word shingles of lowercased text without punctuation",
            "threshold": NEAR_DUPLICATE_THRESHOLD,
            "count": self.count,
            "rows_examined": examined,
            "rows_not_examined": self.skipped,
            "note": note,
            "examples": self.examples,
        }


# ------------------------------------------------------------------------------------------------ processing


class _Tally:
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


def _take_sample(records: Iterator) -> list:
    head, dicts = [], 0
    for item in records:
        head.append(item)
        dicts += isinstance(item[1], dict)
        if dicts >= _DETECTION_ROWS or len(head) >= _DETECTION_MAX_RECORDS:
            break
    return head


def _sample_columns(head: list) -> list[str]:
    columns: dict[str, None] = {}
    for _, record in head:
        if isinstance(record, dict):
            columns.update(dict.fromkeys(map(str, record)))
    return list(columns)


def _resolve_schema(schema, head, candidates, columns):
    detected = candidates[0] if candidates else None
    chosen = schema or detected
    if chosen is not None:
        return detected, chosen
    parsed = any(isinstance(record, dict) for _, record in head)
    if not parsed and len(head) < _DETECTION_MAX_RECORDS:
        return None, None  # every row is broken; the problems say why
    if not parsed:
        first = head[0][1]
        raise DatasetError(f"None of the first {len(head)} rows could be read (row {head[0][0]}: {first.message})")
    expected = "; ".join(f"{s}: {', '.join(f)}" for s, f in _REQUIRED_FIELDS.items()) + (
        "; kto: a chat layout plus kto_tag or label")
    raise DatasetError(
        f"The columns {_describe_columns(columns)} match no known schema (expected {expected}). Choose a "
        "schema and map your columns to its fields with column_map, e.g. "
        '{"prompt": "question", "completion": "answer"}.'
    )


def _describe_columns(columns: list[str], limit: int = 10) -> str:
    shown = [repr(c if len(c) <= 40 else c[:37] + "...") for c in columns[:limit]]
    more = f" and {len(columns) - limit} more" if len(columns) > limit else ""
    return ", ".join(shown) + more


def _invalid_reason(tally: _Tally, total: int, valid: int, drop_invalid: bool) -> str | None:
    bad = {k: n for k, n in tally.counts.items() if k != "duplicate"}
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(bad.items()))
    if valid == 0:
        return f"No row is usable: all {total} rows have problems ({summary})."
    if bad and not drop_invalid:
        return (f"{sum(bad.values())} of {total} rows have problems ({summary}). Fix them, or drop those rows "
                "(drop_invalid) and use the rest.")
    return None


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
) -> DatasetReport:
    """Reads `src_path` in any supported format, validates and normalises every row, writes the usable rows as
    normalised JSONL to `out_path` (only when the dataset is ready; atomically) and returns a DatasetReport.

    max_decompressed_bytes caps what a gzip file may expand to; the default is 100x the file size, at least
    64 MiB. file_name (the user's) makes *.txt/*.md plain text. max_rows and max_seconds stop the reading with a
    DatasetError once passed. Raises DatasetError for whole-file problems; row problems go in the report.
    """
    src_path, out_path = Path(src_path), Path(out_path)
    check_options(schema, column_map)
    fields = _Fields(column_map)
    budget = _Budget(max_rows, max_seconds)
    with ExitStack() as stack:
        source = _open_source(src_path, max_decompressed_bytes, stack, file_name, schema)
        head = _take_sample(source.records)
        if not head:
            raise DatasetError("The file is empty: it has no rows.")
        columns = source.columns or _sample_columns(head)
        candidates = _schema_candidates([r for _, r in head if isinstance(r, dict)], fields)
        detected, chosen = _resolve_schema(schema, head, candidates, columns)
        output = stack.enter_context(_AtomicOutput(out_path))
        report = DatasetReport(
            status="invalid", format=source.format, compressed=source.compressed, schema=chosen,
            schema_detected=detected, schema_candidates=candidates, columns=columns,
        )
        tally = _Tally(max_problem_examples)
        near = _NearDuplicates(max_problem_examples)
        _validate_rows(chain(head, source.records), chosen, fields, output, tally, near, report,
                       drop_invalid=drop_invalid, drop_duplicates=drop_duplicates,
                       progress=progress, fraction=source.fraction, budget=budget)
        report.problem_counts = dict(tally.counts)
        report.dropped_counts = dict(tally.dropped)
        report.dropped_rows = sum(tally.dropped.values())
        report.errors = tally.listed(duplicates=False)
        report.warnings = tally.listed(duplicates=True)
        report.near_duplicates = near.report()
        report.reason = _invalid_reason(tally, report.total_rows, report.valid_rows, drop_invalid)
        if report.reason is None:
            report.status = "ready"
            output.commit()
        else:
            output.discard()
    if progress:
        progress(1.0)
    return report


class _Budget:
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


def _other_layout(record, schema: str, fields: _Fields, problem: RowProblem) -> RowProblem:
    """A row missing a field of the file's layout but fitting another one: say that layouts are mixed."""
    if problem.kind != "missing_field" or not isinstance(record, dict):
        return problem
    others = [s for s in _record_schemas(record, fields) if s != schema]
    if not others:
        return problem
    return RowProblem("missing_field", f"{problem.message} The row is laid out as {others[0]} (it has "
                                       f"{_describe_columns(list(map(str, record)), 6)}), but the file's first rows "
                                       f"are {schema}; one file must use one layout.")


def _validate_rows(rows, schema, fields, output, tally, near, report, *, drop_invalid, drop_duplicates, progress,
                   fraction, budget):
    normalise = _NORMALISERS.get(schema)
    seen = _HashIndex()
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
            if isinstance(record, RowProblem):
                raise record
            media = _unsupported_media(record)
            if media:
                raise media
            try:
                example = normalise(record, fields)
            except RowProblem as problem:
                raise _other_layout(record, schema, fields, problem) from None
            line = _serialise(example)
        except RowProblem as problem:
            tally.add(row, problem.kind, problem.message)
            if drop_invalid:
                tally.dropped[problem.kind] += 1
            continue
        first = seen.add(_row_hash(line), row)
        if first is not None:
            tally.add(row, "duplicate", f"The row is an exact duplicate of row {first} (after normalisation).")
            if drop_duplicates:
                tally.dropped["duplicate"] += 1
                continue
        else:
            near.check(row, example)
        write(line)
        valid += 1
        report.tool_rows += int("tools" in example or any(
            "tool_calls" in m or m["role"] == "tool" for m in example.get("messages", ())))
        if "label" in example:
            labels["desirable" if example["label"] else "undesirable"] += 1
    budget.check(total)
    report.total_rows, report.valid_rows = total, valid
    report.kto_labels = dict(labels)


# ------------------------------------------------------------------------------------------------ reading back


def iter_examples(normalised_path) -> Iterator[dict]:
    """The examples of a normalised JSONL file (as written by process_dataset or split_dataset), in order."""
    with open(normalised_path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _normalised_lines(path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield line if line.endswith(b"\n") else line + b"\n"


def split_dataset(normalised_path, train_out, val_out, *, fraction: float, seed: int) -> tuple[int, int]:
    """Splits a normalised file into train and validation files; returns (n_train, n_val).

    Each row is ranked by a hash keyed with the seed, and the lowest round(n * fraction) rows (at least one if
    fraction > 0 and there are two rows or more) go to validation, so the same file and seed always give the same
    split, identical rows land on the same side, and at least one row is left for training. Both files keep the
    original row order.
    """
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise DatasetError(f"The validation fraction must be a number, not {fraction!r}.") from None
    if not 0 <= fraction < 1 or math.isnan(fraction):
        raise DatasetError(f"The validation fraction must be at least 0 and below 1, not {fraction}.")
    key = str(int(seed)).encode()
    hashes = array("Q", (_row_hash(line, key) for line in _normalised_lines(normalised_path)))
    n = len(hashes)
    if n == 0:
        raise DatasetError("The dataset has no rows to split.")
    n_val = min(n - 1, round(n * fraction))
    if fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    in_val = np.zeros(n, dtype=bool)
    in_val[np.argsort(np.frombuffer(hashes, dtype=np.uint64), kind="stable")[:n_val]] = True
    with _AtomicOutput(train_out) as train, _AtomicOutput(val_out) as val:
        for i, line in enumerate(_normalised_lines(normalised_path)):
            (val if in_val[i] else train).file.write(line)
        train.commit()
        val.commit()
    return n - n_val, n_val


def overlap_report(train_path, val_path, *, max_examples: int = 5) -> dict:
    """How many validation rows also appear in training: exactly (same normalised row) or nearly (MinHash
    Jaccard >= 0.8 on the lowercased text without punctuation). Row numbers are 1-based lines of each file.
    Near matching indexes at most OVERLAP_MAX_VALIDATION_ROWS validation rows and scans at most
    OVERLAP_MAX_TRAIN_ROWS_NEAR training rows; exact matching covers everything.
    """
    exact_index, near_index, val_rows = _index_validation(val_path)
    exact: set[int] = set()
    near: dict[int, tuple[int, float]] = {}
    examples: list[dict] = []
    train_rows = 0
    for batch in _batched(enumerate(_normalised_lines(train_path), start=1), _SIGNATURE_BATCH):
        train_rows = batch[-1][0]
        unmatched = []
        for row, line in batch:
            val_row = exact_index.get(_row_hash(line))
            if val_row is None:
                unmatched.append((row, line))
            elif val_row not in exact:
                exact.add(val_row)
                if len(examples) < max_examples:
                    examples.append({"kind": "exact", "train_row": row, "validation_row": val_row,
                                     "similarity": 1.0})
        unmatched = [(row, line) for row, line in unmatched if row <= OVERLAP_MAX_TRAIN_ROWS_NEAR]
        if not unmatched or not near_index._row_numbers:
            continue
        signatures = near_index.signatures([similarity_words(json.loads(line)) for _, line in unmatched])
        for (row, _), signature, keys in zip(unmatched, signatures, near_index.band_keys(signatures)):
            match = near_index.best_match(signature, keys)
            if match and match[0] not in near:
                near[match[0]] = (row, match[1])
    near_only = {v: m for v, m in near.items() if v not in exact}
    for val_row, (train_row, similarity) in sorted(near_only.items())[:max_examples]:
        examples.append({"kind": "near", "train_row": train_row, "validation_row": val_row,
                         "similarity": round(similarity, 3)})
    return {
        "exact": len(exact),
        "near": len(near_only),
        "validation_rows": val_rows,
        "train_rows": train_rows,
        "near_validation_rows_indexed": min(val_rows, OVERLAP_MAX_VALIDATION_ROWS),
        "near_train_rows_examined": min(train_rows, OVERLAP_MAX_TRAIN_ROWS_NEAR),
        "examples": examples,
    }


def _index_validation(val_path):
    exact_index = _HashIndex()
    near_index = _MinHashIndex(OVERLAP_MAX_VALIDATION_ROWS)
    val_rows = 0
    for batch in _batched(enumerate(_normalised_lines(val_path), start=1), _SIGNATURE_BATCH):
        val_rows = batch[-1][0]
        for row, line in batch:
            exact_index.add(_row_hash(line), row)
        batch = batch[: max(0, near_index.max_rows - len(near_index._row_numbers))]
        if batch:
            signatures = near_index.signatures([similarity_words(json.loads(line)) for _, line in batch])
            for (row, _), signature, keys in zip(batch, signatures, near_index.band_keys(signatures)):
                near_index.add(signature, keys, row)
    return exact_index, near_index, val_rows


# ------------------------------------------------------------------------------------------------ token statistics


def token_stats(lengths: Iterable[int], truncation_points=(256, 512, 1024, 2048, 4096), bins: int = 20) -> dict:
    """Summary of per-example token counts. Percentiles are actual lengths (the smallest length with at least
    p% of examples at or below it); the histogram has at most `bins` equal-width integer bins, each
    [edges[i], edges[i+1]); `truncated` counts the examples longer than each cut-off."""
    values = np.fromiter((int(n) for n in lengths), dtype=np.int64)
    if values.size == 0:
        return {"count": 0, "min": 0, "p50": 0, "p95": 0, "p99": 0, "max": 0, "mean": 0.0,
                "histogram": {"edges": [], "counts": []}, "truncated": {str(p): 0 for p in truncation_points}}
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
        "truncated": {str(p): int((values > p).sum()) for p in truncation_points},
    }


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
    a preference pair; none for text."""
    if "chosen" in example:
        return [list(example["prompt"]) + [{"role": "assistant", "content": example[side]}]
                for side in ("chosen", "rejected")]
    return [example["messages"]] if "messages" in example else []


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


def _human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
