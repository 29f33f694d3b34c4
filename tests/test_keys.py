"""Key lifecycle: erasure, expiry, eviction, transparent re-registration, key files.

Server-side behaviour is checked on real servers on loopback with real SEAL keys;
the KeyStore's bookkeeping (idle TTL, LRU by count and by bytes) is checked in
isolation. Time is a fake clock everywhere, the servers' key TTLs included, so no
test depends on timing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tenseal.sealapi as seal
from conftest import raw_scores, register_keys
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.keystore import KeyStore, KeyTooLargeError
from heserve.domain.scorer import KeyRetentionPolicy, Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.reasons import KEY_NOT_FOUND
from heserve.protocol.slots import query_slots
from heserve.transport.server import RunningServer, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client, ParameterMismatchError, SecretContext

FloatArray = npt.NDArray[np.float64]
TIMEOUT = 60.0
# Valid 128-bit parameters that are not the server's: one more data prime.
OTHER_PARAMETERS = replace(DEFAULT_PARAMETERS, coeff_modulus_bits=(60, 40, 40, 60))


# --- helpers -------------------------------------------------------------------------


class FakeClock:
    """Time that passes only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    assert isinstance(error, grpc.Call)
    return error.code()


def error_reasons(error: grpc.RpcError) -> list[str]:
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    reasons = []
    for detail in [] if status is None else status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reasons.append(info.reason)
    return reasons


def galois_steps(stub: pb_grpc.ScoringServiceStub) -> list[int]:
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
    return list(info.ckks.galois_steps)


def score_request(
    secret: SecretContext,
    key_id: str,
    catalog: Catalog,
    vector: FloatArray,
    complex_scores: bool = False,
) -> pb.ScoreRequest:
    """complex_scores=True for keys without the conjugation key (as the Client uploads)."""
    slots = query_slots(vector, catalog.dimension, secret.params.slot_count)
    return pb.ScoreRequest(
        key_id=key_id,
        catalog=catalog.name,
        query=secret.encrypt(slots),
        complex_scores=complex_scores,
    )


def score_error(stub: pb_grpc.ScoringServiceStub, request: pb.ScoreRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Score(request, timeout=TIMEOUT))
    return info.value


def max_error(scores: FloatArray, catalog: Catalog, vector: FloatArray) -> float:
    return float(np.abs(scores - catalog.embeddings @ vector).max())


@pytest.fixture
def films_user(films: Catalog) -> FloatArray:
    vector: FloatArray = unit_rows(1, films.dimension, seed=11)[0]
    return vector


def serve(scorer: Scorer) -> RunningServer:
    return start_server(scorer, "127.0.0.1", 0)


# --- DeleteKeys ----------------------------------------------------------------------


def test_delete_keys_forgets_the_key(
    stub: pb_grpc.ScoringServiceStub,
    scorer: Scorer,
    secret: SecretContext,
    films: Catalog,
    films_user: FloatArray,
) -> None:
    before = len(scorer.keys)
    key_id = register_keys(stub, secret.galois_keys(galois_steps(stub)))
    assert len(scorer.keys) == before + 1
    request = score_request(secret, key_id, films, films_user)
    assert max_error(raw_scores(stub, secret, request, films.item_count), films, films_user) < 1e-4

    reply = stub.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), timeout=TIMEOUT)

    assert reply.deleted
    assert len(scorer.keys) == before
    error = score_error(stub, request)
    assert code_of(error) == grpc.StatusCode.NOT_FOUND
    assert error_reasons(error) == [KEY_NOT_FOUND]
    again = stub.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), timeout=TIMEOUT)
    assert not again.deleted  # already gone: nothing held, still no error


