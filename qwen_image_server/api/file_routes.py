"""`GET /files/{name}`: a PNG this server saved (`save_to_file`), read from the output folder.

Only through the signed, expiring link the save's answer gave (`file_url`, see
`serving/file_links.py`), asked for by the API key that saved it: a name alone is guessable.
With a bucket (QWEN_IMAGE_RESULTS_URL=s3://...) `file_url` is a presigned URL of the file's copy
there instead, which the storage serves itself.
Only what the server itself writes is served: names of its own pattern, regular files directly
inside `output_dir`, never through a symlink (someone may plant one there pointing elsewhere).
Every other case is the same 404, so the answer says nothing about what else is on the disk.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastapi import APIRouter, Request, Response
from starlette.applications import Starlette
from starlette.datastructures import URL

from qwen_image_server import errors
from qwen_image_server.api.context import Ctx, ServerContext, Who
from qwen_image_server.protocol.common import ErrorResponse
from qwen_image_server.serving.object_store import file_key
from qwen_image_server.serving.render import SAVED_NAME

router = APIRouter()

# No following a symlink as the last component; no blocking on a planted FIFO.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


@router.get("/files/{name}", tags=["files"], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "The saved PNG."},
                       404: {"model": ErrorResponse}})
async def get_file(name: str, ctx: Ctx, caller: Who, expires: int | None = None,
                   signature: str | None = None) -> Response:
    """A PNG saved by `save_to_file`, through the link (`file_url`) its answer gave."""
    if not ctx.files.valid(name, expires, signature, caller.id):
        raise _missing(name)
    data = await ctx.generation.in_pool(read_saved_png, ctx.settings.output_dir, name)
    return Response(data, media_type="image/png")


def file_url(ctx: ServerContext, request: Request, file_path: str | None, owner: str | None,
             job_id: str) -> str | None:
    """The link to the file job `job_id` saved, for its owner (None when nothing was saved)."""
    return file_url_at(ctx, request.app, request.base_url, file_path, owner, job_id)


def file_url_at(ctx: ServerContext, app: Starlette, base_url: str | URL, file_path: str | None,
                owner: str | None, job_id: str) -> str | None:
    """`file_url` for a request to `base_url` (the one that created a job, for its webhook): a
    presigned URL of its copy in the bucket (QWEN_IMAGE_RESULTS_URL=s3://...), valid as long as a
    /files link would be; else this server's signed /files link."""
    if file_path is None:
        return None
    name = Path(file_path).name
    objects = ctx.objects
    if objects is not None and objects.links:
        # Signing is local (no request to the storage): cheap enough for the event loop.
        return objects.url(file_key(job_id, name), ctx.settings.file_link_ttl_s)
    return f"{app.url_path_for('get_file', name=name).make_absolute_url(base_url)}?{ctx.files.query(name, owner)}"


def _missing(name: str) -> errors.NotFound:
    return errors.NotFound(f"No saved image named {name!r}, or the link is not valid (any more).", param="name")


def read_saved_png(folder: Path, name: str) -> bytes:
    """The bytes of `folder/name` if it is a PNG this server saved there; NotFound otherwise."""
    missing = _missing(name)
    if not SAVED_NAME.fullmatch(name):
        raise missing
    base = folder.resolve()
    path = base / name
    if path.parent != base:
        raise missing
    try:
        if path.is_symlink():  # O_NOFOLLOW refuses it too, where the OS has it
            raise missing
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:  # missing, a symlink (ELOOP), a name too long, unreadable
        raise missing from None
    # Checked on the opened file itself: nothing can swap the path in between.
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise missing
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
