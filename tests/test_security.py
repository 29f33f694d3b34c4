"""TLS, mutual TLS, API tokens, key ownership and query budgets, against real servers on
loopback with certificates made here; and a full session whose DEBUG logs are searched
for any trace of the keys, queries, scores or user vector that crossed the wire.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from conftest import (
    TIMEOUT,
    cli_env,
    free_port,
    raw_scores,
    reap,
    register_keys,
    run_cli,
    serving,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots
from heserve.transport.auth import Authenticator, QueryBudget, TokenError, owner_tag, parse_tokens
from heserve.transport.server import TlsConfig
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import (
    Client,
    HeserveError,
    LimitExceededError,
    NotFoundError,
    SecretContext,
    ServerUnavailableError,
)

ITEMS, DIMENSION = 500, 16


# --- certificates --------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM bytes of a test CA, a server and client certificate it signed, and a rogue
    client certificate from another CA; `files` has each written to disk."""

    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    rogue_cert: bytes
    rogue_key: bytes
    files: dict[str, Path]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], common_name: str, server: bool
) -> tuple[bytes, bytes]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = _ca("heserve test CA")
    server_cert, server_key = _issue(ca, "heserve test server", server=True)
    client_cert, client_key = _issue(ca, "heserve test client", server=False)
    rogue_cert, rogue_key = _issue(_ca("some other CA"), "rogue client", server=False)
    ca_pem = ca[0].public_bytes(serialization.Encoding.PEM)
    folder = tmp_path_factory.mktemp("pki")
    pems = {
        "ca.pem": ca_pem,
        "server.pem": server_cert,
        "server-key.pem": server_key,
        "client.pem": client_cert,
        "client-key.pem": client_key,
    }
    files = {}
    for name, data in pems.items():
        (folder / name).write_bytes(data)
        if name.endswith("-key.pem"):
            (folder / name).chmod(0o600)  # the server refuses a key every user can read
        files[name] = folder / name
    return Pki(
        ca_pem, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key, files
    )


# --- servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop() -> Catalog:
    return Catalog("shop", unit_rows(ITEMS, DIMENSION, 41), tuple(f"sku-{i}" for i in range(ITEMS)))


@pytest.fixture(scope="module")
def shop_scorer(shop: Catalog) -> Scorer:
    return Scorer(DEFAULT_PARAMETERS, [shop])


@pytest.fixture
def user() -> np.ndarray:
    vector: np.ndarray = unit_rows(1, DIMENSION, seed=42)[0]
    return vector


@pytest.fixture
def serve(shop_scorer: Scorer) -> Iterator[Callable[..., str]]:
    """Start servers for the shop catalog with the given options; returns their target."""
    with ExitStack() as running:

        def start(**options: Any) -> str:
            server = running.enter_context(serving(shop_scorer, **options))
            return f"127.0.0.1:{server.port}"

        yield start


def _token() -> str:
    return secrets.token_urlsafe(32)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert isinstance(error, grpc.Call)
    return error.code()


def _drain(method: Callable[..., Iterator[Any]], *args: Any, **kwargs: Any) -> list[Any]:
    return list(method(*args, **kwargs))


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --- TLS -------------------------------------------------------------------------------


def test_tls_client_works_and_plaintext_or_untrusting_clients_fail(
    serve: Callable[..., str], pki: Pki, shop: Catalog, user: np.ndarray
) -> None:
    target = serve(tls=TlsConfig(pki.server_cert, pki.server_key))

    with Client(target, tls_ca=pki.files["ca.pem"]) as client:
        scores = client.score(user, catalog="shop")
    np.testing.assert_allclose(scores, shop.embeddings @ user, atol=1e-4)
    # the name in the certificate, not the address dialled
    with Client(target, tls_ca=pki.ca, tls_server_name="localhost") as client:
        assert client.catalogs()[0].name == "shop"

    with pytest.raises(ServerUnavailableError):
        Client(target, timeout=10)  # plaintext to a TLS port
    with pytest.raises(ServerUnavailableError):
        Client(target, tls=True, timeout=10)  # the system's CAs did not sign this server


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    serve: Callable[..., str], pki: Pki, shop: Catalog, user: np.ndarray
) -> None:
    target = serve(tls=TlsConfig(pki.server_cert, pki.server_key, client_ca=pki.ca))

    with Client(
        target,
        tls_ca=pki.files["ca.pem"],
        tls_cert=pki.files["client.pem"],
        tls_key=pki.files["client-key.pem"],
    ) as client:
        top = client.recommend(user, catalog="shop", k=3)
    assert [item for item, _ in top] == [
        shop.ids[i] for i in np.argsort(-(shop.embeddings @ user), kind="stable")[:3]
    ]

    with pytest.raises(ServerUnavailableError):
        Client(target, tls_ca=pki.ca, timeout=10)  # no client certificate
    with pytest.raises(ServerUnavailableError):
        Client(target, tls_ca=pki.ca, tls_cert=pki.rogue_cert, tls_key=pki.rogue_key, timeout=10)
    with pytest.raises(ServerUnavailableError):
        Client(target, timeout=10)  # plaintext


