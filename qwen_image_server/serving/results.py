"""Finished images kept for a while under random ids: OpenAI `url` responses and job results.

Ids are unguessable (192 random bits). Each image belongs to the API key that made it (its
`owner`): another key asking for it is told it does not exist. Entries expire after `ttl_s`, and
memory is bounded by count and by bytes. When a bound is passed, the owner holding the most
bytes loses its oldest image first, so a key that floods the server with images evicts its own,
not another key's.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoredImage:
    id: str
    data: bytes
    media_type: str
    created: float  # time.time() when stored
    expires_at: float  # clock() deadline
    owner: str | None = None  # the API key's id that made it (None: a server without keys)


class ResultStore:
    def __init__(self, ttl_s: float, max_items: int, max_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic, id_prefix: str = "") -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.id_prefix = id_prefix  # starts every random id: the replica's name when scaled out
        self._clock = clock
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._bytes_by_owner: dict[str | None, int] = {}
        self._lock = threading.Lock()

    def new_id(self) -> str:
        """A fresh random id (192 bits), starting with the replica's prefix."""
        return f"{self.id_prefix}{secrets.token_urlsafe(24)}"

    def put(self, data: bytes, media_type: str, *, id: str | None = None, owner: str | None = None) -> StoredImage:
        """Store `data` for `owner` and return its entry (with a fresh random id unless one is given)."""
        item = StoredImage(
            id=id or self.new_id(),
            data=data,
            media_type=media_type,
            created=time.time(),
            expires_at=self._clock() + self.ttl_s,
            owner=owner,
        )
        with self._lock:
            self._remove_locked(item.id)
            self._items[item.id] = item
            self._count_locked(item, +1)
            self._evict_locked()
        return item

    def get(self, id: str, owner: str | None = None) -> StoredImage | None:
        """The entry, or None when unknown, expired, or another owner's."""
        with self._lock:
            self._evict_locked()
            item = self._items.get(id)
        return item if item is not None and item.owner == owner else None

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            self._evict_locked()
            return len(self._items)

    def _count_locked(self, item: StoredImage, sign: int) -> None:
        size = sign * len(item.data)
        self._bytes += size
        left = self._bytes_by_owner.get(item.owner, 0) + size
        if left > 0:
            self._bytes_by_owner[item.owner] = left
        else:
            self._bytes_by_owner.pop(item.owner, None)

    def _remove_locked(self, id: str) -> None:
        item = self._items.pop(id, None)
        if item is not None:
            self._count_locked(item, -1)

    def _evict_locked(self) -> None:
        now = self._clock()
        # Oldest first, and every entry lives ttl_s: the expired ones are at the front.
        while self._items and next(iter(self._items.values())).expires_at <= now:
            self._remove_locked(next(iter(self._items)))
        while self._items and (len(self._items) > self.max_items
                               or (self.max_bytes is not None and self._bytes > self.max_bytes)):
            heaviest = max(self._bytes_by_owner, key=self._bytes_by_owner.__getitem__)
            oldest = next(item.id for item in self._items.values() if item.owner == heaviest)
            self._remove_locked(oldest)
