"""Reading PEM files (certificates, keys) for TLS, on the server and in the client.

Both ends read paths an operator or an app developer names, so both bound the read
(a PEM file is a few kilobytes) and say which file is wrong, not what OpenSSL
made of it later. A private key that every user of the machine may read is no longer
private: `private=True` refuses such a file (group-readable stays allowed, as for
Debian's `ssl-cert` group).
"""

from __future__ import annotations

import os
import stat

MAX_PEM_BYTES = 1 << 20

# A PEM file's path, or its contents.
PemSource = str | os.PathLike[str] | bytes


class ExposedKeyFileError(PermissionError):
    """A private key file that other users of the machine can read or write."""


def read_pem(source: PemSource, *, private: bool = False) -> bytes:
    """The PEM bytes of `source` (returned as they are when already bytes).

    With `private`, a file that others (not owner, not group) may read or write is
    refused: its key may already be copied, and the operator should know now.
    """
    if isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode  # of the file read, not of a path re-resolved
            if private and mode & (stat.S_IROTH | stat.S_IWOTH):
                raise ExposedKeyFileError(
                    f"{os.fspath(source)} is a private key that every user can read or write "
                    f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {os.fspath(source)}"
                )
            data = file.read(MAX_PEM_BYTES + 1)
    except ExposedKeyFileError:
        raise
    except OSError as exc:
        raise OSError(f"cannot read {os.fspath(source)}: {exc.strerror}") from None
    if len(data) > MAX_PEM_BYTES or b"-----BEGIN " not in data:
        raise ValueError(f"{os.fspath(source)} is not a PEM file")
    return data
