"""The Python client as a long-running service uses it (issue 12, items 1, 2 and 10):
across a catalog change and a server restart, with errors mapped by ErrorInfo reason,
and with a key file whose registration outlives the process. Real servers on loopback."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TIMEOUT, free_port, make_catalog, register_keys

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.reasons import CATALOG_VERSION_CHANGED, CONJUGATION_KEY_MISSING
from heserve.protocol.slots import query_slots
from heserve.transport.auth import Authenticator
from heserve.transport.server import RunningServer, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import (
    Client,
    ConjugationKeyMissingError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    SecretContext,
    ServerUnavailableError,
    StaleCatalogError,
    UnauthenticatedError,
)
from heserve_client._errors import error_class, from_rpc_error

SLOTS = DEFAULT_PARAMETERS.slot_count


@pytest.fixture(scope="module")
def films() -> Catalog:
    return make_catalog("films", 300, 32, seed=121)


@pytest.fixture(scope="module")
def changed_films(films: Catalog) -> Catalog:
    """The same name and ids, other embeddings and one item more: another version."""
    rows = unit_rows(films.item_count + 1, films.dimension, seed=122)
    changed = Catalog("films", rows, (*films.ids, "films-new"))
    assert changed.version != films.version
    return changed


def _start(servers: list[RunningServer], scorer: Scorer, port: int = 0) -> RunningServer:
    server = start_server(scorer, "127.0.0.1", port)
    servers.append(server)
    return server


def _target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


def _user(catalog: Catalog, seed: int) -> np.ndarray:
    vector: np.ndarray = unit_rows(1, catalog.dimension, seed=seed)[0]
    return vector


# --- across a catalog change (item 1) ---------------------------------------------------


def test_a_client_keeps_working_across_a_restart_with_a_changed_catalog(
    servers: list[RunningServer], films: Catalog, changed_films: Catalog
) -> None:
    first = _start(servers, Scorer(DEFAULT_PARAMETERS, [films]))
    vector = _user(films, 123)
    with Client(_target(first), timeout=TIMEOUT) as client:
        before = client.score(vector, catalog="films")
        assert np.abs(before - films.embeddings @ vector).max() < 1e-4
        assert client.item_ids("films") == list(films.ids)
        first.stop(grace=None)
        second = _start(servers, Scorer(DEFAULT_PARAMETERS, [changed_films]), first.port)

        # The first call after the change: keys re-registered, catalog re-read, scored.
        after = client.score(vector, catalog="films")
        assert after.shape == (changed_films.item_count,)
        assert np.abs(after - changed_films.embeddings @ vector).max() < 1e-4
        assert client.stats.catalog_refreshes == 1
        assert client.stats.registrations == 2
        assert client.catalog("films").version == changed_films.version

        # recommend ranks with the new version's ids, the new item among them
        top = client.recommend(vector, catalog="films", k=changed_films.item_count)
        assert sorted(item for item, _ in top) == sorted(changed_films.ids)
        best = int(np.argmax(changed_films.embeddings @ vector))
        assert top[0][0] == changed_films.ids[best]
        assert client.stats.catalog_refreshes == 1  # no refusal since
        assert _target(second) == _target(first)


def test_a_stale_version_refused_by_the_server_is_a_stale_catalog_error(
    servers: list[RunningServer], films: Catalog, changed_films: Catalog
) -> None:
    """What the server answers a stale version, mapped: today with no reason (the
    message), and with CATALOG_VERSION_CHANGED once the server gives it."""
    server = _start(servers, Scorer(DEFAULT_PARAMETERS, [changed_films]))
    secret = SecretContext(DEFAULT_PARAMETERS)
    with grpc.insecure_channel(_target(server)) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
        steps = [step for step in info.ckks.galois_steps if step != 0]
        key_id = register_keys(stub, secret.galois_keys(steps))
        query = secret.encrypt(query_slots(_user(films, 124), films.dimension, SLOTS))
        request = pb.ScoreRequest(
            key_id=key_id,
            catalog="films",
            query=query,
            catalog_version=films.version,
            complex_scores=True,
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Score(request, timeout=TIMEOUT))
    error = from_rpc_error(refused.value)
    assert isinstance(error, StaleCatalogError)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason in ("", CATALOG_VERSION_CHANGED)


def test_failed_precondition_maps_by_reason_not_to_stale_catalog_by_default() -> None:
    failed = grpc.StatusCode.FAILED_PRECONDITION
    stale_text = "catalog 'x' is at version a, not b"
    assert error_class(failed, CATALOG_VERSION_CHANGED, "anything") is StaleCatalogError
    assert error_class(failed, "", stale_text) is StaleCatalogError
    conjugation_text = "real-slot scores need the conjugation key (rotation step 0 ...)"
    assert error_class(failed, CONJUGATION_KEY_MISSING, conjugation_text) is (
        ConjugationKeyMissingError
    )
    assert error_class(failed, "", conjugation_text) is PreconditionError
    assert not issubclass(ConjugationKeyMissingError, StaleCatalogError)
    assert issubclass(StaleCatalogError, PreconditionError)


def test_a_missing_conjugation_key_is_not_a_stale_catalog(
    servers: list[RunningServer], films: Catalog
) -> None:
    server = _start(servers, Scorer(DEFAULT_PARAMETERS, [films]))
    secret = SecretContext(DEFAULT_PARAMETERS)
    with grpc.insecure_channel(_target(server)) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
        steps = [step for step in info.ckks.galois_steps if step != 0]  # no conjugation
        key_id = register_keys(stub, secret.galois_keys(steps))
        query = secret.encrypt(query_slots(_user(films, 125), films.dimension, SLOTS))
        request = pb.ScoreRequest(key_id=key_id, catalog="films", query=query)  # real slots
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Score(request, timeout=TIMEOUT))
    error = from_rpc_error(refused.value)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(error, PreconditionError)
    assert not isinstance(error, StaleCatalogError)


def test_permission_denied_and_unauthenticated_have_their_own_errors(
    servers: list[RunningServer], films: Catalog
) -> None:
    alice, bob = "alice-" + os.urandom(8).hex(), "bob-" + os.urandom(8).hex()
    scorer = Scorer(DEFAULT_PARAMETERS, [films])
    server = start_server(
        scorer, "127.0.0.1", 0, authenticator=Authenticator([("alice", alice), ("bob", bob)])
    )
    servers.append(server)
    with pytest.raises(UnauthenticatedError) as anonymous:
        Client(_target(server), timeout=TIMEOUT)
    assert anonymous.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(_target(server), token=alice, timeout=TIMEOUT) as client:
        alices_key = client.register_keys()
    with (
        Client(_target(server), token=bob, timeout=TIMEOUT) as client,
        grpc.insecure_channel(_target(server)) as channel,
    ):
        stub = pb_grpc.ScoringServiceStub(channel)
        bearer = (("authorization", f"Bearer {bob}"),)
        with pytest.raises(grpc.RpcError) as refused:
            stub.DeleteKeys(
                pb.DeleteKeysRequest(key_id=alices_key), timeout=TIMEOUT, metadata=bearer
            )
        error = from_rpc_error(refused.value)
        assert isinstance(error, PermissionDeniedError)
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert client.catalogs()[0].name == "films"


def test_an_unknown_catalog_names_the_ones_the_server_serves(
    servers: list[RunningServer], films: Catalog
) -> None:
    books = make_catalog("books", 40, 8, seed=126)
    server = _start(servers, Scorer(DEFAULT_PARAMETERS, [films, books]))
    with (
        Client(_target(server), timeout=TIMEOUT) as client,
        pytest.raises(NotFoundError) as unknown,
    ):
        client.score(_user(films, 127), catalog="movies")
    assert "'movies'" in str(unknown.value)
    assert "it serves: 'books', 'films'" in str(unknown.value)


# --- across a restart: UNAVAILABLE retried within the deadline (item 2) -----------------


def test_a_call_made_while_the_server_restarts_waits_for_it_within_its_deadline(
    servers: list[RunningServer], films: Catalog
) -> None:
    first = _start(servers, Scorer(DEFAULT_PARAMETERS, [films]))
    port = first.port
    vector = _user(films, 128)
    expected = films.embeddings @ vector
    # The second server's catalog is encoded before the outage: the restart is short.
    second_scorer = Scorer(DEFAULT_PARAMETERS, [films])
    with Client(_target(first), timeout=TIMEOUT) as client, ThreadPoolExecutor(1) as background:
        client.score(vector, catalog="films")
        first.stop(grace=None)

        pending = background.submit(client.score, vector, catalog="films")
        deadline = time.monotonic() + TIMEOUT
        while client.stats.retries < 2:  # the call is failing and retrying
            assert not pending.done(), pending.exception()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _start(servers, second_scorer, port)

        scores = pending.result(timeout=TIMEOUT)
        assert np.abs(scores - expected).max() < 1e-4
        assert client.stats.registrations == 2  # the new server's key store is empty


def test_unavailable_is_retried_only_until_the_deadline_and_only_when_asked(
    servers: list[RunningServer], films: Catalog
) -> None:
    server = _start(servers, Scorer(DEFAULT_PARAMETERS, [films]))
    vector = _user(films, 129)
    with Client(_target(server), timeout=1.5) as client:
        client.score(vector, catalog="films")
        server.stop(grace=None)
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError) as failed:
            client.score(vector, catalog="films")
        took = time.monotonic() - started
        assert 0.5 < took < 1.5 + 1.0, took  # retried, then gave up by the deadline
        assert client.stats.retries >= 2
        assert failed.value.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )

        client.retry_unavailable = False
        retries = client.stats.retries
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError):
            client.score(vector, catalog="films")
        assert time.monotonic() - started < 1.0
        assert client.stats.retries == retries


def test_the_first_call_is_not_retried_so_a_wrong_address_fails_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError):
        Client(f"127.0.0.1:{free_port()}", timeout=20)  # nothing listens there
    assert time.monotonic() - started < 5.0


# --- a key file keeps its registration (item 10) ----------------------------------------


def test_a_key_file_keeps_its_registration_across_clients_until_erased(
    servers: list[RunningServer], films: Catalog, tmp_path: Path
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [films])
    server = _start(servers, scorer)
    key_file = tmp_path / "user.key"
    record = tmp_path / "user.key.registration"
    vector = _user(films, 130)
    expected = films.embeddings @ vector

    with Client(_target(server), key_file=key_file, timeout=TIMEOUT) as first:
        assert np.abs(first.score(vector, catalog="films") - expected).max() < 1e-4
        assert first.stats.registrations == 1
        key_id = first._session.key_id
    assert scorer.keys.touch(key_id), "close() erased keys the key file means to keep"
    assert record.stat().st_mode & 0o077 == 0
    saved = json.loads(record.read_text())[_target(server)]
    assert saved["key_id"] == key_id
    assert saved["expires_at"] > time.time() + 0.9 * scorer.retention.ttl_seconds

    # A second run: no upload, the same key_id, correct scores.
    with Client(_target(server), key_file=key_file, timeout=TIMEOUT) as second:
        assert np.abs(second.score(vector, catalog="films") - expected).max() < 1e-4
        assert second.stats.registrations == 0
        assert second.stats.key_bytes_sent == 0
        assert second._session.key_id == key_id

    # Erasing is explicit: the keys leave the server and the record.
    with Client(
        _target(server), key_file=key_file, timeout=TIMEOUT, forget_keys_on_close=True
    ) as third:
        third.score(vector, catalog="films")
        assert third.stats.registrations == 0
    assert not scorer.keys.touch(key_id)
    assert _target(server) not in json.loads(record.read_text())

    # Without a key file, close() erases by default.
    with Client(_target(server), timeout=TIMEOUT) as ephemeral:
        ephemeral.score(vector, catalog="films")
        ephemeral_key = ephemeral._session.key_id
    assert not scorer.keys.touch(ephemeral_key)


def test_a_kept_registration_the_server_lost_or_that_expired_is_registered_again(
    servers: list[RunningServer], films: Catalog, tmp_path: Path
) -> None:
    first = _start(servers, Scorer(DEFAULT_PARAMETERS, [films]))
    key_file = tmp_path / "user.key"
    record = tmp_path / "user.key.registration"
    vector = _user(films, 131)
    expected = films.embeddings @ vector
    with Client(_target(first), key_file=key_file, timeout=TIMEOUT) as client:
        client.score(vector, catalog="films")
    first.stop(grace=None)

    # A restarted server does not hold the kept key_id: KEY_NOT_FOUND, registered again.
    second_scorer = Scorer(DEFAULT_PARAMETERS, [films])
    second = _start(servers, second_scorer, first.port)
    with Client(_target(second), key_file=key_file, timeout=TIMEOUT) as client:
        assert np.abs(client.score(vector, catalog="films") - expected).max() < 1e-4
        assert client.stats.registrations == 1
        renewed = client._session.key_id
    assert json.loads(record.read_text())[_target(second)]["key_id"] == renewed

    # A record past its TTL is not even tried.
    entries = json.loads(record.read_text())
    entries[_target(second)]["expires_at"] = time.time() - 1
    record.write_text(json.dumps(entries))
    with Client(_target(second), key_file=key_file, timeout=TIMEOUT) as client:
        assert client._session.key_id == ""
        client.score(vector, catalog="films")
        assert client.stats.registrations == 1


def test_a_kept_registration_of_another_token_is_replaced_not_refused(
    servers: list[RunningServer], films: Catalog, tmp_path: Path
) -> None:
    alice, bob = "alice-" + os.urandom(8).hex(), "bob-" + os.urandom(8).hex()
    scorer = Scorer(DEFAULT_PARAMETERS, [films])
    server = start_server(
        scorer, "127.0.0.1", 0, authenticator=Authenticator([("alice", alice), ("bob", bob)])
    )
    servers.append(server)
    key_file = tmp_path / "shared.key"
    vector = _user(films, 132)
    with Client(_target(server), key_file=key_file, token=alice, timeout=TIMEOUT) as client:
        client.score(vector, catalog="films")
    with Client(_target(server), key_file=key_file, token=bob, timeout=TIMEOUT) as client:
        scores = client.score(vector, catalog="films")
        assert client.stats.registrations == 1  # PERMISSION_DENIED on alice's key_id
    assert np.abs(scores - films.embeddings @ vector).max() < 1e-4
