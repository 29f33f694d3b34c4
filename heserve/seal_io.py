"""SEAL objects to and from bytes, with every size bounded before SEAL sees it.

`tenseal.sealapi` only saves to and loads from file paths, so bytes pass through a
private temporary file (on a memory-backed filesystem where there is one). SEAL's
own loader inflates zlib/zstd payloads without an output limit, which would let a
few kilobytes of upload allocate gigabytes; so compressed payloads are inflated
here with a hard limit and handed to SEAL uncompressed.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import tenseal.sealapi as seal
import zstandard

_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr mode, reserved, size
_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
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
            with zstandard.ZstdDecompressor().stream_reader(body) as reader:
                body = reader.read(limit + 1)
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
    raw = _uncompressed(blob, max_bytes)
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


def load_secret_key(context: seal.SEALContext, blob: bytes, max_bytes: int) -> seal.SecretKey:
    """Load a SecretKey; used by the client only, from the user's own file."""
    key = seal.SecretKey()
    _load(key, context, blob, max_bytes)
    return key


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """SEAL's GaloisTool::get_elt_from_step for a CKKS rotate_vector step."""
    slots = poly_modulus_degree // 2
    if step == 0 or abs(step) >= slots:
        raise ValueError(f"rotation step {step} is out of range for {slots} slots")
    exponent = slots - abs(step) if step < 0 else step
    return pow(3, exponent, 2 * poly_modulus_degree)
