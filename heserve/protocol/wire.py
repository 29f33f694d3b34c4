"""SEAL objects to and from bytes, with every size bounded before SEAL sees it.

`tenseal.sealapi` only saves to and loads from file paths, so bytes pass through a
private temporary file (on a memory-backed filesystem where there is one). SEAL's
own loader inflates zlib/zstd payloads without an output limit, which would let a
few kilobytes of upload allocate gigabytes; so compressed payloads are inflated
here with a hard limit and handed to SEAL uncompressed.

SEAL loads only objects whose headers (the outer one and those of nested objects:
a Ciphertext's data array and PRNG seed, each key of a GaloisKeys) name its own
major.minor version. SEAL 4.0 to 4.3 share one layout for Ciphertext, Plaintext and
KSwitchKeys (TenSEAL's SEAL writes 4.3 headers, the released Microsoft SEAL 4.1 and
its bindings, node-seal, SEAL-Python and SEALNet, write 4.1), and this module walks
that layout header by header, refusing bytes that do not follow it. So an object
tagged with any of those versions is accepted: re-tagged to the local version
before loading. What goes out is tagged in the version the client speaks
(`ciphertext_to_wire(blob, minor)`: the server answers each query in the version it
carried), 4.1 by default, compression mode none; no client has to patch bytes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import tenseal.sealapi as seal
import zstandard

_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr mode, reserved, size
_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
# SEAL 4 minor versions whose Ciphertext, Plaintext and KSwitchKeys layouts are the
# same byte for byte (4.1 and 4.3 checked by loading each side's objects in the
# other's SEAL; 4.0 introduced the layout, with the correction factor, and 4.2 was
# never released with another): every header of an object is checked against it.
ACCEPTED_MINORS = frozenset({0, 1, 2, 3})
_SAME_LAYOUT_MINORS = ACCEPTED_MINORS
_WIRE_MINOR = 1  # the wire speaks SEAL 4.1
_OWN_OBJECT_BYTES = 1 << 31  # inflate limit for objects this process made itself
# A Ciphertext's fields: parms_id, is_ntt_form, size, N, primes, scale, correction factor.
_CIPHERTEXT_FIELDS = struct.Struct("<4Q?QQQdQ")
_PLAINTEXT_FIELDS = 32 + 8 + 8  # parms_id, coeff_count, scale
_KIND_CIPHERTEXT, _KIND_PLAINTEXT, _KIND_KSWITCH_KEYS = "ciphertext", "plaintext", "kswitch"
_SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class SerializationError(ValueError):
    """Bytes that are not a valid SEAL object of the expected kind and parameters."""


class PayloadTooLargeError(SerializationError):
    """A payload, or what it inflates to, exceeds the allowed size."""


class _Saveable(Protocol):
    def save(self, path: str) -> None: ...


@contextlib.contextmanager
def _scratch_file() -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix="heserve-", dir=_SCRATCH_DIR)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def to_bytes(obj: _Saveable) -> bytes:
    """SEAL's serialization of `obj` (a Ciphertext, GaloisKeys or their Serializable)."""
    with _scratch_file() as path:
        obj.save(str(path))
        return path.read_bytes()


def ciphertext_bytes(
    parms_id: Sequence[int],
    is_ntt_form: bool,
    size: int,
    poly_modulus_degree: int,
    primes: int,
    scale: float,
    residues: bytes | memoryview,
    correction_factor: int = 1,
) -> bytes:
    """A Ciphertext's serialization as the wire carries it (SEAL 4.1, compression none),
    built from its fields and its residues (size × primes × N little-endian uint64):
    what `ciphertext_to_wire(to_bytes(ct))` gives, without SEAL's temporary file and
    zstd pass and heserve's inflating it again (~1 ms per ciphertext at N = 8192)."""
    count = size * primes * poly_modulus_degree
    data = memoryview(residues).cast("B")
    if data.nbytes != 8 * count:
        raise SerializationError(f"expected {count} residues, got {data.nbytes // 8}")
    array_size = _HEADER.size + 8 + data.nbytes
    total = _HEADER.size + _CIPHERTEXT_FIELDS.size + array_size
    return b"".join(
        (
            _HEADER.pack(_MAGIC, _HEADER.size, 4, _WIRE_MINOR, _COMPR_NONE, 0, total),
            _CIPHERTEXT_FIELDS.pack(
                *parms_id, is_ntt_form, size, poly_modulus_degree, primes, scale,
                correction_factor,
            ),
            _HEADER.pack(_MAGIC, _HEADER.size, 4, _WIRE_MINOR, _COMPR_NONE, 0, array_size),
            struct.pack("<Q", count),
            data,
        )
    )  # fmt: skip


