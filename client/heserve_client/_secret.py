"""The client's half of the scheme: the secret key never leaves this object.

It makes the key pair under the server's parameters, the public Galois keys to
upload, encrypts queries and decrypts scores. It can be saved to a file the user
names, so one key pair serves across runs. The file is made new, owner-only, and never
through a symbolic link (one planted at the path, dangling or not, would otherwise
send the secret key wherever it points); a file that other users can read is refused
on loading, as ssh refuses such a private key.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

from heserve.protocol import wire
from heserve.protocol.params import CkksParameters

_FILE_MAGIC = b"HESERVE-SECRET-CONTEXT-1\n"
_MAX_SECRET_FILE_BYTES = 64 << 20
# A new file only (O_EXCL: nothing at the path, not even a dangling symlink), not
# through a symlink in the last component (O_NOFOLLOW), and owner-only from the start.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


class ExposedSecretKeyError(PermissionError):
    """A secret key file that users other than its owner can read or write."""


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
        """Write parameters and secret key to a new file at `path`, readable by the owner
        only; FileExistsError if anything (a file, a symlink) is already there."""
        header = json.dumps(
            {
                "poly_modulus_degree": self.params.poly_modulus_degree,
                "coeff_modulus_bits": list(self.params.coeff_modulus_bits),
                "scale_bits": self.params.scale_bits,
                "catalog_scale_bits": self.params.catalog_scale_bits,
            }
        ).encode()
        key = wire.to_bytes(self._secret_key)
        try:
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            raise FileExistsError(
                f"{os.fspath(path)} already exists (a file or a link): the secret key is "
                "written to a new file only; remove it or choose another path"
            ) from None
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)  # whatever the umask made of the mode
            out.write(_FILE_MAGIC + struct.pack("<I", len(header)) + header + key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SecretContext:
        """Read a context written by `save`; refuse a file other users can read or write."""
        with open(path, "rb") as file:
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)  # of the file opened
            data = file.read(_MAX_SECRET_FILE_BYTES + 1)
        if len(data) > _MAX_SECRET_FILE_BYTES or not data.startswith(_FILE_MAGIC):
            raise ValueError(f"{path} is not a heserve secret context file")
        if mode & 0o077:
            raise ExposedSecretKeyError(
                f"{os.fspath(path)} holds a secret key but other users may read or write it "
                f"(mode {mode:04o}); run: chmod 600 {os.fspath(path)}"
            )
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
