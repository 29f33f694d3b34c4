"""A reload that fails changes nothing (issue 11): a missing or corrupt file, NaN rows,
repeated ids, another dimension, a Parquet file with a bad row; each is reported (the
change's outcome and error, the failed count the metrics export) while the served
version keeps serving. And a Parquet file reloads like an .npz."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heserve.domain.catalog import Catalog, load_catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import unpack_complex
from heserve_client import SecretContext

ITEMS, DIMENSION = 300, 8
IDS = [f"s{i}" for i in range(ITEMS)]


def _npz(path: Path, rows: np.ndarray, ids: list[str]) -> Path:
    np.savez(path, embeddings=rows, ids=np.asarray(ids))
    return path


def _parquet(path: Path, rows: np.ndarray, ids: list[str]) -> Path:
    flat = pa.array(rows.astype(np.float32).ravel())
    embedding = pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])
    pq.write_table(pa.table({"id": ids, "embedding": embedding}), path)
    return path


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"PK\x03\x04 not a zip archive")
    return path


def _with_nan(rows: np.ndarray) -> np.ndarray:
    broken = rows.copy()
    broken[123, 4] = np.nan
    return broken


BROKEN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing file": (lambda folder: folder / "gone.npz", "gone.npz"),
    "corrupt file": (lambda folder: _corrupt(folder / "shop.npz"), "shop.npz"),
    "NaN row": (
        lambda folder: _npz(folder / "shop.npz", _with_nan(unit_rows(ITEMS, DIMENSION, 2)), IDS),
        "row 123",
    ),
    "repeated ids": (
        lambda folder: _npz(folder / "shop.npz", unit_rows(ITEMS, DIMENSION, 2), [*IDS[:-1], "s7"]),
        "'s7' repeats",
    ),
    "another dimension": (
        lambda folder: _npz(folder / "shop.npz", unit_rows(ITEMS, DIMENSION * 2, 2), IDS),
        "dimension changed from 8 to 16",
    ),
    "parquet with a NaN row": (
        lambda folder: _parquet(
            folder / "shop.parquet", _with_nan(unit_rows(ITEMS, DIMENSION, 2)), IDS
        ),
        "row 123",
    ),
}


@pytest.fixture
def scorer() -> Scorer:
    return Scorer(DEFAULT_PARAMETERS, [Catalog("shop", unit_rows(ITEMS, DIMENSION, 1), IDS)])


def _scores(scorer: Scorer, secret: SecretContext, vector: np.ndarray) -> np.ndarray:
    key_id = scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))
    query = secret.encrypt(scorer.catalog("shop").plan.query_slots(vector))
    runs = scorer.score(key_id, "shop", query, [], complex_scores=True)
    return np.concatenate(
        [unpack_complex(secret.decrypt_complex(run.scores, 1 << 26), run.count) for run in runs]
    )


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_source_is_reported_and_the_served_version_stays(
    case: str, scorer: Scorer, secret: SecretContext, tmp_path: Path
) -> None:
    write, named = BROKEN[case]
    served = scorer.catalog("shop")
    path = write(tmp_path)
    change = scorer.reload("shop", lambda: load_catalog("shop", path))
    assert change.outcome == "failed" and named in change.error
    assert "\n" not in change.error
    assert change.version == change.previous_version == served.catalog.version
    assert scorer.catalog("shop") is served and scorer.reloads == 0
    assert scorer.change_counts[("shop", "reload", "failed")] == 1
    vector = unit_rows(1, DIMENSION, 9)[0]
    np.testing.assert_allclose(
        _scores(scorer, secret, vector), served.catalog.embeddings @ vector, rtol=0, atol=1e-4
    )


def test_a_parquet_file_reloads_like_an_npz(
    scorer: Scorer, secret: SecretContext, tmp_path: Path
) -> None:
    rows = unit_rows(ITEMS + 5, DIMENSION, 3)
    ids = [*IDS, *(f"new-{i}" for i in range(5))]
    path = _parquet(tmp_path / "shop.parquet", rows, ids)
    change = scorer.reload("shop", lambda: load_catalog("shop", path))
    assert change.outcome == "replaced" and change.item_count == ITEMS + 5
    assert scorer.catalog("shop").catalog.ids == tuple(ids)
    vector = unit_rows(1, DIMENSION, 9)[0]
    np.testing.assert_allclose(
        _scores(scorer, secret, vector), rows.astype(np.float32) @ vector, rtol=0, atol=1e-4
    )
    again = scorer.reload("shop", lambda: load_catalog("shop", path))
    assert again.outcome == "unchanged" and again.version == change.version
