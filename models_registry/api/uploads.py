"""Upload handling for artifact uploads: stream to disk, stop at the size limit.

Django keeps an uploaded file in memory up to ``FILE_UPLOAD_MAX_MEMORY_SIZE`` and spools
anything larger to a temporary file. The handler below sits in front of those and counts
each file's bytes as they arrive, so an oversized upload is refused (413) while it streams
instead of after it has filled the disk.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.uploadhandler import (
    FileUploadHandler,
    MemoryFileUploadHandler,
    TemporaryFileUploadHandler,
)

# Multipart framing and the small form fields ride on top of the files themselves.
_FORM_OVERHEAD = 64 * 1024


class SizeLimitUploadHandler(FileUploadHandler):
    """Refuses any file over ``limit`` (default ``MODEL_UPLOAD_MAX_BYTES``) with RequestDataTooBig (413).

    A body announcing more than ``files`` such files (plus form overhead) is refused
    before it is read.
    """

    def __init__(self, request: Any = None, *, limit: int | None = None, files: int = 3) -> None:
        super().__init__(request)
        self.limit = int(settings.MODEL_UPLOAD_MAX_BYTES) if limit is None else int(limit)
        self.files = files
        self.received = 0

    def handle_raw_input(
        self,
        input_data: Any,
        META: Any,  # noqa: N803 - Django's parameter name
        content_length: int,
        boundary: Any,
        encoding: str | None = None,
    ) -> None:
        if content_length and content_length > self.files * self.limit + _FORM_OVERHEAD:
            raise RequestDataTooBig(f"Upload of {content_length} bytes exceeds the limit.")
        return None

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        self.received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received += len(raw_data)
        if self.received > self.limit:
            raise RequestDataTooBig(f"{self.field_name} exceeds the {self.limit}-byte upload limit.")
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None


def artifact_upload_handlers(request: Any) -> list[FileUploadHandler]:
    """The handler chain for artifact uploads: size limit, then memory or temporary file."""
    return [
        SizeLimitUploadHandler(request),
        MemoryFileUploadHandler(request),
        TemporaryFileUploadHandler(request),
    ]


def dataset_upload_handlers(request: Any) -> list[FileUploadHandler]:
    """The handler chain for data set uploads: one file of at most ``DATASET_MAX_BYTES``."""
    from models_registry.datasets import dataset_max_bytes

    return [
        SizeLimitUploadHandler(request, limit=dataset_max_bytes(), files=1),
        MemoryFileUploadHandler(request),
        TemporaryFileUploadHandler(request),
    ]
