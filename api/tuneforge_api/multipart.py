"""The upload's multipart body, parsed as it streams in (python-multipart, as Starlette does).

Starlette's own form parser spools the whole file to a temp folder (a thread hop per 64 KiB),
and the upload route then copied it again into storage: 4 GB written for a 2 GB upload
(bench/RESULTS.md). Here the file part goes straight into a spool of the storage, written and
hashed on a thread in 1 MiB batches while the next batch is received.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

SPOOL_BATCH = 1 << 20  # file bytes are written in 1 MiB batches: one thread hop per MiB, not per packet
MAX_FIELD_BYTES = 1 << 20  # a form field other than the file (as Starlette's form parser allows)
MAX_FILES, MAX_FIELDS = 1, 8


class FormError(Exception):
    """The body is not the multipart form expected (answered 400 invalid_multipart)."""


@dataclass
class ReceivedFile:
    """The form's file part, received into ``spool`` (a storage spool, rewound)."""

    filename: str
    spool: BinaryIO
    size: int = 0
    sha256: str | None = None


@dataclass
class _Part:
    name: str = ""
    disposition: bytes = b""
    is_file: bool = False  # the 'file' part: its bytes go to the spool
    skip: bool = False  # a file in another part: its bytes are dropped (the form has no 'file')
    data: bytearray = field(default_factory=bytearray)


class UploadForm:
    """Parses the upload's multipart body as it streams in (python-multipart, as Starlette does):
    the file part goes straight into a spool of the storage (for file://, on the disk the object
    lives on, published by a rename), written and hashed (when ``hash_file``) on a thread in 1 MiB
    batches while the next batch is received; the other fields are kept, each up to 1 MiB."""

    def __init__(self, content_type: str, open_spool: Callable[[], BinaryIO], *, hash_file: bool) -> None:
        _, params = parse_options_header(content_type)
        if b"boundary" not in params:
            raise FormError("Missing boundary in multipart.")
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        try:
            self._charset = codecs.lookup(charset).name
        except LookupError:
            self._charset = "latin-1"
        self._open_spool = open_spool
        self._digest = hashlib.sha256() if hash_file else None
        self._pending = bytearray()  # file bytes parsed but not yet handed to the writer
        self._writing: asyncio.Future[None] | None = None  # the batch being written, at most one
        self._lock = threading.Lock()  # held by a write; close() waits for it
        self._closed = False
        self._ended = False  # the closing boundary was seen
        self._part = _Part()
        self._header_name = self._header_value = b""
        self._files = self._fields = 0
        self.fields: dict[str, str] = {}
        self.file: ReceivedFile | None = None
        callbacks = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_end": self._on_end,
        }
        self._parser = MultipartParser(params[b"boundary"], callbacks)

    async def read(self, stream: AsyncIterator[bytes]) -> None:
        async for chunk in stream:
            self._parser.write(chunk)
            if len(self._pending) >= SPOOL_BATCH:
                await self._write_behind()
        self._parser.finalize()  # checks nothing (python-multipart): the closing boundary is ours to see
        if not self._ended:  # a body cut short (a short Content-Length, a dropped chunked stream)
            raise FormError("The form ends before its closing boundary.")
        if self.file is not None:
            await self._write_behind()
            await self._writing  # type: ignore[misc]
            await run_in_threadpool(self._finish_file)

    async def _write_behind(self) -> None:
        """Hand the pending bytes to a thread and go on receiving (after the previous batch)."""
        if self._writing is not None:
            await self._writing
        batch, self._pending = self._pending, bytearray()
        self._writing = asyncio.get_running_loop().run_in_executor(None, self._write, batch)
        # Retrieved here too, for a request that fails before awaiting it (no "never retrieved").
        self._writing.add_done_callback(lambda f: f.cancelled() or f.exception())

    def close(self) -> None:
        """Remove the spool (after a write in flight: at most one batch)."""
        with self._lock:
            self._closed = True
            if self.file is not None:
                self.file.spool.close()

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self._charset)
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    def _write(self, batch: bytearray) -> None:
        with self._lock:
            if self._closed or self.file is None:
                return
            self.file.spool.write(batch)
            if self._digest is not None:
                self._digest.update(batch)
            self.file.size += len(batch)

    def _finish_file(self) -> None:
        assert self.file is not None
        self.file.spool.flush()
        self.file.spool.seek(0)
        self.file.sha256 = self._digest.hexdigest() if self._digest is not None else None

    def _on_part_begin(self) -> None:
        self._part = _Part()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.is_file:
            self._pending += memoryview(data)[start:end]
            return
        if self._part.skip:
            return
        if len(self._part.data) + end - start > MAX_FIELD_BYTES:
            raise FormError("A form field exceeds 1 MiB.")
        self._part.data += data[start:end]

    def _on_end(self) -> None:
        self._ended = True

    def _on_part_end(self) -> None:
        if not (self._part.is_file or self._part.skip):  # a repeated field: the last one counts
            self.fields[self._part.name] = self._decode(bytes(self._part.data))

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._part.disposition = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part.disposition)
        if b"name" not in options:
            raise FormError('The Content-Disposition header field "name" must be provided.')
        self._part.name = self._decode(options[b"name"])
        if b"filename" not in options:
            self._fields += 1
            if self._fields > MAX_FIELDS:
                raise FormError(f"Too many fields. Maximum number of fields is {MAX_FIELDS}.")
            return
        self._files += 1
        if self._files > MAX_FILES:
            raise FormError(f"Too many files. Maximum number of files is {MAX_FILES}.")
        if self._part.name != "file":
            self._part.skip = True
            return
        self._part.is_file = True
        # Opened here, not at construction: a form without a file never touches storage.
        self.file = ReceivedFile(self._decode(options[b"filename"]), self._open_spool())
