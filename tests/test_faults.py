"""Faults, for real, against servers on loopback: clients that hang up mid-upload and
mid-stream, worker processes killed between and during queries, a server restarted
under a live client, and keys and queries corrupted in the middle of their data.

After every fault the server must still serve: each test ends with a correct score.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import make_catalog

from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol import wire as wire_format
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import FloatArray, query_slots
from heserve.transport import servicer as service
from heserve.transport.server import RunningServer, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client, SecretContext, ServerUnavailableError

TIMEOUT = 60.0
SLOTS = DEFAULT_PARAMETERS.slot_count
CHUNK_ITEMS = 2 * SLOTS  # catalog rows per output ciphertext (complex slots)
SEAL_HEADER = struct.Struct("<HBBBBHQ")
CIPHERTEXT_FIELDS = 32 + 1 + 5 * 8  # parms_id, is_ntt_form, size, N, primes, scale, corr.
# Long enough for gRPC's default reconnection backoff (1 s, x1.6 per attempt, +-20%) to
# leave a gap of more than 3 s between attempts.
OUTAGE_SECONDS = 9.0


@pytest.fixture(scope="module")
def shop() -> Catalog:
    return make_catalog("shop", 600, 16, seed=61)


@pytest.fixture(scope="module")
def wide() -> Catalog:
    """Five output ciphertexts' worth of items."""
    return make_catalog("wide", 4 * CHUNK_ITEMS + 100, 8, seed=62)


@pytest.fixture(scope="module")
def party() -> SecretContext:
    return SecretContext(DEFAULT_PARAMETERS)


def _target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


def _chunked(blob: bytes, size: int = 1 << 20) -> Iterator[pb.RegisterKeysRequest]:
    for start in range(0, len(blob), size):
        yield pb.RegisterKeysRequest(galois_keys_chunk=blob[start : start + size])


def _query(party: SecretContext, vector: np.ndarray) -> bytes:
    return party.encrypt(query_slots(vector, vector.shape[0], SLOTS))


def _assert_serves(target: str, catalog: Catalog) -> None:
    """A fresh client gets correct scores: the server survived whatever came before."""
    vector = unit_rows(1, catalog.dimension, seed=69)[0]
    with Client(target, timeout=TIMEOUT) as client:
        scores = client.score(vector, catalog=catalog.name)
    assert np.abs(scores - catalog.embeddings @ vector).max() < 1e-4


def _threads_in(function: str) -> int:
    """Threads now running (or blocked) inside heserve.transport.servicer's `function`."""
    count = 0
    for top in sys._current_frames().values():
        frame: Any = top
        while frame is not None:
            code = frame.f_code
            if code.co_name == function and code.co_filename == service.__file__:
                count += 1
                break
            frame = frame.f_back
    return count


def _access_codes(caplog: pytest.LogCaptureFixture, method: str) -> list[str]:
    return [
        record.fields["code"]  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "heserve.access"
        and getattr(record, "fields", {}).get("method") == method
        and "code" in record.fields  # type: ignore[attr-defined]
    ]


def _errors(server: RunningServer, method: str, code: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "heserve_request_errors_total",
        {"service": "heserve.v1.ScoringService", "method": method, "code": code},
    )
    return value or 0.0


# --- clients that hang up ---------------------------------------------------------------


