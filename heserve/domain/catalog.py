"""Item catalogs: plaintext embeddings with ids, loaded from files or built in.

A catalog is validated when it is made (finite values, bounded row norms, unique
ids) so that nothing downstream has to wonder; its version is a content hash, so a
client can tell when the ids it cached went stale.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from heserve.he.rows import RowBlocks, RowEditor
from heserve.protocol.slots import FloatArray, RowArray

# Every preset leaves scores at least 8 bits of headroom (|score| < 128); with a
# user vector of norm <= 1, rows of norm <= 64 keep a factor of two in reserve.
MAX_ROW_NORM = 64.0
MAX_ID_BYTES = 256
DEMO_CATALOG_NAME = "demo"


_BLANKS = (
    "begins or ends with blanks: files of ids (one a line) are read trimmed, so no such "
    "file could name it"
)


class CatalogError(ValueError):
    """A catalog file or array that cannot be served."""


class UnknownItemError(CatalogError):
    """A change names an item the catalog does not hold."""


class Catalog:
    """n items × d dimensions of plaintext embeddings, with one id per item.

    Not changed once made (`changed_catalog` makes the next version). The rows are held
    as `RowBlocks`, which the versions made from one another share block by block.
    """

    name: str
    rows: RowBlocks
    ids: tuple[str, ...]
    popularity: tuple[float, ...] | None
    """The catalog's published non-personalized order: one finite number an item,
    higher first (served by ListItems). None: the catalog publishes none."""
    version: str
    """A hash of the content (of a change and the version before, for a version made by
    `changed_catalog`): a client that cached ids tells when they went stale."""

    def __init__(
        self,
        name: str,
        embeddings: npt.ArrayLike,
        ids: Sequence[str],
        popularity: Sequence[float] | None = None,
    ) -> None:
        # Held as float32, what embedding models produce: half the memory of float64,
        # and its rounding (~6e-8 relative) is far below every preset's error.
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        ids = tuple(ids)
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise CatalogError(f"catalog {name!r}: embeddings must be a non-empty n × d matrix")
        row = _first_non_finite_row(emb)
        if row is not None:
            raise CatalogError(
                f"catalog {name!r}: embeddings contain NaN or infinity (first in row {row})"
            )
        _check_norms(name, emb, "row")
        if len(ids) != emb.shape[0]:
            raise CatalogError(f"catalog {name!r}: {len(ids)} ids for {emb.shape[0]} embeddings")
        repeated = repeated_rows(ids)
        if repeated is not None:
            raise CatalogError(
                f"catalog {name!r}: item ids are not unique ({ids[repeated[1]][:40]!r} repeats)"
            )
        _check_each_id(name, ids, lambda row: f"row {row}'s")
        digest = hashlib.sha256(emb.astype("<f4", copy=False).data)
        digest.update("\n".join(ids).encode())
        values: tuple[float, ...] | None = None
        if popularity is not None:
            values = tuple(float(value) for value in popularity)
            if len(values) != len(ids):
                raise CatalogError(
                    f"catalog {name!r}: {len(values)} popularity values for {len(ids)} items"
                )
            if not all(math.isfinite(value) for value in values):
                raise CatalogError(f"catalog {name!r}: popularity holds NaN or infinity")
            # a new order is a new version: clients that cached the old one read it again
            digest.update(np.asarray(values, dtype="<f8").tobytes())
        self._set(name, RowBlocks.of(emb), ids, values, digest.hexdigest()[:16])

    def _set(
        self,
        name: str,
        rows: RowBlocks,
        ids: tuple[str, ...],
        popularity: tuple[float, ...] | None,
        version: str,
    ) -> None:
        for key, value in (
            ("name", name),
            ("rows", rows),
            ("ids", ids),
            ("popularity", popularity),
            ("version", version),
        ):
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"a Catalog does not change ({key}); changed_catalog makes the next")

    def __repr__(self) -> str:
        return (
            f"Catalog({self.name!r}, {self.item_count} × {self.dimension}, version {self.version})"
        )

    @classmethod
    def _checked(
        cls,
        name: str,
        rows: RowBlocks,
        ids: tuple[str, ...],
        popularity: tuple[float, ...] | None,
        version: str,
        positions: dict[str, int],
    ) -> Catalog:
        """A catalog whose parts were checked already (by `changed_catalog`, change by
        change): building it skips the whole-catalog checks and hash, which at
        1,000,000 items would cost more than the change itself."""
        catalog = object.__new__(cls)
        catalog._set(name, rows, ids, popularity, version)
        catalog.__dict__["_positions"] = positions
        return catalog

    @property
    def embeddings(self) -> RowArray:
        """All rows as one n × d array: the catalog's own array when it was made from
        one, a copy when it is a version made by a change (for checks and small
        catalogs; serving reads `rows`)."""
        return self.rows.array()

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        """Row number by id, built on the first re-ranking: ~60 bytes an item that a
        catalog only scored in full never needs (60 MB at 1,000,000 items)."""
        return {item_id: i for i, item_id in enumerate(self.ids)}

    @property
    def item_count(self) -> int:
        return len(self.rows)

    @property
    def dimension(self) -> int:
        return self.rows.dimension

    def positions_of(self, item_ids: list[str]) -> list[int]:
        """Row numbers of these ids; raises KeyError naming the first unknown id."""
        try:
            return [self._positions[item_id] for item_id in item_ids]
        except KeyError as exc:
            raise KeyError(f"unknown item id {exc.args[0]!r} in catalog {self.name!r}") from None


@dataclass(frozen=True)
class CatalogChanges:
    """A catalog's next version made by upserting and deleting items, with the rows that
    differ from the version it was made from: only their chunks need encoding again."""

    catalog: Catalog
    changed_rows: npt.NDArray[np.int64]
    """Sorted row positions whose contents changed, appeared or went away (positions
    past the new item count are rows that no longer exist)."""
    upserted: int
    deleted: int


def changed_catalog(
    base: Catalog,
    upsert_ids: Sequence[str],
    upsert_rows: npt.ArrayLike,
    delete_ids: Sequence[str] = (),
    popularity: Sequence[float] | None = None,
) -> CatalogChanges:
    """`base` with these items written (an id it holds is replaced in place, a new one is
    appended) and those deleted, checked like a whole catalog but in time proportional
    to the change, not to the catalog.

    A deleted row is filled by the catalog's last row (and the catalog shrinks by one),
    so a delete rewrites two chunks at most, not every chunk after it. The version is
    a hash of the base version and the change, so a client tells it from every other
    version; it is not the hash a file of the same rows would get.
    """
    name = base.name
    rows = np.asarray(upsert_rows, dtype=np.float32)
    if rows.size == 0:
        rows = rows.reshape(0, base.dimension)
    if rows.ndim != 2 or rows.shape[1] != base.dimension:
        raise CatalogError(
            f"catalog {name!r}: upserted embeddings must be k × {base.dimension}, "
            f"got shape {tuple(rows.shape)}"
        )
    if len(upsert_ids) != rows.shape[0]:
        raise CatalogError(
            f"catalog {name!r}: {len(upsert_ids)} ids for {rows.shape[0]} upserted embeddings"
        )
    if not len(upsert_ids) and not len(delete_ids):
        raise CatalogError(f"catalog {name!r}: neither upserts nor deletes: nothing to change")
    _check_ids(name, upsert_ids, "upserted")
    _check_ids(name, delete_ids, "deleted")
    both = set(upsert_ids) & set(delete_ids)
    if both:
        raise CatalogError(
            f"catalog {name!r}: item {min(both)[:40]!r} is both upserted and deleted"
        )
    row = _first_non_finite_row(rows)
    if row is not None:
        raise CatalogError(f"catalog {name!r}: upserted row {row} (0-based) holds NaN or infinity")
    _check_norms(name, rows, "upserted row")
    values: list[float] | None = None
    if base.popularity is None:
        if popularity is not None:
            raise CatalogError(f"catalog {name!r} publishes no popularity; send none")
    else:
        if popularity is None and upsert_ids:
            raise CatalogError(
                f"catalog {name!r} publishes a popularity order: send one value per upserted item"
            )
        popularity = popularity or ()  # a change that only deletes needs none
        if len(popularity) != len(upsert_ids):
            raise CatalogError(
                f"catalog {name!r}: {len(popularity)} popularity values for "
                f"{len(upsert_ids)} upserted items"
            )
        if not all(math.isfinite(float(value)) for value in popularity):
            raise CatalogError(f"catalog {name!r}: popularity holds NaN or infinity")
        values = list(base.popularity)
    old = dict(base._positions)  # the base's own map stays as it is (it still serves)
    unknown = next((item for item in delete_ids if item not in old), None)
    if unknown is not None:
        raise UnknownItemError(f"catalog {name!r} holds no item {unknown[:40]!r}")
    count = base.item_count
    fresh = [i for i, item in enumerate(upsert_ids) if item not in old]
    if count + len(fresh) - len(delete_ids) < 1:
        raise CatalogError(f"catalog {name!r}: the change would delete every item")

    editor = RowEditor(base.rows)  # copies only the blocks it writes
    ids = list(base.ids)
    changed: set[int] = set()
    for i, item in enumerate(upsert_ids):
        at = old.get(item)
        if at is None:
            at = old[item] = len(ids)
            ids.append(item)
            if values is not None:
                values.append(0.0)
        editor.write(at, rows[i])
        if values is not None and popularity is not None:
            values[at] = float(popularity[i])
        changed.add(at)
    for at in sorted((old.pop(item) for item in delete_ids), reverse=True):
        last = len(ids) - 1  # rows past `at` that were deleted are gone already
        changed.add(last)
        if at != last:
            editor.write(at, editor.row(last))
            ids[at] = ids[last]
            old[ids[at]] = at
            if values is not None:
                values[at] = values[last]
            changed.add(at)
        ids.pop()
        if values is not None:
            values.pop()
    editor.truncate(len(ids))
    digest = hashlib.sha256(f"{base.version}\0change\0".encode())
    digest.update("\n".join(upsert_ids).encode() + b"\0" + rows.astype("<f4").tobytes())
    digest.update("\n".join(delete_ids).encode())
    if popularity is not None:
        digest.update(np.asarray(popularity, dtype="<f8").tobytes())
    catalog = Catalog._checked(
        name,
        editor.finish(),
        tuple(ids),
        None if values is None else tuple(values),
        digest.hexdigest()[:16],
        old,
    )
    return CatalogChanges(
        catalog,
        # rows appended and deleted again by the same change existed in neither version
        np.asarray(sorted(r for r in changed if r < max(count, len(ids))), dtype=np.int64),
        len(upsert_ids),
        len(delete_ids),
    )


def _check_each_id(name: str, ids: Sequence[str], whose: Callable[[int], str]) -> None:
    """Each id 1 to MAX_ID_BYTES bytes and without blanks around it, for a whole catalog
    and for a change alike; `whose(i)` names the i-th id's item in an error ("row 3's")."""
    for position, item in enumerate(ids):
        if not item or len(item.encode()) > MAX_ID_BYTES:
            raise CatalogError(
                f"catalog {name!r}: ids must be 1 to {MAX_ID_BYTES} bytes; "
                f"{whose(position)} has {len(item.encode())}"
            )
        if item != item.strip():
            raise CatalogError(f"catalog {name!r}: {whose(position)} id {_BLANKS}")


