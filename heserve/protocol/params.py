"""CKKS parameters: the one place that decides what a SEAL context looks like.

Client and server must build bit-identical SEAL contexts, so both derive them from
a `CkksParameters` value, which is validated on construction against the
HomomorphicEncryption.org 128-bit security table: a context below 128-bit
security cannot be made from this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenseal.sealapi as seal

# Largest total coefficient modulus (bits) for 128-bit classical security with a
# ternary secret, per ring degree (HomomorphicEncryption.org standard, as in SEAL).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Scores must stay below 2^headroom in magnitude; 8 bits allows |score| < 128 with
# a margin (catalog rows are bounded, see catalog.MAX_ROW_NORM).
MIN_HEADROOM_BITS = 8


class InsecureParametersError(ValueError):
    """The parameters fall below 128-bit security or are not valid CKKS parameters."""


@dataclass(frozen=True)
class CkksParameters:
    """The encryption parameters a client and a server agree on.

    `coeff_modulus_bits` lists the data primes first and the special prime last,
    as SEAL expects. The query is encrypted at the top data level with scale
    2^scale_bits; catalog diagonals are encoded at 2^catalog_scale_bits. With two
    or more data primes the products are rescaled once (dropping the last data
    prime); with one there is no rescale and the product scale must fit q0.
    """

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int
    catalog_scale_bits: int = 0  # 0: the same as scale_bits

    def __post_init__(self) -> None:
        if self.catalog_scale_bits == 0:
            object.__setattr__(self, "catalog_scale_bits", self.scale_bits)
        limit = MAX_COEFF_BITS_128.get(self.poly_modulus_degree)
        if limit is None:
            raise InsecureParametersError(
                f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)}, "
                f"got {self.poly_modulus_degree}"
            )
        total = sum(self.coeff_modulus_bits)
        if total > limit:
            raise InsecureParametersError(
                f"coefficient modulus of {total} bits exceeds the 128-bit security bound of "
                f"{limit} bits for N={self.poly_modulus_degree}"
            )
        if len(self.coeff_modulus_bits) < 2:
            raise InsecureParametersError("need at least one data prime and one special prime")
        if not all(20 <= b <= 60 for b in self.coeff_modulus_bits):
            raise InsecureParametersError("every prime must have 20 to 60 bits")
        if min(self.scale_bits, self.catalog_scale_bits) < 10:
            raise InsecureParametersError("scales below 2^10 lose too much precision")
        data_bits = sum(self.coeff_modulus_bits[:-1])
        if self.scale_bits + self.catalog_scale_bits + MIN_HEADROOM_BITS > data_bits:
            raise InsecureParametersError("the product of the scales does not fit the data primes")
        if self.score_headroom_bits < MIN_HEADROOM_BITS:
            raise InsecureParametersError(
                f"scores keep only {self.score_headroom_bits} bits of headroom in the "
                f"first prime; need {MIN_HEADROOM_BITS}"
            )

    @property
    def data_prime_count(self) -> int:
        return len(self.coeff_modulus_bits) - 1

    @property
    def rescales(self) -> bool:
        """Whether scoring rescales its products (needs a second data prime)."""
        return self.data_prime_count >= 2

    @property
    def result_scale_bits(self) -> int:
        """log2 of the scale the score ciphertexts come back at (approximately)."""
        dropped = self.coeff_modulus_bits[self.data_prime_count - 1] if self.rescales else 0
        return self.scale_bits + self.catalog_scale_bits - dropped

    @property
    def score_headroom_bits(self) -> int:
        """Bits left above the result scale in the first prime: |score| < 2^headroom."""
        return self.coeff_modulus_bits[0] - self.result_scale_bits - 1

    @property
    def slot_count(self) -> int:
        """Number of CKKS slots: N / 2."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """The query's encoding scale, 2^scale_bits."""
        return float(2**self.scale_bits)

    @property
    def catalog_scale(self) -> float:
        """The catalog diagonals' encoding scale, 2^catalog_scale_bits."""
        return float(2**self.catalog_scale_bits)

    def seal_context(self) -> seal.SEALContext:
        """Build the SEAL context; SEAL re-checks 128-bit security itself."""
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.poly_modulus_degree)
        parms.set_coeff_modulus(
            seal.CoeffModulus.Create(self.poly_modulus_degree, list(self.coeff_modulus_bits))
        )
        context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not context.parameters_set():
            raise InsecureParametersError(
                f"SEAL rejected the parameters: {context.parameters_error_message()}"
            )
        return context


# Named presets, all inside the 128-bit table. Precision and speed are measured
# per preset by the benchmark harness (bench/) and listed in the README.
PRESETS: dict[str, CkksParameters] = {
    # N = 8192, data primes 60 + 40, special 60 (160 of 218 bits). Query and catalog
    # at 2^40; the product is rescaled by the 40-bit prime back to ~2^40 inside the
    # 60-bit one: ~1e-6 error, 19 bits of score headroom.
    "precise": CkksParameters(8192, (60, 40, 60), scale_bits=40, catalog_scale_bits=40),
    # N = 8192, one 60-bit data prime, special 60 (120 bits), no rescale: half the
    # multiplications, key-switch work and query bytes. The product scale 2^51 must
    # fit q0; the split 2^32 (query) x 2^19 (catalog) balances the key-switching
    # noise of the baby-step rotations against the catalog's rounding (measured:
    # ~3e-4 max error, against ~9e-4 for 2^30 x 2^21 or 2^34 x 2^17).
    "fast": CkksParameters(8192, (60, 60), scale_bits=32, catalog_scale_bits=19),
    # N = 4096, one 54-bit data prime, special 54 (108 of 109 bits): the smallest
    # keys and queries, 2,048 items per response; ~1e-3 max error (2^28 x 2^17:
    # measured better than 2^29 x 2^16, 2^27 x 2^18 or 2^30 x 2^15).
    "compact": CkksParameters(4096, (54, 54), scale_bits=28, catalog_scale_bits=17),
}
DEFAULT_PRESET = "precise"
DEFAULT_PARAMETERS = PRESETS[DEFAULT_PRESET]
