"""Where finished images are kept so that any server (or the storage itself) can serve them:
`QWEN_IMAGE_RESULTS_URL`, an S3-compatible bucket (`s3://bucket/prefix`) or a shared folder
(`file:///shared/folder`). The job stores keep their images through the same interface
(`SqliteJobStore` in a private folder of `QWEN_IMAGE_DATA_DIR` when no results URL is set).

Every object carries its media type, its owner (an API key's id, never the key) and when it
expires: a server that did not make an image still answers only its owner, and never past its
expiry. The methods block (disk or network I/O): call them off the event loop.

Keys are paths of names this server makes (`images/<id>`, `jobs/<job id>`, `layers/<job id>`,
`files/<job id>/<name>`):
letters, digits, `_`, `-` and `.`, never starting with a dot. A key built from a client's id that
does not fit is simply not there.

Expiry: a folder is swept by the server (`sweep`, every minute), an object past its expiry is
deleted. A bucket is cleaned by its own lifecycle rule (S3 counts in days, and listing a large
bucket every minute from every replica costs more than it saves); the server never serves an
object past its expiry meanwhile, and the job store deletes the images of the jobs it expires.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

import anyio
from pydantic import AnyUrl, BaseModel, ValidationError

from qwen_image_server.errors import ConfigurationError
from qwen_image_server.serving.render import save_atomically

log = logging.getLogger(__name__)

_NAME = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}"
KEY = re.compile(rf"{_NAME}(?:/{_NAME}){{0,3}}")
# SigV4, which every S3-compatible storage speaks, signs a URL for at most 7 days.
MAX_LINK_S = 7 * 24 * 3600
# A crashed put leaves a temp file, or data without its metadata; a put writes both within
# seconds, and another server sharing the folder may be writing one right now.
STALE_S = 600.0
_META_SUFFIX = ".meta.json"


def image_key(image_id: str) -> str:
    """The key of a `url` image (OpenAI's response_format=url)."""
    return f"images/{image_id}"


def job_image_key(job_id: str) -> str:
    """The key of a finished job's image."""
    return f"jobs/{job_id}"


def job_layers_key(job_id: str) -> str:
    """The key of a finished layered job's ZIP of layers (beside its image, the layers stacked)."""
    return f"layers/{job_id}"


def file_key(job_id: str, name: str) -> str:
    """The key of a `save_to_file` image's copy: the job's id keeps servers that count requests
    independently (and so may pick the same file name) apart."""
    return f"files/{job_id}/{name}"


@dataclass(frozen=True, slots=True)
class StoredObject:
    data: bytes
    media_type: str
    owner: str | None  # the API key's id that made it (None: a server without keys)
    expires_at: float  # unix time


class ObjectStore(Protocol):
    """Blocking calls (call them on a thread). `get` answers None for a key that is not there,
    is past its expiry, or is not a valid key."""

    location: str  # for logs and messages: the results URL, without secrets
    links: bool  # True when the storage serves objects itself (`url` gives presigned links)
    failures: tuple[type[Exception], ...]  # what its calls raise when the storage fails

    def put(self, key: str, data: bytes, media_type: str, *, owner: str | None, expires_at: float) -> None: ...
    def get(self, key: str, now: float) -> StoredObject | None: ...
    def url(self, key: str, expires_in: float) -> str | None: ...
    def delete(self, key: str) -> None: ...
    def sweep(self, now: float) -> int: ...


class _Meta(BaseModel):
    """What a folder keeps beside each object (a bucket keeps it as the object's metadata)."""

    media_type: str
    owner: str | None
    expires_at: float


class FolderObjectStore:
    """Objects as files under `root` (a local or shared folder): the data as it is, so an operator
    sees plain images, and beside it a hidden `.<name>.meta.json` with the media type, owner and
    expiry. The metadata is written last and read first: an object is there once its metadata is,
    and a reader never sees half of one (each file is published atomically). Nothing is kept in
    memory, so any number of servers may share the folder."""

    links = False
    failures: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = root.as_uri() if root.is_absolute() else os.fspath(root)

    def _paths(self, key: str) -> tuple[Path, Path] | None:
        if not KEY.fullmatch(key):
            return None
        data = self.root / key
        return data, data.with_name(f".{data.name}{_META_SUFFIX}")

    def put(self, key: str, data: bytes, media_type: str, *, owner: str | None, expires_at: float) -> None:
        paths = self._paths(key)
        if paths is None:
            raise ValueError(f"not an object key: {key!r}")
        path, meta = paths
        save_atomically(data, path.parent, path.name, overwrite=True)
        document = _Meta(media_type=media_type, owner=owner, expires_at=expires_at).model_dump_json()
        save_atomically(document.encode("utf-8"), meta.parent, meta.name, overwrite=True)

    def get(self, key: str, now: float) -> StoredObject | None:
        paths = self._paths(key)
        if paths is None:
            return None
        path, meta_path = paths
        try:
            meta = _Meta.model_validate_json(_read_file(meta_path))
            if meta.expires_at <= now:
                return None
            data = _read_file(path)
        except (OSError, ValidationError):  # not there (any more), or not an object this server wrote
            return None
        return StoredObject(data, meta.media_type, meta.owner, meta.expires_at)

    def url(self, key: str, expires_in: float) -> str | None:
        return None  # a folder serves nothing itself: the server's own links read it

    def delete(self, key: str) -> None:
        paths = self._paths(key)
        if paths is None:
            return
        path, meta = paths
        meta.unlink(missing_ok=True)  # first: the object is gone the moment this is
        path.unlink(missing_ok=True)

    def sweep(self, now: float) -> int:
        """Delete the objects past their expiry, and what crashed puts left (older than
        STALE_S): temp files, data without metadata. Returns how many objects expired."""
        expired = 0
        for folder, _, names in os.walk(self.root):
            present = set(names)
            for name in names:
                path = Path(folder) / name
                if name.startswith(".") and name.endswith(_META_SUFFIX):
                    data = path.with_name(name[1:-len(_META_SUFFIX)])
                    try:
                        meta = _Meta.model_validate_json(_read_file(path))
                    except (OSError, ValidationError):
                        continue  # deleted meanwhile, or not ours
                    if meta.expires_at <= now:
                        path.unlink(missing_ok=True)
                        data.unlink(missing_ok=True)
                        expired += 1
                elif name.startswith("."):
                    if name.endswith(".tmp") and _older_than(path, now - STALE_S):
                        path.unlink(missing_ok=True)
                elif f".{name}{_META_SUFFIX}" not in present and _older_than(path, now - STALE_S):
                    path.unlink(missing_ok=True)  # its put never finished
        if expired:
            log.info("results in %s: deleted %d object(s) past their expiry", self.location, expired)
        return expired


def _read_file(path: Path) -> bytes:
    """A regular file's bytes, never through a symlink (someone may plant one in a shared folder)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise FileNotFoundError(path)
        return fh.read()


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff


class S3ObjectStore:
    """Objects in an S3-compatible bucket under `prefix`, through boto3. The endpoint, region and
    credentials come from boto3's own configuration (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, an
    instance role, ~/.aws/config, ...), never from the server's settings. The owner and the expiry
    are the object's metadata; `url` presigns a GET of the object (SigV4)."""

    links = True

    def __init__(self, bucket: str, prefix: str, location: str) -> None:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise ConfigurationError(
                f"QWEN_IMAGE_RESULTS_URL={location} needs boto3, which is not installed: "
                "pip install 'qwen-image-server[s3]'.") from None
        session = boto3.session.Session()
        # Read now, so a server without any is stopped at start, not at its first image.
        if session.get_credentials() is None:
            raise ConfigurationError(
                f"QWEN_IMAGE_RESULTS_URL={location}: boto3 finds no credentials (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance or pod role).")
        self.bucket = bucket
        self.prefix = prefix
        self.location = location
        # SigV4 for links (what every S3-compatible storage accepts); timeouts short enough that
        # a storage that is down fails a request rather than holding it for minutes.
        self._client: Any = session.client("s3", config=Config(signature_version="s3v4", connect_timeout=10,
                                                               read_timeout=60))
        self._client_error: type[Exception] = ClientError
        self.failures: tuple[type[Exception], ...] = (BotoCoreError, ClientError, OSError)

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def put(self, key: str, data: bytes, media_type: str, *, owner: str | None, expires_at: float) -> None:
        if not KEY.fullmatch(key):
            raise ValueError(f"not an object key: {key!r}")
        metadata = {"expires-at": repr(expires_at)}
        if owner is not None:
            metadata["owner"] = quote(owner, safe="")  # metadata travels as headers: ASCII only
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=media_type,
                                Metadata=metadata)

    def get(self, key: str, now: float) -> StoredObject | None:
        if not KEY.fullmatch(key):
            return None
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self._client_error as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        metadata: dict[str, str] = answer.get("Metadata", {})
        try:
            expires_at = float(metadata["expires-at"])
        except (KeyError, ValueError):
            answer["Body"].close()
            return None  # not an object this server wrote
        if expires_at <= now:
            answer["Body"].close()
            return None
        owner = metadata.get("owner")
        return StoredObject(answer["Body"].read(), answer.get("ContentType") or "application/octet-stream",
                            unquote(owner) if owner is not None else None, expires_at)

    def url(self, key: str, expires_in: float) -> str:
        return str(self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=max(1, min(MAX_LINK_S, int(expires_in)))))

    def delete(self, key: str) -> None:
        if KEY.fullmatch(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def sweep(self, now: float) -> int:
        return 0  # the bucket's lifecycle rule deletes expired objects


def open_object_store(url: AnyUrl) -> ObjectStore:
    """The store a results URL names (ConfigurationError, one line, when it cannot work here)."""
    location = str(url)
    if url.scheme == "s3":
        assert url.host is not None  # the setting's validator requires a bucket
        prefix = unquote(url.path or "").strip("/")
        return S3ObjectStore(url.host, f"{prefix}/" if prefix else "", location)
    root = Path(unquote(url.path or "/"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"QWEN_IMAGE_RESULTS_URL={location}: the folder cannot be created "
                                 f"({exc.strerror or exc}); choose a folder this user can write.") from None
    return FolderObjectStore(root)


async def expire_periodically(store: ObjectStore, interval_s: float) -> None:
    """Sweep `store` (on a thread) now and every `interval_s`, until cancelled; a bucket needs none."""
    if store.links:
        return
    while True:
        try:
            await anyio.to_thread.run_sync(store.sweep, time.time())
        except Exception:  # the next sweep tries again; serving goes on
            log.exception("sweeping the results in %s failed", store.location)
        await asyncio.sleep(interval_s)
