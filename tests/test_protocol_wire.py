"""heserve.protocol.wire: SEAL objects to and from bytes, bounded, and Galois elements.

Real SEAL (tenseal.sealapi) ciphertexts and keys; malformed, compressed and
inflating payloads are built here byte by byte.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tenseal.sealapi as seal
import zstandard
from conftest import Keys, rot

from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PARAMETERS, CkksParameters
from heserve.protocol.slots import FloatArray

HEADER = struct.Struct(
    "<HBBBBHQ"
)  # SEAL 4.x: magic, header size, major, minor, mode, reserved, size
MAGIC = 0xA15E
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
SLOTS = DEFAULT_PARAMETERS.slot_count
N = DEFAULT_PARAMETERS.poly_modulus_degree


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
