"""Finished images kept for a while under random ids: OpenAI `url` responses and job results.

Ids are unguessable (192 random bits), entries expire after `ttl_s`, and at most `max_items`
are kept (the oldest go first), so memory stays bounded however many requests arrive.
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


class ResultStore:
    def __init__(self, ttl_s: float, max_items: int, clock: Callable[[], float] = time.monotonic,
                 id_prefix: str = "") -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self.id_prefix = id_prefix  # starts every random id: the replica's name when scaled out
        self._clock = clock
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str, *, id: str | None = None) -> StoredImage:
        """Store `data` and return its entry (with a fresh random id unless one is given)."""
        item = StoredImage(
            id=id or f"{self.id_prefix}{secrets.token_urlsafe(24)}",
            data=data,
            media_type=media_type,
            created=time.time(),
            expires_at=self._clock() + self.ttl_s,
        )
        with self._lock:
            self._items[item.id] = item
            self._items.move_to_end(item.id)
            self._evict_locked()
        return item

    def get(self, id: str) -> StoredImage | None:
        """The entry, or None when unknown or expired."""
        with self._lock:
            self._evict_locked()
            return self._items.get(id)

    def __len__(self) -> int:
        with self._lock:
            self._evict_locked()
            return len(self._items)

    def _evict_locked(self) -> None:
        now = self._clock()
        while self._items:
            oldest = next(iter(self._items.values()))
            if oldest.expires_at > now and len(self._items) <= self.max_items:
                break
            self._items.popitem(last=False)
