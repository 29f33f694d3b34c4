"""Catalog changes under a steady load (issue 11's target: "under a steady load of
concurrent recommends, 10 reloads in a row fail no query except those that pinned the
old version"). A real server on loopback over the process-pool backend; three client
threads recommend and score in a loop while the admin service reloads the catalog ten
times (alternating between two versions, as a file rewritten by a pipeline would) and
updates items three times. Every change happens while every client is in its loop:
before each one, each client has finished two calls since the last.

No client call fails (the Python client retries once on CATALOG_VERSION_CHANGED, and
reads the catalog again exactly once per change); every result equals numpy on the
version it was computed under, per item id, as the test expects each version to hold;
a raw call pinned to a version that was swapped out gets FAILED_PRECONDITION
(CATALOG_VERSION_CHANGED), and one pinned to the served version succeeds."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from conftest import TIMEOUT, raw_scores, register_keys, serving
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from heserve.admin.v1 import admin_pb2 as apb
from heserve.admin.v1 import admin_pb2_grpc as apb_grpc
from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import CatalogChange, Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.reasons import CATALOG_VERSION_CHANGED
from heserve.protocol.slots import query_slots
from heserve.transport.auth import ADMIN_PREFIX, Authenticator
from heserve.transport.server import AdminConfig, OneAtATime
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client, SecretContext

SLOTS = DEFAULT_PARAMETERS.slot_count
ITEMS, DIMENSION = 3 * SLOTS, 16  # two chunks: one per worker process
IDS = tuple(f"s{i}" for i in range(ITEMS))
ADMIN_TOKEN = "admin-token-" + "c" * 24
CLIENTS = 3
CALLS_BETWEEN_CHANGES = 2  # per client: the one in flight at the swap, and one after
RELOADS = 10
UPDATE_AFTER_RELOADS = (3, 6, 9)
TOLERANCE = 1e-4
K = 5


def _rows(seed: int) -> dict[str, np.ndarray]:
    """A version's items as the test expects them served: id → row (float32, as held)."""
    rows = unit_rows(ITEMS, DIMENSION, seed).astype(np.float32)
    return dict(zip(IDS, rows, strict=True))


@dataclass
class Load:
    """What the client threads did: calls finished per thread (under a condition the
    test waits on), what each call returned and under which version, and failures."""

    finished: list[int] = field(default_factory=lambda: [0] * CLIENTS)
    served: list[tuple[int, str]] = field(default_factory=list)
    """(thread, catalog version) of each call, in the order they finished"""
    scores: list[tuple[int, str, np.ndarray]] = field(default_factory=list)
    rankings: list[tuple[int, str, list[tuple[str, float]]]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    refreshes: list[int] = field(default_factory=lambda: [0] * CLIENTS)
    changed: threading.Condition = field(default_factory=threading.Condition)
    stop: threading.Event = field(default_factory=threading.Event)

    def wait_for_calls(self) -> None:
        """Until every thread has finished CALLS_BETWEEN_CHANGES more calls from now (or
        one failed). Called right after a change, it means every client has been served
        the new version, and that the next change happens while they are calling."""
        with self.changed:
            marks = list(self.finished)

            def ready() -> bool:
                counts = zip(self.finished, marks, strict=True)
                more = all(n >= m + CALLS_BETWEEN_CHANGES for n, m in counts)
                return more or bool(self.failures)

            done = self.changed.wait_for(ready, timeout=TIMEOUT)
            assert done, f"the clients did not keep calling: {self.finished} after {marks}"
            assert not self.failures, f"a client call failed: {self.failures[0]!r}"


def _vector(thread: int) -> np.ndarray:
    vector: np.ndarray = unit_rows(1, DIMENSION, 200 + thread)[0]
    return vector


def _run_client(target: str, thread: int, load: Load) -> None:
    """Recommend and score in turn until told to stop, noting each result's version."""
    vector = _vector(thread)
    try:
        with Client(target) as client:
            call = 0
            while not load.stop.is_set():
                scores = ranking = None
                if call % 2:
                    scores = client.score(vector, catalog="shop")
                else:
                    ranking = client.recommend(vector, catalog="shop", k=K)
                # the client's catalog information is the version this call was scored
                # under: it changes only when a stale version is refused and read again
                version = client.catalog("shop").version
                with load.changed:
                    load.served.append((thread, version))
                    if scores is not None:
                        load.scores.append((thread, version, scores))
                    if ranking is not None:
                        load.rankings.append((thread, version, ranking))
                    load.finished[thread] += 1
                    load.refreshes[thread] = client.stats.catalog_refreshes
                    load.changed.notify_all()
                call += 1
    except BaseException as exc:  # reported to the test, which fails on it
        with load.changed:
            load.failures.append(exc)
            load.changed.notify_all()


@pytest.fixture
def scorer() -> Iterator[Scorer]:
    catalog = Catalog("shop", np.vstack(list(_rows(1).values())), IDS)
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2)
    served = Scorer(DEFAULT_PARAMETERS, [catalog], backend=backend)
    try:
        yield served
    finally:
        backend.close()


