"""Unit tests of the server's building blocks: parameters, packing, SEAL byte I/O, engine.

Everything runs real SEAL (through tenseal.sealapi): real contexts, keys and
ciphertexts, no mocks.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pytest
import tenseal.sealapi as seal
import zstandard

from heserve.he.engine import Engine, QueryError
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import (
    DEFAULT_PARAMETERS,
    PRESETS,
    CkksParameters,
    InsecureParametersError,
)
from heserve.protocol.slots import (
    ComplexArray,
    FloatArray,
    imaginary_signs,
    query_slots,
    unpack_complex,
)

HEADER = struct.Struct(
    "<HBBBBHQ"
)  # SEAL 4.x: magic, header size, major, minor, mode, reserved, size
MAGIC = 0xA15E
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
SLOTS = DEFAULT_PARAMETERS.slot_count
N = DEFAULT_PARAMETERS.poly_modulus_degree


Slots = TypeVar("Slots", FloatArray, ComplexArray)


def rot(vector: Slots, steps: int) -> Slots:
    """CKKS rotate_vector by `steps` (positive = left), in numpy."""
    result: Slots = np.roll(vector, -steps)
    return result


# --------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("degree", "bits", "scale_bits"),
    [
        (8192, (60, 60, 60, 40), 40),  # 220 > 218 bits
        (8192, (60, 40, 40, 40, 40), 40),  # 220 > 218 bits
        (4096, (40, 30, 40), 30),  # 110 > 109 bits
        (2048, (20, 20, 20), 20),  # 60 > 54 bits
        (3000, (40, 30, 40), 30),  # not a SEAL ring degree
        (65536, (60, 40, 60), 40),  # outside the table
        (8192, (60,), 40),  # no special prime
        (8192, (61, 40, 60), 40),  # prime too large
        (8192, (60, 19, 60), 40),  # prime too small
        (8192, (40, 40, 40), 40),  # scale_bits == first prime
        (8192, (40, 40, 40), 41),  # scale_bits > first prime
        (8192, (60, 60), 40),  # one data prime: 2^80 products do not fit 60 bits
        (8192, (60, 40, 60), 9),  # scale too small
    ],
)
def test_insecure_or_invalid_parameters_are_refused(
    degree: int, bits: tuple[int, ...], scale_bits: int
) -> None:
    with pytest.raises(InsecureParametersError):
        CkksParameters(poly_modulus_degree=degree, coeff_modulus_bits=bits, scale_bits=scale_bits)


def test_score_headroom_is_enforced() -> None:
    # one 60-bit data prime, no rescale: scores at 2^(32+19) keep 8 bits, at 2^(33+19) 7
    fits = CkksParameters(8192, (60, 60), scale_bits=32, catalog_scale_bits=19)
    assert fits.score_headroom_bits == 8
    with pytest.raises(InsecureParametersError):
        CkksParameters(8192, (60, 60), scale_bits=33, catalog_scale_bits=19)


@pytest.mark.parametrize(
    ("degree", "bits"),
    [(8192, (60, 40, 40, 38, 40)), (4096, (40, 29, 40)), (16384, (60, 60, 60, 60, 60, 60, 60))],
)
def test_parameters_at_the_security_bound_build_a_seal_context(
    degree: int, bits: tuple[int, ...]
) -> None:
    # SEAL checks the 128-bit bound itself: if our table were too lax, SEAL would refuse.
    params = CkksParameters(poly_modulus_degree=degree, coeff_modulus_bits=bits, scale_bits=25)
    context = params.seal_context()
    assert context.parameters_set()
    assert context.key_context_data().total_coeff_modulus_bit_count() == sum(bits)
    assert sum(bits) <= seal.CoeffModulus.MaxBitCount(degree, seal.SEC_LEVEL_TYPE.TC128)


def test_security_table_matches_seal() -> None:
    from heserve.protocol.params import MAX_COEFF_BITS_128

    for degree, limit in MAX_COEFF_BITS_128.items():
        assert limit == seal.CoeffModulus.MaxBitCount(degree, seal.SEC_LEVEL_TYPE.TC128)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_seal_context(name: str) -> None:
    params = PRESETS[name]
    context = params.seal_context()
    assert context.parameters_set()
    bits = context.key_context_data().total_coeff_modulus_bit_count()
    assert bits == sum(params.coeff_modulus_bits)
    assert bits <= seal.CoeffModulus.MaxBitCount(
        params.poly_modulus_degree, seal.SEC_LEVEL_TYPE.TC128
    )


def test_default_parameters_build_the_documented_context() -> None:
    params = DEFAULT_PARAMETERS
    context = params.seal_context()
    assert context.parameters_set()
    parms = context.first_context_data().parms()
    assert parms.scheme() == seal.SCHEME_TYPE.CKKS
    assert parms.poly_modulus_degree() == 8192
    assert len(parms.coeff_modulus()) == 2  # two data primes at the query's level
    assert context.key_context_data().total_coeff_modulus_bit_count() == 160
    assert params.slot_count == seal.CKKSEncoder(context).slot_count() == 4096
    assert params.scale == 2.0**40


# --------------------------------------------------------------------------- packing


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


def test_imaginary_signs_and_unpack_complex() -> None:
    np.testing.assert_array_equal(imaginary_signs(6), [1, -1, 1, -1, 1, -1])
    slots = np.array([1 + 5j, 2 + 6j, 3 + 7j, 4 + 8j])
    np.testing.assert_array_equal(unpack_complex(slots, 8), [1, 2, 3, 4, 5, -6, 7, -8])
    np.testing.assert_array_equal(unpack_complex(slots, 6), [1, 2, 3, 4, 5, -6])
    np.testing.assert_array_equal(unpack_complex(slots, 3), [1, 2, 3])
    assert unpack_complex(slots, 0).shape == (0,)
    for count in (-1, 9):
        with pytest.raises(ValueError):
            unpack_complex(slots, count)


def test_query_layout_repeats_the_zero_padded_vector() -> None:
    u = np.arange(1.0, 6.0)
    slots = query_slots(u, 5, 32)
    np.testing.assert_array_equal(slots, np.tile([1, 2, 3, 4, 5, 0, 0, 0], 4))
    with pytest.raises(ValueError):
        query_slots(u, 6, 32)
    with pytest.raises(ValueError):
        query_slots(np.ones(16), 16, 24)  # d' = 16 does not divide 24 slots


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


# --------------------------------------------------------------------------- seal_io


class Keys:
    """A real key pair under the default parameters, and helpers to use it."""

    def __init__(self, params: CkksParameters = DEFAULT_PARAMETERS) -> None:
        self.params = params
        self.context = params.seal_context()
        self.generator = seal.KeyGenerator(self.context)
        self.secret_key = self.generator.secret_key()
        self.encoder = seal.CKKSEncoder(self.context)
        self.encryptor = seal.Encryptor(self.context, self.secret_key)
        self.decryptor = seal.Decryptor(self.context, self.secret_key)

    def encrypt(self, values: FloatArray) -> seal.Ciphertext:
        plaintext = seal.Plaintext()
        self.encoder.encode(values.tolist(), self.params.scale, plaintext)
        ciphertext = seal.Ciphertext()
        self.encryptor.encrypt_symmetric(plaintext, ciphertext)
        return ciphertext

    def decrypt(self, ciphertext: seal.Ciphertext) -> FloatArray:
        plaintext = seal.Plaintext()
        self.decryptor.decrypt(ciphertext, plaintext)
        return np.asarray(self.encoder.decode_double(plaintext), dtype=np.float64)

    def decrypt_complex(self, ciphertext: seal.Ciphertext) -> ComplexArray:
        plaintext = seal.Plaintext()
        self.decryptor.decrypt(ciphertext, plaintext)
        return np.asarray(self.encoder.decode_complex(plaintext), dtype=np.complex128)

    def galois_keys(self, steps: list[int]) -> seal.GaloisKeys:
        keys = seal.GaloisKeys()
        elements = [wire.galois_element(s, self.params.poly_modulus_degree) for s in steps]
        self.generator.create_galois_keys(elements, keys)
        return keys


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def values() -> FloatArray:
    return np.random.default_rng(5).uniform(-1, 1, SLOTS)


@pytest.fixture(scope="module")
def ciphertext_blob(keys: Keys, values: FloatArray) -> bytes:
    return wire.to_bytes(keys.encrypt(values))


def header(blob: bytes) -> tuple[int, ...]:
    return tuple(HEADER.unpack_from(blob))


def rehead(body: bytes, mode: int, minor: int, **fields: int) -> bytes:
    """A SEAL header for `body` (compression `mode`), with fields overridable."""
    values = {
        "magic": MAGIC,
        "header_size": HEADER.size,
        "major": 4,
        "minor": minor,
        "mode": mode,
        "reserved": 0,
        "size": HEADER.size + len(body),
    }
    values.update(fields)
    return HEADER.pack(*values.values()) + body


@pytest.fixture(scope="module")
def uncompressed_blob(ciphertext_blob: bytes) -> bytes:
    magic, size_field, major, minor, mode, reserved, total = header(ciphertext_blob)
    assert (magic, size_field, major, reserved, total) == (MAGIC, 16, 4, 0, len(ciphertext_blob))
    assert mode == COMPR_ZSTD  # SEAL's default; the variants below are built from it
    body = zstandard.ZstdDecompressor().decompress(
        ciphertext_blob[HEADER.size :], max_output_size=64 << 20
    )
    return rehead(body, COMPR_NONE, minor)


def variant(uncompressed: bytes, mode: int) -> bytes:
    minor = header(uncompressed)[3]
    body = uncompressed[HEADER.size :]
    if mode == COMPR_ZLIB:
        return rehead(zlib.compress(body, 6), COMPR_ZLIB, minor)
    if mode == COMPR_ZSTD:
        return rehead(zstandard.ZstdCompressor(level=3).compress(body), COMPR_ZSTD, minor)
    return uncompressed


def test_ciphertext_round_trips_through_bytes(
    keys: Keys, values: FloatArray, ciphertext_blob: bytes
) -> None:
    loaded = wire.load_ciphertext(keys.context, ciphertext_blob, 1 << 24)
    assert loaded.size() == 2 and loaded.is_ntt_form()
    assert loaded.parms_id() == keys.context.first_parms_id()
    np.testing.assert_allclose(keys.decrypt(loaded), values, atol=1e-6)
    assert wire.to_bytes(loaded)[:2] == struct.pack("<H", MAGIC)


@pytest.mark.parametrize("mode", [COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD])
def test_every_compression_mode_loads(
    keys: Keys, values: FloatArray, uncompressed_blob: bytes, mode: int
) -> None:
    blob = variant(uncompressed_blob, mode)
    assert header(blob)[4] == mode
    if mode != COMPR_NONE:
        assert len(blob) < len(uncompressed_blob)
    loaded = wire.load_ciphertext(keys.context, blob, len(uncompressed_blob))
    np.testing.assert_allclose(keys.decrypt(loaded), values, atol=1e-6)


@pytest.mark.parametrize("mode", [COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD])
def test_payload_over_max_bytes_is_refused(keys: Keys, uncompressed_blob: bytes, mode: int) -> None:
    blob = variant(uncompressed_blob, mode)
    with pytest.raises(wire.PayloadTooLargeError):
        wire.load_ciphertext(keys.context, blob, len(blob) - 1)


@pytest.mark.parametrize("mode", [COMPR_ZLIB, COMPR_ZSTD])
def test_payload_inflating_past_max_bytes_is_refused(
    keys: Keys, uncompressed_blob: bytes, mode: int
) -> None:
    blob = variant(uncompressed_blob, mode)
    # the compressed bytes fit, what they inflate to does not (by one byte)
    with pytest.raises(wire.PayloadTooLargeError):
        wire.load_ciphertext(keys.context, blob, len(uncompressed_blob) - 1)
    wire.load_ciphertext(keys.context, blob, len(uncompressed_blob))


@pytest.mark.parametrize("mode", [COMPR_ZLIB, COMPR_ZSTD])
def test_compression_bomb_is_refused(keys: Keys, mode: int) -> None:
    zeros = bytes(64 << 20)
    body = zlib.compress(zeros, 9) if mode == COMPR_ZLIB else zstandard.compress(zeros, 3)
    del zeros
    bomb = rehead(body, mode, 3)
    assert len(bomb) < 1 << 20
    with pytest.raises(wire.PayloadTooLargeError):
        wire.load_ciphertext(keys.context, bomb, 1 << 20)


def _truncated_consistent(blob: bytes) -> bytes:
    """Drop the last 100 bytes and fix the header's size so only the body is short."""
    minor, mode = header(blob)[3], header(blob)[4]
    short = blob[HEADER.size : -100]
    return rehead(short, mode, minor)


