from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse
from sqlmodel import Session, col, select
from starlette.types import Receive, Scope, Send

from orchestrator.api.deps import Caller, CallerDep, ServicesDep
from orchestrator.api.docs import documented
from orchestrator.api.json_body import StrictJSONRoute
from orchestrator.api.paths import AssetId
from orchestrator.api.ranges import byte_range
from orchestrator.api.serialize import ASSET_TEXT, PAGE_BATCH, PAGE_TEXT_BYTES, asset_public
from orchestrator.errors import Conflict, ContentUnavailable, RangeNotSatisfiable, gone, not_found
from orchestrator.jobs import raise_if_deleted_since
from orchestrator.models import Asset, Job
from orchestrator.retention import delete_assets, unfinished_jobs_from
from orchestrator.schemas import AssetPublic, Lineage
from orchestrator.services import Services

log = logging.getLogger(__name__)
router = APIRouter(tags=["assets"], route_class=StrictJSONRoute)
MAX_LISTED_JOBS = 20  # named in a refused delete's details
MAX_ANCESTORS = 100
MAX_DESCENDANTS = 1000
# An image larger than this is sent `SEND_CHUNK` at a time (see `_streamed`); a smaller one whole.
SENT_WHOLE = 2**20
SEND_CHUNK = 256 * 2**10


def _get(s: Session, caller: Caller, asset_id: str) -> Asset:
    """The caller's asset; 404 for an unknown one (or another project's), 410 for a deleted one."""
    asset = s.get(Asset, asset_id)
    if asset is None:
        raise not_found("asset", "asset_id", asset_id)
    caller.asset(asset)
    if asset.deleted_at is not None:
        raise gone(asset)
    return asset


@router.get("/assets/{asset_id}", response_model=AssetPublic, summary="Get an asset's metadata",
            responses=documented(404, 410, said={404: "No such asset (`not_found`)."}))
def get_asset(asset_id: AssetId, services: ServicesDep, caller: CallerDep) -> AssetPublic:
    """An image's metadata: its project, job, stage, parent (lineage), engine, model, prompt,
    seed, size, sha256, the whole generation record (`record`) and where its bytes are (`content_url`)."""
    with services.db.session() as s:
        return asset_public(_get(s, caller, asset_id))


@router.delete("/assets/{asset_id}", status_code=204, response_class=Response, summary="Delete an asset",
               responses={204: {"description": "Deleted (or deleted already)."}, **documented(404, 409, said={
                   404: "No such asset (`not_found`).",
                   409: "Unfinished jobs start from this asset (`conflict`, `details.jobs`): cancel them, or let "
                        "them finish, first."})})
def delete_asset(asset_id: AssetId, services: ServicesDep, caller: CallerDep) -> Response:
    """Delete an image: its metadata and content answer 410 `gone` from now on, it is no longer
    listed, promoted or polished, and its file leaves the disk at the next asset sweep once no
    other asset has the same bytes. Its row stays, for the job that made it, the ledger and the
    lineage of its descendants (which list it with `deleted_at`). Refused (409) while an
    unfinished job starts from it: cancel that job first. Deleting it again changes nothing."""
    with services.db.transaction() as s:
        asset = s.get(Asset, asset_id)
        if asset is None:
            raise not_found("asset", "asset_id", asset_id)
        caller.asset(asset)
        if asset.deleted_at is None:
            using = list(s.exec(unfinished_jobs_from(asset_id).order_by(col(Job.id)).limit(MAX_LISTED_JOBS)).all())
            if using:
                raise Conflict(f"asset '{asset_id}' is the source of unfinished jobs: cancel them or let them "
                               "finish first", details={"asset_id": asset_id, "jobs": using})
            delete_assets(s, [asset_id])
    services.store.recent.remove(asset_id)
    log.info("asset %s deleted", asset_id)
    return Response(status_code=204)


_CONTENT_HEADERS = {
    "ETag": {"description": "The image's sha256, quoted: the bytes never change.", "schema": {"type": "string"}},
    "Content-Disposition": {"description": "`inline; filename=\"<asset id>.png\"`", "schema": {"type": "string"}},
    "Accept-Ranges": {"description": "`bytes`: a `Range` of bytes is answered 206.", "schema": {"type": "string"}}}
_CONTENT_RANGE = {"Content-Range": {"description": "`bytes <first>-<last>/<image's length>`",
                                     "schema": {"type": "string"}}}