def _check_ids(name: str, ids: Sequence[str], what: str) -> None:
    """A change's upserted or deleted ids: each well formed, none listed twice."""
    _check_each_id(name, ids, lambda position: f"{what} item {position} (0-based)'s")
    repeated = repeated_rows(ids)
    if repeated is not None:
        raise CatalogError(f"catalog {name!r}: {what} id {ids[repeated[1]][:40]!r} is listed twice")


def _check_norms(name: str, rows: RowArray, what: str) -> None:
    """Row norms within MAX_ROW_NORM, naming the first row above it and how many are."""
    if rows.shape[0] == 0:
        return
    row, largest = _largest_row_norm(rows)
    if largest > MAX_ROW_NORM * (1 + 2**-20):  # float32 may lift a row on the bound
        above = _rows_above(rows, MAX_ROW_NORM * (1 + 2**-20))
        raise CatalogError(
            f"catalog {name!r}: {what} {row} (0-based) has norm {largest:.7g}, above "
            f"{MAX_ROW_NORM}; {above} row(s) are; normalise the embeddings"
        )


def repeated_rows(ids: Sequence[str]) -> tuple[int, int] | None:
    """(first row, repeating row) of the earliest repeated id, or None if all differ.

    Decided on the ids' hashes in numpy (24 bytes an id at the peak) rather than a set of
    the ids (~34 bytes an id: 34 MB at 1,000,000); only ids whose hash another id shares
    are compared as strings, and only a repeat pays for a dict.
    """
    hashes = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
    order = np.argsort(hashes, kind="stable")
    hashes = hashes[order]
    shared = np.flatnonzero(hashes[1:] == hashes[:-1])
    del hashes
    if shared.size == 0:
        return None
    candidates = {int(row) for row in order[shared]} | {int(row) for row in order[shared + 1]}
    if len({ids[row] for row in candidates}) == len(candidates):
        return None  # hash collisions between different ids
    first_row: dict[str, int] = {}
    for row in sorted(candidates):
        if ids[row] in first_row:
            return first_row[ids[row]], row
        first_row[ids[row]] = row
    raise AssertionError("unreachable: a repeated id was found above")


