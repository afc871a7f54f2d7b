"""Uploads stream to a temporary file and stop as soon as they pass the size limit."""
import os

from django.conf import settings
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler
from django.http import QueryDict
from django.utils.datastructures import MultiValueDict


class LimitedTemporaryFileUploadHandler(TemporaryFileUploadHandler):
    def __init__(self, request=None):
        super().__init__(request)
        self.limit = settings.MAX_UPLOAD_BYTES
        self.received = 0
        os.makedirs(settings.FILE_UPLOAD_TEMP_DIR, exist_ok=True)

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        # A declared length over the limit is refused before a single body byte is read.
        if content_length and content_length > self.limit + 64 * 1024:
            self._note_refusal()
            return QueryDict(encoding=encoding), MultiValueDict()
        return None

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > self.limit:
            self._refuse()
        return super().receive_data_chunk(raw_data, start)

    def _refuse(self):
        self._note_refusal()
        raise StopUpload(connection_reset=False)

    def _note_refusal(self):
        if self.request is not None:
            self.request.upload_refused = (
                f"The file is larger than the upload limit of {self.limit / 1024 / 1024:.0f} MiB."
            )