@router.get("/assets/{asset_id}/content", response_class=Response, summary="Get an asset's image", responses={
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "The image.",
          "headers": _CONTENT_HEADERS},
    206: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
          "description": "The one range of bytes `Range` asked for (its last byte at most the image's last).",
          "headers": {**_CONTENT_HEADERS, **_CONTENT_RANGE}},
    304: {"description": "If-None-Match holds the ETag (whatever `Range` asks).", "headers": _CONTENT_HEADERS},
    **documented(404, 410, 416, 500, said={404: "No such asset (`not_found`)."})})
async def get_content(
    asset_id: AssetId, services: ServicesDep, caller: CallerDep, request: Request,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", description=(
        "ETags of copies the client has (`\"<sha256>\"`, weak or strong, or `*`): one of the image's "
        "gets a 304 without the bytes."))] = None,
    range_: Annotated[str | None, Header(alias="Range", description=(
        "One range of bytes: `bytes=0-99`, `bytes=100-` (from byte 100 on), `bytes=-100` (the last 100). "
        "Answered 206 with those bytes, or 416 when the image has none of them. Two or more ranges, "
        "or a header that is not a range of bytes, get the whole image (200)."))] = None,
    if_range: Annotated[str | None, Header(alias="If-Range", description=(
        "The image's ETag (strong, as sent): `Range` is answered only if it is this image's; any other "
        "ETag, a weak one or a date gets the whole image (200)."))] = None,
) -> Response:
    """The PNG: an AUTOMATIC1111 `parameters` text chunk and a JSON chunk with the whole generation
    record (parent included). Immutable: cache it by its `ETag` (`If-None-Match` gets a 304). A
    `Range` of bytes gets those bytes (206), to resume a download (with `If-Range`)."""
    # A just-made asset is served from memory without leaving the event loop; others are read
    # from the database and the disk on a worker thread. A project key's is read first, whose
    # project must be the asset's.
    found = services.store.recent.get(asset_id)
    since = services.store.recent.mark()  # before the row's read (`RecentContent.mark`)
    if found is None or caller.project_id is not None:
        sha256 = await asyncio.to_thread(_sha256, services, caller, asset_id)
    else:
        sha256 = found[0]
    etag = f'"{sha256}"'
    # Saved as `<asset id>.png` (by `curl -OJ`, a browser), not as "content".
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable",
               "Content-Disposition": f'inline; filename="{asset_id}.png"', "Accept-Ranges": "bytes"}
    # If-None-Match compares weakly (RFC 9110 13.1.2): W/"x" matches "x"; * matches anything.
    # Several If-None-Match lines are one list (RFC 9110 5.3). The row's sha256 answers it: a
    # client's copy is the image whatever has become of the file since. Its 304 comes before any
    # range (RFC 9110 13.2.2).
    listed = ",".join(request.headers.getlist("if-none-match"))
    tags = {tag.strip().removeprefix("W/") for tag in listed.split(",")}
    if etag in tags or "*" in tags:
        return Response(status_code=304, headers=headers)
    content = found[1] if found is not None else await asyncio.to_thread(_read_content, services, asset_id, sha256,
                                                                         since)
    size = len(content) if isinstance(content, bytes) else os.fstat(content.fileno()).st_size
    try:
        # Only a GET's: `HeadAsGet` takes a HEAD's Range away (RFC 9110 14.2).
        wanted = byte_range(request.headers.getlist("range"), request.headers.getlist("if-range"), etag, size)
    except RangeNotSatisfiable:
        if not isinstance(content, bytes):
            content.close()
        raise
    if wanted is None:
        start, end, status = 0, size - 1, 200
    else:
        (start, end), status = wanted, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if isinstance(content, bytes) and end + 1 - start <= SENT_WHOLE:
        return Response(content[start:end + 1] if status == 206 else content, status_code=status,
                        media_type="image/png", headers=headers)
    return _streamed(content, headers, start=start, stop=end + 1, status=status)


