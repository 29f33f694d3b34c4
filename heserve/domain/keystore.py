"""The server's store of clients' public Galois keys: bounded, expiring, LRU, fair.

Only evaluation keys ever reach it (RegisterKeys refuses anything else before it
gets here). It is bounded by count and by bytes, so a flood of registrations
evicts least recently used keys instead of exhausting memory, and a key idle for
longer than the TTL is forgotten.

Each entry has an owner (the caller's owner tag; see heserve.transport.auth), and
one caller cannot flush another's keys out:

- an owner at its quota (`max_keys_per_owner`, `max_bytes_per_owner`) makes room
  by evicting its own least recently used entry, never another owner's;
- when the whole store is full, the entry evicted is the least recently used one of
  the owner holding the most (entries when the count is the bound, bytes when the
  bytes are), the owner who is registering included. A caller who holds less than
  everybody else is evicted last, however fast others register.

The anonymous owner "" (a server without tokens, where every caller is that one
owner) has no quota: quotas would only shrink the store for everybody. Fair eviction
still applies to it like to any owner.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")
ANONYMOUS_OWNER = ""


class KeyTooLargeError(ValueError):
    """One key set larger than the whole store, or than its owner's byte quota."""


@dataclass
class _Entry(Generic[K]):
    keys: K
    size: int
    last_used: float
    owner: str = ANONYMOUS_OWNER


@dataclass
class _Holding:
    """What one owner holds: entries and bytes."""

    count: int = 0
    size: int = 0


class KeyStore(Generic[K]):
    """Thread-safe map of key_id to keys, bounded by count, bytes and idle time, overall
    and (optionally) per owner.

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
        *,
        max_keys_per_owner: int | None = None,
        max_bytes_per_owner: int | None = None,
    ) -> None:
        if max_keys < 1 or max_bytes < 1 or ttl_seconds <= 0:
            raise ValueError("key store bounds must be positive")
        if (max_keys_per_owner is not None and max_keys_per_owner < 1) or (
            max_bytes_per_owner is not None and max_bytes_per_owner < 1
        ):
            raise ValueError("per-owner quotas must be positive (or None: none)")
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.max_keys_per_owner = max_keys_per_owner
        self.max_bytes_per_owner = max_bytes_per_owner
        self._clock = clock
        self._on_drop = on_drop
        self._entries: OrderedDict[str, _Entry[K]] = OrderedDict()  # least recently used first
        self._holdings: dict[str, _Holding] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        """Entries dropped to make room (LRU or a caller's quota): /metrics counts them."""
        self.expirations = 0
        """Entries dropped because they went unused for ttl_seconds."""

    def put(self, key_id: str, keys: K, size: int, owner: str = ANONYMOUS_OWNER) -> None:
        """Store (or refresh) `owner`'s keys, evicting to make room: first the owner's own
        least recently used entries past its quota, then, while the store is full, the
        least recently used entry of whoever holds the most."""
        if size > self.max_bytes:
            raise KeyTooLargeError(f"keys of {size} bytes exceed the store's {self.max_bytes}")
        quota_bytes = self._quota(owner, self.max_bytes_per_owner)
        if quota_bytes is not None and size > quota_bytes:
            raise KeyTooLargeError(f"keys of {size} bytes exceed a caller's {quota_bytes}")
        quota_keys = self._quota(owner, self.max_keys_per_owner)
        with self._lock:
            self._expire()
            self._discard(key_id, notify=False)
            mine = self._holdings.get(owner, _Holding())
            while mine.count and (
                (quota_keys is not None and mine.count >= quota_keys)
                or (quota_bytes is not None and mine.size + size > quota_bytes)
            ):
                self._discard(self._least_recently_used({owner}))
                self.evictions += 1
            while self._entries and len(self._entries) >= self.max_keys:
                self._discard(self._fair_victim(owner, size, by_bytes=False))
                self.evictions += 1
            while self._entries and self._bytes + size > self.max_bytes:
                self._discard(self._fair_victim(owner, size, by_bytes=True))
                self.evictions += 1
            self._entries[key_id] = _Entry(keys, size, self._clock(), owner)
            holding = self._holdings.setdefault(owner, _Holding())
            holding.count += 1
            holding.size += size
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

    def held_by(self, owner: str) -> tuple[int, int]:
        """(entries, bytes) that `owner` holds now."""
        with self._lock:
            self._expire()
            holding = self._holdings.get(owner, _Holding())
            return holding.count, holding.size

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    @property
    def bytes_held(self) -> int:
        with self._lock:
            self._expire()
            return self._bytes

    @staticmethod
    def _quota(owner: str, quota: int | None) -> int | None:
        return None if owner == ANONYMOUS_OWNER else quota

    def _least_recently_used(self, owners: set[str]) -> str:
        """The key_id of the least recently used entry of any of `owners`."""
        return next(key_id for key_id, entry in self._entries.items() if entry.owner in owners)

    def _fair_victim(self, newcomer: str, size: int, by_bytes: bool) -> str:
        """The entry to evict when the store is full: the least recently used of the
        owner(s) holding the most, counting the entry `newcomer` is about to add."""
        held = {
            owner: (holding.size if by_bytes else holding.count)
            for owner, holding in self._holdings.items()
            if holding.count
        }
        if newcomer in held:
            held[newcomer] += size if by_bytes else 1
        most = max(held.values())
        return self._least_recently_used({owner for owner, value in held.items() if value == most})

    def _discard(self, key_id: str, notify: bool = True) -> bool:
        entry = self._entries.pop(key_id, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        holding = self._holdings[entry.owner]
        holding.count -= 1
        holding.size -= entry.size
        if not holding.count:
            del self._holdings[entry.owner]
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
            self.expirations += 1