def test_delete_keys_without_a_key_id_is_invalid(stub: pb_grpc.ScoringServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.DeleteKeys(pb.DeleteKeysRequest(), timeout=TIMEOUT)

    assert code_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert galois_steps(stub)  # the server still answers


def test_client_close_erases_its_keys(target: str, scorer: Scorer, films: Catalog) -> None:
    before = len(scorer.keys)
    client = Client(target, timeout=TIMEOUT)
    client.score(unit_rows(1, films.dimension, seed=12)[0], catalog="films")
    assert len(scorer.keys) == before + 1

    client.close()

    assert len(scorer.keys) == before


def test_client_re_registers_after_keys_are_deleted_behind_its_back(
    target: str,
    stub: pb_grpc.ScoringServiceStub,
    scorer: Scorer,
    films: Catalog,
    films_user: FloatArray,
) -> None:
    with Client(target, timeout=TIMEOUT) as client:
        key_id = client.register_keys()
        first = client.score(films_user, catalog="films")
        assert client.stats.registrations == 1
        assert max_error(first, films, films_user) < 1e-4

        assert stub.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), timeout=TIMEOUT).deleted
        assert scorer.keys.get(key_id) is None

        second = client.score(films_user, catalog="films")

        assert client.stats.registrations == 2
        assert max_error(second, films, films_user) < 1e-4


# --- TTL expiry on a real server -------------------------------------------------------


@pytest.fixture(scope="module")
def short_ttl(films: Catalog) -> Iterator[tuple[Scorer, str, FakeClock]]:
    """A server whose keys expire after 1 s idle, by a clock the tests advance."""
    clock = FakeClock()
    retention = KeyRetentionPolicy(ttl_seconds=1)
    scorer = Scorer(DEFAULT_PARAMETERS, [films], retention=retention, clock=clock)
    running = serve(scorer)
    yield scorer, f"127.0.0.1:{running.port}", clock
    running.stop(grace=None)


def test_client_re_registers_after_ttl_expiry(
    short_ttl: tuple[Scorer, str, FakeClock], films: Catalog, films_user: FloatArray
) -> None:
    scorer, target, clock = short_ttl
    with Client(target, timeout=TIMEOUT) as client:
        assert client.server_info.key_retention.ttl_seconds == 1
        first = client.score(films_user, catalog="films")
        assert client.stats.registrations == 1
        assert len(scorer.keys) == 1

        clock.now += 1.25
        assert len(scorer.keys) == 0  # forgotten by the server

        second = client.score(films_user, catalog="films")

        assert client.stats.registrations == 2
        assert max_error(first, films, films_user) < 1e-4
        assert max_error(second, films, films_user) < 1e-4


def test_expired_key_gives_key_not_found(
    short_ttl: tuple[Scorer, str, FakeClock],
    secret: SecretContext,
    films: Catalog,
    films_user: FloatArray,
) -> None:
    _, target, clock = short_ttl
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        reply = stub.RegisterKeys(
            iter([pb.RegisterKeysRequest(galois_keys_chunk=secret.galois_keys([1, 8]))]),
            timeout=TIMEOUT,
        )
        assert reply.ttl_seconds == 1
        # no conjugation key: complex scores, so expiry is the only thing wrong
        request = score_request(secret, reply.key_id, films, films_user, complex_scores=True)

        clock.now += 1.25
        error = score_error(stub, request)

        assert code_of(error) == grpc.StatusCode.NOT_FOUND
        assert error_reasons(error) == [KEY_NOT_FOUND]


# --- eviction and store bounds on a real server ----------------------------------------


def test_least_recently_used_keys_are_evicted_when_the_store_is_full(
    secret: SecretContext, films: Catalog, films_user: FloatArray
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [films], retention=KeyRetentionPolicy(max_keys=2))
    running = serve(scorer)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ScoringServiceStub(channel)
            steps = galois_steps(stub)
            first, second, third = (
                register_keys(stub, secret.galois_keys(steps)) for _ in range(3)
            )
            assert len({first, second, third}) == 3
            # the third registration evicted the first, the least recently used
            assert len(scorer.keys) == 2
            error = score_error(stub, score_request(secret, first, films, films_user))
            assert error_reasons(error) == [KEY_NOT_FOUND]
            # using the second makes the third the least recently used
            request = score_request(secret, second, films, films_user)
            scores = raw_scores(stub, secret, request, films.item_count)
            assert max_error(scores, films, films_user) < 1e-4
            fourth = register_keys(stub, secret.galois_keys(steps))
            for held in (second, fourth):
                request = score_request(secret, held, films, films_user)
                scores = raw_scores(stub, secret, request, films.item_count)
                assert max_error(scores, films, films_user) < 1e-4
            error = score_error(stub, score_request(secret, third, films, films_user))
            assert error_reasons(error) == [KEY_NOT_FOUND]
    finally:
        running.stop(grace=None)