def _streamed(content: bytes | BinaryIO, headers: dict[str, str], *, start: int, stop: int,
              status: int) -> StreamingResponse:
    """A large image (or its bytes from `start` up to `stop`) sent `SEND_CHUNK` at a time, each once
    the client has taken the ones before: sent whole, the server's socket buffer took a copy of it
    for as long as the client took to read it, and 100 clients that never read held 836 MB. A file
    (`ArtifactStore.get_or_open`) is read a chunk at a time too, and closed when the answer ends or
    its client goes."""
    sent = {**headers, "Content-Length": str(stop - start)}
    if isinstance(content, bytes):
        whole = memoryview(content)  # a range's chunks are cut from it, not from a copy of the range

        async def chunks() -> AsyncIterator[bytes]:
            for at in range(start, stop, SEND_CHUNK):
                yield bytes(whole[at:min(at + SEND_CHUNK, stop)])

        return StreamingResponse(chunks(), status_code=status, media_type="image/png", headers=sent)

    def read() -> Iterator[bytes]:
        content.seek(start)
        left = stop - start
        while left > 0 and (chunk := content.read(min(SEND_CHUNK, left))):
            left -= len(chunk)
            yield chunk

    return _FileStream(content, read(), status_code=status, media_type="image/png", headers=sent)


class _FileStream(StreamingResponse):
    """A file's streaming answer that closes the file once the answer is over, however it ends. Left
    to its generator's `with`, a HEAD (answered by its headers) or a client gone mid-way left the
    file open until the garbage collector found the cycle the cancelled stream left: a descriptor
    each, and a swept file's disk space held."""

    def __init__(self, file: BinaryIO, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._file = file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # No read is under way: a cancelled stream waits for its thread's read to return.
            self._file.close()


def _sha256(services: Services, caller: Caller, asset_id: str) -> str:
    with services.db.session() as s:
        return _get(s, caller, asset_id).sha256


def _read_content(services: Services, asset_id: str, sha256: str, since: int) -> bytes | BinaryIO:
    try:
        # Checked against its sha256: a damaged file is refused. A large one is left open, to be sent
        # as it is read.
        content = services.store.get_or_open(sha256, up_to=SENT_WHOLE)
    except ContentUnavailable:
        raise_if_deleted_since(services.db, asset_id)
        raise
    if isinstance(content, bytes):
        services.store.recent.add(asset_id, sha256, content, since=since)
    return content


@router.get("/assets/{asset_id}/lineage", response_model=Lineage, summary="Get an asset's lineage",
            operation_id="get_lineage",
            responses=documented(404, 410, said={404: "No such asset (`not_found`).",
                                                 410: "The asset was deleted (`gone`); its descendants' lineage "
                                                      "still lists it, with its `deleted_at`."}))
def lineage(asset_id: AssetId, services: ServicesDep, caller: CallerDep) -> Lineage:
    """Ancestors root first (draft -> bridge -> ...), and every descendant, breadth first (all in
    the asset's project: promotions and polishes stay in their source's). Deleted ones are listed
    too, with their `deleted_at`: the chain has no gap."""
    with services.db.session() as s:
        asset = _get(s, caller, asset_id)
        ancestors: list[Asset] = []
        parent_id = asset.parent_id
        # Only the asset's project: its writes never cross projects, but a chain written by hand
        # across two (a restore, a merge of databases) must not show another project's prompts.
        while parent_id and len(ancestors) < MAX_ANCESTORS:
            parent = s.get(Asset, parent_id)
            if parent is None or parent.project_id != asset.project_id:
                parent_id = None
                break
            ancestors.append(parent)
            parent_id = parent.parent_id
        truncated = parent_id is not None and len(ancestors) == MAX_ANCESTORS
        descendants: list[Asset] = []
        frontier = [asset.id]
        text = 0  # the descendants' prompts and records, bounded as a page of assets is (`PAGE_TEXT_BYTES`)
        cut = False
        while frontier and not cut:
            # One past the bound says it is cut; a draft promoted 100,000 times is not read whole,
            # nor are 1000 descendants with 10,000-character prompts (an answer of 79 MB): the rows
            # are read `PAGE_BATCH` at a time, and none past the cut is loaded.
            children: list[Asset] = []
            query = (select(Asset, ASSET_TEXT)
                     .where(col(Asset.parent_id).in_(frontier), col(Asset.project_id) == asset.project_id)
                     .order_by(col(Asset.id)).limit(MAX_DESCENDANTS + 1 - len(descendants)))
            with s.exec(query.execution_options(yield_per=PAGE_BATCH)) as result:
                for child, size in result:
                    text += size
                    if len(descendants) + len(children) == MAX_DESCENDANTS or text > PAGE_TEXT_BYTES:
                        cut = True
                        break
                    children.append(child)
            descendants.extend(children)
            frontier = [c.id for c in children]
        truncated = truncated or cut
    return Lineage(asset=asset_public(asset), ancestors=[asset_public(a) for a in reversed(ancestors)],
                   descendants=[asset_public(a) for a in descendants], truncated=truncated)
