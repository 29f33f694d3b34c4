"""The catalog admin service over gRPC (issue 11): a real server on loopback, real
encryption. Upserts and deletes show in decrypted scores and in ListItems; the service
is refused without an admin token (an API token is none), absent unless configured,
and bounds what a request holds; a failed change changes nothing; ReloadCatalogs
reports each catalog's outcome while a broken file's catalog keeps its version."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import TIMEOUT, make_catalog, serving
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from heserve.admin.v1 import admin_pb2 as apb
from heserve.admin.v1 import admin_pb2_grpc as apb_grpc
from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.ops import config
from heserve.ops.cli import reload_catalogs
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.reasons import CATALOG_VERSION_CHANGED
from heserve.transport.admin import change_outcome, change_outcome_name
from heserve.transport.auth import ADMIN_PREFIX, Authenticator, TokenError
from heserve.transport.interceptors import MAX_METADATA_BYTES
from heserve.transport.server import AdminConfig, OneAtATime, RunningServer, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client

ADMIN_TOKEN = "admin-token-" + "a" * 24
API_TOKEN = "api-token-" + "b" * 24
ITEMS, DIMENSION = 300, 16


def _admin(token: str = ADMIN_TOKEN) -> Authenticator:
    return Authenticator([("ops", token)], prefix=ADMIN_PREFIX)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def shop() -> Catalog:
    return make_catalog("shop", ITEMS, DIMENSION, seed=71)


@pytest.fixture
def served(shop: Catalog) -> Iterator[tuple[Scorer, RunningServer]]:
    """A server with API and admin tokens over a fresh scorer (each test changes it)."""
    scorer = Scorer(DEFAULT_PARAMETERS, [shop], max_update_items=8)
    with serving(
        scorer,
        authenticator=Authenticator([("alice", API_TOKEN)]),
        admin=AdminConfig(_admin()),
    ) as running:
        yield scorer, running


@pytest.fixture
def admin_stub(served: tuple[Scorer, RunningServer]) -> Iterator[apb_grpc.CatalogAdminServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{served[1].port}") as channel:
        yield apb_grpc.CatalogAdminServiceStub(channel)


def _client(running: RunningServer) -> Client:
    return Client(f"127.0.0.1:{running.port}", token=API_TOKEN)


def _items(ids: list[str], rows: np.ndarray) -> list[apb.Item]:
    return [apb.Item(id=i, embedding=row.tolist()) for i, row in zip(ids, rows, strict=True)]


def _update(stub: apb_grpc.CatalogAdminServiceStub, **fields: Any) -> apb.UpdateItemsResponse:
    """An UpdateItems call on the catalog "shop" with the admin token."""
    request = apb.UpdateItemsRequest(catalog="shop", **fields)
    reply: apb.UpdateItemsResponse = stub.UpdateItems(
        request, timeout=TIMEOUT, metadata=_bearer(ADMIN_TOKEN)
    )
    return reply


def test_an_upsert_and_a_delete_show_in_decrypted_scores_and_in_list_items(
    served: tuple[Scorer, RunningServer], admin_stub: apb_grpc.CatalogAdminServiceStub
) -> None:
    scorer, running = served
    before = scorer.catalog("shop").catalog
    user = unit_rows(1, DIMENSION, seed=72)[0]
    fresh = unit_rows(3, DIMENSION, seed=73)
    with _client(running) as client:
        client.score(user, catalog="shop")  # keys registered, catalog read: then it changes

        reply = _update(
            admin_stub,
            upserts=_items(["shop-5", "new-1", "new-2"], fresh),  # one replaced, two added
            if_version=before.version,
        )
        change = reply.change
        assert change.outcome == apb.CATALOG_CHANGE_OUTCOME_UPDATED
        assert (change.catalog, change.previous_version) == ("shop", before.version)
        assert change.version != before.version
        assert (change.upserted, change.deleted, change.item_count) == (3, 0, ITEMS + 2)
        assert 1 <= change.chunks_rewritten <= change.chunk_count

        expected = np.vstack([before.embeddings, fresh[1:]]).astype(np.float64)
        expected[5] = fresh[0]
        client.catalogs()  # read again: the version and the count changed
        assert client.catalog("shop").version == change.version
        assert client.catalog("shop").item_count == ITEMS + 2
        ids = client.item_ids("shop")
        assert ids == [*before.ids, "new-1", "new-2"]
        np.testing.assert_allclose(
            client.score(user, catalog="shop"), expected @ user, rtol=0, atol=1e-4
        )

        reply = _update(admin_stub, delete_ids=["shop-7", "new-1"], if_version=change.version)
        assert (reply.change.deleted, reply.change.item_count) == (2, ITEMS)
        client.catalogs()
        ids_after = client.item_ids("shop")
        assert "shop-7" not in ids_after and "new-1" not in ids_after
        assert sorted(ids_after) == sorted(set(ids) - {"shop-7", "new-1"})
        rows = {item_id: expected[ids.index(item_id)] for item_id in ids_after}
        np.testing.assert_allclose(
            client.score(user, catalog="shop"),
            np.array([rows[item_id] for item_id in ids_after]) @ user,
            rtol=0,
            atol=1e-4,
        )


@pytest.mark.parametrize(
    "metadata",
    [(), _bearer(API_TOKEN), _bearer("unknown-token-" + "c" * 20)],
    ids=["no token", "an API token", "an unknown token"],
)
def test_the_admin_service_is_refused_without_an_admin_token_and_nothing_changes(
    served: tuple[Scorer, RunningServer],
    admin_stub: apb_grpc.CatalogAdminServiceStub,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    scorer, _ = served
    version = scorer.catalog("shop").catalog.version
    request = apb.UpdateItemsRequest(catalog="shop", delete_ids=["shop-1"])
    for method, message in (
        (admin_stub.UpdateItems, request),
        (admin_stub.ReloadCatalogs, apb.ReloadCatalogsRequest()),
        (admin_stub.ListCatalogs, apb.ListCatalogsRequest()),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            method(message, timeout=TIMEOUT, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "admin token" in str(refused.value.details())
    assert scorer.catalog("shop").catalog.version == version


def test_an_admin_token_does_not_open_the_scoring_service(
    served: tuple[Scorer, RunningServer],
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served[1].port}") as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListCatalogs(
                pb.ListCatalogsRequest(), timeout=TIMEOUT, metadata=_bearer(ADMIN_TOKEN)
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _services(port: int) -> set[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
        )
    return {service.name for service in reply.list_services_response.service}


def test_without_admin_tokens_the_service_is_unimplemented_and_not_reflected(
    shop: Catalog,
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [shop])
    with (
        serving(scorer) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = apb_grpc.CatalogAdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.UpdateItems(
                apb.UpdateItemsRequest(catalog="shop", delete_ids=["shop-1"]),
                timeout=TIMEOUT,
                metadata=_bearer(ADMIN_TOKEN),
            )
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "heserve.admin.v1.CatalogAdminService" not in _services(running.port)
    assert scorer.catalog("shop").catalog.version == shop.version


def test_with_admin_tokens_reflection_lists_the_admin_service(
    served: tuple[Scorer, RunningServer],
) -> None:
    assert "heserve.admin.v1.CatalogAdminService" in _services(served[1].port)


def test_an_admin_token_that_is_also_an_api_token_is_refused_at_start_up(shop: Catalog) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [shop])
    with pytest.raises(TokenError, match="also API tokens") as refused:
        start_server(
            scorer,
            "127.0.0.1",
            0,
            authenticator=Authenticator([("alice", API_TOKEN)]),
            admin=AdminConfig(_admin(API_TOKEN)),
        )
    assert API_TOKEN not in str(refused.value)


@pytest.mark.parametrize(
    ("fields", "code", "says"),
    [
        (  # 9 items past the limit of 8: refused before a row is allocated
            {"delete_ids": [f"shop-{i}" for i in range(9)]},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "9 items exceed the limit of 8",
        ),
        (
            {"upserts": [apb.Item(id="x", embedding=[0.1] * (DIMENSION + 1))]},
            grpc.StatusCode.INVALID_ARGUMENT,
            f"has {DIMENSION + 1} values",
        ),
        (
            {"upserts": [apb.Item(id="x" * 10_000, embedding=[0.1] * DIMENSION)]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "of 10000 characters exceeds 256",
        ),
        (
            {"delete_ids": ["y" * 10_000]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "of 10000 characters exceeds 256",
        ),
        (
            {"upserts": [apb.Item(id="x", embedding=[float("nan")] * DIMENSION)]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN",
        ),
        (
            {"upserts": [apb.Item(id="x", embedding=[20.0] * DIMENSION)]},  # norm 80 > 64
            grpc.StatusCode.INVALID_ARGUMENT,
            "norm",
        ),
        (
            {
                "upserts": [
                    apb.Item(id="x", embedding=[0.1] * DIMENSION, popularity=1.0),
                    apb.Item(id="z", embedding=[0.1] * DIMENSION),
                ]
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "popularity is set on 1 of 2 upserts",
        ),
        ({"delete_ids": ["no-such-item"]}, grpc.StatusCode.NOT_FOUND, "no-such-item"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "nothing to change"),
    ],
    ids=[
        "too many items",
        "wrong embedding length",
        "10 KB upsert id",
        "10 KB delete id",
        "NaN",
        "norm above 1",
        "popularity on some",
        "unknown delete id",
        "empty",
    ],
)
def test_a_refused_update_has_its_own_status_and_changes_nothing(
    served: tuple[Scorer, RunningServer],
    admin_stub: apb_grpc.CatalogAdminServiceStub,
    fields: dict[str, Any],
    code: grpc.StatusCode,
    says: str,
) -> None:
    scorer, running = served
    version = scorer.catalog("shop").catalog.version
    with pytest.raises(grpc.RpcError) as refused:
        _update(admin_stub, **fields)
    assert refused.value.code() == code
    assert says in str(refused.value.details())
    assert len(str(refused.value.details())) < 1024  # a 10 KB id is not echoed back
    assert scorer.catalog("shop").catalog.version == version
    with _client(running) as client:
        assert client.catalog("shop").version == version
        assert client.catalog("shop").item_count == ITEMS


def test_an_update_against_another_version_fails_its_precondition(
    served: tuple[Scorer, RunningServer], admin_stub: apb_grpc.CatalogAdminServiceStub
) -> None:
    scorer, _ = served
    version = scorer.catalog("shop").catalog.version
    with pytest.raises(grpc.RpcError) as refused:
        _update(admin_stub, delete_ids=["shop-1"], if_version="0123456789abcdef")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == CATALOG_VERSION_CHANGED
    assert scorer.catalog("shop").catalog.version == version


def test_admin_calls_are_logged_under_the_admin_caller_without_item_data(
    served: tuple[Scorer, RunningServer],
    admin_stub: apb_grpc.CatalogAdminServiceStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_id = "secret-item-id-42"
    with caplog.at_level(logging.DEBUG):
        _update(admin_stub, upserts=_items([secret_id], unit_rows(1, DIMENSION, seed=74)))
    access = [
        r
        for r in caplog.records
        if r.name == "heserve.access" and "UpdateItems OK" in r.msg % r.args
    ]
    assert [r.fields["caller"] for r in access] == ["admin:ops"]  # type: ignore[attr-defined]
    changes = [r for r in caplog.records if "upserted" in r.getMessage()]
    assert len(changes) == 1 and "1 upserted" in changes[0].getMessage()
    assert not any(secret_id in r.getMessage() for r in caplog.records)


def _reloading_server(scorer: Scorer, settings: config.Settings) -> RunningServer:
    reload = OneAtATime(lambda: reload_catalogs(scorer, settings))
    return start_server(scorer, "127.0.0.1", 0, admin=AdminConfig(_admin(), reload))


def test_reload_catalogs_reports_each_catalog_and_a_broken_file_keeps_its_version(
    tmp_path: Path,
) -> None:
    np.save(tmp_path / "a.npy", unit_rows(200, 8, seed=75))
    np.save(tmp_path / "b.npy", unit_rows(100, 8, seed=76))
    np.save(tmp_path / "c.npy", unit_rows(100, 8, seed=77))
    settings = config.Settings(
        catalog=(("a", tmp_path / "a.npy"), ("b", tmp_path / "b.npy"), ("c", tmp_path / "c.npy"))
    )
    scorer = Scorer(
        DEFAULT_PARAMETERS,
        [
            Catalog(name, np.load(path), tuple(map(str, range(len(np.load(path))))))
            for name, path in settings.catalog
        ],
    )
    versions = {name: entry.catalog.version for name, entry in scorer.catalogs.items()}
    replaced = unit_rows(200, 8, seed=78)
    np.save(tmp_path / "a.npy", replaced)  # a new version
    (tmp_path / "b.npy").write_bytes(b"corrupt: not a numpy file")  # c stays as it is
    running = _reloading_server(scorer, settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            reply = apb_grpc.CatalogAdminServiceStub(channel).ReloadCatalogs(
                apb.ReloadCatalogsRequest(), timeout=TIMEOUT, metadata=_bearer(ADMIN_TOKEN)
            )
        a, b, c = reply.changes
        assert (a.catalog, a.outcome, a.previous_version) == (
            "a",
            apb.CATALOG_CHANGE_OUTCOME_REPLACED,
            versions["a"],
        )
        assert a.version != versions["a"] and a.chunks_rewritten == a.chunk_count > 0
        assert (b.catalog, b.outcome, b.version) == (
            "b",
            apb.CATALOG_CHANGE_OUTCOME_FAILED,
            versions["b"],
        )
        assert "b.npy" in b.error and "\n" not in b.error
        registry = running.metrics.registry
        for catalog, outcome in (("a", "replaced"), ("b", "failed"), ("c", "unchanged")):
            labels = {"catalog": catalog, "kind": "reload", "outcome": outcome}
            assert registry.get_sample_value("heserve_catalog_changes_total", labels) == 1
        served_items = {"catalog": "a", "version": a.version}
        assert registry.get_sample_value("heserve_catalog_items", served_items) == 200
        assert (
            registry.get_sample_value(
                "heserve_catalog_items", {"catalog": "b", "version": versions["b"]}
            )
            == 100
        )
        assert (c.catalog, c.outcome, c.version, c.error) == (
            "c",
            apb.CATALOG_CHANGE_OUTCOME_UNCHANGED,
            versions["c"],
            "",
        )
        user = unit_rows(1, 8, seed=79)[0]
        with Client(f"127.0.0.1:{running.port}") as client:
            np.testing.assert_allclose(
                client.score(user, catalog="a"), replaced @ user, rtol=0, atol=1e-4
            )
            assert client.catalog("b").version == versions["b"]  # the old b serves on
            np.testing.assert_allclose(
                client.score(user, catalog="b"),
                unit_rows(100, 8, seed=76) @ user,
                rtol=0,
                atol=1e-4,
            )
    finally:
        running.stop(grace=None)


def test_reload_catalogs_without_catalog_files_fails_its_precondition(shop: Catalog) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [shop])
    with (
        serving(scorer, admin=AdminConfig(_admin())) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        apb_grpc.CatalogAdminServiceStub(channel).ReloadCatalogs(
            apb.ReloadCatalogsRequest(), timeout=TIMEOUT, metadata=_bearer(ADMIN_TOKEN)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_an_admin_call_with_oversized_metadata_is_refused_and_changes_nothing(
    served: tuple[Scorer, RunningServer], admin_stub: apb_grpc.CatalogAdminServiceStub
) -> None:
    scorer, _ = served
    before = scorer.catalog("shop")
    metadata = (*_bearer(ADMIN_TOKEN), ("x-note", "n" * MAX_METADATA_BYTES))
    with pytest.raises(grpc.RpcError) as refused:
        admin_stub.UpdateItems(
            apb.UpdateItemsRequest(catalog="shop", delete_ids=["shop-1"]),
            timeout=TIMEOUT,
            metadata=metadata,
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert scorer.catalog("shop") is before


def test_every_catalog_change_outcome_round_trips_by_its_name() -> None:
    for name in ("updated", "replaced", "unchanged", "failed"):
        assert change_outcome_name(change_outcome(name)) == name
    values = apb.CatalogChangeOutcome.values()
    assert {change_outcome_name(v) for v in values} >= {"updated", "replaced", "unchanged"}
    assert change_outcome("no such outcome") == apb.CATALOG_CHANGE_OUTCOME_UNSPECIFIED
    assert change_outcome_name(99) == "outcome 99"


def test_list_catalogs_gives_the_version_an_update_compares_with(
    served: tuple[Scorer, RunningServer], admin_stub: apb_grpc.CatalogAdminServiceStub
) -> None:
    scorer, _ = served
    metadata = _bearer(ADMIN_TOKEN)
    (state,) = admin_stub.ListCatalogs(
        apb.ListCatalogsRequest(), timeout=TIMEOUT, metadata=metadata
    ).catalogs
    served_now = scorer.catalog("shop")
    assert (state.catalog, state.version, state.item_count, state.dimension) == (
        "shop",
        served_now.catalog.version,
        ITEMS,
        DIMENSION,
    )
    assert state.chunk_count == 1 and state.updates_since_source == 0
    change = _update(admin_stub, delete_ids=["shop-3"], if_version=state.version).change
    (state,) = admin_stub.ListCatalogs(
        apb.ListCatalogsRequest(), timeout=TIMEOUT, metadata=metadata
    ).catalogs
    assert (state.version, state.item_count) == (change.version, ITEMS - 1)
    assert state.updates_since_source == 1


def test_a_server_side_re_ranking_is_answered_by_the_version_served_without_a_retry(
    served: tuple[Scorer, RunningServer], admin_stub: apb_grpc.CatalogAdminServiceStub
) -> None:
    """Candidates are named by id, so a re-ranking needs no pinned version: after an
    update the client's cached version is stale, and the call is answered at once by the
    new version (it reads no catalog again), in the order asked."""
    scorer, running = served
    user = unit_rows(1, DIMENSION, seed=90)[0]
    row = unit_rows(1, DIMENSION, seed=91)
    with Client(f"127.0.0.1:{running.port}", token=API_TOKEN, rerank_locally=False) as client:
        stale = client.catalog("shop").version
        client.score(user, catalog="shop", item_ids=["shop-2"])  # keys registered
        _update(admin_stub, upserts=_items(["shop-4"], row), delete_ids=["shop-9"])
        assert client.catalog("shop").version == stale  # the client has not looked again
        scores = client.score(user, catalog="shop", item_ids=["shop-4", "shop-1"])
        assert client.catalog("shop").version == stale  # ... and did not need to
    served_now = scorer.catalog("shop").catalog
    expected = served_now.rows.take(served_now.positions_of(["shop-4", "shop-1"])) @ user
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores[0], row[0].astype(np.float32) @ user, rtol=0, atol=1e-4)
