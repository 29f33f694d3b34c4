"""Shared fixtures and helpers: a real heserve server on loopback, clients of it, and a
real SEAL key pair for the layer tests (protocol, he) that work below the client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
import pytest
import tenseal.sealapi as seal

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import KeyRetentionPolicy, Scorer
from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PARAMETERS, CkksParameters
from heserve.protocol.slots import ComplexArray, FloatArray, unpack_complex
from heserve.transport.server import RunningServer, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client, SecretContext

# Several thousand items, more than the 4,096 slots (two real-slot responses, or one
# complex-slot response whose imaginary parts hold the items past 4,096), and a
# dimension that is not a power of two.
BOOKS_ITEMS = 5_000
BOOKS_DIMENSION = 100
# Long enough for a scored catalog on a loaded 2-core machine; a hung call still fails.
TIMEOUT = 60.0
Metadata = Sequence[tuple[str, str]]

Slots = TypeVar("Slots", FloatArray, ComplexArray)


def rot(vector: Slots, steps: int) -> Slots:
    """CKKS rotate_vector by `steps` (positive = left), in numpy."""
    result: Slots = np.roll(vector, -steps)
    return result


class Keys:
    """A real key pair under the default parameters, and helpers to use it."""

    def __init__(self, params: CkksParameters = DEFAULT_PARAMETERS) -> None:
        self.params = params
        self.context = params.seal_context()
        self.generator = seal.KeyGenerator(self.context)
        self.secret_key = self.generator.secret_key()
        self.encoder = seal.CKKSEncoder(self.context)
        self.encryptor = seal.Encryptor(self.context, self.secret_key)
        self.decryptor = seal.Decryptor(self.context, self.secret_key)

    def encrypt(self, values: FloatArray) -> seal.Ciphertext:
        plaintext = seal.Plaintext()
        self.encoder.encode(values.tolist(), self.params.scale, plaintext)
        ciphertext = seal.Ciphertext()
        self.encryptor.encrypt_symmetric(plaintext, ciphertext)
        return ciphertext

    def decrypt(self, ciphertext: seal.Ciphertext) -> FloatArray:
        plaintext = seal.Plaintext()
        self.decryptor.decrypt(ciphertext, plaintext)
        return np.asarray(self.encoder.decode_double(plaintext), dtype=np.float64)

    def decrypt_complex(self, ciphertext: seal.Ciphertext) -> ComplexArray:
        plaintext = seal.Plaintext()
        self.decryptor.decrypt(ciphertext, plaintext)
        return np.asarray(self.encoder.decode_complex(plaintext), dtype=np.complex128)

    def galois_keys(self, steps: list[int]) -> seal.GaloisKeys:
        keys = seal.GaloisKeys()
        elements = [wire.galois_element(s, self.params.poly_modulus_degree) for s in steps]
        self.generator.create_galois_keys(elements, keys)
        return keys


def make_catalog(name: str, items: int, dimension: int, seed: int) -> Catalog:
    return Catalog(
        name, unit_rows(items, dimension, seed), tuple(f"{name}-{i}" for i in range(items))
    )


@pytest.fixture(scope="session")
def books() -> Catalog:
    return make_catalog("books", BOOKS_ITEMS, BOOKS_DIMENSION, seed=1)


@pytest.fixture(scope="session")
def films() -> Catalog:
    return make_catalog("films", 300, 32, seed=2)


@pytest.fixture(scope="session")
def scorer(books: Catalog, films: Catalog) -> Scorer:
    return Scorer(DEFAULT_PARAMETERS, [books, films], retention=KeyRetentionPolicy(ttl_seconds=600))


@pytest.fixture(scope="session")
def server(scorer: Scorer) -> Iterator[RunningServer]:
    running = start_server(scorer, "127.0.0.1", 0)
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="session")
def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
def client(target: str) -> Iterator[Client]:
    with Client(target, rerank_locally=False) as session_client:  # the server's re-ranking
        yield session_client


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[pb_grpc.ScoringServiceStub]:
    """A raw stub of the session server, for requests the client library would not send."""
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.ScoringServiceStub(channel)


@pytest.fixture(scope="module")
def secret() -> SecretContext:
    """A key pair under the default parameters, made once per module."""
    return SecretContext(DEFAULT_PARAMETERS)


@pytest.fixture
def user(books: Catalog) -> np.ndarray:
    vector: np.ndarray = unit_rows(1, books.dimension, seed=99)[0]
    return vector


@pytest.fixture
def servers() -> Iterator[list[RunningServer]]:
    """Servers a test starts itself (append them): stopped when the test ends."""
    running: list[RunningServer] = []
    yield running
    for server in running:
        server.stop(grace=None)


@contextmanager
def serving(scorer: Scorer, **options: Any) -> Iterator[RunningServer]:
    """A real server for `scorer` on a free loopback port, stopped on exit."""
    running = start_server(scorer, "127.0.0.1", 0, **options)
    try:
        yield running
    finally:
        running.stop(grace=None)


def key_chunks(blob: bytes, size: int = 1 << 20) -> Iterator[pb.RegisterKeysRequest]:
    """A RegisterKeys upload of `blob` in chunks of `size` bytes."""
    for start in range(0, len(blob), size):
        yield pb.RegisterKeysRequest(galois_keys_chunk=blob[start : start + size])


def register_keys(
    stub: pb_grpc.ScoringServiceStub, blob: bytes, size: int = 1 << 20, metadata: Metadata = ()
) -> str:
    """Upload serialized Galois keys through the raw stub; returns the key_id."""
    reply = stub.RegisterKeys(key_chunks(blob, size), timeout=TIMEOUT, metadata=metadata)
    return str(reply.key_id)


class ScoreDecryptor(Protocol):
    """What raw_scores needs of a key pair: heserve_client's SecretContext, or a test's own."""

    def decrypt(self, blob: bytes, max_bytes: int) -> FloatArray: ...

    def decrypt_complex(self, blob: bytes, max_bytes: int) -> ComplexArray: ...


def raw_scores(
    stub: pb_grpc.ScoringServiceStub,
    secret: ScoreDecryptor,
    request: pb.ScoreRequest,
    count: int,
    metadata: Metadata = (),
) -> FloatArray:
    """Score through the raw stub and decrypt each reply into its place (NaN where none came).

    Complex replies hold two scores per slot (`unpack_complex`), real ones one.
    """
    scores = np.full(count, np.nan)
    for reply in stub.Score(request, timeout=TIMEOUT, metadata=metadata):
        if request.complex_scores:
            values = unpack_complex(secret.decrypt_complex(reply.scores, 1 << 24), reply.count)
        else:
            values = secret.decrypt(reply.scores, 1 << 24)[: reply.count]
        scores[reply.offset : reply.offset + reply.count] = values
    return scores


def reap(processes: Iterable[subprocess.Popen[str]]) -> None:
    """Kill any of `processes` still running, wait for each, and close their stdout pipes."""
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def cli_env() -> dict[str, str]:
    """The environment for a `heserve` subprocess: no HESERVE_ settings leaking in from the
    caller's shell, and no PYTHONUNBUFFERED (stdout is a pipe, as under a supervisor)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HESERVE_")}
    env.pop("PYTHONUNBUFFERED", None)
    return env


def run_cli(cwd: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m heserve.ops.cli argv...` in `cwd` to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "heserve.ops.cli", *argv],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    """A loopback port free right now (for servers that cannot be told to pick one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
