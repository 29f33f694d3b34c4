"""The client's half of the scheme: the secret key never leaves this object.

It makes the key pair under the server's parameters, the public Galois keys to
upload, encrypts queries and decrypts scores. It can be saved to a file the user
names (owner-only permissions), so one key pair serves across runs.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

from heserve.protocol import wire
from heserve.protocol.params import CkksParameters

_FILE_MAGIC = b"HESERVE-SECRET-CONTEXT-1\n"
_MAX_SECRET_FILE_BYTES = 64 << 20


class SecretContext:
    """A CKKS key pair under given parameters; holds the secret key in memory only."""

    def __init__(self, params: CkksParameters, secret_key: seal.SecretKey | None = None) -> None:
        self.params = params
        self._context = params.seal_context()
        generator = (
            seal.KeyGenerator(self._context)
            if secret_key is None
            else seal.KeyGenerator(self._context, secret_key)
        )
        self._generator = generator
        self._secret_key = generator.secret_key()
        self._encryptor = seal.Encryptor(self._context, self._secret_key)
        self._decryptor = seal.Decryptor(self._context, self._secret_key)
        self._encoder = seal.CKKSEncoder(self._context)

    def galois_keys(self, steps: Sequence[int]) -> bytes:
        """Serialized public Galois keys for exactly these rotation steps (seeded: half size)."""
        n = self.params.poly_modulus_degree
        elements = sorted({wire.galois_element(step, n) for step in steps})
        keys = self._generator.create_galois_keys(elements)
        return wire.zstd_compressed(wire.galois_keys_to_wire(wire.to_bytes(keys)))

    def encrypt(self, slots: npt.NDArray[np.float64]) -> bytes:
        """Encrypt a full slot vector at the top level; seeded symmetric encryption halves it."""
        plaintext = seal.Plaintext()
        self._encoder.encode(slots.tolist(), self.params.scale, plaintext)
        ciphertext = self._encryptor.encrypt_symmetric(plaintext)
        return wire.zstd_compressed(wire.ciphertext_to_wire(wire.to_bytes(ciphertext)))

    def decrypt(self, blob: bytes, max_bytes: int) -> npt.NDArray[np.float64]:
        """Decrypt and decode a score ciphertext into its slots' real parts."""
        return self.decrypt_complex(blob, max_bytes).real.copy()

    def decrypt_complex(self, blob: bytes, max_bytes: int) -> npt.NDArray[np.complex128]:
        """Decrypt and decode a score ciphertext into its complex slot values."""
        ciphertext = wire.load_ciphertext(self._context, blob, max_bytes)
        plaintext = seal.Plaintext()
        self._decryptor.decrypt(ciphertext, plaintext)
        return np.asarray(self._encoder.decode_complex(plaintext), dtype=np.complex128)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write parameters and secret key to `path`, readable by the owner only."""
        header = json.dumps(
            {
                "poly_modulus_degree": self.params.poly_modulus_degree,
                "coeff_modulus_bits": list(self.params.coeff_modulus_bits),
                "scale_bits": self.params.scale_bits,
                "catalog_scale_bits": self.params.catalog_scale_bits,
            }
        ).encode()
        key = wire.to_bytes(self._secret_key)
        target = Path(path)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(_FILE_MAGIC + struct.pack("<I", len(header)) + header + key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SecretContext:
        """Read a context written by `save`."""
        data = Path(path).read_bytes()
        if len(data) > _MAX_SECRET_FILE_BYTES or not data.startswith(_FILE_MAGIC):
            raise ValueError(f"{path} is not a heserve secret context file")
        offset = len(_FILE_MAGIC)
        (header_len,) = struct.unpack_from("<I", data, offset)
        offset += 4
        fields = json.loads(data[offset : offset + header_len])
        params = CkksParameters(
            poly_modulus_degree=int(fields["poly_modulus_degree"]),
            coeff_modulus_bits=tuple(int(b) for b in fields["coeff_modulus_bits"]),
            scale_bits=int(fields["scale_bits"]),
            catalog_scale_bits=int(fields["catalog_scale_bits"]),
        )
        secret_key = wire.load_secret_key(
            params.seal_context(), data[offset + header_len :], _MAX_SECRET_FILE_BYTES
        )
        return cls(params, secret_key)
