"""Reading PEM files (certificates, keys) for TLS, on the server and in the client.

Both ends read paths an operator or an app developer names, so both bound the read
(a PEM file is a few kilobytes) and say which file is wrong, not what OpenSSL
made of it later.
"""

from __future__ import annotations

import os

MAX_PEM_BYTES = 1 << 20

# A PEM file's path, or its contents.
PemSource = str | os.PathLike[str] | bytes


def read_pem(source: PemSource) -> bytes:
    """The PEM bytes of `source` (returned as they are when already bytes)."""
    if isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise OSError(f"cannot read {os.fspath(source)}: {exc.strerror}") from None
    if len(data) > MAX_PEM_BYTES or b"-----BEGIN " not in data:
        raise ValueError(f"{os.fspath(source)} is not a PEM file")
    return data
