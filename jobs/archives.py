"""Folders as zip downloads: a small adapter zipped in memory, a multi-GB merged model streamed piece by piece.
Used by the pages and the REST API alike."""
import io
import zipfile
from pathlib import Path

from django.http import StreamingHttpResponse


def zip_folder(folder: Path) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, path.relative_to(folder))
    buffer.seek(0)
    return buffer


class _Sink:
    """A write-only file for zipfile that hands out what was written since the last call."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.offset = 0

    def write(self, data):
        self.parts.append(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self):
        return self.offset

    def seek(self, *args):  # zipfile then writes data descriptors instead of seeking back
        raise OSError("not seekable")

    def flush(self):
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def stream_zip(folder: Path, chunk_bytes: int = 1 << 20):
    """Yields a zip of `folder` piece by piece, never holding a whole (multi-GB) weight file in memory."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            info = zipfile.ZipInfo.from_file(path, str(path.relative_to(folder)))
            with path.open("rb") as source, archive.open(info, "w", force_zip64=True) as target:
                while block := source.read(chunk_bytes):
                    target.write(block)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


def zip_response(folder: Path, filename: str) -> StreamingHttpResponse:
    filename = filename.replace("/", "_").replace('"', "")
    response = StreamingHttpResponse(stream_zip(folder), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