def ciphertext_to_wire(blob: bytes, minor: int = _WIRE_MINOR) -> bytes:
    """A serialized Ciphertext (any accepted SEAL 4.x tag, any compression) as the wire
    carries it: tagged SEAL 4.`minor` (default 4.1, which any SEAL 4.1 binding loads as
    it is; the server passes the version its client's query carried), compression
    mode none.
    """
    if minor not in ACCEPTED_MINORS:
        raise SerializationError(f"SEAL 4.{minor} is not a version the wire speaks")
    return _retagged(_uncompressed(blob, _OWN_OBJECT_BYTES), _KIND_CIPHERTEXT, minor)


def seal_minor(blob: bytes) -> int:
    """The SEAL 4.x minor version a serialized object's header names (checked when the
    object is loaded; here only read, to answer in the same version)."""
    if len(blob) < _HEADER.size:
        raise SerializationError("payload is shorter than a SEAL header")
    minor = int(_HEADER.unpack_from(blob)[3])
    if minor not in ACCEPTED_MINORS:
        raise SerializationError(
            f"SEAL 4.{minor} is not accepted: the wire speaks SEAL "
            + ", ".join(f"4.{m}" for m in sorted(ACCEPTED_MINORS))
        )
    return minor


def galois_keys_to_wire(blob: bytes) -> bytes:
    """Serialized GaloisKeys as the wire carries them; see `ciphertext_to_wire`."""
    return _retagged(_uncompressed(blob, _OWN_OBJECT_BYTES), _KIND_KSWITCH_KEYS, _WIRE_MINOR)


def zstd_compressed(wire: bytes) -> bytes:
    """An uncompressed SEAL object with its body zstd-compressed, if that is smaller.

    Primes below 2^60 leave the top bits of every 64-bit coefficient zero, so keys
    and queries shrink by 5-25%; SEAL (and the server, with a bounded inflate) load
    the result as they are.
    """
    magic, header_size, major, minor, mode, reserved, _ = _HEADER.unpack_from(wire)
    if mode != _COMPR_NONE:
        raise SerializationError("expected an uncompressed SEAL object")
    body = zstandard.ZstdCompressor(level=3).compress(wire[_HEADER.size :])
    if _HEADER.size + len(body) >= len(wire):
        return wire
    header = _HEADER.pack(
        magic, header_size, major, minor, _COMPR_ZSTD, reserved, _HEADER.size + len(body)
    )
    return header + body


@functools.cache
def _local_minor() -> int:
    """The minor version the local SEAL writes and will load."""
    minor = int(_HEADER.unpack_from(to_bytes(seal.Plaintext()))[3])
    if minor not in _SAME_LAYOUT_MINORS:
        raise SerializationError(f"SEAL 4.{minor} has no known layout mapping to the wire's 4.1")
    return minor


def _retagged(raw: bytes, kind: str, minor: int) -> bytes:
    """`raw` (uncompressed) with every SEAL header in it re-tagged to version 4.minor.

    Walks the object's layout; bytes that are not that kind of object are refused.
    """
    buffer = bytearray(raw)
    end = _retag_object(buffer, 0, len(buffer), kind, minor)
    if end != len(buffer):
        raise SerializationError("trailing bytes after the SEAL object")
    return bytes(buffer)