def _bearer() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def _refused_as_stale(call: grpc.RpcError) -> bool:
    status = rpc_status.from_call(call)  # type: ignore[arg-type]
    if call.code() != grpc.StatusCode.FAILED_PRECONDITION or status is None:
        return False
    info = error_details_pb2.ErrorInfo()
    unpacked = bool(status.details) and status.details[0].Unpack(info)
    return unpacked and info.reason == CATALOG_VERSION_CHANGED


def test_reloads_and_updates_under_load_fail_only_pinned_queries(
    scorer: Scorer, secret: SecretContext
) -> None:
    first = scorer.catalog("shop").catalog
    sources = {1: _rows(1), 2: _rows(2)}
    source = [first]  # the catalog "file" a reload reads: the test rewrites it

    def reload() -> list[CatalogChange]:
        return [scorer.reload("shop", lambda: source[0])]

    expected: dict[str, dict[str, np.ndarray]] = {first.version: sources[1]}
    versions = [first.version]  # served one after the other
    load = Load()
    admin = AdminConfig(
        Authenticator([("ops", ADMIN_TOKEN)], prefix=ADMIN_PREFIX), OneAtATime(reload)
    )
    with serving(scorer, admin=admin) as running:
        target = f"127.0.0.1:{running.port}"
        threads = [
            threading.Thread(target=_run_client, args=(target, t, load), name=f"load-{t}")
            for t in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        try:
            with grpc.insecure_channel(target) as channel:
                admin_stub = apb_grpc.CatalogAdminServiceStub(channel)
                stub = pb_grpc.ScoringServiceStub(channel)
                key_id = register_keys(stub, secret.galois_keys(scorer.galois_steps))
                orders = {first.version: tuple(_listed_ids(stub))}
                load.wait_for_calls()
                for reload_number in range(1, RELOADS + 1):
                    seed = 2 if reload_number % 2 else 1  # 2, 1, 2, ...: always a new version
                    source[0] = Catalog("shop", np.vstack(list(sources[seed].values())), IDS)
                    reply = admin_stub.ReloadCatalogs(
                        apb.ReloadCatalogsRequest(), timeout=TIMEOUT, metadata=_bearer()
                    )
                    (change,) = reply.changes
                    assert change.outcome == apb.CATALOG_CHANGE_OUTCOME_REPLACED, change.error
                    assert change.previous_version == versions[-1]
                    expected[change.version] = sources[seed]
                    versions.append(change.version)
                    load.wait_for_calls()
                    _check_pinned(stub, secret, key_id, versions, expected, orders)
                    if reload_number in UPDATE_AFTER_RELOADS:
                        _update(admin_stub, reload_number, versions, expected)
                        load.wait_for_calls()
                        _check_pinned(stub, secret, key_id, versions, expected, orders)
        finally:
            load.stop.set()
            for thread in threads:
                thread.join(timeout=TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert not load.failures, f"a client call failed: {load.failures[0]!r}"

    changes = RELOADS + len(UPDATE_AFTER_RELOADS)
    assert len(versions) == changes + 1
    assert len(set(versions)) == 2 + len(UPDATE_AFTER_RELOADS)  # two files, three updates
    # each client was refused a stale version, and read the catalog again, once per change
    assert load.refreshes == [changes] * CLIENTS
    _check_results(load, expected, orders, versions)


def _update(
    admin_stub: apb_grpc.CatalogAdminServiceStub,
    number: int,
    versions: list[str],
    expected: dict[str, dict[str, np.ndarray]],
) -> None:
    """Upsert three items (one replaced in each chunk, so on each worker, and one new
    that fills the hole of the one deleted), on the served version."""
    ids = [f"s{number}", f"s{2 * SLOTS + number}", f"new-{number}"]
    rows = unit_rows(3, DIMENSION, 300 + number).astype(np.float32)
    deleted = f"s{100 + number}"
    request = apb.UpdateItemsRequest(
        catalog="shop",
        upserts=[apb.Item(id=i, embedding=row.tolist()) for i, row in zip(ids, rows, strict=True)],
        delete_ids=[deleted],
        if_version=versions[-1],
    )
    change = admin_stub.UpdateItems(request, timeout=TIMEOUT, metadata=_bearer()).change
    assert change.outcome == apb.CATALOG_CHANGE_OUTCOME_UPDATED, change.error
    assert (change.previous_version, change.upserted, change.deleted) == (versions[-1], 3, 1)
    assert change.chunks_rewritten == change.chunk_count == 2
    items = {**expected[versions[-1]], **dict(zip(ids, rows, strict=True))}
    del items[deleted]
    expected[change.version] = items
    versions.append(change.version)


def _check_pinned(
    stub: pb_grpc.ScoringServiceStub,
    secret: SecretContext,
    key_id: str,
    versions: list[str],
    expected: dict[str, dict[str, np.ndarray]],
    orders: dict[str, tuple[str, ...]],
) -> None:
    """A raw Score pinned to the version swapped out is refused as stale; one pinned to
    the served version scores it. Notes the served version's order of ids (ListItems)."""
    vector = _vector(CLIENTS)
    request = pb.ScoreRequest(
        key_id=key_id,
        catalog="shop",
        query=secret.encrypt(query_slots(vector, DIMENSION, SLOTS)),
        catalog_version=versions[-2],
        complex_scores=True,
    )
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Score(request, timeout=TIMEOUT))
    assert _refused_as_stale(refused.value), refused.value
    request.catalog_version = versions[-1]
    items = expected[versions[-1]]
    listed = orders[versions[-1]] = tuple(_listed_ids(stub))
    scores = raw_scores(stub, secret, request, len(listed))
    assert sorted(listed) == sorted(items)
    want = np.array([items[i] @ vector for i in listed])
    np.testing.assert_allclose(scores, want, rtol=0, atol=TOLERANCE)


def _listed_ids(stub: pb_grpc.ScoringServiceStub) -> list[str]:
    """The served version's ids in catalog order, as ListItems gives them."""
    ids: list[str] = []
    token = ""
    while True:
        page = stub.ListItems(
            pb.ListItemsRequest(catalog="shop", page_size=10_000, page_token=token),
            timeout=TIMEOUT,
        )
        ids.extend(page.item_ids)
        token = page.next_page_token
        if not token:
            return ids


def _check_results(
    load: Load,
    expected: dict[str, dict[str, np.ndarray]],
    orders: dict[str, tuple[str, ...]],
    versions: list[str],
) -> None:
    """Every result equals numpy on the version it was computed under, id by id (a
    score array in that version's order of ids, as ListItems gave it)."""
    assert {version for _, version in load.served} <= set(versions)
    # every client was served every version in turn (it called twice after each change)
    for thread in range(CLIENTS):
        seen = [version for t, version in load.served if t == thread]
        assert [v for i, v in enumerate(seen) if i == 0 or v != seen[i - 1]] == versions
    for thread, version, scores in load.scores:
        items, vector = expected[version], _vector(thread)
        want = np.array([items[i] @ vector for i in orders[version]])
        np.testing.assert_allclose(scores, want, rtol=0, atol=TOLERANCE)
    for thread, version, ranking in load.rankings:
        items, vector = expected[version], _vector(thread)
        best = max(float(row @ vector) for row in items.values())
        assert len(ranking) == K
        for item, score in ranking:
            assert abs(score - float(items[item] @ vector)) < TOLERANCE
        assert float(items[ranking[0][0]] @ vector) > best - 2 * TOLERANCE  # the top-1
    assert load.scores and load.rankings
