"""Plain text: documents separated by blank lines, or one document per line.

The rule: documents are separated by one or more blank lines. A file with no blank line between its first lines
(the first LINE_DOCUMENTS_WINDOW_LINES lines, or its first max_row_bytes) that has at least
LINE_DOCUMENTS_MIN_LINES lines is a corpus of one document per line (LLaMA-Factory's wiki_demo.txt, most
pre-training dumps), and the report says so in a note. Trailing or leading blank lines separate nothing. Each
document is one {"text"} row numbered by the line it starts on; a document with bytes that are not UTF-8, a NUL
byte, or more than max_row_bytes is that row's problem.
"""
from __future__ import annotations

from collections.abc import Iterator

from .lines import LongLine, ReadContext, capped_lines, nul_byte, too_long
from .problems import RowProblem

BOM = b"\xef\xbb\xbf"
LINE_DOCUMENTS_MIN_LINES = 8
LINE_DOCUMENTS_WINDOW_LINES = 1000


def text_documents(stream, context: ReadContext) -> Iterator[tuple[int, object]]:
    lines = _numbered_lines(stream, context.max_row_bytes)
    head, separated = _look_ahead(lines, context.max_row_bytes)
    content = sum(1 for _, line in head if not _is_blank(line))
    if not separated and content >= LINE_DOCUMENTS_MIN_LINES:
        context.notes.append(
            f"No blank line separates the first {content:,} lines, so each line is read as one document (a corpus "
            "of one document per line). To keep documents of several lines whole, separate them with a blank line."
        )
        return _one_per_line(_chain(head, lines), context.max_row_bytes)
    return _paragraphs(_chain(head, lines), context.max_row_bytes)


def _numbered_lines(stream, cap: int) -> Iterator[tuple[int, bytes | LongLine]]:
    for number, line in enumerate(capped_lines(stream, cap), start=1):
        if number == 1 and isinstance(line, bytes) and line.startswith(BOM):
            line = line[len(BOM):]
        yield number, line


def _is_blank(line) -> bool:
    return isinstance(line, bytes) and not line.strip()


def _look_ahead(lines, byte_budget: int) -> tuple[list, bool]:
    """The first lines (up to the window), and whether a blank line separates two of them."""
    head, size, content_seen, blank_pending = [], 0, False, False
    for number, line in lines:
        head.append((number, line))
        if _is_blank(line):
            blank_pending = content_seen
            continue
        if blank_pending:
            return head, True
        content_seen = True
        size += line.size if isinstance(line, LongLine) else len(line)
        if len(head) >= LINE_DOCUMENTS_WINDOW_LINES or size >= byte_budget:
            break
    return head, False


def _chain(head, rest):
    yield from head
    yield from rest


def _one_per_line(lines, cap: int) -> Iterator[tuple[int, object]]:
    for number, line in lines:
        if isinstance(line, LongLine):
            yield number, too_long(line.size, cap, "line")
        elif line.strip():
            yield number, _document([line], "line")


def _paragraphs(lines, cap: int) -> Iterator[tuple[int, object]]:
    start, parts, size = 0, [], 0
    for number, line in lines:
        if _is_blank(line):
            if start:
                yield start, too_long(size, cap, "document") if size > cap else _document(parts, "document")
            start, parts, size = 0, [], 0
            continue
        start = start or number
        size += line.size if isinstance(line, LongLine) else len(line)
        if size <= cap:
            parts.append(line)
        else:
            parts = []  # too long already: only its size is kept
    if start:
        yield start, too_long(size, cap, "document") if size > cap else _document(parts, "document")


def _document(parts: list[bytes], what: str):
    raw = b"".join(parts)
    if b"\x00" in raw:
        return nul_byte(raw.index(b"\x00"), what)
    try:
        return {"text": raw.decode("utf-8").replace("\r\n", "\n").strip("\n")}
    except UnicodeDecodeError as exc:
        return RowProblem("non_utf8", f"The text has bytes that are not valid UTF-8 ({raw[exc.start:exc.start + 4]!r} "
                                      f"at byte {exc.start + 1} of the {what}); save the file as UTF-8.")
