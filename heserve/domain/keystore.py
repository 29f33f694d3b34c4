"""The server's store of clients' public Galois keys: bounded, expiring, LRU.

Only evaluation keys ever reach it (RegisterKeys refuses anything else before it
gets here). It is bounded by count and by bytes, so a flood of registrations
evicts the least recently used keys instead of exhausting memory, and a key idle
for longer than the TTL is forgotten.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")


class KeyTooLargeError(ValueError):
    """One key set larger than the whole store."""


@dataclass
class _Entry(Generic[K]):
    keys: K
    size: int
    last_used: float


class KeyStore(Generic[K]):
    """Thread-safe map of key_id to keys, bounded by count, bytes and idle time.

    `on_drop(key_id)` is called for every key that leaves the store (evicted,
    expired or deleted), so copies elsewhere (worker processes) can follow.
    """

    def __init__(
        self,
        max_keys: int,
        max_bytes: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        if max_keys < 1 or max_bytes < 1 or ttl_seconds <= 0:
            raise ValueError("key store bounds must be positive")
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._on_drop = on_drop
        self._entries: OrderedDict[str, _Entry[K]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key_id: str, keys: K, size: int) -> None:
        """Store (or refresh) keys, evicting the least recently used to make room."""
        if size > self.max_bytes:
            raise KeyTooLargeError(f"keys of {size} bytes exceed the store's {self.max_bytes}")
        with self._lock:
            self._expire()
            self._discard(key_id, notify=False)
            while self._entries and (
                len(self._entries) >= self.max_keys or self._bytes + size > self.max_bytes
            ):
                self._discard(next(iter(self._entries)))
            self._entries[key_id] = _Entry(keys, size, self._clock())
            self._bytes += size

    def get(self, key_id: str) -> K | None:
        """The keys for key_id, marking them used, or None if unknown or expired."""
        with self._lock:
            self._expire()
            entry = self._entries.get(key_id)
            if entry is None:
                return None
            entry.last_used = self._clock()
            self._entries.move_to_end(key_id)
            return entry.keys

    def touch(self, key_id: str) -> bool:
        """Mark key_id used; False if it is not held."""
        return self.get(key_id) is not None

    def delete(self, key_id: str) -> bool:
        """Forget key_id now; True if it was held."""
        with self._lock:
            return self._discard(key_id)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    @property
    def bytes_held(self) -> int:
        with self._lock:
            self._expire()
            return self._bytes

    def _discard(self, key_id: str, notify: bool = True) -> bool:
        entry = self._entries.pop(key_id, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        if notify and self._on_drop is not None:
            self._on_drop(key_id)
        return True

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_seconds
        while self._entries:
            key_id, entry = next(iter(self._entries.items()))
            if entry.last_used > deadline:
                break
            self._discard(key_id)
