"""OpenAI's Files and Batches endpoints over a `Store` and a `BatchRunner`.

Request bodies and query strings are checked here, not by FastAPI models, so every error leaves in
OpenAI's shape (raised as APIError; the app's handler renders it). Uploads are parsed as a stream: the
`file` part goes straight to a pending file on disk chunk by chunk and is refused with 413 the moment
it passes the limit.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from conserve.server.batches import BatchRunner
from conserve.server.errors import APIError
from conserve.server.store import PendingFile, Store

UPLOAD_PURPOSES = ("batch",)  # what this server can use a file for
_MAX_FIELD_BYTES = 64 * 1024  # all non-file form fields together
_MAX_PARTS = 16
_MAX_DRAIN_BYTES = 64 * 1024 * 1024  # read (and drop) this much of a refused upload so the client sees the 413


def router(store: Store, runner: BatchRunner, max_upload_bytes: int) -> APIRouter:
    r = APIRouter()

    # -- files -------------------------------------------------------------------------------------
    @r.post("/v1/files")
    async def upload_file(request: Request) -> dict:
        upload = _MultipartUpload(store, request.headers.get("content-type", ""), max_upload_bytes)
        try:
            await upload.read(request)
            purpose = upload.fields.get("purpose")
            if purpose is None:
                raise APIError(400, "missing form field 'purpose'", "purpose")
            if purpose not in UPLOAD_PURPOSES:
                raise APIError(400, f"purpose {purpose!r} is not supported by this server; upload batch input "
                               "files with purpose 'batch'", "purpose")
            if upload.file is None:
                raise APIError(400, "missing file part 'file'", "file")
            rec = await asyncio.to_thread(store.commit_file, upload.file, upload.filename or "upload", purpose)
        except BaseException:
            upload.discard()
            raise
        return rec.to_api()

    @r.get("/v1/files")
    async def list_files(request: Request) -> dict:
        q = request.query_params
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise APIError(400, "order must be 'asc' or 'desc'", "order")
        try:
            page, more = store.list_files(q.get("purpose"), _limit(q.get("limit"), 10000, 10000), q.get("after"),
                                          ascending=order == "asc")
        except LookupError:
            raise APIError(400, f"after: no such file {q.get('after')!r}", "after") from None
        return _page([f.to_api() for f in page], more, ids_required=True)

    @r.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> dict:
        return _file(store, file_id).to_api()

    @r.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> FileResponse:
        rec = _file(store, file_id)
        path = store.file_path(file_id)
        if not path.exists():  # deleted since the lookup
            raise APIError(404, f"No such file: {file_id}", "file_id", "file_not_found")
        return FileResponse(path, media_type="application/octet-stream", filename=rec.filename)

    @r.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> dict:
        if not await asyncio.to_thread(store.delete_file, file_id):
            raise APIError(404, f"No such file: {file_id}", "file_id", "file_not_found")
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches -----------------------------------------------------------------------------------
    @r.post("/v1/batches")
    async def create_batch(request: Request) -> dict:
        body = await _json_object(request)
        for name in ("input_file_id", "endpoint", "completion_window"):
            if name not in body:
                raise APIError(400, f"missing required parameter '{name}'", name)
        batch = await runner.create(body["input_file_id"], body["endpoint"], body["completion_window"],
                                    body.get("metadata"))
        return runner.to_api(batch)

    @r.get("/v1/batches")
    async def list_batches(request: Request) -> dict:
        q = request.query_params
        try:
            page, more = store.list_batches(_limit(q.get("limit"), 20, 100), q.get("after"))
        except LookupError:
            raise APIError(400, f"after: no such batch {q.get('after')!r}", "after") from None
        return _page([runner.to_api(b) for b in page], more, ids_required=False)

    @r.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str) -> dict:
        batch = store.get_batch(batch_id)
        if batch is None:
            raise APIError(404, f"No such batch: {batch_id}", "batch_id", "batch_not_found")
        return runner.to_api(batch)

    @r.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> dict:
        return runner.to_api(await runner.cancel(batch_id))

    return r


def _file(store: Store, file_id: str):
    rec = store.get_file(file_id)
    if rec is None:
        raise APIError(404, f"No such file: {file_id}", "file_id", "file_not_found")
    return rec


def _page(data: list[dict], has_more: bool, ids_required: bool) -> dict:
    """A list page. OpenAI's schemas type first_id/last_id as strings, never null: an empty page leaves
    them out where they are optional (batches) and sends "" where they are required (files)."""
    page = {"object": "list", "data": data, "has_more": has_more}
    if data:
        page.update(first_id=data[0]["id"], last_id=data[-1]["id"])
    elif ids_required:
        page.update(first_id="", last_id="")
    return page


def _limit(raw: str | None, default: int, most: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise APIError(400, f"limit must be an integer from 1 to {most}", "limit")
    return value


async def _json_object(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


class _Refused(Exception):
    """The upload passed the size limit."""


class _MultipartUpload:
    """Streams a multipart/form-data body: the part named `file` into a PendingFile, other (small)
    fields into `fields`. Nothing is held whole in memory."""

    def __init__(self, store: Store, content_type: str, max_bytes: int) -> None:
        kind, params = parse_options_header(content_type)
        if kind != b"multipart/form-data" or b"boundary" not in params:
            raise APIError(400, "upload the file as multipart/form-data with fields 'file' and 'purpose'")
        self.fields: dict[str, str] = {}
        self.file: PendingFile | None = None
        self.filename: str | None = None
        self._store, self._max_bytes = store, max_bytes
        self._parts = self._field_bytes = 0
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._into_file = False
        self._value = bytearray()
        self._parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_val, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done, "on_part_data": self._data, "on_part_end": self._part_end})

    async def read(self, request: Request) -> None:
        try:
            await self._read(request)
        except ClientDisconnect:  # nobody to answer; not a server error worth a traceback
            raise APIError(400, "the client disconnected during the upload") from None

    async def _read(self, request: Request) -> None:
        received, refused = 0, False
        async for chunk in request.stream():
            received += len(chunk)
            if refused:
                # Keep reading so the client, still sending, gets our 413 instead of a reset connection.
                if received > _MAX_DRAIN_BYTES:
                    break
                continue
            try:
                self._parser.write(chunk)
            except _Refused:
                refused = True
                self.discard()
            except APIError:
                raise
            except ValueError as e:  # malformed multipart (python-multipart's errors are ValueErrors)
                raise APIError(400, f"malformed multipart body: {e}") from None
        if refused:
            raise APIError(413, f"the file is larger than this server accepts ({self._max_bytes} bytes)",
                           "file", "file_too_large")
        try:
            self._parser.finalize()
        except ValueError as e:
            raise APIError(400, f"malformed multipart body: {e}") from None

    def discard(self) -> None:
        if self.file is not None:
            self.file.discard()
            self.file = None

    # -- parser callbacks --------------------------------------------------------------------------
    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise APIError(400, "too many form fields")
        self._disposition, self._name, self._into_file = b"", None, False
        self._value = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_done(self) -> None:
        _, opts = parse_options_header(self._disposition)
        self._name = opts.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file" and b"filename" in opts:
            if self.file is not None:
                raise APIError(400, "send exactly one file per upload", "file")
            self.filename = opts[b"filename"].decode("utf-8", "replace")
            self.file = self._store.new_file()
            self._into_file = True

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._into_file:
            assert self.file is not None
            if self.file.size + (end - start) > self._max_bytes:
                raise _Refused()
            self.file.write(data[start:end])
            return
        self._field_bytes += end - start
        if self._field_bytes > _MAX_FIELD_BYTES:
            raise APIError(400, "form fields are too large")
        self._value += data[start:end]

    def _part_end(self) -> None:
        if not self._into_file and self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")
