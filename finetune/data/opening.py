"""Opening a dataset file: gzip decoded under a size cap, the format sniffed from the content, its reader chosen.

The format is sniffed from the content (gzip magic 1f8b, Parquet magic PAR1, then the first non-blank character),
except that a file named *.txt or *.md (file_name=) is always plain text. A UTF-8 BOM, CRLF line endings and
trailing blank lines are accepted. A file is binary when it starts with a control byte or NUL bytes are more than
1 % of its first bytes (UTF-16 text is half NULs); a stray NUL in one row of a text file is that row's problem.

Gzip input may expand to at most max_decompressed_bytes (default: 100x the file, at least 64 MiB). Before any row
is read, the stream is decompressed once just to count its bytes, stopping at the cap: a gzip bomb is refused in
the seconds zlib takes to inflate the cap, not after its rows were validated (issue 35: 546 MiB, 272 s). The reads
that follow are capped too.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import tempfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import DatasetError

from .lines import READ_CHUNK, ReadContext
from .problems import human_bytes
from .readers import BOM, READERS, Source, parquet_source

PLAIN_TEXT_SUFFIXES = (".txt", ".md", ".text")
GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
ZIP_MAGIC = b"PK\x03\x04"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")

# A decompressed size cap of 100x the file on disk (real text rarely compresses past 10x) and never below 64 MiB,
# so small genuine files are not refused. Callers may pass max_decompressed_bytes to raise or lower it.
DEFAULT_MAX_EXPANSION = 100
DEFAULT_MIN_DECOMPRESSED_CAP = 64 * 1024 * 1024


class DecompressedTooLarge(DatasetError):
    """A gzip file that expands past the cap; `bytes_read` is how much was inflated before reading stopped."""

    def __init__(self, message: str, bytes_read: int):
        super().__init__(message)
        self.bytes_read = bytes_read


@dataclass(frozen=True)
class Cap:
    bytes: int
    why: str  # how the cap was set, in the user's terms


class _CappedStream(io.RawIOBase):
    """Counts decompressed bytes and never inflates more than one byte past the cap, so a gzip bomb fails early
    and cheaply."""

    def __init__(self, inner, cap: Cap):
        self._inner = inner
        self._cap = cap
        self.total = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        room = self._cap.bytes + 1 - self.total  # one byte past the cap is enough to know it is passed
        try:
            n = self._inner.readinto(memoryview(buffer)[:max(1, min(len(buffer), room))])
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"The gzip data is corrupt or cut short ({exc}).") from exc
        self.total += n
        if self.total > self._cap.bytes:
            raise DecompressedTooLarge(
                f"The gzip file expands to more than {human_bytes(self._cap.bytes)} ({self._cap.why}), which is "
                "refused as a likely gzip bomb; reading stopped there. If the data is genuine, upload it "
                "uncompressed or split it into smaller files.", self.total)
        return n


def _decompression_cap(path: Path, max_decompressed_bytes: int | None) -> Cap:
    if max_decompressed_bytes is not None:
        return Cap(int(max_decompressed_bytes), "the limit for one uploaded file")
    return Cap(max(DEFAULT_MIN_DECOMPRESSED_CAP, DEFAULT_MAX_EXPANSION * path.stat().st_size),
               "the limit is 100 times the compressed size, at least 64 MiB")


def _open_decoded(path: Path, cap: Cap, stack: ExitStack):
    """Returns (binary stream of the decoded content, the raw file for progress, compressed?)."""
    raw = stack.enter_context(open(path, "rb"))
    if raw.read(2) != GZIP_MAGIC:
        raw.seek(0)
        return raw, raw, False
    raw.seek(0)
    gz = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    return io.BufferedReader(_CappedStream(gz, cap), buffer_size=READ_CHUNK), raw, True


def check_expanded_size(path: Path, cap: Cap) -> int:
    """Inflates a gzip file once, keeping nothing, to refuse it at the cap before any row is read (and to find a
    corrupt or cut-short file before any row is validated). Returns the expanded size."""
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        counted = _CappedStream(gz, cap)
        chunk = bytearray(READ_CHUNK)
        while counted.readinto(chunk):
            pass
    return counted.total


def _read_head(stream) -> bytes:
    """The first bytes that hold something other than whitespace (or everything, if there are none)."""
    head = stream.read(64 * 1024)
    while head and not head.lstrip(BOM).strip():
        more = stream.read(READ_CHUNK)
        if not more:
            break
        head = head[-16:] + more  # the whitespace already seen does not matter
    return head


def sniff_format(head: bytes) -> str:
    """The READERS key (or "parquet") for a file starting with `head`; refuses what no reader takes."""
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(ZIP_MAGIC):
        raise DatasetError("zip archives are not supported; upload the .jsonl/.csv inside (a gzip-compressed "
                           "file, .gz, is fine).")
    stripped = text_start(head)
    first = stripped[:1]
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl" if _first_line_is_json(stripped) else "json_object"
    header = stripped.split(b"\n", 1)[0]
    return "tsv" if header.count(b"\t") > header.count(b",") else "csv"


def text_start(head: bytes) -> bytes:
    """The head from its first non-blank byte; refuses an empty file, UTF-16 and binary data."""
    if head.startswith(UTF16_BOMS):
        raise DatasetError("The file is UTF-16 text; save it as UTF-8 and upload it again.")
    stripped = head.removeprefix(BOM).lstrip()
    if not stripped:
        raise DatasetError("The file is empty: it has no rows.")
    if _looks_binary(stripped[:8192]):
        raise DatasetError(
            "The file is binary and not a format Tunedeck reads (JSONL, JSON, CSV, TSV, plain text or Parquet, "
            "optionally gzip-compressed). If it is text, save it as UTF-8 (not UTF-16)."
        )
    return stripped


def _looks_binary(head: bytes) -> bool:
    """Binary: a control byte first, or NULs past 1 % of the head (UTF-16 text is half NULs). A single NUL in an
    otherwise text file is one row's problem, reported by the reader with its row."""
    if head[0] < 0x09:
        return True
    nuls = head.count(b"\x00")
    return nuls > 1 and nuls * 100 > len(head)


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


