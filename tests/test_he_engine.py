"""heserve.he.engine: encrypted scoring under every preset, against plaintext W·u.

Real SEAL throughout: a real key pair encrypts the query and decrypts the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import tenseal.sealapi as seal
from conftest import Keys

from heserve.he.engine import Engine, QueryError
from heserve.he.plan import DiagonalPlan
from heserve.protocol.params import PRESETS
from heserve.protocol.slots import FloatArray, unpack_complex

# Largest absolute score error tolerated per preset for unit-norm rows and query:
# the README's 1e-4 for the default, a few times the measured error for the others.
TOLERANCE = {"precise": 1e-4, "fast": 1e-3, "compact": 4e-3}


@dataclass
class Scoring:
    engine: Engine
    keys: Keys
    tolerance: float

    @property
    def slots(self) -> int:
        return self.engine.params.slot_count


@pytest.fixture(scope="module", params=sorted(PRESETS))
def scoring(request: pytest.FixtureRequest) -> Scoring:
    name: str = request.param
    params = PRESETS[name]
    return Scoring(Engine(params), Keys(params), TOLERANCE[name])


def encrypted_outputs(
    engine: Engine,
    keys: Keys,
    plan: DiagonalPlan,
    rows: FloatArray,
    u: FloatArray,
    galois: seal.GaloisKeys | None = None,
) -> list[tuple[int, seal.Ciphertext]]:
    """Each chunk's row count and complex-slot result ciphertext, 2S rows per chunk."""
    size = plan.items_per_chunk
    chunks = [engine.encode_rows(plan, rows[s : s + size]) for s in range(0, len(rows), size)]
    assert len(chunks) == -(-len(rows) // (2 * plan.slot_count))
    query = keys.encrypt(plan.query_slots(u))
    if galois is None:
        galois = keys.galois_keys(list(plan.rotation_steps))
    outputs = list(engine.score(plan, chunks, query, galois))
    assert len(outputs) == len(chunks)
    top = engine.context.first_context_data()
    level = top.next_context_data() if engine.params.rescales else top
    for output in outputs:
        assert output.parms_id() == level.parms_id()
    return [(chunk.row_count, output) for chunk, output in zip(chunks, outputs, strict=True)]


def encrypted_scores(
    engine: Engine, keys: Keys, plan: DiagonalPlan, rows: FloatArray, u: FloatArray
) -> FloatArray:
    outputs = encrypted_outputs(engine, keys, plan, rows, u)
    parts = [unpack_complex(keys.decrypt_complex(out), count) for count, out in outputs]
    return np.concatenate(parts)


def unit_vector(rng: np.random.Generator, dimension: int) -> FloatArray:
    """A random query of norm 1, as the tolerances assume."""
    u = rng.standard_normal(dimension)
    u /= np.linalg.norm(u)
    return u


def assert_scores_like_plaintext(
    scoring: Scoring, plan: DiagonalPlan, rows: FloatArray, u: FloatArray
) -> None:
    """Encrypted scores of `rows` against `u`, decrypted, equal rows @ u within tolerance."""
    scores = encrypted_scores(scoring.engine, scoring.keys, plan, rows, u)
    np.testing.assert_allclose(scores, rows @ u, rtol=0, atol=scoring.tolerance)


def test_one_row_with_all_zero_padding_diagonals_scores(scoring: Scoring) -> None:
    engine = scoring.engine
    rng = np.random.default_rng(11)
    row = rng.standard_normal((1, 100))
    row /= np.linalg.norm(row)
    u = unit_vector(rng, 100)
    plan = DiagonalPlan.for_catalog(100, 1, scoring.slots)
    assert plan.padded_dimension == 128
    chunk = engine.encode_rows(plan, row)
    # diagonals 100..127 of a single row are its zero padding: not encoded
    assert all(d is None for d in chunk.diagonals[100:])
    if engine.params.catalog_scale_bits >= 40:  # nothing rounds to zero at 2^40
        assert all(d is not None for d in chunk.diagonals[:100])

    assert_scores_like_plaintext(scoring, plan, row, u)


def test_zero_giant_blocks_at_the_top_and_in_the_middle_score(scoring: Scoring) -> None:
    engine = scoring.engine
    rng = np.random.default_rng(12)
    row = rng.standard_normal((1, 64))
    plan = DiagonalPlan.for_catalog(64, 1, scoring.slots)
    b = plan.baby_step
    assert plan.giant_count >= 4
    row[0, b : 3 * b] = 0  # giant blocks 1 and 2
    row[0, 64 - b :] = 0  # the last giant block, where the Horner fold starts
    row /= np.linalg.norm(row)
    u = unit_vector(rng, 64)
    chunk = engine.encode_rows(plan, row)
    assert chunk.diagonals[b] is None and chunk.diagonals[-1] is None

    assert_scores_like_plaintext(scoring, plan, row, u)


def test_tiny_entries_that_encode_to_zero_are_skipped(scoring: Scoring) -> None:
    # A lone value of 1e-9 in a diagonal encodes to the zero polynomial even at 2^40;
    # multiplying by it would make SEAL throw "result ciphertext is transparent".
    engine = scoring.engine
    rng = np.random.default_rng(14)
    rows = rng.standard_normal((2, 32))
    rows[:, 8:16] = 1e-9  # diagonals 8..14 hold only tiny values
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    u = unit_vector(rng, 32)
    plan = DiagonalPlan.for_catalog(32, 2, scoring.slots)
    assert any(d is None for d in engine.encode_rows(plan, rows).diagonals)

    assert_scores_like_plaintext(scoring, plan, rows, u)


def test_several_chunks_score_like_plaintext(scoring: Scoring) -> None:
    # a full chunk of 2S rows, then one with all its real parts and 300 imaginary ones
    rng = np.random.default_rng(13)
    rows = rng.standard_normal((3 * scoring.slots + 300, 24))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    u = unit_vector(rng, 24)
    plan = DiagonalPlan.for_catalog(24, rows.shape[0], scoring.slots)

    assert_scores_like_plaintext(scoring, plan, rows, u)


def test_rows_only_in_the_imaginary_parts_score(scoring: Scoring) -> None:
    # the first S rows are zero: every diagonal is purely imaginary
    slots = scoring.slots
    rng = np.random.default_rng(15)
    rows = np.zeros((slots + 40, 16))
    rows[slots:] = rng.standard_normal((40, 16))
    rows[slots:] /= np.linalg.norm(rows[slots:], axis=1, keepdims=True)
    u = unit_vector(rng, 16)
    plan = DiagonalPlan.for_catalog(16, rows.shape[0], slots)

    assert_scores_like_plaintext(scoring, plan, rows, u)


def test_split_complex_gives_the_two_halves_as_real_slots(scoring: Scoring) -> None:
    engine, keys, slots = scoring.engine, scoring.keys, scoring.slots
    rng = np.random.default_rng(16)
    rows = rng.standard_normal((slots + 300, 24))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    u = unit_vector(rng, 24)
    plan = DiagonalPlan.for_catalog(24, rows.shape[0], slots)
    galois = keys.galois_keys([0, *plan.rotation_steps])  # with the conjugation key
    ((count, output),) = encrypted_outputs(engine, keys, plan, rows, u, galois)
    expected = rows @ u

    real, imaginary = engine.split_complex(output, galois)

    complex_scores = unpack_complex(keys.decrypt_complex(output), count)
    for part in (real, imaginary):
        assert part.parms_id() == output.parms_id()
        assert part.scale == 2 * output.scale
    real_slots, imaginary_slots = keys.decrypt_complex(real), keys.decrypt_complex(imaginary)
    # each half in the real parts, nothing in the imaginary parts
    np.testing.assert_allclose(real_slots.real, expected[:slots], rtol=0, atol=scoring.tolerance)
    np.testing.assert_allclose(
        imaginary_slots.real[:300], expected[slots:], rtol=0, atol=scoring.tolerance
    )
    np.testing.assert_allclose(imaginary_slots.real[300:], 0, rtol=0, atol=scoring.tolerance)
    for part_slots in (real_slots, imaginary_slots):
        np.testing.assert_allclose(part_slots.imag, 0, rtol=0, atol=scoring.tolerance)
    # the split spends no precision: the same scores as the complex result
    split = np.concatenate([real_slots.real, imaginary_slots.real[:300]])
    np.testing.assert_allclose(split, complex_scores, rtol=0, atol=scoring.tolerance / 10)
    with pytest.raises(ValueError):  # SEAL: no conjugation key
        engine.split_complex(output, keys.galois_keys(list(plan.rotation_steps)))


def test_an_all_zero_chunk_is_refused(scoring: Scoring) -> None:
    engine, slots = scoring.engine, scoring.slots
    plan = DiagonalPlan.for_catalog(100, 5, slots)
    with pytest.raises(QueryError):
        engine.encode_rows(plan, np.zeros((5, 100)))
    with pytest.raises(QueryError):
        engine.encode_rows(plan, np.zeros((2 * slots, 100)))  # a full chunk of zero rows
    half = np.zeros((2 * slots, 100))
    half[slots, 0] = 1.0  # one row in the imaginary parts: not all zero
    assert engine.encode_rows(plan, half).row_count == 2 * slots
    rows = np.zeros((2 * slots + 5, 100))
    rows[: 2 * slots, 0] = 1.0  # the first chunk (2S rows) is fine, the second is all zero
    with pytest.raises(QueryError):
        engine.encode_catalog(plan, rows)