@pytest.mark.parametrize("mode", [COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD])
def test_malformed_payloads_raise_serialization_error(
    keys: Keys, uncompressed_blob: bytes, mode: int
) -> None:
    blob = variant(uncompressed_blob, mode)
    minor = header(blob)[3]
    body = blob[HEADER.size :]
    limit = 2 * len(uncompressed_blob)
    # Corrupt the coefficients themselves (0xff.. exceeds every prime), then compress:
    # flipping bytes of a compressed stream may still inflate to valid data.
    corrupted = bytearray(uncompressed_blob)
    middle = len(corrupted) // 2
    corrupted[middle : middle + 64] = b"\xff" * 64
    bad = {
        "truncated": blob[:-1],
        "truncated, consistent header": _truncated_consistent(blob),
        "shorter than a header": blob[:10],
        "empty": b"",
        "wrong magic": rehead(body, mode, minor, magic=0xA15F),
        "header size mismatch": rehead(body, mode, minor, header_size=20),
        "major version 3": rehead(body, mode, minor, major=3),
        "reserved bits": rehead(body, mode, minor, reserved=1),
        "unknown compression": rehead(body, 3, minor),
        "size field too large": rehead(body, mode, minor, size=len(blob) + 1),
        "corrupt body": variant(bytes(corrupted), mode),
    }
    for label, payload in bad.items():
        with pytest.raises(wire.SerializationError):
            wire.load_ciphertext(keys.context, payload, limit)
            pytest.fail(f"{label}: loaded")


