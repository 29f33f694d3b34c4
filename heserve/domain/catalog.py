"""Item catalogs: plaintext embeddings with ids, loaded from files or built in.

A catalog is validated when it is made (finite values, bounded row norms, unique
ids) so that nothing downstream has to wonder; its version is a content hash, so a
client can tell when the ids it cached went stale.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from heserve.protocol.slots import FloatArray, RowArray

# Every preset leaves scores at least 8 bits of headroom (|score| < 128); with a
# user vector of norm <= 1, rows of norm <= 64 keep a factor of two in reserve.
MAX_ROW_NORM = 64.0
MAX_ID_BYTES = 256
DEMO_CATALOG_NAME = "demo"


class CatalogError(ValueError):
    """A catalog file or array that cannot be served."""


@dataclass(frozen=True)
class Catalog:
    """n items × d dimensions of plaintext embeddings, with one id per item."""

    name: str
    embeddings: RowArray
    ids: tuple[str, ...]
    version: str = field(init=False)

    def __post_init__(self) -> None:
        # Held as float32, what embedding models produce: half the memory of float64,
        # and its rounding (~6e-8 relative) is far below every preset's error.
        emb = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise CatalogError(
                f"catalog {self.name!r}: embeddings must be a non-empty n × d matrix"
            )
        if not np.isfinite(emb).all():
            raise CatalogError(f"catalog {self.name!r}: embeddings contain NaN or infinity")
        largest = _largest_row_norm(emb)
        if largest > MAX_ROW_NORM * (1 + 2**-20):  # float32 may lift a row on the bound
            raise CatalogError(
                f"catalog {self.name!r}: a row has norm {largest:.4g}, above {MAX_ROW_NORM}; "
                "normalise the embeddings"
            )
        if len(self.ids) != emb.shape[0]:
            raise CatalogError(
                f"catalog {self.name!r}: {len(self.ids)} ids for {emb.shape[0]} embeddings"
            )
        if len(set(self.ids)) != len(self.ids):
            raise CatalogError(f"catalog {self.name!r}: item ids are not unique")
        if any(not item_id or len(item_id.encode()) > MAX_ID_BYTES for item_id in self.ids):
            raise CatalogError(f"catalog {self.name!r}: ids must be 1 to {MAX_ID_BYTES} bytes")
        digest = hashlib.sha256(emb.astype("<f4", copy=False).data)
        digest.update("\n".join(self.ids).encode())
        object.__setattr__(self, "embeddings", emb)
        object.__setattr__(self, "version", digest.hexdigest()[:16])

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        """Row number by id, built on the first re-ranking: ~60 bytes an item that a
        catalog only scored in full never needs (60 MB at 1,000,000 items)."""
        return {item_id: i for i, item_id in enumerate(self.ids)}

    @property
    def item_count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dimension(self) -> int:
        return int(self.embeddings.shape[1])

    def positions_of(self, item_ids: list[str]) -> list[int]:
        """Row numbers of these ids; raises KeyError naming the first unknown id."""
        try:
            return [self._positions[item_id] for item_id in item_ids]
        except KeyError as exc:
            raise KeyError(f"unknown item id {exc.args[0]!r} in catalog {self.name!r}") from None


def _largest_row_norm(rows: RowArray, block: int = 65_536) -> float:
    """max ‖row‖, summed in float64 a block of rows at a time (no n × d temporary)."""
    largest = 0.0
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        squares = np.einsum("ij,ij->i", part, part, dtype=np.float64)
        largest = max(largest, float(np.sqrt(squares.max())))
    return largest


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
    """Load `.npy` (ids from `ids_path`, one per line, else row numbers) or `.npz`.

    An `.npz` holds `embeddings` and `ids` arrays. Pickled objects are never loaded.
    """
    try:
        if path.suffix == ".npz":
            if ids_path is not None:
                raise CatalogError(f"{path}: an .npz carries its own ids; drop the ids file")
            with np.load(path, allow_pickle=False) as archive:
                if "embeddings" not in archive or "ids" not in archive:
                    raise CatalogError(f"{path}: an .npz catalog needs 'embeddings' and 'ids'")
                embeddings = np.asarray(archive["embeddings"], dtype=np.float32)
                ids = tuple(str(item_id) for item_id in archive["ids"].tolist())
        elif path.suffix == ".npy":
            embeddings = np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
            if ids_path is None:
                ids = tuple(str(i) for i in range(embeddings.shape[0] if embeddings.ndim else 0))
            else:
                ids = tuple(
                    line.strip() for line in ids_path.read_text().splitlines() if line.strip()
                )
        else:
            raise CatalogError(f"{path}: a catalog is an .npy or .npz file")
    except (OSError, ValueError) as exc:
        if isinstance(exc, CatalogError):
            raise
        raise CatalogError(f"{path}: {exc}") from None
    return Catalog(name, embeddings, ids)
