"""The job store: every accepted async job, written before its client hears "accepted", so that
nothing a client was promised dies with the process.

What is kept per job: what it asked (its parameters, with the seed resolved, and an edit's
uploaded files, as sent), its owner (an API key's id, never the key), its state and how many
times it started, and once it ended its final status and its image (a file), and a layered job's
ZIP of layers (a file beside it). After a restart the
server runs the jobs that had not ended again (a job that was running starts from the beginning,
at most once more), and serves the finished ones until their TTL. An expired job leaves a small
tombstone for a week, so that its id answers "expired", not "unknown".

`SqliteJobStore` is the embedded default: one SQLite file in WAL mode plus two folders of files
(`results/`, `inputs/`) under `QWEN_IMAGE_DATA_DIR`. Images go through an object store
(`serving/object_store.py`): that `results/` folder, or the storage `QWEN_IMAGE_RESULTS_URL`
names, where any server sharing it reads them; a layered job's ZIP goes there too (no column of
its own: a job has one when its task is `layered` and it succeeded). Its methods block (disk I/O); the job
registry calls them through `AsyncJobStore`, on one thread of their own, so the event loop never
waits on the disk and writes are never concurrent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from qwen_image_server import errors
from qwen_image_server.job_state import JobState
from qwen_image_server.serving.layers import ZIP_MEDIA_TYPE
from qwen_image_server.serving.object_store import FolderObjectStore, ObjectStore, job_image_key, job_layers_key
from qwen_image_server.serving.render import save_atomically
from qwen_image_server.serving.uploads import Upload, field_names

log = logging.getLogger(__name__)
T = TypeVar("T")

StoredTask = Literal["generate", "edit", "layered"]
TOMBSTONE_S = 7 * 24 * 3600.0  # how long an expired job's id still answers "expired"


@dataclass(frozen=True, slots=True)
class StoredJob:
    id: str
    owner: str | None
    task: StoredTask
    body: str  # the request's parameters as JSON (the seed resolved, no images)
    request_id: int
    created_at: float  # unix time
    state: JobState
    runs: int  # how many times it started running
    status: str | None = None  # its final JobStatus as JSON, once it ended
    media_type: str | None = None  # its image's, once it succeeded
    expires_at: float | None = None  # unix time its record and image go, once it ended
    expired: bool = False  # past its TTL: only the id is left
    base_url: str | None = None  # of the request that created it (its links in its webhook)
    webhook_url: str | None = None  # where its end is POSTed
    cancelled: bool = False  # a cancel was asked for while no server ran it (a shared store)


class JobStore(Protocol):
    """Blocking calls; `AsyncJobStore` runs them off the event loop. `add` raises
    InsufficientStorage (507) when the store cannot take the job (a full disk, ...)."""

    def add(self, job: StoredJob, uploads: Sequence[Upload], mask: Upload | None) -> None: ...
    def remove(self, job_id: str) -> None: ...
    def started(self, job_id: str) -> None: ...
    def finished(self, job_id: str, state: JobState, status: str, expires_at: float,
                 image: bytes | None, media_type: str | None, layers: bytes | None = None) -> None: ...
    def get(self, job_id: str) -> StoredJob | None: ...
    def image(self, job_id: str) -> bytes | None: ...
    def layers(self, job_id: str) -> bytes | None: ...
    def uploads(self, job_id: str) -> tuple[list[Upload], Upload | None]: ...
    def unfinished(self) -> list[StoredJob]: ...
    def last_request_id(self) -> int: ...
    def sweep(self, now: float) -> int: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    task TEXT NOT NULL,
    body TEXT NOT NULL,
    request_id INTEGER NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    status TEXT,
    media_type TEXT,
    uploads INTEGER NOT NULL DEFAULT 0,
    has_mask INTEGER NOT NULL DEFAULT 0,
    expires_at REAL,
    expired INTEGER NOT NULL DEFAULT 0,
    base_url TEXT,
    webhook_url TEXT
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (state) WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
"""

_COLUMNS = ("id, owner, task, body, request_id, created_at, state, runs, status, media_type, expires_at, expired, "
            "base_url, webhook_url")


