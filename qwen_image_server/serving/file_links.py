"""Signed, expiring links to saved files: the only way `/files` serves an image.

A saved file keeps the seed's name on disk (`Qwen-Image-<time>-req<N>.png`, which operators rely
on), but that name is guessable: the time and a request counter every response shows. So a link
carries an expiry and an HMAC-SHA256 over the name, the expiry and the API key's id that saved
it; `/files` serves a file only for a link it signed, unexpired, asked for by that same key.

The signing key is `QWEN_IMAGE_FILES_SECRET`, or a random one kept in the output folder
(`.files-secret`, readable by the server's user only), so links survive a restart, and servers
sharing the folder accept each other's links.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

from qwen_image_server.serving.secret_file import keep_secret

log = logging.getLogger(__name__)

SECRET_FILE = ".files-secret"


class FileLinks:
    def __init__(self, secret: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    def query(self, name: str, owner: str | None) -> str:
        """The query string that makes `/files/<name>` a link for `owner`, valid for ttl_s."""
        expires = int(self._clock() + self.ttl_s)
        return urlencode({"expires": expires, "signature": self._sign(name, expires, owner)})

    def valid(self, name: str, expires: int | None, signature: str | None, owner: str | None) -> bool:
        """True for a link `query` made for this name and owner that has not expired."""
        if expires is None or signature is None or expires < self._clock():
            return False
        return hmac.compare_digest(signature.encode("ascii", "replace"),
                                   self._sign(name, expires, owner).encode("ascii"))

    def _sign(self, name: str, expires: int, owner: str | None) -> str:
        message = f"{name}\n{expires}\n{owner or ''}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def load_secret(folder: Path) -> bytes:
    """The signing key kept in `folder` (made on first use, readable by this user only); a random
    one for this process alone when the folder cannot hold it (links then end with the process)."""
    path = folder / SECRET_FILE
    try:
        secret = keep_secret(path, lambda: secrets.token_urlsafe(48).encode("ascii"))
        if len(secret) < 32:
            raise OSError(f"{path} is shorter than 32 bytes")
        return secret
    except OSError as exc:
        log.warning("cannot keep the /files signing key in %s (%s): links to saved files end when the "
                    "server stops; set QWEN_IMAGE_FILES_SECRET to keep them", path, exc)
        return secrets.token_bytes(48)
