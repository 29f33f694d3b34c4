"""Issue 10, finding 5 (files): the client's secret key file must not be written
through a planted symbolic link nor read while other users can read it, and the
server must not start on a TLS private key every local user can read."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import cli_env
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.pem import ExposedKeyFileError
from heserve.transport.server import TlsConfig
from heserve_client import SecretContext
from heserve_client._secret import ExposedSecretKeyError

# --- the client's secret key file --------------------------------------------------------


def test_the_secret_key_is_not_written_through_a_dangling_symlink(tmp_path: Path) -> None:
    target = tmp_path / "attacker" / "collected-key"  # where the planted link points
    target.parent.mkdir()
    link = tmp_path / "my.key"
    link.symlink_to(target)
    assert not link.exists()  # dangling: what the client checks before saving

    with pytest.raises(FileExistsError, match="a file or a link"):
        SecretContext(DEFAULT_PARAMETERS).save(link)

    assert not target.exists() and link.is_symlink()


def test_the_secret_key_never_overwrites_or_follows_an_existing_path(tmp_path: Path) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_text("mine\n")
    link = tmp_path / "linked.key"
    link.symlink_to(victim)

    for path in (victim, link):
        with pytest.raises(FileExistsError):
            SecretContext(DEFAULT_PARAMETERS).save(path)

    assert victim.read_text() == "mine\n"


def test_the_secret_key_file_is_owner_only_even_with_umask_000(tmp_path: Path) -> None:
    path = tmp_path / "k"
    old = os.umask(0)
    try:
        SecretContext(DEFAULT_PARAMETERS).save(path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert SecretContext.load(path).params == DEFAULT_PARAMETERS


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_secret_key_file_other_users_can_read_or_write_is_refused(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "k"
    SecretContext(DEFAULT_PARAMETERS).save(path)
    path.chmod(mode)

    with pytest.raises(ExposedSecretKeyError) as refused:
        SecretContext.load(path)

    assert f"mode {mode:04o}" in str(refused.value) and "chmod 600" in str(refused.value)
    path.chmod(0o600)
    assert SecretContext.load(path).params == DEFAULT_PARAMETERS
    path.chmod(0o400)  # read-only for its owner is fine too
    assert SecretContext.load(path).params == DEFAULT_PARAMETERS


# --- the server's TLS private key -----------------------------------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.pem", folder / "server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize("mode", [0o644, 0o666, 0o602])
def test_a_tls_private_key_every_user_can_read_or_write_is_refused(
    tmp_path: Path, mode: int
) -> None:
    cert, key = _self_signed(tmp_path)
    key.chmod(mode)

    with pytest.raises(ExposedKeyFileError, match="chmod 600"):
        TlsConfig.from_files(cert, key)

    for allowed in (0o600, 0o640):  # owner, or a group such as Debian's ssl-cert
        key.chmod(allowed)
        assert TlsConfig.from_files(cert, key).private_key.startswith(b"-----BEGIN ")


def test_heserve_serve_refuses_a_world_readable_tls_key_at_start_up(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    key.chmod(0o644)

    result = subprocess.run(
        [sys.executable, "-m", "heserve.ops.cli", "serve", "--port", "0",
         "--tls-cert", str(cert), "--tls-key", str(key)],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert result.returncode == 2
    assert result.stderr.startswith("heserve: error: ") and result.stderr.count("\n") == 1
    assert "every user can read" in result.stderr and "BEGIN" not in result.stderr
