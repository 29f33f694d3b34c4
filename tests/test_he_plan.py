"""heserve.he.plan: the BSGS diagonal plan, checked in numpy against W·u.

The engine's schedule (single-step babies, Horner-folded giants) is simulated on
plain complex slots, so the layout and the rotation count are tested without SEAL.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rot

from heserve.he.plan import DiagonalPlan
from heserve.protocol.slots import ComplexArray, FloatArray, unpack_complex


def simulate_bsgs(plan: DiagonalPlan, rows: FloatArray, u: FloatArray) -> ComplexArray:
    """slots = Σ_g rot(Σ_k D'[g*b+k] * rot(q, k), g*b), as ENGINE.md writes it.

    Complex: up to 2S scores, read with `unpack_complex`.
    """
    q = plan.query_slots(u)
    diagonals = plan.diagonals(rows)
    b = plan.baby_step
    slots = np.zeros(plan.slot_count, dtype=np.complex128)
    for g in range(plan.giant_count):
        inner = sum(
            (diagonals[g * b + k] * rot(q, k) for k in range(b)),
            np.zeros(len(q), dtype=np.complex128),
        )
        slots += rot(inner, g * b)
    return slots


def simulate_engine(
    plan: DiagonalPlan, chunks: list[FloatArray], u: FloatArray
) -> tuple[list[ComplexArray], list[int]]:
    """The engine's schedule: single-step babies, Horner-folded giants. Logs each rotation."""
    used: list[int] = []
    q = plan.query_slots(u)
    babies = [q]
    for _ in range(1, plan.baby_step):
        used.append(1)
        babies.append(rot(babies[-1], 1))
    b = plan.baby_step
    outputs = []
    for rows in chunks:
        diagonals = plan.diagonals(rows)
        result: ComplexArray | None = None
        for g in reversed(range(plan.giant_count)):
            inner = sum(
                (diagonals[g * b + k] * babies[k] for k in range(b)),
                np.zeros(len(q), dtype=np.complex128),
            )
            if result is None:
                result = inner
                continue
            used.append(b)
            result = rot(result, b) + inner
        assert result is not None
        outputs.append(result)
    return outputs, used


SHAPES = [
    # (items, dimension, slots); a chunk holds 2S items, S in the real parts
    (10, 5, 16),  # real parts only
    (37, 3, 16),  # n not a multiple of 2S: the last chunk has 5 rows
    (16, 16, 16),  # d' = S, exactly the real parts
    (17, 16, 16),  # one row in the imaginary parts
    (32, 4, 16),  # exactly one full chunk
    (33, 4, 16),  # one full chunk and one row
    (96, 8, 16),  # three full chunks
    (1, 1, 16),
    (130, 24, 64),
    (70, 33, 64),  # d' = S = 64
    (200, 100, 128),
    (300, 7, 256),
    (5000, 100, 4096),
]


@pytest.mark.parametrize(("items", "dimension", "slots"), SHAPES)
def test_bsgs_sum_over_the_diagonals_equals_w_times_u(
    items: int, dimension: int, slots: int
) -> None:
    rng = np.random.default_rng(items * 1000 + dimension)
    w = rng.standard_normal((items, dimension))
    u = rng.standard_normal(dimension)
    plan = DiagonalPlan.for_catalog(dimension, items, slots)
    assert plan.items_per_chunk == 2 * slots
    got = []
    for start in range(0, items, plan.items_per_chunk):
        rows = w[start : start + plan.items_per_chunk]
        got.append(unpack_complex(simulate_bsgs(plan, rows, u), rows.shape[0]))
    assert len(got) == -(-items // (2 * slots))
    np.testing.assert_allclose(np.concatenate(got), w @ u, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("items", "dimension", "slots"), SHAPES)
def test_every_baby_step_scores_correctly_with_two_rotation_keys(
    items: int, dimension: int, slots: int
) -> None:
    rng = np.random.default_rng(dimension)
    w = rng.standard_normal((items, dimension))
    u = rng.standard_normal(dimension)
    chunks = [w[s : s + 2 * slots] for s in range(0, items, 2 * slots)]
    padded = DiagonalPlan.for_catalog(dimension, items, slots).padded_dimension
    for exponent in range(padded.bit_length()):
        plan = DiagonalPlan(dimension=dimension, slot_count=slots, baby_step=1 << exponent)

        outputs, used = simulate_engine(plan, chunks, u)

        scores = np.concatenate(
            [unpack_complex(o, r.shape[0]) for o, r in zip(outputs, chunks, strict=True)]
        )
        np.testing.assert_allclose(scores, w @ u, rtol=0, atol=1e-9)
        assert set(used) == set(plan.rotation_steps)
        assert len(used) == plan.rotations_per_query(len(chunks))


@pytest.mark.parametrize("count", [3, 16, 19, 32])
def test_slots_past_the_last_row_are_zero_in_every_diagonal(count: int) -> None:
    plan = DiagonalPlan(dimension=5, slot_count=16, baby_step=2)
    rows = np.random.default_rng(count).standard_normal((count, 5))
    diagonals = plan.diagonals(rows)
    assert diagonals.shape == (8, 16)
    # un-rotate each giant block and check
    # D[j][i] = W[i, (i+j) mod d'] + 1j * (-1)^i * W[S+i, (i+j) mod d'] (0 past d and n)
    padded = np.zeros((32, 8))
    padded[:count, :5] = rows
    for j in range(8):
        unrotated = rot(diagonals[j], (j // 2) * 2)
        real = [padded[i, (i + j) % 8] for i in range(16)]
        imaginary = [(-1) ** i * padded[16 + i, (i + j) % 8] for i in range(16)]
        np.testing.assert_array_equal(unrotated.real, real)
        np.testing.assert_array_equal(unrotated.imag, imaginary)
    if count <= 16:
        assert not diagonals.imag.any()  # S rows or fewer: the imaginary parts stay zero


def test_plan_refuses_impossible_layouts() -> None:
    with pytest.raises(ValueError):
        DiagonalPlan(dimension=17, slot_count=16, baby_step=1)
    with pytest.raises(ValueError):
        DiagonalPlan(dimension=0, slot_count=16, baby_step=1)
    with pytest.raises(ValueError):
        DiagonalPlan(dimension=8, slot_count=16, baby_step=16)
    with pytest.raises(ValueError):
        DiagonalPlan(dimension=8, slot_count=16, baby_step=3)
    plan = DiagonalPlan(dimension=8, slot_count=16, baby_step=2)
    assert plan.diagonals(np.ones((32, 8))).shape == (8, 16)  # 2S rows fit
    with pytest.raises(ValueError):
        plan.diagonals(np.ones((33, 8)))
    with pytest.raises(ValueError):
        plan.diagonals(np.ones((4, 7)))


@pytest.mark.parametrize("dimension", [1, 2, 3, 5, 8, 24, 64, 100, 128, 512, 4096])
@pytest.mark.parametrize("items", [1, 4096, 4097, 8192, 8193, 10_000, 100_000, 1_000_000])
def test_for_catalog_picks_the_cheapest_baby_step(dimension: int, items: int) -> None:
    slots = 4096
    chunks = -(-items // (2 * slots))  # a chunk holds 2S items
    padded = 1 << (dimension - 1).bit_length()
    costs = {}
    for exponent in range(padded.bit_length()):
        b = 1 << exponent
        # b - 1 baby rotations, shared; d'/b - 1 giant rotations per chunk
        costs[b] = (b - 1) + chunks * (padded // b - 1)
        assert DiagonalPlan(dimension, slots, b).rotations_per_query(chunks) == costs[b]
    cheapest = min(costs.values())
    plan = DiagonalPlan.for_catalog(dimension, items, slots)
    assert plan.padded_dimension == padded
    assert plan.rotations_per_query(chunks) == cheapest
    assert plan.baby_step == max(b for b, cost in costs.items() if cost == cheapest)


@pytest.mark.parametrize(
    ("dimension", "baby_step", "steps"),
    [
        (100, 16, (1, 16)),
        (64, 8, (1, 8)),
        (8, 1, (1,)),  # b = 1: the giant step is 1
        (8, 8, (1,)),  # b = d': babies only
        (5, 8, (1,)),
        (1, 1, ()),  # d' = 1: nothing to rotate
        (2, 2, (1,)),
    ],
)
def test_rotation_steps(dimension: int, baby_step: int, steps: tuple[int, ...]) -> None:
    assert DiagonalPlan(dimension, 4096, baby_step).rotation_steps == steps


def test_for_catalog_steps_for_the_default_shapes() -> None:
    # one chunk of a 100-dim catalog: b = 8 and 16 tie at 22 rotations; the larger wins
    plan = DiagonalPlan.for_catalog(100, 10, 4096)
    assert (plan.baby_step, plan.rotation_steps, plan.rotations_per_query(1)) == (16, (1, 16), 22)
