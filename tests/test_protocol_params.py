"""heserve.protocol.params: the 128-bit security table, the refused parameter sets,
and every preset building a real SEAL context."""

from __future__ import annotations

import pytest
import tenseal.sealapi as seal

from heserve.protocol.params import (
    DEFAULT_PARAMETERS,
    PRESETS,
    CkksParameters,
    InsecureParametersError,
)


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