def open_source(path: Path, max_decompressed_bytes: int | None, stack: ExitStack,
                file_name: str | None = None, schema: str | None = None,
                context: ReadContext | None = None) -> Source:
    if not path.is_file():
        raise DatasetError(f"The dataset file {path.name} does not exist.")
    if path.stat().st_size == 0:
        raise DatasetError("The file is empty: it has no rows.")
    context = context or ReadContext()
    cap = _decompression_cap(path, max_decompressed_bytes)
    stream, raw, compressed = _open_decoded(path, cap, stack)
    if compressed:
        check_expanded_size(path, cap)
    head = _read_head(stream)
    if compressed and not head:
        raise DatasetError("The file is empty: the gzip archive holds no data.")
    if _is_plain_text_name(file_name):
        text_start(head)
        fmt = "txt"
    else:
        fmt = sniff_format(head)
    if fmt in ("csv", "tsv") and schema == "text" and not _header_has(head, "text"):
        fmt = "txt"  # schema=text on a file with no 'text' column: the user says it is plain text
    size = max(1, path.stat().st_size)
    if fmt == "parquet":
        parquet_path = _spill_to_disk(stream, head, stack) if compressed else path
        return parquet_source(parquet_path, compressed, cap.bytes)
    if compressed:  # re-open: a gzip stream cannot be rewound cheaply through the cap wrapper
        stream, raw, _ = _open_decoded(path, cap, stack)
    else:
        stream.seek(0)

    def fraction():
        try:
            return min(1.0, raw.tell() / size)
        except (OSError, ValueError):
            return 0.0

    reader = READERS[fmt]
    columns, records = reader.read(stream, context)
    return Source(reader.reports_as, compressed, records, fraction, columns, context.notes)


def _header_has(head: bytes, column: str) -> bool:
    header = head.lstrip(BOM).lstrip().split(b"\n", 1)[0].decode("utf-8", "replace")
    return column in [c.strip().strip('"') for c in re.split(r"[,\t]", header)]


def _spill_to_disk(stream, head: bytes, stack: ExitStack) -> Path:
    """pyarrow needs a seekable file: decompress a gzipped Parquet file to a temporary one (still capped)."""
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tunedeck-parquet-")))
    target = folder / "data.parquet"
    with open(target, "wb") as out:
        out.write(head)
        shutil.copyfileobj(stream, out, READ_CHUNK)
    return target

