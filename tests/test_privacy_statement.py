"""The privacy statement (GetServerInfo.privacy) says what the running server does.

Each test starts a real server on loopback with one configuration and reads its
statement through the Python client, the way an app would: TLS off, on and mutual;
key TTL and limits; tokens and query budget; noise protections; and the log records
it lists against the records the server really writes at that log level.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import serving
from test_security import Pki, _token, pki  # noqa: F401  (pki: the module's fixture)

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.protection import ScoreProtection
from heserve.domain.scorer import KeyRetentionPolicy, Scorer
from heserve.domain.statement import (
    ACCESS_FIELDS,
    CALL_STARTED_FIELDS,
    SCORE_ACCESS_FIELDS,
    build_statement,
)
from heserve.protocol import convert, privacy
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.auth import Authenticator, QueryBudget
from heserve.transport.server import TlsConfig
from heserve.transport.servicer import ScoringServicer
from heserve.v1 import scoring_pb2 as pb
from heserve_client import Client, PrivacyStatement

ITEMS, DIMENSION = 300, 16


@pytest.fixture(scope="module")
def shelf() -> Catalog:
    return Catalog("shelf", unit_rows(ITEMS, DIMENSION, 131), tuple(f"s{i}" for i in range(ITEMS)))


def _scorer(shelf: Catalog, **options: object) -> Scorer:
    return Scorer(DEFAULT_PARAMETERS, [shelf], **options)  # type: ignore[arg-type]


def _statement(client: Client) -> PrivacyStatement:
    assert client.statement is not None
    return client.statement


def test_a_default_server_states_plaintext_anonymous_keys_only_and_no_protection(
    shelf: Catalog,
) -> None:
    scorer = _scorer(shelf)
    with serving(scorer) as running, Client(f"127.0.0.1:{running.port}") as client:
        statement = _statement(client)

    retention = scorer.retention
    assert statement.statement_version == privacy.STATEMENT_VERSION
    assert statement.transport == privacy.PLAINTEXT
    assert statement.caller_identity == privacy.ANONYMOUS
    assert statement.keys == privacy.KeysKept(
        retention.ttl_seconds, retention.max_keys, retention.max_bytes,
        retention.max_keys_per_caller,
    )  # fmt: skip
    # keys (erasable, idle TTL) and the transient count of running calls: nothing else
    assert [(s.subject, s.idle_ttl_seconds, s.erasable) for s in statement.stored] == [
        ("galois_keys", 3600, True),
        ("calls_in_flight", 0, False),
    ]
    assert {p.name: p.enabled for p in statement.catalog_protections} == {
        "query_budget": False,
        "flood_bits": False,
        "score_noise_std": False,
    }
    assert "without TLS" in " ".join(statement.summary)
    assert {o.subject for o in statement.observations} >= {
        "caller", "peer_address", "catalog", "timing", "sizes", "rerank_candidate_ids",
    }  # fmt: skip
    # the 300-item catalog is re-ranked locally by the Python client: the statement says so
    rerank = next(o for o in statement.observations if o.subject == "rerank_candidate_ids")
    assert "catalogs here: shelf" in rerank.description
    assert set(statement.never_logged) >= {"API tokens", "user vectors", "scores"}


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_a_tls_server_states_tls(shelf: Catalog, pki: Pki, mutual: bool) -> None:  # noqa: F811
    tls = TlsConfig(pki.server_cert, pki.server_key, client_ca=pki.ca if mutual else None)
    client_pems = {"tls_cert": pki.client_cert, "tls_key": pki.client_key} if mutual else {}
    with (
        serving(_scorer(shelf), tls=tls) as running,
        Client(f"127.0.0.1:{running.port}", tls_ca=pki.ca, **client_pems) as client,  # type: ignore[arg-type]
    ):
        statement = _statement(client)

    assert statement.transport == (privacy.MUTUAL_TLS if mutual else privacy.TLS)
    caller = next(o for o in statement.observations if o.subject == "caller")
    assert ("client certificate" in caller.description) is mutual
    assert f"It is served {'over mutual TLS' if mutual else 'over TLS'}." in statement.summary


def test_the_key_ttl_and_limits_are_the_key_stores(shelf: Catalog) -> None:
    retention = KeyRetentionPolicy(ttl_seconds=120, max_keys=7, max_bytes=1 << 28)
    with (
        serving(_scorer(shelf, retention=retention)) as running,
        Client(f"127.0.0.1:{running.port}") as client,
    ):
        statement = _statement(client)

    assert statement.keys.ttl_seconds == 120 == client.server_info.key_retention.ttl_seconds
    assert (statement.keys.max_keys, statement.keys.max_bytes) == (7, 1 << 28)
    keys = statement.stored[0]
    assert keys.idle_ttl_seconds == 120
    assert "at most 7 key sets and 256 MiB" in keys.description
    assert "120 s" in keys.kept_for


def test_tokens_budget_and_noise_are_stated_with_what_they_do_not_hold_against(
    shelf: Catalog,
) -> None:
    token = _token()
    scorer = _scorer(shelf, protection=ScoreProtection(flood_bits=8, score_noise_std=0.01))
    with (
        serving(
            scorer,
            authenticator=Authenticator([("app", token)]),
            query_budget=QueryBudget(50, 600),
        ) as running,
        Client(f"127.0.0.1:{running.port}", token=token) as client,
    ):
        statement = _statement(client)

    assert statement.caller_identity == privacy.API_TOKEN
    budget, flood, noise = (statement.protection(n) for n in privacy_names())
    assert budget is not None and flood is not None and noise is not None
    assert budget.enabled and budget.setting == "50 queries per caller per 600 s"
    assert flood.enabled and flood.setting == "8 bits of noise flooding"
    assert noise.enabled and "0.01" in noise.setting
    for defence in (flood, noise):
        assert "scales its query" in defence.does_not_hold_against
    assert "many API tokens" in budget.does_not_hold_against
    assert [s.subject for s in statement.stored] == [
        "galois_keys",
        "query_budget_counts",
        "calls_in_flight",
    ]
    assert f"at most {scorer.retention.max_keys_per_caller} key sets per API token" in (
        statement.stored[0].description
    )
    assert "Catalog protections on: query_budget, flood_bits, score_noise_std." in (
        statement.summary
    )


def privacy_names() -> tuple[str, str, str]:
    return ("query_budget", "flood_bits", "score_noise_std")


@pytest.fixture
def heserve_log() -> Iterator[list[logging.LogRecord]]:
    """Every record heserve's loggers make while the test runs, kept here; the level of
    the 'heserve' logger restored after."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("heserve")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING])
