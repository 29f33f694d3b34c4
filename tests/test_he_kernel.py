"""The native multiply-accumulate kernel (heserve/he/_mac.c) against SEAL's own loop.

The kernel must give the same ciphertexts as SEAL's multiply_plain + add_inplace,
bit for bit: for every preset, with all-zero diagonals and empty giant steps, one
query or several, through its portable path and its AVX-512 IFMA path where the
CPU has one. Then the giant steps (SEAL's rescale and rotations) must give the
same bits too, so nothing the client decrypts can differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal
from conftest import Keys

from heserve.he import _mac
from heserve.he.engine import EncodedChunk, Engine, ResidueChunk, native_kernel_available
from heserve.he.plan import DiagonalPlan
from heserve.protocol.limbs import ciphertext_limbs
from heserve.protocol.params import PRESETS, CkksParameters
from heserve.protocol.slots import FloatArray

IMPLS = [1, 2] if _mac.has_ifma() else [1]  # 1: portable, 2: AVX-512 IFMA


class Pair:
    """The same parameters under the kernel and under SEAL's loop, and a key pair."""

    def __init__(self, params: CkksParameters) -> None:
        self.native = Engine(params, native=True)
        self.seal = Engine(params, native=False)
        self.keys = Keys(params)
        self.params = params


@pytest.fixture(scope="module", params=sorted(PRESETS))
def pair(request: pytest.FixtureRequest) -> Pair:
    return Pair(PRESETS[request.param])


def test_the_kernel_is_built_and_sees_seals_memory() -> None:
    assert native_kernel_available()
    assert Engine(PRESETS["precise"]).native


