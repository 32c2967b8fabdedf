"""`GET /files/{name}`: a PNG this server saved (`save_to_file`), read from the output folder.

Only what the server itself writes is served: names of its own pattern, regular files directly
inside `output_dir`, never through a symlink (someone may plant one there pointing elsewhere).
Every other case is the same 404, so the answer says nothing about what else is on the disk.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastapi import APIRouter, Response

from qwen_image_server import errors
from qwen_image_server.api.context import Ctx
from qwen_image_server.protocol.common import ErrorResponse
from qwen_image_server.serving.render import SAVED_NAME

router = APIRouter()

# No following a symlink as the last component; no blocking on a planted FIFO.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


@router.get("/files/{name}", tags=["files"], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "The saved PNG."},
                       404: {"model": ErrorResponse}})
async def get_file(name: str, ctx: Ctx) -> Response:
    """A PNG saved by `save_to_file`, by the file name its response gave."""
    data = await ctx.generation.in_pool(read_saved_png, ctx.settings.output_dir, name)
    return Response(data, media_type="image/png")


def read_saved_png(folder: Path, name: str) -> bytes:
    """The bytes of `folder/name` if it is a PNG this server saved there; NotFound otherwise."""
    missing = errors.NotFound(f"No saved image named {name!r}.", param="name")
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