def test_ciphertext_under_other_parameters_is_refused(ciphertext_blob: bytes) -> None:
    other = CkksParameters(poly_modulus_degree=8192, coeff_modulus_bits=(50, 40, 60), scale_bits=40)
    with pytest.raises(wire.SerializationError):
        wire.load_ciphertext(other.seal_context(), ciphertext_blob, 1 << 24)


def test_galois_keys_round_trip_through_bytes(keys: Keys) -> None:
    elements = [wire.galois_element(s, N) for s in (1, 16)]
    blob = wire.to_bytes(keys.generator.create_galois_keys(elements))
    loaded = wire.load_galois_keys(keys.context, blob, 64 << 20)
    assert all(loaded.has_key(e) for e in elements)
    assert not loaded.has_key(wire.galois_element(2, N))


STEPS = [0, 1, 2, 3, 8, 16, 100, 1000, 2047, 2048, 4095, -1, -2, -16, -4095]


def test_galois_element_matches_seals_galois_tool(keys: Keys) -> None:
    tool = keys.context.key_context_data().galois_tool()
    assert [wire.galois_element(s, N) for s in STEPS] == [tool.get_elt_from_step(s) for s in STEPS]


@pytest.mark.parametrize("step", [SLOTS, -SLOTS, SLOTS + 1, -SLOTS - 1])
def test_galois_element_refuses_steps_out_of_range(step: int) -> None:
    with pytest.raises(ValueError):
        wire.galois_element(step, N)


