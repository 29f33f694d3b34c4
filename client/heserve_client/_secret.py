"""The client's half of the scheme: the secret key never leaves this object.

It makes the key pair under the server's parameters, the public Galois keys to
upload, encrypts queries and decrypts scores. It can be saved to a file the user
names, so one key pair serves across runs. The file is made new, owner-only, and never
through a symbolic link (one planted at the path, dangling or not, would otherwise
send the secret key wherever it points); a file that other users can read is refused
on loading, as ssh refuses such a private key.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import tenseal.sealapi as seal

from heserve.protocol import limbs, wire
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
        self._evaluator = seal.Evaluator(self._context)
        n = params.poly_modulus_degree
        # Slot j of SEAL's CKKS layout is the polynomial evaluated at the primitive
        # 2N-th root of unity exp(i·pi·3^j / N): decoding is sampling an FFT there.
        self._slot_roots = np.array([pow(3, j, 2 * n) for j in range(n // 2)])

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
        with contextlib.suppress(limbs.LayoutError):
            return self._decode_one_prime(plaintext, ciphertext)
        return np.asarray(self._encoder.decode_complex(plaintext), dtype=np.complex128)

    def _decode_one_prime(
        self, plaintext: seal.Plaintext, ciphertext: seal.Ciphertext
    ) -> npt.NDArray[np.complex128]:
        """SEAL's CKKS decode for a plaintext at one prime, in numpy: SEAL's own
        `decode_complex` hands back 4,096 Python complex numbers one by one (~0.6 ms of
        the ~1 ms a response costs). The plaintext's residues are taken back to
        coefficient form by SEAL's inverse NTT (through the ciphertext it came from,
        which is at the same level and in NTT form), lifted to signed integers, and
        evaluated at the slots' roots of unity with one real FFT. Results at more than
        one prime go to SEAL's decode (a CRT lift in floating point would lose bits)."""
        n = self.params.poly_modulus_degree
        residues = limbs.plaintext_limbs(plaintext, n)
        if residues.shape[0] != 1 or ciphertext.coeff_modulus_size() != 1:
            raise limbs.LayoutError("more than one prime: SEAL's decode")
        modulus = self._context.get_context_data(plaintext.parms_id()).parms().coeff_modulus()
        q = modulus[0].value()
        polys = limbs.ciphertext_limbs(ciphertext)
        polys[0, 0] = residues[0]  # the ciphertext is spent: its first poly carries p now
        self._evaluator.transform_from_ntt_inplace(ciphertext)
        coefficients = limbs.ciphertext_limbs(ciphertext)[0, 0]
        signed = coefficients.astype(np.float64)
        signed[coefficients > q // 2] -= float(q)
        # p(exp(i·pi·m/N)) for every m in [0, 2N): the conjugate of a real FFT of p
        spectrum = np.conj(np.fft.rfft(signed, 2 * n))  # m = 0 .. N
        roots = self._slot_roots
        upper = roots > n
        values = np.empty(roots.shape[0], dtype=np.complex128)
        values[~upper] = spectrum[roots[~upper]]
        values[upper] = np.conj(spectrum[2 * n - roots[upper]])
        result: npt.NDArray[np.complex128] = values / plaintext.scale
        return result

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
