"""The RNS limbs of SEAL ciphertexts and plaintexts as numpy arrays, without copying.

The server's native kernel (`heserve.he.engine`) and the client's decoding work on
the NTT-form residues SEAL already holds, but `tenseal.sealapi` gives no pointer to
them: `Ciphertext.data(i)` and
`DynArray.at(i)` return one coefficient per Python call (32,768 calls per
ciphertext at N = 8192, two primes), and a round trip through SEAL's serialization
costs ~1 ms per ciphertext each way (`save` always compresses, and only to a file).

pybind11 keeps the address of the wrapped C++ object right after the Python object
header, and SEAL keeps the residues of a `Ciphertext` and a `Plaintext` in one
`DynArray` at a fixed place in the object. This module reads that place, and
trusts it only after checking, for every object it views, that the fields around
it say what the public API says (parms_id, sizes, scale) and that the first and
last residues agree with `DynArray.at`. Any disagreement raises `LayoutError`, and
the engine falls back to SEAL's own loop: a different SEAL or pybind11 build can
make heserve slower, never wrong.

The views alias SEAL's memory: they are valid while the SEAL object lives and is
not resized. Only public data (ciphertexts, plaintexts) is ever viewed.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

U64Array = npt.NDArray[np.uint64]

# Where pybind11's simple instance layout keeps the C++ object's address: right
# after PyObject_HEAD (reference count and type pointer).
_HOLDER_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p)
_WORD = 8


class LayoutError(RuntimeError):
    """SEAL's objects are not laid out as this module expects; use SEAL's own loop."""


def _cxx_address(obj: object) -> int:
    address = ctypes.c_void_p.from_address(id(obj) + _HOLDER_OFFSET).value
    if not address:
        raise LayoutError("no C++ object behind this pybind11 instance")
    return int(address)


def _words(address: int, count: int) -> list[int]:
    return list((ctypes.c_uint64 * count).from_address(address))


def _view(address: int, count: int) -> U64Array:
    array: U64Array = np.ctypeslib.as_array((ctypes.c_uint64 * count).from_address(address))
    return array


def _check_data(dyn_array: seal.DynArray, pointer: int, count: int) -> None:
    """The pointer must hold the DynArray's first and last residues."""
    if count == 0 or dyn_array.size() != count or not pointer:
        raise LayoutError("data size does not match")
    first, last = _words(pointer, 1)[0], _words(pointer + (count - 1) * _WORD, 1)[0]
    if first != dyn_array.at(0) or last != dyn_array.at(count - 1):
        raise LayoutError("data pointer does not hold the object's residues")


# seal::Ciphertext: parms_id (4 words), is_ntt_form, size, poly_modulus_degree,
# coeff_modulus_size, scale, correction_factor, then DynArray: pool (2 words),
# capacity, size, data pointer.
_CT_PARMS, _CT_NTT, _CT_SIZE, _CT_N, _CT_PRIMES, _CT_SCALE = 0, 4, 5, 6, 7, 8
_CT_DATA_SIZE, _CT_DATA = 13, 14


def ciphertext_limbs(ciphertext: seal.Ciphertext) -> U64Array:
    """A (size, primes, N) view of a ciphertext's residues, writable in place."""
    size, n = ciphertext.size(), ciphertext.poly_modulus_degree()
    primes = ciphertext.coeff_modulus_size()
    base = _cxx_address(ciphertext)
    words = _words(base, _CT_DATA + 1)
    scale = np.array(words[_CT_SCALE], dtype=np.uint64).view(np.float64)
    if (
        words[_CT_PARMS : _CT_PARMS + 4] != list(ciphertext.parms_id())
        or words[_CT_NTT] & 0xFF != int(ciphertext.is_ntt_form())  # a bool, then padding
        or words[_CT_SIZE : _CT_PRIMES + 1] != [size, n, primes]
        or float(scale) != ciphertext.scale
    ):
        raise LayoutError("Ciphertext fields are not where this build of SEAL was measured")
    count = size * primes * n
    if words[_CT_DATA_SIZE] != count:
        raise LayoutError("Ciphertext data size does not match")
    _check_data(ciphertext.dyn_array(), words[_CT_DATA], count)
    return _view(words[_CT_DATA], count).reshape(size, primes, n)


# seal::Plaintext: parms_id (4 words), coeff_count, scale, then DynArray: pool (2
# words), capacity, size, data pointer.
_PT_PARMS, _PT_COUNT, _PT_SCALE, _PT_DATA_SIZE, _PT_DATA = 0, 4, 5, 9, 10


def plaintext_limbs(plaintext: seal.Plaintext, n: int) -> U64Array:
    """A (primes, N) view of an NTT-form plaintext's residues."""
    count = plaintext.coeff_count()
    if not plaintext.is_ntt_form() or count % n:
        raise LayoutError("expected an NTT-form plaintext of whole limbs")
    words = _words(_cxx_address(plaintext), _PT_DATA + 1)
    scale = np.array(words[_PT_SCALE], dtype=np.uint64).view(np.float64)
    if (
        words[_PT_PARMS : _PT_PARMS + 4] != list(plaintext.parms_id())
        or words[_PT_COUNT] != count
        or float(scale) != plaintext.scale
        or words[_PT_DATA_SIZE] != count
    ):
        raise LayoutError("Plaintext fields are not where this build of SEAL was measured")
    _check_data(plaintext.dyn_array(), words[_PT_DATA], count)
    return _view(words[_PT_DATA], count).reshape(count // n, n)


def supported() -> bool:
    """Whether this process's SEAL objects can be viewed (little-endian 64-bit only)."""
    return sys.byteorder == "little" and ctypes.sizeof(ctypes.c_void_p) == _WORD
