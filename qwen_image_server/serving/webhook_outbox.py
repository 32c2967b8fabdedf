"""The outbox of webhook deliveries: every event is written here before its first try, and stays
until a receiver accepted it or it was given up, so deliveries survive a crash or a restart.

A SQLite database of its own (`<data_dir>/webhooks.sqlite3`, WAL), reached from one thread: the
event loop never waits on the disk. Servers sharing the folder share the outbox: a delivery is
claimed (its next try moved past the try's longest time) before it is tried, so no two servers
try it at once, and one whose server died during a try is tried again once the claim lapses.
With a Redis job store the outbox is in Redis (`redis_store.RedisOutbox`), the same way.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")

FILE_NAME = "webhooks.sqlite3"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,      -- the event's id: the webhook-id header, the same on every try
    job_id TEXT NOT NULL,     -- what the event is about (for the logs)
    url TEXT NOT NULL,
    payload BLOB NOT NULL,    -- the body, as signed and sent on every try
    created_at REAL NOT NULL, -- unix time of the event: tries end retry_s after it
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,    -- unix time of the next try (or when a claim lapses)
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_by_next_try ON deliveries (next_at);
"""


@dataclass(frozen=True)
class Delivery:
    """One event to deliver to one URL."""

    id: str
    job_id: str
    url: str
    payload: bytes
    created_at: float
    attempts: int = 0  # tries that failed so far


class Outbox(Protocol):
    """Where deliveries wait until made or given up (every server sharing it sees them)."""

    @property
    def path(self) -> object:
        """Where it is, for messages."""
        ...


    async def open(self) -> int: ...
    async def add(self, delivery: Delivery, next_at: float) -> None: ...
    async def claim(self, now: float, limit: int, until: float) -> list[Delivery]: ...
    async def next_try(self) -> float | None: ...
    async def retry(self, delivery: Delivery, next_at: float, error: str) -> None: ...
    async def remove(self, delivery: Delivery) -> None: ...
    async def close(self) -> None: ...


class SqliteOutbox:
    """Deliveries not made yet, in `folder`/webhooks.sqlite3; every method runs on the outbox's
    own thread."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILE_NAME
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="qwen-image-outbox")
        self._db: sqlite3.Connection | None = None  # made, used and closed on that thread only

    async def open(self) -> int:
        """Open (or create) the database; the number of deliveries it holds (pending from
        before a restart). OSError or sqlite3.Error when the folder cannot hold it."""
        return await self._run(self._open)

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10)  # autocommit; BEGIN where needed
        db.execute("PRAGMA journal_mode=WAL")
        # Every commit reaches the disk: an event written here is not lost to a power cut either
        # (one fsync per finished job, next to the seconds the job took).
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db = db
        count: int = db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
        return count

    async def add(self, delivery: Delivery, next_at: float) -> None:
        def add(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO deliveries (id, job_id, url, payload, created_at, attempts, next_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (delivery.id, delivery.job_id, delivery.url, delivery.payload, delivery.created_at,
                        delivery.attempts, next_at))

        await self._run_db(add)

    async def claim(self, now: float, limit: int, until: float) -> list[Delivery]:
        """Up to `limit` deliveries due at `now`, earliest first, each claimed until `until`."""

        def claim(db: sqlite3.Connection) -> list[Delivery]:
            db.execute("BEGIN IMMEDIATE")  # no other server claims between the read and the write
            try:
                rows = db.execute("SELECT id, job_id, url, payload, created_at, attempts FROM deliveries "
                                  "WHERE next_at <= ? ORDER BY next_at LIMIT ?", (now, limit)).fetchall()
                db.executemany("UPDATE deliveries SET next_at = ? WHERE id = ?", [(until, row[0]) for row in rows])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return [Delivery(id, job_id, url, bytes(payload), created_at, attempts)
                    for id, job_id, url, payload, created_at, attempts in rows]

        return await self._run_db(claim)

    async def next_try(self) -> float | None:
        """When the earliest delivery is due (None: none left)."""

        def earliest(db: sqlite3.Connection) -> float | None:
            value: float | None = db.execute("SELECT MIN(next_at) FROM deliveries").fetchone()[0]
            return value

        return await self._run_db(earliest)

    async def retry(self, delivery: Delivery, next_at: float, error: str) -> None:
        """A try failed: the next one at `next_at`."""
        await self._run_db(lambda db: db.execute(
            "UPDATE deliveries SET attempts = ?, next_at = ?, last_error = ? WHERE id = ?",
            (delivery.attempts, next_at, error, delivery.id)))

    async def remove(self, delivery: Delivery) -> None:
        """Delivered, or given up."""
        await self._run_db(lambda db: db.execute("DELETE FROM deliveries WHERE id = ?", (delivery.id,)))

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._thread.shutdown(wait=True)

    async def _run_db(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def with_db() -> T:
            if self._db is None:
                raise sqlite3.ProgrammingError("the webhook outbox is closed")
            return work(self._db)

        return await self._run(with_db)

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)
