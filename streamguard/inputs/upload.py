"""Multipart uploads streamed to disk (file jobs, standalone checks).

File parts go to disk chunk by chunk, never whole in memory; the other form
values are small and bounded in size and number, so no form can make the
daemon hold more than about a chunk and FIELD_MAX_BYTES x MAX_FIELDS.

`client_max_size` of the app (1 MiB) does not apply here: aiohttp enforces it
in `request.read()/post()` only, not in the multipart reader's `read_chunk`.

A refused upload (413, or a malformed form) is answered without reading the
rest of the body: aiohttp's default after a handler returns early is to read
and discard the unread body for up to `lingering_time` (10 s), which on a fast
link is gigabytes. `_stop_reading` turns that off for the connection and
half-closes it once the reply is out.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BodyPartReader

from ..errors import InputInvalid, PayloadTooLarge, UnsupportedMediaType
from .writer import ChunkWriter

CHUNK = 256 << 10  # bytes asked of the reader at a time
FIELD_MAX_BYTES = 64 << 10  # one non-file form value
MAX_FIELDS = 32  # non-file form values per request
REFUSE_GRACE = 2.0  # seconds a refused upload's connection stays half-open for the client to read the reply


@dataclass
class Upload:
    files: list[Path] = field(default_factory=list)  # the file parts, in order, on disk
    fields: dict[str, str] = field(default_factory=dict)  # the other form values
    filenames: list[str | None] = field(default_factory=list)  # the client's names for `files`, as sent


def _stop_reading(request: web.Request) -> None:
    """Send the reply, then close the connection without reading the rest of
    the body. Closing a socket with unread data makes the kernel send a reset,
    which can destroy a reply the client has not read yet; so the close is a
    half-close (FIN after the reply) with reading paused, and the socket is
    dropped REFUSE_GRACE seconds later. A client reading its reply while it
    sends (aiohttp, curl, browsers) sees the 413 and stops."""
    if request.content.is_eof():  # the whole body is in: nothing to refuse reading
        return
    protocol = request.protocol
    transport = request.transport
    if hasattr(protocol, "_lingering_time"):  # aiohttp's RequestHandler: no public knob per connection
        protocol._lingering_time = 0.0  # else it reads and discards the body for up to 10 s
    protocol.close()  # no keep-alive: the body's rest would be read as the next request
    if transport is None or getattr(transport, "_streamguard_refusing", False):
        return
    close = transport.close
    loop = asyncio.get_running_loop()

    def half_close() -> None:
        if transport.is_closing() or getattr(transport, "_streamguard_half_closed", False):
            close()  # asked again (the server shutting down): now
            return
        transport._streamguard_half_closed = True  # type: ignore[attr-defined]
        transport.pause_reading()
        if transport.can_write_eof():
            transport.write_eof()  # after what is buffered: the reply goes out, then FIN
        loop.call_later(REFUSE_GRACE, close)

    try:
        transport.close = half_close  # type: ignore[method-assign]  # what aiohttp calls once the reply is sent
        transport._streamguard_refusing = True  # type: ignore[attr-defined]
    except AttributeError:
        # uvloop's transports take no new attributes: stop reading, and let
        # aiohttp close the connection once the reply is written (no lingering read).
        transport.pause_reading()


def _refuse(request: web.Request, error: Exception) -> Exception:
    _stop_reading(request)
    return error


def _too_large(what: str, limit: int, field_name: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes",
                           details={"field": field_name, "limit": limit})


async def _reader(request: web.Request, file_field: str) -> MultipartReader:
    if request.content_type not in ("multipart/form-data", "multipart/mixed"):
        raise UnsupportedMediaType(
            f"expected a multipart/form-data body with the file in field {file_field!r}, "
            f"got {request.content_type or 'no Content-Type'}",
            details={"field": file_field, "contentType": request.content_type})
    try:
        return await request.multipart()
    except (ValueError, AssertionError, KeyError):  # no or a bad boundary
        raise InputInvalid("the multipart body has no valid boundary in its Content-Type",
                           details={"field": file_field}) from None


async def _save(part: BodyPartReader, dest_dir: Path, index: int, max_bytes: int, file_field: str) -> Path:
    """Stream one file part to a new file in `dest_dir`; removed if it fails or grows past `max_bytes`."""
    fd, name = tempfile.mkstemp(prefix=f"upload-{index}-", dir=dest_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = ChunkWriter(fh)
            while chunk := await part.read_chunk(CHUNK):
                if writer.size + len(chunk) > max_bytes:
                    raise _too_large(f"the file in field {file_field!r}", max_bytes, file_field)
                await writer.write(chunk)
            await writer.flush()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


async def _value(part: BodyPartReader, name: str, max_bytes: int) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data += chunk
        if len(data) > max_bytes:
            raise _too_large(f"form field {name!r}", max_bytes, name)
    try:
        return data.decode(part.get_charset("utf-8"))
    except (UnicodeDecodeError, LookupError):
        raise InputInvalid(f"form field {name!r} is not valid text", details={"field": name}) from None


async def _read_form(reader: MultipartReader, upload: Upload, dest_dir: Path, *, file_field: str,
                     max_bytes: int, max_files: int, max_field_bytes: int, max_fields: int) -> None:
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InputInvalid("nested multipart bodies are not accepted", details={"field": file_field})
        name = part.name or ""
        if name == file_field:
            if len(upload.files) >= max_files:
                raise InputInvalid(f"at most {max_files} file(s) in field {file_field!r}",
                                   details={"field": file_field, "limit": max_files})
            upload.files.append(await _save(part, dest_dir, len(upload.files), max_bytes, file_field))
            upload.filenames.append(part.filename)
        elif part.filename is not None:
            raise InputInvalid(f"unexpected file in form field {name!r}; the file goes in {file_field!r}",
                               details={"field": name})
        elif name in upload.fields:
            raise InputInvalid(f"form field {name!r} is given more than once", details={"field": name})
        elif len(upload.fields) >= max_fields:
            raise InputInvalid(f"more than {max_fields} form fields", details={"field": name})
        else:
            upload.fields[name] = await _value(part, name, max_field_bytes)


async def receive_multipart(request: web.Request, dest_dir: Path, *, file_field: str, max_bytes: int,
                            max_files: int = 1, max_field_bytes: int = FIELD_MAX_BYTES,
                            max_fields: int = MAX_FIELDS) -> Upload:
    """Stream the `file_field` parts of a multipart request into `dest_dir`
    (never whole in memory). PayloadTooLarge (413) as soon as a file passes
    `max_bytes` (before reading anything when Content-Length already exceeds
    `max_files` x `max_bytes`), with its partial file removed; 415 for a body
    that is not multipart; InputInvalid (400) for a form that lacks the file,
    is malformed or breaks the field limits. On any error no file is left."""
    if request.content_length is not None and request.content_length > max_files * max_bytes:
        raise _refuse(request, _too_large(f"the request body ({request.content_length} bytes)",
                                          max_files * max_bytes, file_field))
    try:
        reader = await _reader(request, file_field)
    except (InputInvalid, UnsupportedMediaType) as exc:
        raise _refuse(request, exc) from None
    upload = Upload()
    try:
        await _read_form(reader, upload, dest_dir, file_field=file_field, max_bytes=max_bytes,
                         max_files=max_files, max_field_bytes=max_field_bytes, max_fields=max_fields)
        if not upload.files:
            raise InputInvalid(f"the form has no file in field {file_field!r}", details={"field": file_field})
    except BaseException as exc:  # a refusal, a malformed body, a client gone: nothing is left behind
        for path in upload.files:
            path.unlink(missing_ok=True)
        if isinstance(exc, (InputInvalid, PayloadTooLarge)):
            raise _refuse(request, exc) from None
        if isinstance(exc, (ValueError, RuntimeError, HttpProcessingError)):  # the reader's word for malformed
            raise _refuse(request, InputInvalid("the multipart body is malformed",
                                                details={"field": file_field})) from None
        raise
    return upload