def test_a_client_hanging_up_mid_upload_registers_nothing_and_frees_its_handler(
    servers: list[RunningServer],
    shop: Catalog,
    party: SecretContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [shop])
    server = start_server(scorer, "127.0.0.1", 0)
    servers.append(server)
    caplog.set_level(logging.DEBUG, logger="heserve")
    blob = party.galois_keys(list(scorer.galois_steps))
    piece = 64 << 10
    assert len(blob) > 4 * piece
    release = threading.Event()

    def upload() -> Iterator[pb.RegisterKeysRequest]:
        for start in range(0, 3 * piece, piece):
            yield pb.RegisterKeysRequest(galois_keys_chunk=blob[start : start + piece])
        release.wait(TIMEOUT)  # the rest never comes: the client hangs up first

    admission = server.admission
    assert admission is not None
    with grpc.insecure_channel(_target(server)) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        call = stub.RegisterKeys.future(upload(), timeout=TIMEOUT)
        # The server holds the half-open upload as a stream of this address, and no
        # thread waits on it (grpc.aio): what it holds, not a thread, is the probe.
        assert admission.wait_held("address:127.0.0.1", 1, timeout=TIMEOUT)
        assert _threads_in("RegisterKeys") == 0

        assert call.cancel()
        # Release the generator only once the server has seen the hang-up: ended
        # earlier, it could half-close the stream first, and the server would then
        # rightly see a complete (truncated) upload.
        assert admission.wait_held("address:127.0.0.1", 0, timeout=TIMEOUT, calls=0)
        release.set()
        _wait_for(lambda: bool(_access_codes(caplog, "RegisterKeys")))
    assert len(scorer.keys) == 0 and scorer.keys.bytes_held == 0
    # A hang-up is the client's doing: CANCELLED, never an UNKNOWN (server-bug) error.
    # gRPC Python may hand the handler the cancel as a plain end of stream before the
    # call turns inactive; the server then sees a truncated upload and refuses it.
    (code,) = _access_codes(caplog, "RegisterKeys")
    assert code in {"CANCELLED", "INVALID_ARGUMENT"}
    assert _errors(server, "RegisterKeys", code) == 1
    assert _errors(server, "RegisterKeys", "UNKNOWN") == 0
    assert server.metrics.registry.get_sample_value("heserve_requests_in_flight") == 0

    _assert_serves(_target(server), shop)


def test_a_client_hanging_up_mid_stream_stops_the_scoring(
    servers: list[RunningServer],
    wide: Catalog,
    party: SecretContext,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [wide])
    produced: list[int] = []
    closed = threading.Event()
    hung_up = threading.Event()
    score = scorer.backend.score

    def gated(*args: Any) -> Iterator[list[bytes]]:
        """The backend's results, each after the first only once the client hung up."""
        try:
            for blob in score(*args):
                if produced:
                    hung_up.wait(TIMEOUT)
                produced.append(1)
                yield blob
        finally:
            closed.set()

    monkeypatch.setattr(scorer.backend, "score", gated)
    server = start_server(scorer, "127.0.0.1", 0)
    servers.append(server)
    caplog.set_level(logging.INFO, logger="heserve")
    total = scorer.catalogs["wide"].plan.chunk_count(wide.item_count)
    assert total == 5

    with grpc.insecure_channel(_target(server)) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        key_id = stub.RegisterKeys(
            _chunked(party.galois_keys(list(scorer.galois_steps))), timeout=TIMEOUT
        ).key_id
        request = pb.ScoreRequest(
            key_id=key_id,
            catalog="wide",
            query=_query(party, unit_rows(1, 8, seed=63)[0]),
            complex_scores=True,
        )
        call = stub.Score(request, timeout=TIMEOUT)
        first = next(call)
        assert (first.chunk_index, first.chunk_count) == (0, total)
        call.cancel()
        hung_up.set()

        # The server stops asking for results at the next one it would send: the
        # backend is closed (its workers stop computing) with most chunks never made.
        assert closed.wait(TIMEOUT), "the backend's generator was never closed"
        assert len(produced) <= 3 < total
        _wait_for(lambda: bool(_access_codes(caplog, "Score")))
        assert _access_codes(caplog, "Score") == ["CANCELLED"]
        assert _threads_in("Score") == 0

    _assert_serves(_target(server), wide)


# --- worker processes that die ----------------------------------------------------------


POOL_CHUNKS, POOL_DIMENSION = 16, 64


@pytest.fixture(scope="module")
def pool_catalog() -> Catalog:
    """16 chunks: each of two workers holds eight, tens of milliseconds of work each."""
    return make_catalog("pool", POOL_CHUNKS * CHUNK_ITEMS, POOL_DIMENSION, seed=64)


@pytest.fixture(scope="module")
def pool(pool_catalog: Catalog) -> Iterator[tuple[RunningServer, PoolBackend]]:
    """A server on the default backend: a pool of two worker processes."""
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2)
    try:
        server = start_server(Scorer(DEFAULT_PARAMETERS, [pool_catalog], backend=backend), port=0)
        yield server, backend
        server.stop(grace=None)
    finally:
        backend.close()


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _workers_cpu(backend: PoolBackend) -> float:
    return sum(_cpu_seconds(pid) for pid in backend.worker_pids())


def _settled_workers_cpu(backend: PoolBackend) -> float:
    """The workers' CPU time once they have been idle for a while."""
    last = _workers_cpu(backend)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = _workers_cpu(backend)
        if now == last:
            return now
        last = now
    raise AssertionError("the workers never went idle")


