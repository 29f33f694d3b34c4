"""heserve.protocol.limbs: zero-copy views of SEAL's residues, checked against SEAL itself."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from heserve.he.engine import Engine
from heserve.protocol import wire
from heserve.protocol.limbs import LayoutError, ciphertext_limbs, plaintext_limbs
from heserve.protocol.params import PRESETS, CkksParameters


class _Party:
    """A key pair, an encoder and an evaluator under one preset."""

    def __init__(self, params: CkksParameters) -> None:
        self.params = params
        self.context = params.seal_context()
        keygen = seal.KeyGenerator(self.context)
        public = seal.PublicKey()
        keygen.create_public_key(public)
        self.encryptor = seal.Encryptor(self.context, public)
        self.decryptor = seal.Decryptor(self.context, keygen.secret_key())
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self.moduli = [m.value() for m in self.context.first_context_data().parms().coeff_modulus()]

    def encode(self, values: np.ndarray, scale: float) -> seal.Plaintext:
        plaintext = seal.Plaintext()
        self.encoder.encode(values.tolist(), scale, plaintext)
        return plaintext

    def encrypt(self, values: np.ndarray) -> seal.Ciphertext:
        ciphertext = seal.Ciphertext()
        self.encryptor.encrypt(self.encode(values, self.params.scale), ciphertext)
        return ciphertext

    def decrypt(self, ciphertext: seal.Ciphertext) -> np.ndarray:
        plaintext = seal.Plaintext()
        self.decryptor.decrypt(ciphertext, plaintext)
        return np.array(self.encoder.decode_double(plaintext))


@pytest.fixture(scope="module", params=sorted(PRESETS))
def party(request: pytest.FixtureRequest) -> _Party:
    return _Party(PRESETS[request.param])


def test_a_ciphertext_view_holds_the_residues_seal_serializes(party: _Party) -> None:
    ciphertext = party.encrypt(np.linspace(-1, 1, party.params.slot_count))
    view = ciphertext_limbs(ciphertext)
    n, primes = party.params.poly_modulus_degree, party.params.data_prime_count
    assert view.shape == (2, primes, n) and view.dtype == np.uint64
    serialized = wire.ciphertext_to_wire(wire.to_bytes(ciphertext))  # uncompressed
    limbs = np.frombuffer(serialized[-view.nbytes :], dtype=np.uint64).reshape(view.shape)
    assert np.array_equal(view, limbs)
    assert all(int(view[0, p].max()) < party.moduli[p] for p in range(primes))


def test_a_plaintext_view_multiplies_like_seal(party: _Party) -> None:
    rng = np.random.default_rng(5)
    ciphertext = party.encrypt(rng.uniform(-1, 1, party.params.slot_count))
    plaintext = party.encode(
        rng.uniform(-1, 1, party.params.slot_count), party.params.catalog_scale
    )
    product = seal.Ciphertext()
    party.evaluator.multiply_plain(ciphertext, plaintext, product)
    query, diagonal = (
        ciphertext_limbs(ciphertext),
        plaintext_limbs(plaintext, party.params.poly_modulus_degree),
    )
    expected = np.empty_like(query)
    for prime, modulus in enumerate(party.moduli[: query.shape[1]]):
        wide = query[:, prime].astype(object) * diagonal[prime].astype(object) % modulus
        expected[:, prime] = wide.astype(np.uint64)
    assert np.array_equal(ciphertext_limbs(product), expected)


def test_writing_through_a_view_changes_what_decrypts(party: _Party) -> None:
    values = np.full(party.params.slot_count, 0.25)
    ciphertext = party.encrypt(values)
    doubled = ciphertext_limbs(ciphertext)
    for prime, modulus in enumerate(party.moduli[: doubled.shape[1]]):
        doubled[:, prime] = (doubled[:, prime].astype(object) * 2 % modulus).astype(np.uint64)
    assert np.abs(party.decrypt(ciphertext) - 2 * values).max() < 1e-3


def test_a_plaintext_not_in_ntt_form_is_refused(party: _Party) -> None:
    plain = seal.Plaintext(party.params.poly_modulus_degree)  # coefficient form, not NTT
    plain.set_zero()
    with pytest.raises(LayoutError):
        plaintext_limbs(plain, party.params.poly_modulus_degree)


def test_a_ciphertext_serialized_from_its_view_equals_seals_own_bytes(party: _Party) -> None:
    """Engine.serialize (fields + residues, no temporary file, no zstd) gives the bytes
    SEAL's save gives once inflated and tagged for the wire, and they load back."""
    engine = Engine(party.params)
    ciphertext = party.encrypt(np.linspace(-0.5, 0.5, party.params.slot_count))
    product = seal.Ciphertext()
    plaintext = party.encode(np.full(party.params.slot_count, 0.5), party.params.catalog_scale)
    party.evaluator.multiply_plain(ciphertext, plaintext, product)  # an unseeded result
    direct = engine.serialize(product)
    assert direct == wire.ciphertext_to_wire(wire.to_bytes(product))
    loaded = wire.load_ciphertext(engine.context, direct, len(direct))
    assert np.array_equal(ciphertext_limbs(loaded), ciphertext_limbs(product))