# --- tokens ----------------------------------------------------------------------------


def test_every_call_but_health_needs_a_known_token(
    serve: Callable[..., str], shop: Catalog, user: np.ndarray
) -> None:
    alice = _token()
    target = serve(authenticator=Authenticator([("alice", alice)]))

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        info = pb.GetServerInfoRequest()
        assert _code(lambda: stub.GetServerInfo(info, timeout=TIMEOUT)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        for wrong in (_token(), alice + "x", alice[:-1], ""):
            call = functools.partial(
                stub.GetServerInfo, info, timeout=TIMEOUT, metadata=_bearer(wrong)
            )
            assert _code(call) == grpc.StatusCode.UNAUTHENTICATED
        basic = (("authorization", f"Basic {alice}"),)
        assert _code(lambda: stub.GetServerInfo(info, timeout=TIMEOUT, metadata=basic)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        chunks = iter([pb.RegisterKeysRequest(galois_keys_chunk=b"x" * 100)])
        assert _code(lambda: stub.RegisterKeys(chunks, timeout=TIMEOUT)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        score = pb.ScoreRequest(key_id="k", catalog="shop", query=b"q")
        assert _code(lambda: list(stub.Score(score, timeout=TIMEOUT))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListCatalogs(pb.ListCatalogsRequest(), timeout=TIMEOUT)
        assert alice not in str(caught.value)

        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        assert stub.GetServerInfo(info, timeout=TIMEOUT, metadata=_bearer(alice)).ckks.slot_count

    with pytest.raises(HeserveError) as refused:
        Client(target)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(target, token=alice, rerank_locally=False) as client:
        scores = client.score(user, catalog="shop")
    np.testing.assert_allclose(scores, shop.embeddings @ user, atol=1e-4)


def test_keys_belong_to_the_token_that_registered_them(
    serve: Callable[..., str], shop: Catalog, user: np.ndarray
) -> None:
    alice, bob = _token(), _token()
    target = serve(authenticator=Authenticator([("alice", alice), ("bob", bob)]))
    party = SecretContext(DEFAULT_PARAMETERS)

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        steps = stub.GetServerInfo(
            pb.GetServerInfoRequest(), timeout=TIMEOUT, metadata=_bearer(alice)
        ).ckks.galois_steps
        blob = party.galois_keys(list(steps))
        query = party.encrypt(query_slots(user, DIMENSION, DEFAULT_PARAMETERS.slot_count))

        alices = register_keys(stub, blob, metadata=_bearer(alice))
        bobs = register_keys(stub, blob, metadata=_bearer(bob))  # the very same bytes
        assert alices != bobs
        assert alices.endswith(owner_tag("alice")) and bobs.endswith(owner_tag("bob"))
        assert register_keys(stub, blob, metadata=_bearer(alice)) == alices  # idempotent per owner

        def score(key_id: str, token: str) -> np.ndarray:
            request = pb.ScoreRequest(key_id=key_id, catalog="shop", query=query)
            return raw_scores(stub, party, request, ITEMS, metadata=_bearer(token))

        def delete(key_id: str, token: str) -> bool:
            request = pb.DeleteKeysRequest(key_id=key_id)
            return bool(stub.DeleteKeys(request, timeout=TIMEOUT, metadata=_bearer(token)).deleted)

        denied = grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: score(alices, bob)) == denied
        assert _code(lambda: delete(alices, bob)) == denied
        assert _code(lambda: score("0" * 32, bob)) == denied  # an id without bob's tag
        np.testing.assert_allclose(score(alices, alice), shop.embeddings @ user, atol=1e-4)

        assert delete(bobs, bob)  # bob's erasure leaves alice's entry alone
        np.testing.assert_allclose(score(alices, alice), shop.embeddings @ user, atol=1e-4)
        assert _code(lambda: score(bobs, bob)) == grpc.StatusCode.NOT_FOUND
        assert delete(alices, alice)
        assert not delete(alices, alice)


def test_query_budget_is_per_token(
    serve: Callable[..., str], shop: Catalog, user: np.ndarray
) -> None:
    alice, bob = _token(), _token()
    target = serve(
        authenticator=Authenticator([("alice", alice), ("bob", bob)]),
        query_budget=QueryBudget(2, window_seconds=3600),
    )

    with Client(target, token=alice, rerank_locally=False) as client:
        client.score(user, catalog="shop")
        client.score(user, catalog="shop", item_ids=["sku-3", "sku-1"])
        with pytest.raises(LimitExceededError) as spent:
            client.score(user, catalog="shop")
        assert spent.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "budget" in str(spent.value)
        assert client.catalogs()[0].name == "shop"  # only Score is charged
    with Client(target, token=bob) as client:
        np.testing.assert_allclose(
            client.score(user, catalog="shop"), shop.embeddings @ user, atol=1e-4
        )


def test_query_budget_renews_each_window() -> None:
    now = [1000.0]
    budget = QueryBudget(2, window_seconds=60, clock=lambda: now[0])

    assert budget.charge("a") is None
    assert budget.charge("a") is None
    assert budget.charge("a") == pytest.approx(60)
    assert budget.charge("b") is None
    now[0] += 45
    assert budget.charge("a") == pytest.approx(15)
    now[0] += 15
    assert budget.charge("a") is None


def test_tokens_file_and_variable(tmp_path: Path) -> None:
    alice, bob, carol = _token(), _token(), _token()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# team tokens\nalice:{alice}\n\n{bob}\n")

    auth = Authenticator.load(tokens, f"carol:{carol}")

    assert auth is not None and len(auth) == 3
    assert auth.authenticate({"authorization": f"Bearer {alice}"}) == auth.authenticate(
        {"authorization": f"bearer {alice}"}
    )  # the scheme in any case (RFC 7235); other spacing: tests/test_security_tokens.py
    found = auth.authenticate({"authorization": f"Bearer {alice}"})
    assert found is not None and found.name == "alice"
    found = auth.authenticate({"authorization": f"Bearer {bob}"})
    assert found is not None and found.name.startswith("token-") and bob not in found.name
    found = auth.authenticate({"authorization": f"Bearer {carol}"})
    assert found is not None and found.name == "carol"
    assert auth.authenticate({"authorization": f"Bearer {alice[:-1]}"}) is None
    assert auth.authenticate({}) is None
    # two tokens under one name (a rotation) are one caller, owning the same keys
    rotated = Authenticator(parse_tokens(f"alice:{alice}\nalice:{bob}", "test"))
    assert rotated.authenticate({"authorization": f"Bearer {alice}"}) == rotated.authenticate(
        {"authorization": f"Bearer {bob}"}
    )
    assert Authenticator.load(None, None) is None
    assert Authenticator.load(None, "") is None


@pytest.mark.parametrize(
    "text",
    [
        "short",  # too short to be a secret
        "alice:has a space in it ok",
        "al ice:" + "x" * 32,  # bad name
        "alice:" + "x" * 32 + "\nalice2:" + "x" * 32,  # the same token twice
        "# only a comment\n",
    ],
)
def test_bad_tokens_are_refused(text: str) -> None:
    with pytest.raises(TokenError):
        Authenticator(parse_tokens(text, "test"))


# --- the CLI ---------------------------------------------------------------------------


@dataclass
class Served:
    process: subprocess.Popen[str]
    target: str
    log: Path


@pytest.fixture
def cli_servers() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    reap(served.process for served in started)


def _serve_cli(
    tmp_path: Path, started: list[Served], *args: str, env: dict[str, str] | None = None
) -> Served:
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "heserve.ops.cli", "serve", "--port", "0", *args],
            cwd=tmp_path,
            env=env or cli_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    served = Served(process, "", log)
    started.append(served)
    assert process.stdout is not None
    line = process.stdout.readline()  # the serving line, or "" if it exits first
    match = re.match(r"^heserve \S+ serving \d+ catalog\(s\) on ([\d.]+):(\d+) ", line)
    assert match, f"unexpected first line {line!r}; log:\n{log.read_text()}"
    served.target = f"{match[1]}:{match[2]}"
    return served


def _recommend(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(tmp_path, "recommend", *args, timeout=180)


def test_cli_serves_mutual_tls_with_tokens_and_recommend_uses_them(
    tmp_path: Path, pki: Pki, cli_servers: list[Served], shop: Catalog, user: np.ndarray
) -> None:
    np.save(tmp_path / "shop.npy", shop.embeddings)
    np.save(tmp_path / "u.npy", user)
    token = _token()
    (tmp_path / "tokens.txt").write_text(f"alice:{token}\n")
    (tmp_path / "alice.token").write_text(f"{token}\n")
    files = {name: str(path) for name, path in pki.files.items()}
    served = _serve_cli(
        tmp_path,
        cli_servers,
        "--catalog", "shop=shop.npy", "--workers", "0",
        "--tls-cert", files["server.pem"], "--tls-key", files["server-key.pem"],
        "--tls-client-ca", files["ca.pem"], "--tokens-file", "tokens.txt",
    )  # fmt: skip
    tls = [
        "--tls-ca", files["ca.pem"], "--tls-cert", files["client.pem"],
        "--tls-key", files["client-key.pem"],
    ]  # fmt: skip
    base = ["--server", served.target, "--catalog", "shop", "--vector", "u.npy", "-k", "3"]

    result = _recommend(tmp_path, *base, *tls, "--token-file", "alice.token")

    assert result.returncode == 0, result.stderr
    expected = [str(i) for i in np.argsort(-(shop.embeddings @ user), kind="stable")[:3]]
    assert [line.split()[1] for line in result.stdout.splitlines()] == expected

    no_token = _recommend(tmp_path, *base, *tls)
    assert no_token.returncode == 1  # the command ran and was refused
    assert no_token.stderr.startswith("heserve: error: UNAUTHENTICATED")
    assert token not in no_token.stderr
    no_cert = _recommend(
        tmp_path, *base, "--tls-ca", files["ca.pem"], "--token-file", "alice.token"
    )
    assert no_cert.returncode == 75  # EX_TEMPFAIL: the server could not be reached
    assert "UNAVAILABLE" in no_cert.stderr

    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0
    assert token not in served.log.read_text()


# --- nothing secret in the logs ----------------------------------------------------------


if TYPE_CHECKING:  # generic in grpc-stubs only
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.StreamUnaryClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _StreamUnary = grpc.StreamUnaryClientInterceptor


class _Recorder(_UnaryUnary, _UnaryStream, _StreamUnary):
    """Keeps every key, query and score payload that crosses the channel."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self._key = bytearray()

    def _keep(self, message: Any) -> Any:
        if isinstance(message, pb.RegisterKeysRequest):
            self._key += message.galois_keys_chunk
        elif isinstance(message, pb.ScoreRequest):
            self.payloads.append(message.query)
        elif isinstance(message, pb.ScoreResponse):
            self.payloads.append(message.scores)
        return message

    def key_done(self) -> None:
        if self._key:
            self.payloads.append(bytes(self._key))
            self._key = bytearray()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, self._keep(request))

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        call = continuation(details, self._keep(request))
        return (self._keep(reply) for reply in call)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        self.key_done()
        response = continuation(details, (self._keep(r) for r in requests))
        self.key_done()
        return response


@functools.lru_cache(maxsize=8)
def _windows(text: str, size: int) -> set[str]:
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def _leaks(log: str, blob: bytes) -> list[str]:
    """The forms in which some 32-byte piece of `blob` (30 for base64, whose 4-character
    groups must align; 16 for Python's bytes escapes) appears in `log`."""
    found = []
    lower = log.lower()
    hex_windows = _windows(lower, 64)
    text = blob.hex()
    if any(text[o : o + 64] in hex_windows for o in range(0, len(text) - 63, 2)):
        found.append("hex")
    b64_windows = _windows(log, 40)
    for shift in range(3):
        encoded = base64.b64encode(blob[shift:]).decode()
        for variant in (encoded, encoded.replace("+", "-").replace("/", "_")):
            if any(variant[o : o + 40] in b64_windows for o in range(0, len(variant) - 39, 4)):
                found.append("base64")
    raw_windows = _windows(log, 32)
    latin = blob.decode("latin-1")
    if any(latin[o : o + 32] in raw_windows for o in range(len(latin) - 31)):
        found.append("raw")
    escapes = [repr(bytes([b]))[2:-1] for b in range(256)]
    escape_windows = _windows(log, 48)
    escaped = "".join(escapes[b] for b in blob)
    starts = np.cumsum([0] + [len(escapes[b]) for b in blob])
    if any(escaped[s : s + 48] in escape_windows for s in starts[:-1]):
        found.append("escaped")
    return found


def _float_forms(vector: np.ndarray) -> set[str]:
    forms = set()
    for value in np.abs(vector):
        forms |= {repr(float(value)), f"{value:.6f}", f"{value:.8f}", f"{value:.10f}"}
        forms |= {f"{value:.17g}", f"{value:.6e}", f"{value:.5e}"}
    return forms


def test_full_session_logs_at_debug_hold_no_keys_queries_scores_or_vectors(
    tmp_path: Path, cli_servers: list[Served], shop: Catalog, user: np.ndarray
) -> None:
    np.save(tmp_path / "shop.npy", shop.embeddings)
    alice, bob = _token(), _token()
    (tmp_path / "tokens.txt").write_text(f"alice:{alice}\nbob:{bob}\n")
    metrics_port = free_port()
    served = _serve_cli(
        tmp_path,
        cli_servers,
        "--catalog", "shop=shop.npy", "--workers", "1", "--tokens-file", "tokens.txt",
        "--query-budget", "4", "--log-level", "DEBUG", "--log-format", "json",
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    recorder = _Recorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(served.target), recorder)

    with Client(served.target, token=alice, channel=channel, rerank_locally=False) as client:
        key_id = client.register_keys()
        client.score(user, catalog="shop")  # budget 1
        client.score(user, catalog="shop", item_ids=["7", "2", "400"])  # 2 (row numbers)
        with pytest.raises(NotFoundError):
            client.score(user, catalog="shop", item_ids=["7", "no-such-item"])  # 3
        query = recorder.payloads[1]
        # The client's keys hold no conjugation key: ask for complex scores as it does,
        # so that each refusal below is for the reason its name gives.
        ask = functools.partial(pb.ScoreRequest, key_id=key_id, complex_scores=True)
        with grpc.insecure_channel(served.target) as plain:
            stub = pb_grpc.ScoringServiceStub(plain)
            refusals = {
                "bob with alice's key": (bob, ask(query=query)),
                "no token": ("", ask(catalog="shop", query=query)),
                "scores as a query": (  # a real ciphertext, one level too low
                    alice,
                    ask(catalog="shop", query=recorder.payloads[2]),
                ),  # 4
                "past the budget": (alice, ask(catalog="shop", query=query)),
            }
            codes = {}
            for case, (token, request) in refusals.items():
                metadata = _bearer(token) if token else ()
                call = functools.partial(
                    _drain, stub.Score, request, timeout=TIMEOUT, metadata=metadata
                )
                codes[case] = _code(call).name
            delete = pb.DeleteKeysRequest(key_id=key_id)
            codes["bob deletes"] = _code(
                lambda: stub.DeleteKeys(delete, timeout=TIMEOUT, metadata=_bearer(bob))
            ).name
        assert codes == {
            "bob with alice's key": "PERMISSION_DENIED",
            "no token": "UNAUTHENTICATED",
            "scores as a query": "INVALID_ARGUMENT",
            "past the budget": "RESOURCE_EXHAUSTED",
            "bob deletes": "PERMISSION_DENIED",
        }
    # close() asked the server to erase alice's keys

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        metrics = response.read().decode()
    assert re.search(r"heserve_keys_held(\{\})? 0\.0", metrics)
    for code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT", "NOT_FOUND"):
        assert f'code="{code}"' in metrics, code

    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0
    log = served.log.read_text()

    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(lines) > 10 and any(line["level"] == "DEBUG" for line in lines)
    access = [line for line in lines if line["logger"] == "heserve.access" and "code" in line]
    assert {line["code"] for line in access} >= {
        "OK", "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED", "NOT_FOUND",
    }  # fmt: skip
    assert all(re.fullmatch(r"[0-9a-f]{32}", line["request_id"]) for line in access)
    # every call the client made carried a deadline
    assert all(line["deadline_ms"] for line in access if line["caller"] == "alice")
    # the JSON values, unescaped, as well as the lines as written
    decoded = "\n".join(" ".join(str(value) for value in line.values()) for line in lines)
    payloads = recorder.payloads
    assert len(payloads) >= 5 and all(len(p) > 1000 for p in payloads)
    for text in (log, decoded):
        for index, blob in enumerate(payloads):
            assert not _leaks(text, blob), f"payload {index} is in the log: {_leaks(text, blob)}"
        found = [form for form in _float_forms(user) if form in text]
        assert not found, f"the user vector is in the log: {found}"
    for secret in (alice, bob):
        assert secret not in log


def test_leak_detector_finds_every_form() -> None:
    blob = secrets.token_bytes(4096)
    piece = blob[1001:1037]  # 36 bytes at an offset that is not a multiple of 3
    for text in (
        piece.hex(),
        piece.hex().upper(),
        base64.b64encode(piece).decode(),
        base64.urlsafe_b64encode(blob[500:1500]).decode(),
        repr(piece),
        piece.decode("latin-1"),
    ):
        assert _leaks(f"msg=ok {text} end", blob), text
    assert not _leaks("level=INFO msg=" + secrets.token_bytes(64).hex(), blob)
    assert _float_forms(np.array([0.123456789])) & {"0.123457", "0.123456789"}
