"""The normalised JSONL file: one example a line, written atomically (via a temporary file) and read back."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .lines import READ_CHUNK
from .problems import RowProblem


def serialise(example: dict) -> bytes:
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


class AtomicOutput:
    """Writes to a temporary file beside the target; only commit() makes the target appear."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        self.tmp = Path(name)
        self.file = os.fdopen(fd, "wb", buffering=READ_CHUNK)

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


def iter_examples(normalised_path) -> Iterator[dict]:
    """The examples of a normalised JSONL file (as written by process_dataset or split_dataset), in order."""
    with open(normalised_path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def normalised_lines(path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield line if line.endswith(b"\n") else line + b"\n"

