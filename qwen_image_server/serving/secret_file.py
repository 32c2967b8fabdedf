"""A secret the server makes once and keeps in a file of its own (readable by its user only), so
that what it signs stays valid across restarts and between servers sharing the folder."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def keep_secret(path: Path, make: Callable[[], bytes]) -> bytes:
    """The secret in `path`, made with `make()` when there is none yet; OSError when the folder
    cannot hold it."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written aside, then linked into place: a server starting at the same moment reads
        # either no file or a whole one, and the first link wins.
        tmp = folder / f"{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(make())
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another server's secret is as good
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()
