"""The client's numpy decoding of score ciphertexts against SEAL's own decode_complex:
the same slot values, for every preset, and SEAL's decode where it does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from heserve.domain.catalog import unit_rows
from heserve.he.engine import Engine
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import PRESETS
from heserve_client import SecretContext


def _seal_decode(secret: SecretContext, blob: bytes) -> np.ndarray:
    ciphertext = wire.load_ciphertext(secret._context, blob, 1 << 26)
    plaintext = seal.Plaintext()
    secret._decryptor.decrypt(ciphertext, plaintext)
    return np.asarray(secret._encoder.decode_complex(plaintext), dtype=np.complex128)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_scores_decode_as_seal_decodes_them(preset: str) -> None:
    params = PRESETS[preset]
    secret = SecretContext(params)
    engine = Engine(params)
    plan = DiagonalPlan.for_catalog(24, 2 * params.slot_count, params.slot_count)
    rows = unit_rows(2 * params.slot_count, 24, seed=81)
    keys = wire.load_galois_keys(
        engine.context, secret.galois_keys(list(plan.rotation_steps)), 1 << 28
    )
    vector = unit_rows(1, 24, seed=82)[0]
    query = wire.load_ciphertext(engine.context, secret.encrypt(plan.query_slots(vector)), 1 << 26)
    (scores,) = engine.score(plan, [engine.encode_rows(plan, rows)], query, keys)
    blob = engine.serialize(scores)
    mine = secret.decrypt_complex(blob, 1 << 26)
    theirs = _seal_decode(secret, blob)
    # Two floating-point FFTs of the same integers: they differ in the last digits,
    # ~1e-8 at most, a hundred times below the best preset's error (~1e-6)...
    assert np.abs(mine - theirs).max() < 1e-7
    # ... and the numpy decode is as close to the plaintext scores as SEAL's.
    exact = rows[: params.slot_count] @ vector
    assert np.abs(mine.real - exact).max() <= np.abs(theirs.real - exact).max() + 1e-7
    assert np.abs(mine.real - exact).max() < 5e-3


def test_a_ciphertext_at_two_primes_is_decoded_by_seal() -> None:
    """A fresh precise ciphertext (two primes): the numpy decode declines, SEAL decodes."""
    params = PRESETS["precise"]
    secret = SecretContext(params)
    values = np.linspace(-1, 1, params.slot_count)
    blob = secret.encrypt(values)
    decoded = secret.decrypt_complex(blob, 1 << 26)
    assert np.abs(decoded.real - values).max() < 1e-6
    assert np.array_equal(decoded, _seal_decode(secret, blob))
