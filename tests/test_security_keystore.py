"""Issue 10, finding 2 (the key store's half): one caller flooding the key store with
registrations must not evict another caller's keys.

The attack: each re-compression of one key set was a new entry in one LRU shared by
all callers, so a caller registering fast enough flushed everybody else's keys out
(their next Score: NOT_FOUND). Here the store is driven as the Scorer drives it, with
owner tags as owners, and a fake clock.
"""

from __future__ import annotations

import pytest

from heserve.domain.keystore import KeyStore, KeyTooLargeError

ALICE, MALLORY, BOB = ".alice00000", ".mallory000", ".bob0000000"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.001  # every call a little later: a strict order of use
        return self.now


class RecordingStore(KeyStore[str]):
    """A store that records the key_ids it drops (what worker processes are told)."""

    def __init__(self, max_keys: int, max_bytes: int, **quotas: int | None) -> None:
        self.dropped: list[str] = []
        super().__init__(
            max_keys,
            max_bytes,
            ttl_seconds=3600,
            clock=FakeClock(),
            on_drop=self.dropped.append,
            max_keys_per_owner=quotas.get("max_keys_per_owner"),
            max_bytes_per_owner=quotas.get("max_bytes_per_owner"),
        )


def _store(max_keys: int = 8, max_bytes: int = 1000, **quotas: int | None) -> RecordingStore:
    return RecordingStore(max_keys, max_bytes, **quotas)


def test_a_flood_of_registrations_evicts_the_flooders_own_keys_never_the_victims() -> None:
    store = _store(max_keys=8, max_keys_per_owner=2)
    store.put("a1" + ALICE, "alice's keys", 10, owner=ALICE)

    for variant in range(1000):  # the same key set, re-compressed a thousand ways
        store.put(f"m{variant}" + MALLORY, "mallory's keys", 10, owner=MALLORY)

    assert store.get("a1" + ALICE) == "alice's keys"
    assert store.held_by(MALLORY) == (2, 20)  # her quota, her two most recent
    assert store.get("m999" + MALLORY) and store.get("m998" + MALLORY)
    assert store.get("m997" + MALLORY) is None
    assert not any(key_id.endswith(ALICE) for key_id in store.dropped)
    assert len(store.dropped) == 998  # the workers are told to forget them too


def test_without_quotas_a_full_store_evicts_from_whoever_holds_most() -> None:
    # Several tokens (names) of one attacker, each under any quota, fill the store:
    # eviction then takes from the largest holder, not simply the least recently used.
    store = _store(max_keys=4)
    store.put("a1" + ALICE, "alice's keys", 10, owner=ALICE)  # the least recently used
    for variant in range(50):
        store.put(f"m{variant}" + MALLORY, "m", 10, owner=MALLORY)

    assert store.get("a1" + ALICE) == "alice's keys"
    assert store.held_by(MALLORY) == (3, 30)
    assert len(store) == 4

    # bob, new, takes the room of mallory's least recently used, not alice's
    store.put("b1" + BOB, "bob's keys", 10, owner=BOB)
    assert store.get("a1" + ALICE) and store.get("b1" + BOB)
    assert store.held_by(MALLORY) == (2, 20) and store.get("m47" + MALLORY) is None


def test_eviction_by_bytes_is_fair_too() -> None:
    store = _store(max_keys=100, max_bytes=100, max_bytes_per_owner=60)
    store.put("a1" + ALICE, "alice's keys", 40, owner=ALICE)
    for variant in range(20):
        store.put(f"m{variant}" + MALLORY, "m", 30, owner=MALLORY)

    assert store.get("a1" + ALICE) == "alice's keys"
    assert store.held_by(MALLORY) == (2, 60)  # her byte quota
    assert store.bytes_held == 100

    with pytest.raises(KeyTooLargeError):  # one key set past a caller's quota
        store.put("m-huge" + MALLORY, "m", 61, owner=MALLORY)
    assert store.get("a1" + ALICE) == "alice's keys"


def test_a_caller_at_its_quota_keeps_its_most_recently_used_keys() -> None:
    store = _store(max_keys=8, max_keys_per_owner=2)
    store.put("old" + ALICE, "old", 10, owner=ALICE)
    store.put("new" + ALICE, "new", 10, owner=ALICE)
    assert store.touch("old" + ALICE)  # used since: "new" is now the least recently used

    store.put("newer" + ALICE, "newer", 10, owner=ALICE)

    assert store.get("new" + ALICE) is None
    assert store.get("old" + ALICE) == "old" and store.get("newer" + ALICE) == "newer"
    # re-registering keys already held refreshes them without evicting anything
    store.put("old" + ALICE, "old", 10, owner=ALICE)
    assert store.held_by(ALICE) == (2, 20) and store.get("newer" + ALICE) == "newer"


def test_the_anonymous_owner_has_no_quota_and_deletion_and_expiry_keep_the_books() -> None:
    store = _store(max_keys=8, max_keys_per_owner=2)
    for index in range(5):  # without tokens every caller is the one anonymous owner
        store.put(f"k{index}", "keys", 10)
    assert store.held_by("") == (5, 50)

    store.put("a1" + ALICE, "a", 10, owner=ALICE)
    assert store.delete("a1" + ALICE) and store.held_by(ALICE) == (0, 0)
    assert not store.delete("a1" + ALICE)


@pytest.mark.parametrize("quotas", [{"max_keys_per_owner": 0}, {"max_bytes_per_owner": -1}])
def test_quotas_must_be_positive(quotas: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        _store(8, 100, **quotas)


def test_evictions_and_expirations_are_counted_for_metrics() -> None:
    now = [0.0]
    store: KeyStore[str] = KeyStore(2, 1000, 10.0, clock=lambda: now[0])
    for key_id in ("a", "b", "c"):  # the third evicts the least recently used
        store.put(key_id, key_id, 1)
    assert (store.evictions, store.expirations) == (1, 0)
    now[0] = 11.0
    assert store.get("c") is None  # expired on the next access
    assert (store.evictions, store.expirations) == (1, 2)