def _retag_header(buffer: bytearray, pos: int, end: int, minor: int) -> int:
    """Re-tag the uncompressed SEAL header at `pos`; return where its object ends."""
    if pos + _HEADER.size > end:
        raise SerializationError("SEAL object truncated before a nested header")
    magic, header_size, major, old_minor, mode, reserved, size = _HEADER.unpack_from(buffer, pos)
    if (
        magic != _MAGIC
        or header_size != _HEADER.size
        or major != 4
        or old_minor not in _SAME_LAYOUT_MINORS
        or mode != _COMPR_NONE
        or reserved != 0
        or not _HEADER.size <= size <= end - pos
    ):
        raise SerializationError(
            "not a SEAL 4.x object of the expected layout (versions "
            + ", ".join(f"4.{m}" for m in sorted(ACCEPTED_MINORS))
            + ", compression none, zlib or zstd)"
        )
    buffer[pos + 4] = minor
    return pos + int(size)


def _retag_object(buffer: bytearray, pos: int, end: int, kind: str, minor: int) -> int:
    """Re-tag the object at `pos` and the objects nested in it; return where it ends."""
    object_end = _retag_header(buffer, pos, end, minor)
    pos += _HEADER.size
    if kind == _KIND_CIPHERTEXT:  # fields, the data array, and a PRNG seed if seeded
        pos = _retag_header(buffer, pos + _CIPHERTEXT_FIELDS.size, object_end, minor)
        if pos < object_end:
            pos = _retag_header(buffer, pos, object_end, minor)
    elif kind == _KIND_PLAINTEXT:  # a SecretKey is its Plaintext
        pos = _retag_header(buffer, pos + _PLAINTEXT_FIELDS, object_end, minor)
    else:  # parms_id, then a vector of vectors of PublicKeys (Ciphertexts)
        pos += 32
        outer = _read_count(buffer, pos, object_end)
        pos += 8
        for _ in range(outer):
            inner = _read_count(buffer, pos, object_end)
            pos += 8
            for _ in range(inner):
                pos = _retag_object(buffer, pos, object_end, _KIND_CIPHERTEXT, minor)
    if pos != object_end:
        raise SerializationError("SEAL object does not have the expected layout")
    return object_end


def _read_count(buffer: bytearray, pos: int, end: int) -> int:
    if pos + 8 > end:
        raise SerializationError("SEAL object truncated before a count")
    (count,) = struct.unpack_from("<Q", buffer, pos)
    if count > (end - pos) // 8:  # every entry takes at least 8 bytes
        raise SerializationError("SEAL object count exceeds its size")
    return int(count)


def _uncompressed(blob: bytes, max_bytes: int) -> bytes:
    """Return `blob` re-headed with compression mode none, inflating at most max_bytes."""
    if len(blob) > max_bytes:
        raise PayloadTooLargeError(f"payload of {len(blob)} bytes exceeds {max_bytes}")
    if len(blob) < _HEADER.size:
        raise SerializationError("payload is shorter than a SEAL header")
    magic, header_size, major, minor, mode, reserved, size = _HEADER.unpack_from(blob)
    if magic != _MAGIC or header_size != _HEADER.size or major != 4 or reserved != 0:
        raise SerializationError("payload does not start with a SEAL 4.x header")
    if size != len(blob):
        raise SerializationError(f"SEAL header says {size} bytes but {len(blob)} arrived")
    body = blob[_HEADER.size :]
    limit = max_bytes - _HEADER.size
    if mode == _COMPR_NONE:
        return blob
    if mode == _COMPR_ZLIB:
        try:
            body = zlib.decompressobj().decompress(body, limit + 1)
        except zlib.error as exc:
            raise SerializationError(f"corrupt zlib payload: {exc}") from None
    elif mode == _COMPR_ZSTD:
        try:
            # read by pieces: read(n) allocates n bytes up front, whatever inflates
            pieces: list[bytes] = []
            inflated = 0
            with zstandard.ZstdDecompressor().stream_reader(body) as reader:
                while inflated <= limit:
                    piece = reader.read(min(limit + 1 - inflated, 1 << 20))
                    if not piece:
                        break
                    pieces.append(piece)
                    inflated += len(piece)
            body = b"".join(pieces)
        except zstandard.ZstdError as exc:
            raise SerializationError(f"corrupt zstd payload: {exc}") from None
    else:
        raise SerializationError(f"unknown SEAL compression mode {mode}")
    if len(body) > limit:
        raise PayloadTooLargeError(f"payload inflates past {max_bytes} bytes")
    header = _HEADER.pack(
        _MAGIC, _HEADER.size, major, minor, _COMPR_NONE, 0, _HEADER.size + len(body)
    )
    return header + body