def _first_non_finite_row(rows: RowArray, block: int = 65_536) -> int | None:
    """The first row holding NaN or infinity, a block at a time: an n × d boolean
    temporary would be a quarter of the catalog again (128 MB at 1,000,000 × 128)."""
    for start in range(0, rows.shape[0], block):
        finite = np.isfinite(rows[start : start + block]).all(axis=1)
        if not finite.all():
            return start + int(np.flatnonzero(~finite)[0])
    return None


def _row_norms(rows: RowArray, block: int = 65_536) -> Iterator[tuple[int, FloatArray]]:
    """(first row, ‖row‖ of each) a block of rows at a time, summed in float64 (no n × d
    temporary)."""
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        yield start, np.sqrt(np.einsum("ij,ij->i", part, part, dtype=np.float64))


def _largest_row_norm(rows: RowArray) -> tuple[int, float]:
    """The row with the largest norm (the first such), and that norm."""
    best_row, largest = 0, 0.0
    for start, norms in _row_norms(rows):
        at = int(np.argmax(norms))
        if float(norms[at]) > largest:
            best_row, largest = start + at, float(norms[at])
    return best_row, largest


def _rows_above(rows: RowArray, bound: float) -> int:
    return sum(int((norms > bound).sum()) for _, norms in _row_norms(rows))