def test_step_zero_is_complex_conjugation(keys: Keys) -> None:
    assert wire.galois_element(0, N) == 2 * N - 1
    rng = np.random.default_rng(6)
    values = rng.uniform(-1, 1, SLOTS) + 1j * rng.uniform(-1, 1, SLOTS)
    plaintext = seal.Plaintext()
    keys.encoder.encode(values.tolist(), keys.params.scale, plaintext)
    ciphertext = seal.Ciphertext()
    keys.encryptor.encrypt_symmetric(plaintext, ciphertext)
    galois = keys.galois_keys([0])
    assert galois.has_key(2 * N - 1)
    conjugate = seal.Ciphertext()
    seal.Evaluator(keys.context).complex_conjugate(ciphertext, galois, conjugate)
    keys.decryptor.decrypt(conjugate, plaintext)
    decoded = np.asarray(keys.encoder.decode_complex(plaintext))
    np.testing.assert_allclose(decoded, np.conj(values), atol=1e-5)


@pytest.mark.parametrize("step", [1, 16, 100, -1, -7, 4095])
def test_keys_made_from_galois_element_rotate_like_np_roll(
    keys: Keys, values: FloatArray, step: int
) -> None:
    galois = keys.galois_keys([step])
    assert galois.has_key(wire.galois_element(step, N))
    rotated = seal.Ciphertext()
    # SEAL derives the element from the step itself and fails if the key is missing
    seal.Evaluator(keys.context).rotate_vector(keys.encrypt(values), step, galois, rotated)
    np.testing.assert_allclose(keys.decrypt(rotated), rot(values, step), atol=1e-5)