class SqliteJobStore:
    """Jobs in `<folder>/jobs.sqlite3`, edit uploads in `inputs/<id>/`, their images in `images`
    (default: the folder's `results/`)."""

    def __init__(self, folder: Path, images: ObjectStore | None = None) -> None:
        self.folder = folder
        self.inputs = folder / "inputs"
        for path in (folder, self.inputs):
            path.mkdir(parents=True, exist_ok=True)
        self.images = images if images is not None else FolderObjectStore(folder / "results")
        # One connection, used by one thread at a time (AsyncJobStore's).
        self._db = sqlite3.connect(folder / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process (what a restart is); only a
        # power loss may take the last commits back.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def add(self, job: StoredJob, uploads: Sequence[Upload], mask: Upload | None) -> None:
        """Keep a job just accepted, with an edit's uploads (written first: a row never names
        files that are not there). InsufficientStorage when the data folder cannot take them."""
        try:
            if uploads or mask is not None:
                folder = self.inputs / job.id
                folder.mkdir(exist_ok=True)
                for index, upload in enumerate(uploads):
                    _write(folder / f"image-{index}", upload)
                if mask is not None:
                    _write(folder / "mask", mask)
            self._db.execute(
                "INSERT INTO jobs (id, owner, task, body, request_id, created_at, state, runs, uploads, has_mask, "
                "base_url, webhook_url) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.owner, job.task, job.body, job.request_id, job.created_at, job.state.value, job.runs,
                 len(uploads), int(mask is not None), job.base_url, job.webhook_url))
        except (OSError, sqlite3.OperationalError) as exc:  # full, read-only, or no folder where one must be
            shutil.rmtree(self.inputs / job.id, ignore_errors=True)
            log.error("job %s could not be stored in %s: %s", job.id, self.folder, exc)
            raise unwritable(f"the data folder (QWEN_IMAGE_DATA_DIR) cannot take it: {_reason(exc)}") from exc

    def remove(self, job_id: str) -> None:
        """Forget a job that was never queued after all (the queue refused it)."""
        self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.inputs / job_id, ignore_errors=True)

    def started(self, job_id: str) -> None:
        # Every start counts, a start again after a restart too (the job was left 'running').
        self._db.execute("UPDATE jobs SET state = 'running', runs = runs + 1 "
                         "WHERE id = ? AND state IN ('queued', 'running')", (job_id,))

    def finished(self, job_id: str, state: JobState, status: str, expires_at: float,
                 image: bytes | None, media_type: str | None, layers: bytes | None = None) -> None:
        """The job ended: its image and a layered job's ZIP of `layers` (written first), its
        final status, when it expires. Its uploads are not needed any more."""
        if image is not None or layers is not None:
            row = self._db.execute("SELECT owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
            owner = row[0] if row is not None else None
            if layers is not None:
                self.images.put(job_layers_key(job_id), layers, ZIP_MEDIA_TYPE, owner=owner, expires_at=expires_at)
            if image is not None:
                self.images.put(job_image_key(job_id), image, media_type or "image/png", owner=owner,
                                expires_at=expires_at)
        self._db.execute("UPDATE jobs SET state = ?, status = ?, media_type = ?, expires_at = ? WHERE id = ?",
                         (state.value, status, media_type, expires_at, job_id))
        shutil.rmtree(self.inputs / job_id, ignore_errors=True)

    def get(self, job_id: str) -> StoredJob | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def image(self, job_id: str) -> bytes | None:
        stored = self.images.get(job_image_key(job_id), time.time())
        return stored.data if stored is not None else None

    def layers(self, job_id: str) -> bytes | None:
        stored = self.images.get(job_layers_key(job_id), time.time())
        return stored.data if stored is not None else None

    def uploads(self, job_id: str) -> tuple[list[Upload], Upload | None]:
        """An unfinished edit's uploads, as they were sent."""
        row = self._db.execute("SELECT uploads, has_mask FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return [], None
        folder = self.inputs / job_id
        names = field_names(row[0], "image")
        images = [_read(folder / f"image-{index}", name) for index, name in enumerate(names)]
        mask = _read(folder / "mask", "mask") if row[1] else None
        return images, mask

    def unfinished(self) -> list[StoredJob]:
        """Jobs accepted but not ended, oldest first."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('queued', 'running') "
                                "ORDER BY created_at").fetchall()
        return [_job(row) for row in rows]

    def last_request_id(self) -> int:
        row = self._db.execute("SELECT MAX(request_id) FROM jobs").fetchone()
        return int(row[0] or 0)

    def sweep(self, now: float) -> int:
        """Expire the jobs past their TTL (their images go, a tombstone stays), and forget the
        tombstones older than a week. Returns how many jobs expired."""
        expired = [row[0] for row in self._db.execute(
            "SELECT id FROM jobs WHERE expired = 0 AND expires_at IS NOT NULL AND expires_at <= ?", (now,))]
        for job_id in expired:
            self.images.delete(job_image_key(job_id))
            self.images.delete(job_layers_key(job_id))
        if expired:
            self._db.executemany("UPDATE jobs SET expired = 1, status = NULL WHERE id = ?",
                                 [(job_id,) for job_id in expired])
        self._db.execute("DELETE FROM jobs WHERE expired = 1 AND expires_at <= ?", (now - TOMBSTONE_S,))
        return len(expired)

    def close(self) -> None:
        self._db.close()


def unwritable(why: str) -> errors.InsufficientStorage:
    """The 507 a job the store cannot take is refused with (nothing was queued)."""
    return errors.InsufficientStorage(f"The server cannot keep this job, so it was not queued; {why}. Try again "
                                      "later; requests that wait for their image (/generate) still work.",
                                      param=None, code="job_store_full")


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)  # SQLite's own words: "database or disk is full", "attempt to write a readonly database"


def _job(row: tuple[Any, ...]) -> StoredJob:
    (job_id, owner, task, body, request_id, created_at, state, runs, status, media_type, expires_at, expired,
     base_url, webhook_url) = row
    return StoredJob(id=job_id, owner=owner, task=task, body=body, request_id=request_id, created_at=created_at,
                     state=JobState(state), runs=runs, status=status, media_type=media_type,
                     expires_at=expires_at, expired=bool(expired), base_url=base_url, webhook_url=webhook_url)


def _write(path: Path, upload: Upload) -> None:
    data = upload.data.encode("ascii") if isinstance(upload.data, str) else upload.data
    # A marker says which kind it was (raw bytes, or base64 text from a JSON body).
    kind = b"t" if isinstance(upload.data, str) else b"b"
    save_atomically(kind + data, path.parent, path.name, overwrite=True)


def _read(path: Path, name: str) -> Upload:
    raw = path.read_bytes()
    return Upload(name, raw[1:].decode("ascii") if raw[:1] == b"t" else raw[1:])


class AsyncJobStore:
    """A JobStore for the event loop: each call runs on the store's own thread, in order."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="qwen-image-store")

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` on the store's thread; submitted now (calls run in the order made)."""
        return asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(fn, *args))

    async def sweep_periodically(self, interval_s: float) -> None:
        """Drop jobs past their TTL from the store, now and every `interval_s`."""
        while True:
            try:
                await self.call(self.store.sweep, time.time())
            except Exception:  # the next sweep tries again; serving goes on
                log.exception("sweeping the job store failed")
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.store.close()