def unit_rows(count: int, dimension: int, seed: int) -> FloatArray:
    """Deterministic random unit-norm rows, for the demo catalog and tests."""
    rows = np.random.default_rng(seed).standard_normal((count, dimension))
    result: FloatArray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return result


def demo_catalog(item_count: int = 10_000, dimension: int = 64) -> Catalog:
    """The embedded default catalog: the same deterministic items on every machine."""
    ids = tuple(f"item-{i:05d}" for i in range(item_count))
    return Catalog(DEMO_CATALOG_NAME, unit_rows(item_count, dimension, seed=20261123), ids)


def load_catalog(name: str, path: Path, ids_path: Path | None = None) -> Catalog:
    """Load `.npy` (ids from `ids_path`, one per line, else row numbers), `.npz` or
    `.parquet`.

    An `.npz` holds `embeddings` and `ids` arrays, and optionally `popularity` (one
    number an item, higher first: the non-personalized order ListItems publishes).
    Pickled objects are never loaded. A `.parquet` has `id` and `embedding` columns, and
    optionally `popularity`; `books.parquet#item_id:vector[:score]` names others (see
    heserve.domain.parquet; it needs the `heserve[parquet]` extra).
    """
    # imported here: heserve.domain.parquet builds on this module's CatalogError
    from heserve.domain import parquet

    popularity: tuple[float, ...] | None = None
    parquet_source = parquet.split_columns(path)
    if parquet_source is not None:
        if ids_path is not None:
            raise CatalogError(f"{path}: a .parquet carries its own ids; drop the ids file")
        read = parquet.read_parquet(*parquet_source)
        with _named(path):
            return Catalog(name, read.embeddings, read.ids, read.popularity)
    try:
        if path.suffix == ".npz":
            if ids_path is not None:
                raise CatalogError(f"{path}: an .npz carries its own ids; drop the ids file")
            if not zipfile.is_zipfile(path):
                raise CatalogError(f"{path}: not an .npz file (numpy.savez writes a zip archive)")
            with np.load(path, allow_pickle=False) as archive:
                if "embeddings" not in archive or "ids" not in archive:
                    raise CatalogError(f"{path}: an .npz catalog needs 'embeddings' and 'ids'")
                embeddings = np.asarray(archive["embeddings"], dtype=np.float32)
                ids = tuple(str(item_id) for item_id in _array(archive, "ids", path).tolist())
                if "popularity" in archive:
                    values = np.asarray(_array(archive, "popularity", path), dtype=np.float64)
                    if values.ndim != 1:
                        raise CatalogError(f"{path}: 'popularity' must be one number an item")
                    popularity = tuple(values.tolist())
        elif path.suffix == ".npy":
            embeddings = np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
            if ids_path is None:
                ids = tuple(str(i) for i in range(embeddings.shape[0] if embeddings.ndim else 0))
            else:
                ids = tuple(
                    line.strip() for line in ids_path.read_text().splitlines() if line.strip()
                )
        else:
            raise CatalogError(f"{path}: a catalog is an .npy, .npz or .parquet file")
    except (OSError, ValueError) as exc:
        if isinstance(exc, CatalogError):
            raise
        raise CatalogError(f"{path}: {exc}{_hint(exc)}") from None
    with _named(path):
        return Catalog(name, embeddings, ids, popularity)


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    """A catalog's own error (NaN, a norm, a repeated id) naming the file it came from."""
    try:
        yield
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from None


_OBJECT_ARRAY_HINT = (
    "; an array of Python objects (what pandas' .values gives for strings) needs pickle, "
    "which is never loaded: save the ids as strings, e.g. np.asarray(ids, dtype=str), or "
    "as a text file of one id a line"
)


def _hint(exc: BaseException) -> str:
    """What to do about a numpy loading error an operator cannot act on as it is worded."""
    return _OBJECT_ARRAY_HINT if "allow_pickle" in str(exc) else ""


def _array(archive: Mapping[str, npt.NDArray[Any]], key: str, path: Path) -> npt.NDArray[Any]:
    """`archive[key]`, with the hint for an object array (numpy's message has none)."""
    try:
        return archive[key]
    except ValueError as exc:
        raise CatalogError(f"{path}: {key!r}: {exc}{_hint(exc)}") from None
