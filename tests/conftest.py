"""Shared fixtures: a real heserve server on loopback, and clients of it."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import KeyRetentionPolicy, Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.server import RunningServer, start_server
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client, SecretContext

# Several thousand items, more than the 4,096 slots (two real-slot responses, or one
# complex-slot response whose imaginary parts hold the items past 4,096), and a
# dimension that is not a power of two.
BOOKS_ITEMS = 5_000
BOOKS_DIMENSION = 100


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
    with Client(target) as session_client:
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
