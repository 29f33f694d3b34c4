"""The scoring service's domain: catalogs, keys and queries, checked and scored.

Everything read from the network is bounded and validated here before anything is
allocated for it or computed from it; each refusal is a `ServiceError` whose
status the transport puts on the wire. Nothing here logs bytes of a key, a
ciphertext or a vector.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy.typing as npt
import tenseal.sealapi as seal

from heserve.backends.base import (
    BOUNDED_OBJECT_BYTES,
    Backend,
    ScoreCall,
    Sealed,
    ShardFaultError,
    ShardUnavailableError,
    return_freed_memory,
)
from heserve.backends.local import LocalBackend
from heserve.domain.catalog import Catalog, CatalogError, UnknownItemError, changed_catalog
from heserve.domain.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
    clip,
)
from heserve.domain.keystore import KeyStore, KeyTooLargeError
from heserve.domain.protection import NoiseAdder, ScoreProtection
from heserve.he.engine import Progress, QueryError
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import PRESETS, CkksParameters
from heserve.protocol.reasons import (
    CATALOG_VERSION_CHANGED,
    CONJUGATION_KEY_MISSING,
    KEY_NOT_FOUND,
)
from heserve.protocol.slots import ceil_div

log = logging.getLogger(__name__)
_ANSWER_SECONDS = 0.1
"""What a change's answer is given to reach its caller before the deadline: a change
encoded later than that is dropped, so that a caller who sees DEADLINE_EXCEEDED may take
it that nothing changed (all but certainly: an answer can still take longer)."""
MAX_UPDATE_ITEMS = 65_536
"""Items (upserted and deleted together) one catalog update may name, by default: the
admin service's limit, not the public API's, so it is not among the SizeLimits that
GetServerInfo announces."""
# SEAL's rotation step for complex conjugation (Galois element 2N - 1).
CONJUGATION_STEP = 0


@dataclass(frozen=True)
class SizeLimits:
    """Sizes the server reads from the network, each bounded before allocation."""

    max_message_bytes: int = 4 << 20
    max_key_chunk_bytes: int = 1 << 20
    max_key_bytes: int = 16 << 20
    max_item_ids: int = 65_536
    max_page_size: int = 10_000
    max_queries_per_request: int = 8
    """Queries one Score call may carry: eight seeded precise queries stay well inside
    the default message size, and one pass over the catalog serves them all."""
    max_name_chars: int = 256
    """Longest catalog name, catalog_version, key_id or page_token a request may carry
    (a served catalog's name and version, and an issued key_id, are far shorter)."""
    max_item_id_chars: int = 256
    """Longest item id a request may name."""


@dataclass(frozen=True)
class KeyRetentionPolicy:
    """How many keys the server holds, and for how long without use."""

    ttl_seconds: int = 3600
    max_keys: int = 256
    max_bytes: int = 1 << 30
    max_keys_per_caller: int = 0
    """Key sets one caller (token) may hold; past it, the caller's own least recently
    used goes, never another caller's. 0: a quarter of max_keys (at least 1). A
    server without tokens has one caller, and no quota."""

    def __post_init__(self) -> None:
        if self.max_keys_per_caller <= 0:
            object.__setattr__(self, "max_keys_per_caller", max(1, self.max_keys // 4))


@dataclass(frozen=True)
class ScoredRun:
    """One output ciphertext and the run of items (offset, count) it covers."""

    scores: bytes
    offset: int
    count: int
    index: int
    total: int
    query_index: int = 0
    """Which of the request's queries these scores answer (0: the first)."""


@dataclass(frozen=True)
class CatalogChange:
    """What one update or reload did to one catalog: what the admin service answers,
    the log line says and the metrics count."""

    catalog: str
    outcome: str
    """"updated" (items upserted or deleted), "replaced" (a reload served a new
    version), "unchanged" (a reload found the served version) or "failed"."""
    version: str
    """The version served afterwards (the previous one, unless it changed)."""
    previous_version: str
    item_count: int
    """Items served afterwards."""
    upserted: int = 0
    deleted: int = 0
    chunks_rewritten: int = 0
    """Encoded chunks made for the new version: an update's touched ones, a reload's all."""
    chunk_count: int = 0
    """Chunks of the version served afterwards."""
    seconds: float = 0.0
    error: str = ""
    """Why it failed: one line, naming no value of the catalog."""
    updates_dropped: int = 0
    """A reload's: updates the replaced version held that its source does not."""


@dataclass(frozen=True)
class ServedCatalog:
    """A catalog with its slot layout; its encoded chunks live in the backend."""

    catalog: Catalog
    plan: DiagonalPlan
    updates: int = 0
    """Updates (update_items) made since the catalog was read from its source: they live
    in memory only, and a reload (or a restart) serves the source without them."""

    @property
    def key(self) -> str:
        """The backend's name for this version of the catalog: a reload encodes the next
        version beside this one, and queries already running finish on this one."""
        return f"{self.catalog.name}@{self.catalog.version}"


@contextlib.contextmanager
def _refused_keys() -> Iterator[None]:
    """Key bytes that do not inflate or load, as the refusals the caller gets."""
    try:
        yield
    except wire.PayloadTooLargeError as exc:
        raise ResourceExhaustedError(f"key upload too large: {exc}") from None
    except wire.SerializationError as exc:
        raise InvalidArgumentError(
            f"upload is not SEAL GaloisKeys under the server's parameters ({exc})"
        ) from None


class Scorer:
    """Validates requests, owns the key store, and scores through a backend.

    The backend holds the encoded catalogs (in process by default, or sharded
    over worker processes or Ray actors) and computes every score, re-ranking
    subsets included. The Scorer shares the backend's engine (one SEAL context per
    process) to load and check what arrives and to split complex results.
    `clock` times the keys' idle TTL.
    """

    def __init__(
        self,
        params: CkksParameters,
        catalogs: Iterable[Catalog],
        *,
        clock: Callable[[], float] = time.monotonic,
        limits: SizeLimits | None = None,
        retention: KeyRetentionPolicy | None = None,
        progress: Progress | None = None,
        backend: Backend | None = None,
        protection: ScoreProtection | None = None,
        max_update_items: int = MAX_UPDATE_ITEMS,
    ) -> None:
        self.params = params
        self.max_update_items = max_update_items
        self.preset = next((name for name, p in PRESETS.items() if p == params), "custom")
        self.protection = protection or ScoreProtection()
        self._noise = NoiseAdder(params, self.preset, self.protection)
        self._conjugation = wire.galois_element(CONJUGATION_STEP, params.poly_modulus_degree)
        self.limits = limits or SizeLimits()
        self.retention = retention or KeyRetentionPolicy()
        self.backend: Backend = backend or LocalBackend(params)
        if self.backend.engine.params != params:
            raise ValueError("the backend computes under other CKKS parameters than the Scorer")
        self.engine = self.backend.engine
        self.keys: KeyStore[Sealed[seal.GaloisKeys]] = KeyStore(
            self.retention.max_keys,
            self.retention.max_bytes,
            self.retention.ttl_seconds,
            clock=clock,
            on_drop=self.backend.forget_keys,
            max_keys_per_owner=self.retention.max_keys_per_caller,
        )
        served: dict[str, ServedCatalog] = {}
        for catalog in catalogs:
            if catalog.name in served:
                raise ValueError(f"two catalogs are named {catalog.name!r}")
            plan = self._plan_for(catalog)
            log.info(
                "encoding catalog %s: %d items × %d dims, baby step %d",
                catalog.name,
                catalog.item_count,
                catalog.dimension,
                plan.baby_step,
            )
            entry = ServedCatalog(catalog, plan)
            self.backend.add_catalog(entry.key, plan, catalog.rows, progress)
            served[catalog.name] = entry
        self.catalogs: Mapping[str, ServedCatalog] = dict(sorted(served.items()))
        self._versions = threading.Lock()  # the catalogs mapping, queries per version
        self._reloading = threading.Lock()  # one replacement at a time
        self._in_use: dict[str, int] = {}
        self._retired: set[str] = set()
        self.reloads = 0
        """Catalog versions swapped in since start-up (reloads and updates)."""
        self.change_counts: Counter[tuple[str, str, str]] = Counter()
        """(catalog, "update" or "reload", outcome) → times, for the metrics."""
        steps = {step for entry in self.catalogs.values() for step in entry.plan.rotation_steps}
        # Step 0 (complex conjugation) comes first: needed for real-slot scores only.
        self.galois_steps = (CONJUGATION_STEP, *sorted(steps))
        self._galois_elements = [
            wire.galois_element(step, params.poly_modulus_degree) for step in self.galois_steps
        ]

    @property
    def max_query_bytes(self) -> int:
        """An unseeded, uncompressed top-level ciphertext plus slack for its header."""
        return 2 * self.params.poly_modulus_degree * self.params.data_prime_count * 8 + 4096

    def bounded(self, what: str, value: str, limit: int | None = None) -> str:
        """`value` if it is at most `limit` (default: max_name_chars) characters long;
        INVALID_ARGUMENT, naming its length and not its content, if longer."""
        limit = self.limits.max_name_chars if limit is None else limit
        if len(value) > limit:
            raise InvalidArgumentError(f"{what} of {len(value)} characters exceeds {limit}")
        return value

    def catalog(self, name: str) -> ServedCatalog:
        entry = self.catalogs.get(self.bounded("catalog name", name))
        if entry is None:
            raise NotFoundError(f"no catalog named {clip(name)}")
        return entry

    def register_keys(self, blob: bytes, owner: str = "") -> str:
        """Validate and store GaloisKeys; the key_id is a hash of the keys (idempotent).

        The hash is of the canonical (inflated) bytes, so the same key set sent with
        other compression settings is the same entry, not a new one that evicts
        someone else's. `owner` (an authenticated caller's tag; see
        heserve.transport.auth) enters the hash and ends the key_id, so two callers
        uploading the same keys never share an entry, and the key store's per-caller
        quota applies to it.
        """
        limit = self.limits.max_key_bytes
        uploaded = len(blob)
        with _refused_keys():
            blob = wire.canonical_galois_keys(blob, limit)
        key_id = hashlib.sha256(owner.encode() + b"\0" + blob).hexdigest()[:32] + owner
        if self.keys.touch(key_id):
            return key_id
        with _refused_keys():
            keys = wire.load_galois_keys(self.engine.context, blob, limit)
        missing = [
            step
            for step, element in zip(self.galois_steps, self._galois_elements, strict=True)
            if step != CONJUGATION_STEP and not keys.has_key(element)
        ]
        if missing:
            raise InvalidArgumentError(
                f"GaloisKeys do not cover rotation steps {missing}; see GetServerInfo.galois_steps"
            )
        try:
            size = len(blob) + self._loaded_size(keys)
            self.keys.put(key_id, Sealed(blob, keys), size, owner=owner)
        except KeyTooLargeError as exc:
            raise ResourceExhaustedError(f"keys do not fit the key store: {exc}") from None
        log.info("registered keys %s (%d bytes uploaded)", key_id[:12], uploaded)
        return key_id

    def _loaded_size(self, keys: seal.GaloisKeys) -> int:
        """Bytes the loaded keys occupy: per key, one (2 × N × all primes) pair per data prime."""
        primes = len(self.params.coeff_modulus_bits)
        per_key = (primes - 1) * 2 * self.params.poly_modulus_degree * primes * 8
        return max(1, int(keys.size())) * per_key

    def delete_keys(self, key_id: str) -> bool:
        return self.keys.delete(self.bounded("key_id", key_id))

    def score(
        self,
        key_id: str,
        catalog_name: str,
        query: bytes,
        item_ids: list[str],
        version: str = "",
        complex_scores: bool = False,
        more_queries: Sequence[bytes] = (),
        deadline: float | None = None,
    ) -> Iterator[ScoredRun]:
        """`_score` on the catalog version served when the call began: a replacement
        made while it runs does not drop that version's chunks until it ends."""
        entry = self._acquire(catalog_name)
        try:
            yield from self._score(
                entry, key_id, query, item_ids, version, complex_scores, more_queries, deadline
            )
        finally:
            self._release(entry)

    def _plan_for(self, catalog: Catalog) -> DiagonalPlan:
        """The slot layout a catalog is encoded under, at start-up and on a reload alike."""
        return DiagonalPlan.for_catalog(
            catalog.dimension, catalog.item_count, self.params.slot_count, self.backend.shard_count
        )

    def _acquire(self, catalog_name: str) -> ServedCatalog:
        with self._versions:
            entry = self.catalog(catalog_name)
            self._in_use[entry.key] = self._in_use.get(entry.key, 0) + 1
            return entry

    def _release(self, entry: ServedCatalog) -> None:
        with self._versions:
            left = self._in_use[entry.key] = self._in_use[entry.key] - 1
            drop = left == 0 and entry.key in self._retired
            if drop:
                self._retired.discard(entry.key)
        if drop:
            self.backend.remove_catalog(entry.key)

    def replace_catalog(self, catalog: Catalog, progress: Progress | None = None) -> bool:
        """Serve `catalog` instead of the served catalog of its name, without a restart.

        The new version is encoded while the old one keeps serving, then swapped in at
        once: queries already running finish on the old version, whose chunks are
        dropped after the last of them; a query pinned to the old version gets
        FAILED_PRECONDITION (CATALOG_VERSION_CHANGED). Returns False if the catalog is
        the version already served. A catalog whose layout would need rotation keys
        that clients did not register (another dimension or size class) is refused:
        it needs a restart.
        """
        return self._replace(catalog, progress) is not None

    def _replace(
        self, catalog: Catalog, progress: Progress | None = None
    ) -> tuple[str, int] | None:
        """`replace_catalog`: the version it replaced and the updates that version held
        (read when the swap was decided: updates may land while a reload reads its
        file), or None if `catalog` is the version served. Only those, not the old
        catalog: the caller must not keep its rows alive."""
        with self._reloading:
            old = self.catalogs.get(catalog.name)
            if old is None:
                raise ValueError(f"no catalog named {catalog.name!r} is served")
            if old.catalog.version == catalog.version:
                return None
            if catalog.dimension != old.catalog.dimension:
                raise ValueError(
                    f"catalog {catalog.name!r}: the dimension changed from "
                    f"{old.catalog.dimension} to {catalog.dimension}: clients' vectors would "
                    "no longer fit; restart to serve it"
                )
            plan = self._plan_for(catalog)
            extra = set(plan.rotation_steps) - set(self.galois_steps)
            if extra:
                raise ValueError(
                    f"catalog {catalog.name!r}: the new version needs rotation steps "
                    f"{sorted(extra)} that clients' keys do not cover; restart to serve it"
                )
            entry = ServedCatalog(catalog, plan)
            started = time.monotonic()
            self._encode_then_swap(
                old,
                entry,
                lambda: self.backend.add_catalog(entry.key, plan, catalog.rows, progress),
            )
            log.info(
                "catalog %s: version %s replaced %s (%d items encoded in %.2f s)",
                catalog.name,
                catalog.version,
                old.catalog.version,
                catalog.item_count,
                time.monotonic() - started,
                extra={"fields": {"event": "catalog_replaced", "catalog": catalog.name}},
            )
            return old.catalog.version, old.updates

    def update_items(
        self,
        catalog_name: str,
        upsert_ids: Sequence[str],
        upsert_rows: npt.ArrayLike,
        delete_ids: Sequence[str] = (),
        popularity: Sequence[float] | None = None,
        if_version: str = "",
        deadline: float | None = None,
    ) -> CatalogChange:
        """Upsert and delete items by id: a new version of the catalog, visible to
        queries when this returns, that re-encodes only the chunks the change touches
        (the others are shared with the version before). All or nothing: a change that
        fails its checks, or a shard that fails while encoding it, leaves the served
        version as it was. `if_version` (when set) must be the served version, so that
        two writers cannot overwrite each other unknowingly. Queries already running
        finish on the version they started on, as with a reload. `deadline`
        (time.monotonic()) is the caller's: a change encoded after it is dropped, not
        served (DEADLINE_EXCEEDED), so that a caller who gave up is not told of a failure
        that in fact took effect.
        """
        started = time.monotonic()
        try:
            self.bound_update(upsert_ids, delete_ids)
            self.bounded("if_version", if_version)
            with self._reloading:
                old = self.catalog(catalog_name)
                if if_version and if_version != old.catalog.version:
                    raise FailedPreconditionError(
                        f"catalog {old.catalog.name!r} is at version {old.catalog.version}, "
                        f"not {clip(if_version)}",
                        reason=CATALOG_VERSION_CHANGED,
                    )
                try:
                    changes = changed_catalog(
                        old.catalog, upsert_ids, upsert_rows, delete_ids, popularity
                    )
                except UnknownItemError as exc:
                    raise NotFoundError(str(exc)) from None
                except CatalogError as exc:
                    raise InvalidArgumentError(str(exc)) from None
                entry = ServedCatalog(changes.catalog, old.plan, old.updates + 1)
                total = old.plan.chunk_count(changes.catalog.item_count)
                chunks = sorted(
                    {int(row) // old.plan.items_per_chunk for row in changes.changed_rows}
                    & set(range(total))
                )
                try:
                    self._encode_then_swap(
                        old,
                        entry,
                        functools.partial(
                            self.backend.update_catalog,
                            entry.key,
                            old.key,
                            old.plan,
                            changes.catalog.rows,
                            chunks,
                        ),
                        deadline,
                    )
                except ShardUnavailableError as exc:
                    raise UnavailableError(f"{exc}; nothing changed, retry the update") from None
                except ShardFaultError as exc:
                    log.error("a shard failed a catalog update: %s", exc)
                    raise InternalError("a shard failed the update; nothing changed") from None
        except ServiceError:
            # Counted under a served name only: a metric label is never the caller's
            # input. Not logged here: the refusal is the caller's status, which the
            # transport logs once with the call.
            counted = catalog_name if catalog_name in self.catalogs else ""
            self.change_counts[(counted, "update", "failed")] += 1
            raise
        change = CatalogChange(
            catalog=old.catalog.name,
            outcome="updated",
            version=changes.catalog.version,
            previous_version=old.catalog.version,
            item_count=changes.catalog.item_count,
            upserted=changes.upserted,
            deleted=changes.deleted,
            chunks_rewritten=len(chunks),
            chunk_count=total,
            seconds=time.monotonic() - started,
        )
        del old, entry, changes
        _after_a_version_went()
        self._record("update", change)
        return change

    def bound_update(self, upsert_ids: Sequence[str], delete_ids: Sequence[str]) -> None:
        """Refuse an update naming more items than `max_update_items`, or an id longer
        than `max_item_id_chars`: checked before anything is made for it (update_items
        does; a transport that builds the rows first calls it before it allocates)."""
        named = len(upsert_ids) + len(delete_ids)
        if named > self.max_update_items:
            raise ResourceExhaustedError(
                f"{named} items exceed the limit of {self.max_update_items} "
                "per update; send them in several"
            )
        for item in (*upsert_ids, *delete_ids):
            self.bounded("an item id", item, self.limits.max_item_id_chars)

    def reload(self, catalog_name: str, load: Callable[[], Catalog]) -> CatalogChange:
        """Serve what `load` reads for a served catalog (its source read again), through
        `replace_catalog`. A source that does not load, or a version the server cannot
        swap in, changes nothing: the served version stays, and the change says why."""
        started = time.monotonic()
        served = self.catalog(catalog_name)
        change = CatalogChange(
            catalog=catalog_name,
            outcome="unchanged",
            version=served.catalog.version,
            previous_version=served.catalog.version,
            item_count=served.catalog.item_count,
            chunk_count=served.plan.chunk_count(served.catalog.item_count),
        )
        try:
            catalog = load()
            if catalog.name != catalog_name:
                raise ValueError(f"the source of {catalog_name!r} loaded {catalog.name!r}")
            replaced = self._replace(catalog)
            if replaced is not None:
                previous, dropped = replaced
                if dropped:
                    log.warning(
                        "catalog %s: the reload served its source, which does not hold the "
                        "%d update(s) made through the admin service since it was read; "
                        "write changes to the source too if they must last",
                        catalog_name,
                        dropped,
                    )
                entry = self.catalog(catalog_name)
                total = entry.plan.chunk_count(catalog.item_count)
                change = replace(
                    change,
                    outcome="replaced",
                    previous_version=previous,
                    updates_dropped=dropped,
                    version=catalog.version,
                    item_count=catalog.item_count,
                    chunks_rewritten=total,
                    chunk_count=total,
                )
        except (CatalogError, OSError, ValueError, ShardUnavailableError, ShardFaultError) as exc:
            change = replace(change, outcome="failed", error=str(exc).splitlines()[0][:500])
        change = replace(change, seconds=time.monotonic() - started)
        if change.outcome == "replaced":
            del served
            _after_a_version_went()
        self._record("reload", change)
        return change

    def _record(self, kind: str, change: CatalogChange) -> None:
        """Count a change for the metrics and log it, one line."""
        self.change_counts[(change.catalog, kind, change.outcome)] += 1
        fields = {
            "event": f"catalog_{kind}",
            "catalog": change.catalog,
            "outcome": change.outcome,
            "version": change.version,
            "previous_version": change.previous_version,
            "items": change.item_count,
            "chunks_rewritten": change.chunks_rewritten,
            "seconds": round(change.seconds, 3),
        }
        if change.outcome == "failed":
            log.error(
                "catalog %s failed, the served version stays: %s",
                kind,
                change.error,
                extra={"fields": fields},
            )
        elif change.outcome == "unchanged":
            log.info("catalog %s: unchanged (version %s)", change.catalog, change.version)
        elif kind == "update":  # a reload's replacement is logged by replace_catalog
            log.info(
                "catalog %s: version %s replaced %s (%d upserted, %d deleted; %d of %d "
                "chunks encoded in %.2f s)",
                change.catalog,
                change.version,
                change.previous_version,
                change.upserted,
                change.deleted,
                change.chunks_rewritten,
                change.chunk_count,
                change.seconds,
                extra={"fields": fields},
            )

    def _encode_then_swap(
        self,
        old: ServedCatalog,
        entry: ServedCatalog,
        encode: Callable[[], None],
        deadline: float | None = None,
    ) -> None:
        """Have the backend hold `entry`'s chunks (`encode`), then serve it instead of
        `old` at once. A failure while encoding, or a `deadline` (time.monotonic()) that
        passed meanwhile, drops what was made and serves `old` on; `old`'s chunks go when
        the last query that started on it ends."""
        try:
            encode()
            if deadline is not None and time.monotonic() > deadline - _ANSWER_SECONDS:
                raise DeadlineExceededError(
                    "the call's deadline passed while the change was encoded: nothing "
                    "changed; allow more time (a change rewrites whole chunks)"
                )
        except BaseException:
            self.backend.remove_catalog(entry.key)
            raise
        with self._versions:
            self.catalogs = {**self.catalogs, entry.catalog.name: entry}
            drop = self._in_use.get(old.key, 0) == 0
            if not drop:
                self._retired.add(old.key)
            self.reloads += 1
        if drop:
            self.backend.remove_catalog(old.key)

    def _score(
        self,
        entry: ServedCatalog,
        key_id: str,
        query: bytes,
        item_ids: list[str],
        version: str,
        complex_scores: bool,
        more_queries: Sequence[bytes],
        deadline: float | None,
    ) -> Iterator[ScoredRun]:
        """Check the whole request, then yield encrypted score runs in order.

        Each chunk's result holds 2S scores in complex slots. A client that decodes
        complex slots gets it as it is; for any other, it is split into two
        real-slot ciphertexts of S scores each (which needs the conjugation key).
        `more_queries` are scored with `query` in one pass over the catalog; runs
        come chunk by chunk, and within a chunk query by query (`query_index`).
        """
        queries = [query, *more_queries]
        if len(queries) > self.limits.max_queries_per_request:
            raise ResourceExhaustedError(
                f"{len(queries)} queries exceed the limit of "
                f"{self.limits.max_queries_per_request} per request"
            )
        self.bounded("key_id", key_id)
        self.bounded("catalog_version", version)
        catalog_name = entry.catalog.name
        catalog = entry.catalog
        if version and version != catalog.version:
            raise FailedPreconditionError(
                f"catalog {catalog_name!r} is at version {catalog.version}, not {clip(version)}",
                reason=CATALOG_VERSION_CHANGED,
            )
        positions = self._positions(catalog, item_ids)
        keys = self.keys.get(key_id)
        if keys is None:
            raise NotFoundError(
                f"unknown or expired key_id {key_id[:12]!r}; register keys again",
                reason=KEY_NOT_FOUND,
            )
        if not complex_scores and not keys.value.has_key(self._conjugation):
            raise FailedPreconditionError(
                "real-slot scores need the conjugation key (rotation step 0, Galois element "
                "2N-1) in the registered keys; register keys with it, or ask for complex_scores",
                reason=CONJUGATION_KEY_MISSING,
            )
        loaded = tuple(Sealed(blob, self._load_query(blob)) for blob in queries)
        # Each query is answered in the SEAL 4.x version its header carried.
        minors = [wire.seal_minor(blob) for blob in queries]
        call = ScoreCall(entry.key, key_id, keys, loaded, deadline)
        if positions is None:
            runs = self.backend.score(call)
            count = catalog.item_count
        else:
            rows = catalog.rows.take(positions)
            runs = self.backend.score_rows(call, rows)
            count = len(positions)
        per_response = entry.plan.items_per_chunk if complex_scores else self.params.slot_count
        total = ceil_div(count, per_response)
        index = 0
        try:
            for per_query in runs:
                finished = [
                    self._finish(scores, keys.value, complex_scores, minor)
                    for scores, minor in zip(per_query, minors, strict=True)
                ]
                for part in range(len(finished[0])):
                    offset = index * per_response
                    if offset >= count:
                        break  # the imaginary half of a last chunk with S items or fewer
                    size = min(per_response, count - offset)
                    for query_index, parts in enumerate(finished):
                        yield ScoredRun(parts[part], offset, size, index, total, query_index)
                    index += 1
        except QueryError as exc:
            raise InvalidArgumentError(str(exc)) from None
        except ShardFaultError as exc:
            log.error("a shard failed a query: %s", exc)
            raise InternalError("internal server error: a shard failed the query") from None
        except ShardUnavailableError as exc:
            raise UnavailableError(f"{exc}; retry the query") from None

    def _finish(
        self, scores: bytes, keys: seal.GaloisKeys, complex_scores: bool, minor: int
    ) -> list[bytes]:
        """A chunk's result as it goes on the wire (tagged SEAL 4.`minor`): with noise,
        split if real slots were asked."""
        if complex_scores and not self.protection.enabled:
            return [wire.ciphertext_to_wire(scores, minor)]
        ciphertext = wire.load_ciphertext(self.engine.context, scores, BOUNDED_OBJECT_BYTES)
        self._noise.add_to(ciphertext)
        parts = [ciphertext] if complex_scores else self.engine.split_complex(ciphertext, keys)
        return [wire.ciphertext_to_wire(self.engine.serialize(part), minor) for part in parts]

    def _positions(self, catalog: Catalog, item_ids: list[str]) -> list[int] | None:
        if not item_ids:
            return None
        if len(item_ids) > self.limits.max_item_ids:
            raise ResourceExhaustedError(
                f"{len(item_ids)} item ids exceed the limit of {self.limits.max_item_ids}"
            )
        longest = max(item_ids, key=len)
        self.bounded("an item id", longest, self.limits.max_item_id_chars)
        if len(set(item_ids)) != len(item_ids):
            raise InvalidArgumentError("item_ids contains repeated ids")
        try:
            return catalog.positions_of(item_ids)
        except KeyError:
            unknown = next(i for i in item_ids if not _known(catalog, i))
            raise NotFoundError(
                f"unknown item id {clip(unknown)} in catalog {clip(catalog.name)}"
            ) from None

    def _load_query(self, blob: bytes) -> seal.Ciphertext:
        if not blob:
            raise InvalidArgumentError("query is empty")
        try:
            ciphertext = wire.load_ciphertext(self.engine.context, blob, self.max_query_bytes)
            self.engine.check_query(ciphertext)
        except wire.PayloadTooLargeError as exc:
            raise ResourceExhaustedError(f"query too large: {exc}") from None
        except (wire.SerializationError, QueryError) as exc:
            raise InvalidArgumentError(
                f"query is not a valid ciphertext for this server: {exc}"
            ) from None
        return ciphertext


def _after_a_version_went() -> None:
    """The old version's rows are freed once the last reference to them goes (the
    Scorer's, unless a query still runs on it): give their pages back to the system, so
    the front's resident size comes down to one version. A change frees many 8 MiB row
    blocks, which glibc keeps in its heap otherwise."""
    return_freed_memory()


def _known(catalog: Catalog, item_id: str) -> bool:
    try:
        catalog.positions_of([item_id])
    except KeyError:
        return False
    return True
