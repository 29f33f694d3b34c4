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


class InsecureParametersError(ValueError):
    """The parameters fall below 128-bit security or are not valid CKKS parameters."""


@dataclass(frozen=True)
class CkksParameters:
    """The encryption parameters a client and a server agree on.

    `coeff_modulus_bits` lists the data primes first and the special prime last,
    as SEAL expects. The query lives at the top data level; scoring uses one
    multiply_plain and one rescale, so at least two data primes are needed.
    """

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
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
        if len(self.coeff_modulus_bits) < 3:
            raise InsecureParametersError(
                "need at least two data primes and one special prime "
                f"(got {len(self.coeff_modulus_bits)} primes)"
            )
        if not all(20 <= b <= 60 for b in self.coeff_modulus_bits):
            raise InsecureParametersError("every prime must have 20 to 60 bits")
        if not 20 <= self.scale_bits < self.coeff_modulus_bits[0]:
            raise InsecureParametersError(
                "scale_bits must be at least 20 and below the first prime's bit size"
            )

    @property
    def slot_count(self) -> int:
        """Number of CKKS slots: N / 2."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """The encoding scale, 2^scale_bits."""
        return float(2**self.scale_bits)

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


# N = 8192 with data primes 60 + 40 and special prime 60: 160 of 218 allowed bits.
# The query is encrypted at scale 2^40 over both data primes; after multiply_plain
# the scores are rescaled by the 40-bit prime back to ~2^40 inside the 60-bit one,
# leaving 20 bits of headroom for the score magnitude.
DEFAULT_PARAMETERS = CkksParameters(
    poly_modulus_degree=8192, coeff_modulus_bits=(60, 40, 60), scale_bits=40
)