def test_keys_larger_than_the_whole_store_are_exhausted(
    secret: SecretContext, films: Catalog
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [films], retention=KeyRetentionPolicy(max_bytes=1 << 20))
    running = serve(scorer)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ScoringServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                register_keys(stub, secret.galois_keys(galois_steps(stub)))

            assert code_of(info.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(scorer.keys) == 0
            assert galois_steps(stub)
    finally:
        running.stop(grace=None)


# --- KeyStore with a fake clock ---------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def new_store(clock: FakeClock, max_keys: int, max_bytes: int) -> KeyStore[seal.GaloisKeys]:
    """A store with a 60 s TTL on the fake clock."""
    return KeyStore(max_keys=max_keys, max_bytes=max_bytes, ttl_seconds=60, clock=clock)


def keys() -> seal.GaloisKeys:
    return seal.GaloisKeys()


def test_store_returns_what_it_holds(clock: FakeClock) -> None:
    store = new_store(clock, max_keys=4, max_bytes=1000)
    a, b = keys(), keys()
    store.put("a", a, 10)
    store.put("b", b, 20)

    assert store.get("a") is a
    assert store.get("b") is b
    assert store.get("c") is None
    assert store.touch("a")
    assert not store.touch("c")
    assert len(store) == 2
    assert store.bytes_held == 30


def test_store_forgets_keys_idle_for_the_ttl(clock: FakeClock) -> None:
    store = new_store(clock, max_keys=4, max_bytes=1000)
    a = keys()
    store.put("a", a, 10)
    store.put("b", keys(), 10)

    clock.now += 59.5
    assert store.get("a") is a  # use resets a's idle time, not b's
    clock.now += 1.0  # b idle 60.5 s, a idle 1 s
    assert store.get("b") is None
    assert store.get("a") is a
    assert (len(store), store.bytes_held) == (1, 10)

    clock.now += 60.0  # exactly the TTL since the last use
    assert store.get("a") is None
    assert (len(store), store.bytes_held) == (0, 0)


def test_store_evicts_least_recently_used_by_count(clock: FakeClock) -> None:
    store = new_store(clock, max_keys=3, max_bytes=1000)
    for key_id in "abc":
        store.put(key_id, keys(), 1)
        clock.now += 1
    assert store.touch("a")  # order of use is now b, c, a

    store.put("d", keys(), 1)

    assert store.get("b") is None
    assert all(store.touch(key_id) for key_id in "acd")
    assert len(store) == 3


def test_store_evicts_least_recently_used_by_bytes(clock: FakeClock) -> None:
    store = new_store(clock, max_keys=100, max_bytes=100)
    store.put("a", keys(), 40)
    store.put("b", keys(), 40)
    assert store.touch("a")

    store.put("c", keys(), 40)  # 120 > 100: b, least recently used, goes

    assert store.get("b") is None
    assert store.touch("a")
    assert store.touch("c")
    assert store.bytes_held == 80

    store.put("d", keys(), 100)  # only fits alone

    assert [store.touch(key_id) for key_id in "acd"] == [False, False, True]
    assert (len(store), store.bytes_held) == (1, 100)


def test_store_refuses_keys_larger_than_itself(clock: FakeClock) -> None:
    store = new_store(clock, max_keys=4, max_bytes=100)
    store.put("a", keys(), 60)

    with pytest.raises(KeyTooLargeError):
        store.put("big", keys(), 101)

    assert store.get("big") is None
    assert store.touch("a")  # nothing was evicted for the refused keys
    assert store.bytes_held == 60


def test_store_replacing_a_key_does_not_count_it_twice(clock: FakeClock) -> None:
    store = new_store(clock, max_keys=2, max_bytes=100)
    store.put("a", keys(), 40)
    store.put("b", keys(), 40)
    replacement = keys()

    store.put("a", replacement, 50)

    assert store.get("a") is replacement
    assert store.touch("b")
    assert (len(store), store.bytes_held) == (2, 90)


def test_store_delete(clock: FakeClock) -> None:
    store = new_store(clock, max_keys=4, max_bytes=100)
    store.put("a", keys(), 30)
    store.put("b", keys(), 30)

    assert store.delete("a")
    assert not store.delete("a")
    assert not store.delete("never-held")
    assert store.get("a") is None
    assert store.touch("b")
    assert (len(store), store.bytes_held) == (1, 30)


@pytest.mark.parametrize(
    ("max_keys", "max_bytes", "ttl"), [(0, 100, 60.0), (4, 0, 60.0), (4, 100, 0.0)]
)
def test_store_bounds_must_be_positive(max_keys: int, max_bytes: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        KeyStore(max_keys=max_keys, max_bytes=max_bytes, ttl_seconds=ttl)


# --- key files ----------------------------------------------------------------------


def test_key_file_is_created_owner_only(target: str, tmp_path: Path) -> None:
    path = tmp_path / "k"

    with Client(target, key_file=path, timeout=TIMEOUT):
        pass

    assert path.is_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_key_file_is_reused_not_overwritten(
    target: str,
    stub: pb_grpc.ScoringServiceStub,
    tmp_path: Path,
    films: Catalog,
    films_user: FloatArray,
) -> None:
    path = tmp_path / "k"
    with Client(target, key_file=path, timeout=TIMEOUT) as first:
        key_id = first.register_keys()
        saved = path.read_bytes()

        # The file's secret key is the one the client's Galois keys were made from:
        # queries encrypted under it score correctly with the client's key_id (the
        # client uploads no conjugation key, so the scores come as complex slots).
        loaded = SecretContext.load(path)
        request = score_request(loaded, key_id, films, films_user, complex_scores=True)
        scores = raw_scores(stub, loaded, request, films.item_count)
        assert max_error(scores, films, films_user) < 1e-4

        # Control: another secret key cannot use those Galois keys.
        stranger = SecretContext(DEFAULT_PARAMETERS)
        request = score_request(stranger, key_id, films, films_user, complex_scores=True)
        garbage = raw_scores(stub, stranger, request, films.item_count)
        assert max_error(garbage, films, films_user) > 1e-2

        with Client(target, key_file=path, timeout=TIMEOUT) as second:
            assert path.read_bytes() == saved
            scores = second.score(films_user, catalog="films")
            assert max_error(scores, films, films_user) < 1e-4


def test_secret_context_round_trips_through_a_file(tmp_path: Path) -> None:
    original = SecretContext(DEFAULT_PARAMETERS)
    original.save(tmp_path / "k")
    values = np.linspace(-1.0, 1.0, DEFAULT_PARAMETERS.slot_count)
    ciphertext = original.encrypt(values)

    loaded = SecretContext.load(tmp_path / "k")

    assert loaded.params == original.params
    assert np.abs(loaded.decrypt(ciphertext, 1 << 24) - values).max() < 1e-4
    stranger = SecretContext(DEFAULT_PARAMETERS)
    assert np.abs(stranger.decrypt(ciphertext, 1 << 24) - values).max() > 1e-2


def test_key_file_under_other_parameters_is_refused(target: str, tmp_path: Path) -> None:
    path = tmp_path / "k"
    SecretContext(OTHER_PARAMETERS).save(path)
    saved = path.read_bytes()

    with pytest.raises(ParameterMismatchError):
        Client(target, key_file=path, timeout=TIMEOUT)

    assert path.read_bytes() == saved  # the user's key pair is left alone


def test_a_file_that_is_not_a_key_file_is_refused_and_kept(target: str, tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"my thesis, not a key\n")

    with pytest.raises(ValueError):
        Client(target, key_file=path, timeout=TIMEOUT)

    assert path.read_bytes() == b"my thesis, not a key\n"