def test_workers_stop_computing_a_query_the_client_hung_up_on(
    pool: tuple[RunningServer, PoolBackend],
    pool_catalog: Catalog,
    party: SecretContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, backend = pool
    at_close: list[float] = []
    score = backend.score

    def watched(*args: Any) -> Iterator[list[bytes]]:
        try:
            yield from score(*args)
        finally:  # the front let go of the query: what the workers spend from here is waste
            at_close.append(_workers_cpu(backend))

    monkeypatch.setattr(backend, "score", watched)
    with grpc.insecure_channel(_target(server)) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
        keys = party.galois_keys(list(info.ckks.galois_steps))
        key_id = stub.RegisterKeys(_chunked(keys), timeout=TIMEOUT).key_id
        request = pb.ScoreRequest(
            key_id=key_id,
            catalog="pool",
            query=_query(party, unit_rows(1, POOL_DIMENSION, seed=65)[0]),
            complex_scores=True,
        )
        assert len(list(stub.Score(request, timeout=TIMEOUT))) == POOL_CHUNKS  # ships the keys
        before = _settled_workers_cpu(backend)
        assert len(list(stub.Score(request, timeout=TIMEOUT))) == POOL_CHUNKS
        full = _settled_workers_cpu(backend) - before

        call = stub.Score(request, timeout=TIMEOUT)
        next(call)
        call.cancel()
        _wait_for(lambda: len(at_close) == 3)
        after = _settled_workers_cpu(backend) - at_close[-1]

    # Each worker may finish the chunk it is on; without the cancellation reaching
    # them they would compute the rest of their shards, for a client long gone.
    print(f"full query {full:.2f} s of worker CPU, after the hang-up {after:.2f} s")
    assert after < 0.25 * full, (after, full)
    assert backend.pending_requests() == 0  # no reply queue left behind
    _assert_serves(_target(server), pool_catalog)


def _user_of(catalog: Catalog, seed: int) -> tuple[FloatArray, FloatArray]:
    """A user vector and its plaintext scores over `catalog`."""
    vector = unit_rows(1, catalog.dimension, seed=seed)[0]
    return vector, catalog.embeddings @ vector


def _assert_replaced(
    pool: tuple[RunningServer, PoolBackend], shard: int, victim: int, catalog: Catalog
) -> None:
    """A new process serves the shard, the killed one is dead and reaped, and queries work."""
    server, backend = pool
    assert backend.worker_pids()[shard] != victim
    assert not os.path.exists(f"/proc/{victim}")
    _assert_serves(_target(server), catalog)


def test_a_worker_killed_between_queries_is_replaced_and_the_next_query_succeeds(
    pool: tuple[RunningServer, PoolBackend], pool_catalog: Catalog
) -> None:
    server, backend = pool
    vector, expected = _user_of(pool_catalog, seed=66)
    with Client(_target(server), timeout=TIMEOUT) as client:
        assert np.abs(client.score(vector, catalog="pool") - expected).max() < 1e-4
        restarts = backend.restarts
        victim = backend.worker_pids()[0]

        os.kill(victim, signal.SIGKILL)
        # The very next query either waits for the replacement or, if it raced the
        # death, fails cleanly as retryable; never anything else.
        try:
            scores = client.score(vector, catalog="pool")
            assert np.abs(scores - expected).max() < 1e-4
        except ServerUnavailableError as error:
            assert error.code == grpc.StatusCode.UNAVAILABLE

        _wait_for(lambda: backend.restarts == restarts + 1, timeout=TIMEOUT)
        assert np.abs(client.score(vector, catalog="pool") - expected).max() < 1e-4
    _assert_replaced(pool, 0, victim, pool_catalog)


def _items_streamed(server: RunningServer) -> float:
    registry = server.metrics.registry
    return registry.get_sample_value("heserve_items_scored_total", {"catalog": "pool"}) or 0


def test_a_worker_killed_during_a_query_fails_it_with_unavailable_and_is_replaced(
    pool: tuple[RunningServer, PoolBackend], pool_catalog: Catalog
) -> None:
    server, backend = pool
    vector, expected = _user_of(pool_catalog, seed=67)

    def items_streamed() -> float:
        return _items_streamed(server)

    # retry_unavailable=False: the failure itself, as a client that does not retry sees it
    client = Client(_target(server), timeout=TIMEOUT, retry_unavailable=False)
    with client, ThreadPoolExecutor(1) as background:
        assert np.abs(client.score(vector, catalog="pool") - expected).max() < 1e-4  # keys out
        restarts = backend.restarts
        victim = backend.worker_pids()[1]
        # Frozen, worker 1 takes the query but computes none of its chunks (1, 3, ...):
        # the client gets chunk 0 from worker 0, then waits on worker 1, which dies.
        os.kill(victim, signal.SIGSTOP)
        try:
            streamed = items_streamed()
            query = background.submit(client.score, vector, catalog="pool")
            _wait_for(lambda: items_streamed() > streamed)
            assert not query.done()
        finally:
            os.kill(victim, signal.SIGKILL)
        with pytest.raises(ServerUnavailableError) as failed:
            query.result(timeout=TIMEOUT)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert "retry" in str(failed.value)

        # The next query waits for the replacement, which re-encoded its shard.
        assert np.abs(client.score(vector, catalog="pool") - expected).max() < 1e-4
        assert backend.restarts == restarts + 1
    _assert_replaced(pool, 1, victim, pool_catalog)


def test_a_worker_killed_during_a_query_is_invisible_to_a_retrying_client(
    pool: tuple[RunningServer, PoolBackend], pool_catalog: Catalog
) -> None:
    """The same kill, with the client's default: the UNAVAILABLE is retried, the retry
    waits for the replacement, and the caller gets its scores."""
    server, backend = pool
    vector, expected = _user_of(pool_catalog, seed=71)
    with Client(_target(server), timeout=TIMEOUT) as client, ThreadPoolExecutor(1) as background:
        assert np.abs(client.score(vector, catalog="pool") - expected).max() < 1e-4  # keys out
        restarts = backend.restarts
        victim = backend.worker_pids()[1]
        os.kill(victim, signal.SIGSTOP)
        try:
            streamed = _items_streamed(server)
            query = background.submit(client.score, vector, catalog="pool")
            _wait_for(lambda: _items_streamed(server) > streamed)
            assert not query.done()
        finally:
            os.kill(victim, signal.SIGKILL)
        assert np.abs(query.result(timeout=TIMEOUT) - expected).max() < 1e-4
        assert client.stats.retries >= 1
        assert backend.restarts == restarts + 1
    _assert_replaced(pool, 1, victim, pool_catalog)


# --- a server restart -------------------------------------------------------------------


def test_a_restarted_server_gets_the_clients_keys_again_transparently(
    servers: list[RunningServer], shop: Catalog
) -> None:
    first = start_server(Scorer(DEFAULT_PARAMETERS, [shop]), "127.0.0.1", 0)
    servers.append(first)
    target = _target(first)
    vector = unit_rows(1, shop.dimension, seed=68)[0]
    expected = shop.embeddings @ vector
    with Client(target, timeout=TIMEOUT) as client:
        assert np.abs(client.score(vector, catalog="shop") - expected).max() < 1e-4
        assert client.stats.registrations == 1

        first.stop(grace=None)
        # A new process: a new Scorer (no keys), the same catalogs, the same port.
        second = start_server(Scorer(DEFAULT_PARAMETERS, [shop]), "127.0.0.1", first.port)
        servers.append(second)

        assert np.abs(client.score(vector, catalog="shop") - expected).max() < 1e-4
        assert client.stats.registrations == 2  # NOT_FOUND KEY_NOT_FOUND, re-registered
        assert np.abs(client.score(vector, catalog="shop") - expected).max() < 1e-4
        assert client.stats.registrations == 2
        assert client.recommend(vector, catalog="shop", k=3)[0][0] == f"shop-{expected.argmax()}"


def test_a_client_used_through_an_outage_reconnects_soon_after_the_restart(
    servers: list[RunningServer], shop: Catalog
) -> None:
    first = start_server(Scorer(DEFAULT_PARAMETERS, [shop]), "127.0.0.1", 0)
    servers.append(first)
    port = first.port
    vector = unit_rows(1, shop.dimension, seed=70)[0]
    expected = shop.embeddings @ vector
    # Without retries: each call during the outage fails at once, which is what shows
    # the channel's reconnection attempts (test_operator_client: calls that retry).
    with Client(_target(first), timeout=TIMEOUT, retry_unavailable=False) as client:
        client.score(vector, catalog="shop")
        first.stop(grace=None)

        # During the outage something on the port takes each connection and hangs up
        # (as a restarting host might): it sees every reconnection attempt.
        attempts: list[float] = []
        listening = threading.Event()
        with socket.create_server(("127.0.0.1", port)) as listener:
            listener.settimeout(0.05)

            def hang_up() -> None:
                while not listening.is_set():
                    try:
                        connection, _ = listener.accept()
                    except TimeoutError:
                        continue
                    attempts.append(time.monotonic())
                    connection.close()

            watcher = threading.Thread(target=hang_up)
            watcher.start()
            began = time.monotonic()
            try:
                while time.monotonic() - began < OUTAGE_SECONDS:
                    started = time.monotonic()
                    with pytest.raises(ServerUnavailableError):  # at once, cleanly
                        client.score(vector, catalog="shop")
                    assert time.monotonic() - started < 5.0
                    time.sleep(0.25)
            finally:
                listening.set()
                watcher.join()
            ended = time.monotonic()

        # Each failed attempt lengthens the channel's backoff; gRPC's default lets it
        # grow to two minutes, so a client would sit out most of that after the server
        # came back. The client caps it: an attempt at least every few seconds.
        gaps = np.diff([began, *attempts, ended])
        print("seconds between reconnection attempts:", np.round(gaps, 2))
        assert len(attempts) >= 3 and gaps.max() < 3.0, gaps

        second = start_server(Scorer(DEFAULT_PARAMETERS, [shop]), "127.0.0.1", port)
        servers.append(second)
        back = time.monotonic()
        while True:
            try:
                scores = client.score(vector, catalog="shop")
                break
            except ServerUnavailableError:
                assert time.monotonic() - back < 3.0, "the client did not reconnect in time"
                time.sleep(0.1)
        assert np.abs(scores - expected).max() < 1e-4
        assert client.stats.registrations == 2


# --- corrupted uploads ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop_server(shop: Catalog) -> Iterator[tuple[RunningServer, Scorer]]:
    scorer = Scorer(DEFAULT_PARAMETERS, [shop])
    server = start_server(scorer, "127.0.0.1", 0)
    yield server, scorer
    server.stop(grace=None)


@pytest.fixture
def stub(shop_server: tuple[RunningServer, Scorer]) -> Iterator[pb_grpc.ScoringServiceStub]:
    with grpc.insecure_channel(_target(shop_server[0])) as channel:
        yield pb_grpc.ScoringServiceStub(channel)


def _data_range(blob: bytes | bytearray, pos: int) -> tuple[int, int, int]:
    """(start, end) of the coefficient data of the SEAL Ciphertext serialized at `pos`
    (uncompressed), and where the object ends."""
    size = SEAL_HEADER.unpack_from(blob, pos)[6]
    array = pos + SEAL_HEADER.size + CIPHERTEXT_FIELDS  # the data DynArray's own header
    (count,) = struct.unpack_from("<Q", blob, array + SEAL_HEADER.size)
    start = array + SEAL_HEADER.size + 8
    return start, start + 8 * count, pos + size


def _key_data_ranges(blob: bytes) -> list[tuple[int, int]]:
    """The coefficient data of every key in uncompressed serialized GaloisKeys."""
    ranges = []
    pos = SEAL_HEADER.size + 32  # parms_id
    (outer,) = struct.unpack_from("<Q", blob, pos)
    pos += 8
    for _ in range(outer):
        (inner,) = struct.unpack_from("<Q", blob, pos)
        pos += 8
        for _ in range(inner):
            start, end, pos = _data_range(blob, pos)
            ranges.append((start, end))
    assert pos == len(blob)
    return ranges


def _flip(blob: bytes, coefficient_at: int, bit: int) -> bytes:
    """`blob` with one bit of the 64-bit coefficient at byte offset `coefficient_at` flipped."""
    changed = bytearray(blob)
    changed[coefficient_at + bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


def _middle(start: int, end: int) -> int:
    return start + ((end - start) // 16) * 8


def _score_code(
    stub: pb_grpc.ScoringServiceStub, request: pb.ScoreRequest
) -> tuple[grpc.StatusCode, list[pb.ScoreResponse]]:
    try:
        return grpc.StatusCode.OK, list(stub.Score(request, timeout=TIMEOUT))
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        return error.code(), []


def _register_code(stub: pb_grpc.ScoringServiceStub, blob: bytes) -> grpc.StatusCode:
    try:
        stub.RegisterKeys(_chunked(blob), timeout=TIMEOUT)
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        return error.code()
    return grpc.StatusCode.OK


def test_a_query_corrupted_in_its_coefficients_is_refused_or_scored_as_noise(
    shop_server: tuple[RunningServer, Scorer],
    stub: pb_grpc.ScoringServiceStub,
    shop: Catalog,
    party: SecretContext,
) -> None:
    server, scorer = shop_server
    key_id = stub.RegisterKeys(
        _chunked(party.galois_keys(list(scorer.galois_steps))), timeout=TIMEOUT
    ).key_id
    vector = unit_rows(1, shop.dimension, seed=71)[0]
    wire = wire_format.ciphertext_to_wire(_query(party, vector))  # uncompressed, seeded
    start, end, _ = _data_range(wire, 0)
    assert end - start == 8 * DEFAULT_PARAMETERS.poly_modulus_degree * 2  # c0 over two primes
    middle = _middle(start, end)

    def request(query: bytes) -> pb.ScoreRequest:
        return pb.ScoreRequest(key_id=key_id, catalog="shop", query=query, complex_scores=True)

    code, replies = _score_code(stub, request(wire))
    assert code == grpc.StatusCode.OK and len(replies) == 1
    exact = shop.embeddings @ vector
    assert np.abs(party.decrypt_complex(replies[0].scores, 1 << 24).real[:600] - exact).max() < 1e-4

    # The top bit: the coefficient is now past every prime, which SEAL's check catches.
    for at in (start, middle, end - 8):
        code, _ = _score_code(stub, request(_flip(wire, at, 63)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT

    # A low bit leaves a value below the prime: a valid ciphertext of something else.
    # Nothing can tell it from the real query (integrity is TLS's job); the client
    # decrypts noise, not an error, and the server carries on.
    code, replies = _score_code(stub, request(_flip(wire, middle, 3)))
    assert code == grpc.StatusCode.OK and len(replies) == 1
    garbled = party.decrypt_complex(replies[0].scores, 1 << 24).real[:600]
    assert np.abs(garbled - exact).max() > 1.0

    # The same corruption under compression: refused, or noise; never a server error.
    compressed = wire_format.zstd_compressed(wire)
    assert len(compressed) < len(wire)
    for fraction in (0.2, 0.5, 0.8):
        at = int(len(compressed) * fraction)
        for xor in (0x01, 0x80, 0xFF):
            changed = bytearray(compressed)
            changed[at] ^= xor
            code, _ = _score_code(stub, request(bytes(changed)))
            assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, (at, xor)
    # And cut in the middle of its coefficients, with the header's size patched to match.
    cut = bytearray(wire[:middle])
    struct.pack_into("<Q", cut, 8, len(cut))
    assert _score_code(stub, request(bytes(cut)))[0] == grpc.StatusCode.INVALID_ARGUMENT

    _assert_serves(_target(server), shop)


def test_keys_corrupted_in_their_coefficients_are_refused_or_stored_as_other_keys(
    shop_server: tuple[RunningServer, Scorer],
    stub: pb_grpc.ScoringServiceStub,
    shop: Catalog,
    party: SecretContext,
) -> None:
    server, scorer = shop_server
    wire = wire_format.galois_keys_to_wire(party.galois_keys(list(scorer.galois_steps)))
    ranges = _key_data_ranges(wire)
    assert len(ranges) >= len(scorer.galois_steps)
    start, end = ranges[len(ranges) // 2]  # the middle key's coefficients
    middle = _middle(start, end)
    held = len(scorer.keys)

    for at in (ranges[0][0], middle, ranges[-1][1] - 8):
        assert _register_code(stub, _flip(wire, at, 63)) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(scorer.keys) == held

    # A low bit: still a valid key (of no one), stored under its own key_id.
    assert _register_code(stub, _flip(wire, middle, 2)) == grpc.StatusCode.OK
    assert len(scorer.keys) == held + 1

    compressed = wire_format.zstd_compressed(wire)
    for fraction in (0.2, 0.5, 0.8):
        at = int(len(compressed) * fraction)
        for xor in (0x01, 0x80, 0xFF):
            changed = bytearray(compressed)
            changed[at] ^= xor
            code = _register_code(stub, bytes(changed))
            assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, (at, xor)
    cut = bytearray(wire[:middle])
    struct.pack_into("<Q", cut, 8, len(cut))
    assert _register_code(stub, bytes(cut)) == grpc.StatusCode.INVALID_ARGUMENT

    _assert_serves(_target(server), shop)
