"""A streamed multipart/form-data body for uploads, so a large file is never held in memory."""
from __future__ import annotations

import mimetypes
import uuid
from pathlib import Path


class MultipartStream:
    """A multipart/form-data body read in blocks straight from the files, so a large file is never held in
    memory; reports the bytes read (= sent) to on_progress. It has a length, so requests sends Content-Length
    rather than chunked encoding (which many WSGI servers refuse)."""

    BLOCK = 256 * 1024

    def __init__(self, fields: dict, files: dict, on_progress=None):
        self.boundary = f"tunedeck-{uuid.uuid4().hex}"
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self.on_progress = on_progress
        self.parts: list = []
        for name, value in fields.items():
            if value is None:
                continue
            self.parts.append(self._header(name) + b"\r\n" + str(value).encode() + b"\r\n")
        for name, path in files.items():
            path = Path(path)
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self.parts.append(self._header(name, path.name, kind) + b"\r\n")
            self.parts.append(path)
            self.parts.append(b"\r\n")
        self.parts.append(f"--{self.boundary}--\r\n".encode())
        self.length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in self.parts)
        self.sent = 0
        self._index, self._file, self._buffer = 0, None, b""

    def _header(self, name, filename=None, kind=None) -> bytes:
        quote = lambda s: s.replace("\\", "\\\\").replace('"', "%22").replace("\r", "").replace("\n", "")
        disposition = f'Content-Disposition: form-data; name="{quote(name)}"'
        if filename is not None:
            disposition += f'; filename="{quote(filename)}"'
        header = f"--{self.boundary}\r\n{disposition}\r\n"
        if kind:
            header += f"Content-Type: {kind}\r\n"
        return header.encode()

    def __len__(self):
        return self.length

    def _next_block(self, size) -> bytes:
        while self._index < len(self.parts):
            part = self.parts[self._index]
            if isinstance(part, bytes):
                self._index += 1
                return part
            if self._file is None:
                self._file = open(part, "rb")  # noqa: SIM115 - closed below when exhausted
            block = self._file.read(size)
            if block:
                return block
            self._file.close()
            self._file = None
            self._index += 1
        return b""

    def read(self, size=-1) -> bytes:
        size = self.BLOCK if size is None or size < 0 else max(1, size)
        while len(self._buffer) < size:
            block = self._next_block(max(size, self.BLOCK))
            if not block:
                break
            self._buffer += block
        chunk, self._buffer = self._buffer[:size], self._buffer[size:]
        self.sent += len(chunk)
        if self.on_progress and chunk:
            self.on_progress(self.sent, self.length)
        return chunk

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