# --------------------------------------------------------------------------- engine

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


def test_one_row_with_all_zero_padding_diagonals_scores(scoring: Scoring) -> None:
    engine = scoring.engine
    rng = np.random.default_rng(11)
    row = rng.standard_normal((1, 100))
    row /= np.linalg.norm(row)
    u = rng.standard_normal(100)
    u /= np.linalg.norm(u)
    plan = DiagonalPlan.for_catalog(100, 1, scoring.slots)
    assert plan.padded_dimension == 128
    chunk = engine.encode_rows(plan, row)
    # diagonals 100..127 of a single row are its zero padding: not encoded
    assert all(d is None for d in chunk.diagonals[100:])
    if engine.params.catalog_scale_bits >= 40:  # nothing rounds to zero at 2^40
        assert all(d is not None for d in chunk.diagonals[:100])

    scores = encrypted_scores(engine, scoring.keys, plan, row, u)

    np.testing.assert_allclose(scores, row @ u, rtol=0, atol=scoring.tolerance)


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
    u = rng.standard_normal(64)
    u /= np.linalg.norm(u)
    chunk = engine.encode_rows(plan, row)
    assert chunk.diagonals[b] is None and chunk.diagonals[-1] is None

    scores = encrypted_scores(engine, scoring.keys, plan, row, u)

    np.testing.assert_allclose(scores, row @ u, rtol=0, atol=scoring.tolerance)


def test_tiny_entries_that_encode_to_zero_are_skipped(scoring: Scoring) -> None:
    # A lone value of 1e-9 in a diagonal encodes to the zero polynomial even at 2^40;
    # multiplying by it would make SEAL throw "result ciphertext is transparent".
    engine = scoring.engine
    rng = np.random.default_rng(14)
    rows = rng.standard_normal((2, 32))
    rows[:, 8:16] = 1e-9  # diagonals 8..14 hold only tiny values
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    u = rng.standard_normal(32)
    u /= np.linalg.norm(u)
    plan = DiagonalPlan.for_catalog(32, 2, scoring.slots)
    assert any(d is None for d in engine.encode_rows(plan, rows).diagonals)

    scores = encrypted_scores(engine, scoring.keys, plan, rows, u)

    np.testing.assert_allclose(scores, rows @ u, rtol=0, atol=scoring.tolerance)


def test_several_chunks_score_like_plaintext(scoring: Scoring) -> None:
    # a full chunk of 2S rows, then one with all its real parts and 300 imaginary ones
    rng = np.random.default_rng(13)
    rows = rng.standard_normal((3 * scoring.slots + 300, 24))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    u = rng.standard_normal(24)
    u /= np.linalg.norm(u)
    plan = DiagonalPlan.for_catalog(24, rows.shape[0], scoring.slots)

    scores = encrypted_scores(scoring.engine, scoring.keys, plan, rows, u)

    np.testing.assert_allclose(scores, rows @ u, rtol=0, atol=scoring.tolerance)


def test_rows_only_in_the_imaginary_parts_score(scoring: Scoring) -> None:
    # the first S rows are zero: every diagonal is purely imaginary
    engine, slots = scoring.engine, scoring.slots
    rng = np.random.default_rng(15)
    rows = np.zeros((slots + 40, 16))
    rows[slots:] = rng.standard_normal((40, 16))
    rows[slots:] /= np.linalg.norm(rows[slots:], axis=1, keepdims=True)
    u = rng.standard_normal(16)
    u /= np.linalg.norm(u)
    plan = DiagonalPlan.for_catalog(16, rows.shape[0], slots)

    scores = encrypted_scores(engine, scoring.keys, plan, rows, u)

    np.testing.assert_allclose(scores, rows @ u, rtol=0, atol=scoring.tolerance)


def test_split_complex_gives_the_two_halves_as_real_slots(scoring: Scoring) -> None:
    engine, keys, slots = scoring.engine, scoring.keys, scoring.slots
    rng = np.random.default_rng(16)
    rows = rng.standard_normal((slots + 300, 24))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    u = rng.standard_normal(24)
    u /= np.linalg.norm(u)
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