def _rows(params: CkksParameters, count: int, dimension: int, seed: int) -> FloatArray:
    rows = np.random.default_rng(seed).uniform(-1, 1, (count, dimension))
    rows[:, dimension // 2 : dimension // 2 + 9] = 0.0  # whole diagonals of zeros
    return rows


def _limbs(ciphertext: seal.Ciphertext) -> bytes:
    return ciphertext_limbs(ciphertext).tobytes()


@pytest.mark.parametrize("few_rows", [True, False], ids=["5-rows", "full-chunk"])
@pytest.mark.parametrize(("dimension", "baby_step"), [(100, 128), (100, 16), (64, 8)])
def test_inner_sums_and_scores_equal_seals_bit_for_bit(
    pair: Pair, dimension: int, baby_step: int, few_rows: bool
) -> None:
    """Five rows leave whole diagonals (and with b = 16, whole giant steps) at zero."""
    slots = pair.params.slot_count
    plan = DiagonalPlan(dimension, slots, min(baby_step, 1 << (dimension - 1).bit_length()))
    count = 5 if few_rows else 2 * slots - 37
    rows = _rows(pair.params, count, dimension, seed=dimension + baby_step)
    reference = pair.seal.encode_rows(plan, rows)
    encoded = pair.native.encode_rows(plan, rows)
    assert isinstance(reference, EncodedChunk) and isinstance(encoded, ResidueChunk)
    assert [d is None for d in encoded.diagonals] == [d is None for d in reference.diagonals]
    assert any(d is None for d in encoded.diagonals) == few_rows

    keys = pair.keys.galois_keys(list(plan.rotation_steps))
    u = np.random.default_rng(3).uniform(-1, 1, dimension)
    query = pair.keys.encrypt(plan.query_slots(u / np.linalg.norm(u)))
    babies = pair.seal.baby_rotations(plan, query, keys)
    expected = pair.seal.inner_sums(plan, reference, babies)
    got = pair.native.inner_sums(plan, encoded, babies)
    assert [s is None for s in got] == [s is None for s in expected]
    for mine, theirs in zip(got, expected, strict=True):
        if theirs is not None:
            assert mine is not None and mine.scale == theirs.scale
            assert mine.parms_id() == theirs.parms_id() and mine.is_ntt_form()
            assert _limbs(mine) == _limbs(theirs)

    scores = pair.native.giant_steps(plan, got, keys)
    reference_scores = pair.seal.giant_steps(plan, expected, keys)
    assert scores.scale == reference_scores.scale
    assert _limbs(scores) == _limbs(reference_scores)


def test_several_queries_in_one_pass_equal_one_pass_each(pair: Pair) -> None:
    slots = pair.params.slot_count
    plan = DiagonalPlan(48, slots, 8)
    rows = _rows(pair.params, 2 * slots, 48, seed=11)
    chunks = [pair.native.encode_rows(plan, rows), pair.native.encode_rows(plan, rows[:100])]
    keys = pair.keys.galois_keys(list(plan.rotation_steps))
    rng = np.random.default_rng(12)
    queries = [pair.keys.encrypt(plan.query_slots(rng.uniform(-0.1, 0.1, 48))) for _ in range(3)]
    together = list(pair.native.score_many(plan, chunks, queries, keys))
    assert len(together) == len(chunks) and all(len(row) == 3 for row in together)
    for q, query in enumerate(queries):
        alone = list(
            pair.seal.score(
                plan,
                [pair.seal.encode_rows(plan, rows), pair.seal.encode_rows(plan, rows[:100])],
                query,
                keys,
            )
        )
        for c, scores in enumerate(alone):
            assert _limbs(together[c][q]) == _limbs(scores)


@pytest.mark.parametrize("impl", IMPLS)
def test_each_path_of_the_kernel_reduces_exactly(impl: int) -> None:
    """Random residues at the edges (0 and q - 1) against Python's big integers."""
    rng = np.random.default_rng(impl)
    moduli = [(1 << 60) - 93, (1 << 40) - 87]  # odd, one above IFMA's 52 bits, one below
    n, b, giants = 64, 4, 3
    diagonals = np.stack(
        [np.stack([rng.integers(0, m, n, dtype=np.uint64) for m in moduli]) for _ in range(10)]
    )
    diagonals[0, :, :] = np.array([[m - 1] for m in moduli], dtype=np.uint64)
    index = np.array([[0, 1, -1, 2, -1, -1, -1, -1, 3, 4, 5, 0]], dtype=np.int64)
    babies = [
        np.stack([np.stack([rng.integers(0, m, n, dtype=np.uint64) for m in moduli])] * 2)
        for _ in range(2 * b)  # two queries
    ]
    babies[0][:] = np.array([[m - 1] for m in moduli], dtype=np.uint64)[None]
    out = [np.full((2, len(moduli), n), 7, dtype=np.uint64) for _ in range(2 * giants)]
    _mac.inner_sums(diagonals, index, babies, out, moduli, b, impl)
    for q in range(2):
        for g in range(giants):
            for p in range(2):
                for limb, modulus in enumerate(moduli):
                    want = [0] * n
                    for k in range(b):
                        row = int(index[0, g * b + k])
                        if row >= 0:
                            d = diagonals[row, limb].astype(object)
                            x = babies[q * b + k][p, limb].astype(object)
                            want = [
                                (w + int(a) * int(y)) for w, a, y in zip(want, d, x, strict=True)
                            ]
                    got = out[q * giants + g][p, limb]
                    assert [int(v) for v in got] == [w % modulus for w in want]


def test_reduce128_matches_python_at_the_edges() -> None:
    for modulus in [(1 << 60) - 93, (1 << 40) - 87, 3, (1 << 61) - 1]:
        for value in [0, 1, modulus - 1, modulus, (1 << 64) - 1, (1 << 127), (1 << 128) - 1]:
            assert _mac.reduce128(value, modulus) == value % modulus


def test_bad_inputs_are_refused_before_any_work() -> None:
    diagonals = np.zeros((2, 1, 8), dtype=np.uint64)
    baby = np.zeros((2, 1, 8), dtype=np.uint64)
    out = [np.zeros((2, 1, 8), dtype=np.uint64)]
    with pytest.raises(IndexError):
        _mac.inner_sums(diagonals, np.array([[0, 2]], dtype=np.int64), [baby, baby], out, [97], 2)
    with pytest.raises(ValueError, match="shape"):
        _mac.inner_sums(diagonals, np.array([[0, 1]]), [baby, baby[:, :, :4].copy()], out, [97], 2)
    with pytest.raises(ValueError, match="out arrays"):
        _mac.inner_sums(diagonals, np.array([[0, 1]]), [baby, baby], out * 2, [97], 2)
    with pytest.raises(ValueError, match="odd"):
        _mac.inner_sums(diagonals, np.array([[0, 1]]), [baby, baby], out, [96], 2)
    with pytest.raises(TypeError):
        _mac.inner_sums(
            diagonals.astype(np.float64), np.array([[0, 1]]), [baby, baby], out, [97], 2
        )