def _load(
    target: seal.Ciphertext | seal.GaloisKeys | seal.SecretKey,
    context: seal.SEALContext,
    blob: bytes,
    max_bytes: int,
) -> None:
    if isinstance(target, seal.Ciphertext):
        kind = _KIND_CIPHERTEXT
    elif isinstance(target, seal.GaloisKeys):
        kind = _KIND_KSWITCH_KEYS
    else:
        kind = _KIND_PLAINTEXT
    raw = _retagged(_uncompressed(blob, max_bytes), kind, _local_minor())
    with _scratch_file() as path:
        path.write_bytes(raw)
        try:
            # SEAL's load checks metadata against the context before it allocates,
            # then checks the data (is_valid_for); objects made under other
            # parameters fail here.
            target.load(context, str(path))
        except (RuntimeError, ValueError) as exc:
            raise SerializationError(f"not a valid {type(target).__name__}: {exc}") from None


def load_ciphertext(context: seal.SEALContext, blob: bytes, max_bytes: int) -> seal.Ciphertext:
    """Load a Ciphertext valid for `context` from at most `max_bytes` (inflated) bytes."""
    ciphertext = seal.Ciphertext()
    _load(ciphertext, context, blob, max_bytes)
    return ciphertext


def load_galois_keys(context: seal.SEALContext, blob: bytes, max_bytes: int) -> seal.GaloisKeys:
    """Load GaloisKeys valid for `context` from at most `max_bytes` (inflated) bytes.

    A secret key, public key or ciphertext does not parse as key-switching keys and
    is refused here; relinearization keys parse but hold no Galois element, so the
    caller's coverage check refuses them.
    """
    keys = seal.GaloisKeys()
    _load(keys, context, blob, max_bytes)
    return keys


def canonical_galois_keys(blob: bytes, max_bytes: int) -> bytes:
    """GaloisKeys bytes in one canonical form: inflated (at most `max_bytes`) and tagged
    SEAL 4.1, whatever compression and SEAL 4.x tag they came with, so that one key
    set always hashes to the same key_id. Raises what `load_galois_keys` raises for
    bytes it cannot inflate."""
    return _retagged(_uncompressed(blob, max_bytes), _KIND_KSWITCH_KEYS, _WIRE_MINOR)


def load_secret_key(context: seal.SEALContext, blob: bytes, max_bytes: int) -> seal.SecretKey:
    """Load a SecretKey; used by the client only, from the user's own file."""
    key = seal.SecretKey()
    _load(key, context, blob, max_bytes)
    return key


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """SEAL's GaloisTool::get_elt_from_step for a CKKS rotate_vector step.

    Step 0 is SEAL's spelling of complex conjugation: Galois element 2N - 1.
    """
    slots = poly_modulus_degree // 2
    if step == 0:
        return 2 * poly_modulus_degree - 1
    if abs(step) >= slots:
        raise ValueError(f"rotation step {step} is out of range for {slots} slots")
    exponent = slots - abs(step) if step < 0 else step
    return pow(3, exponent, 2 * poly_modulus_degree)