def test_the_log_records_stated_are_the_ones_written(
    shelf: Catalog, heserve_log: list[logging.LogRecord], level: int
) -> None:
    """At each log level, the records the statement says are written are, with the
    fields it lists, and those it says are not, are not."""
    logging.getLogger("heserve").setLevel(level)
    user = unit_rows(1, DIMENSION, seed=3)[0]
    with serving(_scorer(shelf)) as running:
        with Client(f"127.0.0.1:{running.port}") as client:
            statement = _statement(client)
            client.recommend(user, catalog="shelf", k=3)
        running.stop(grace=1.0)  # every call's last record is written before we look

    written = {record.name: record.written for record in statement.logs}
    assert written["access"] is (level <= logging.INFO)
    assert written["call_started"] is written["sizes"] is (level <= logging.DEBUG)
    assert ("peer" in statement.logged_fields()) is (level <= logging.DEBUG)

    access = [r for r in heserve_log if r.name == "heserve.access" and r.levelno >= level]
    ended = [r for r in access if re.fullmatch(r"\w+ [A-Z_]+ [0-9.]+ ms", r.getMessage())]
    started = [r for r in access if re.fullmatch(r"\w+ started", r.getMessage())]
    assert bool(ended) is written["access"]
    assert bool(started) is written["call_started"]
    for record in ended:
        score = record.getMessage().startswith("Score ")
        expected = ACCESS_FIELDS + SCORE_ACCESS_FIELDS if score else ACCESS_FIELDS
        assert tuple(record.fields) == expected  # type: ignore[attr-defined]
    access_stated = next(r for r in statement.logs if r.name == "access")
    assert access_stated.fields == ACCESS_FIELDS + SCORE_ACCESS_FIELDS
    for record in started:
        assert tuple(record.fields) == CALL_STARTED_FIELDS  # type: ignore[attr-defined]
    registered = [r for r in heserve_log if r.getMessage().startswith("registered keys")]
    assert bool(registered) is written["keys_registered"]
    if level == logging.WARNING:
        assert "logs no line about calls" in " ".join(statement.summary)


def test_the_statement_round_trips_and_an_older_server_has_none(shelf: Catalog) -> None:
    scorer = _scorer(shelf)
    statement = build_statement(scorer)
    info = ScoringServicer(scorer).server_info()

    assert convert.privacy_from_message(info) == statement
    older = pb.GetServerInfoResponse()
    older.CopyFrom(info)
    older.ClearField("privacy")
    assert convert.privacy_from_message(older) is None


def test_catalog_popularity_is_loaded_checked_and_versioned(tmp_path: Path) -> None:
    rows = unit_rows(4, 3, seed=5)
    ids = np.asarray(["a", "b", "c", "d"])
    plain, ranked = tmp_path / "plain.npz", tmp_path / "ranked.npz"
    np.savez(plain, embeddings=rows, ids=ids)
    np.savez(ranked, embeddings=rows, ids=ids, popularity=np.asarray([1.0, 9.0, 3.0, 9.0]))

    from heserve.domain.catalog import CatalogError, load_catalog

    without, with_order = load_catalog("c", plain), load_catalog("c", ranked)
    assert without.popularity is None
    assert with_order.popularity == (1.0, 9.0, 3.0, 9.0)
    assert with_order.version != without.version  # a new order is a new version
    with pytest.raises(CatalogError, match="3 popularity values for 4 items"):
        Catalog("c", rows, ("a", "b", "c", "d"), (1.0, 2.0, 3.0))
    with pytest.raises(CatalogError, match="NaN or infinity"):
        Catalog("c", rows, ("a", "b", "c", "d"), (1.0, float("nan"), 3.0, 4.0))
