"""The client decides: a policy refused before any upload, "forget me", and opting out.

Real servers on loopback; what a server saw is read from its own metrics (calls by
method, items scored) and its key store, so "refused before any upload" means the
server counted no RegisterKeys and no Score, and "forgotten" means its key store and
the disk hold nothing of the user.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import run_cli, serving
from test_security import Pki, pki  # noqa: F401  (pki: the module's fixture)

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import KeyRetentionPolicy, Scorer
from heserve.domain.statement import Deployment, build_statement
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.server import RunningServer, TlsConfig
from heserve.transport.servicer import SERVICE_NAME
from heserve_client import (
    Client,
    ErasureReport,
    Policy,
    PolicyError,
    ServerUnavailableError,
    forget_me,
)

ITEMS, DIMENSION = 300, 16


@pytest.fixture(scope="module")
def shelf() -> Catalog:
    popularity = tuple(float((i * 37) % 101) for i in range(ITEMS))
    return Catalog(
        "shelf", unit_rows(ITEMS, DIMENSION, 141), tuple(f"s{i}" for i in range(ITEMS)), popularity
    )


@pytest.fixture(scope="module")
def plain_shelf() -> Catalog:
    return Catalog("plain", unit_rows(40, DIMENSION, 142), tuple(f"p{i}" for i in range(40)))


@pytest.fixture
def scorer(shelf: Catalog, plain_shelf: Catalog) -> Scorer:
    """A fresh key store per test: what it holds is what this test left."""
    return Scorer(
        DEFAULT_PARAMETERS, [shelf, plain_shelf], retention=KeyRetentionPolicy(ttl_seconds=600)
    )


@pytest.fixture
def server(scorer: Scorer) -> Iterator[RunningServer]:
    with serving(scorer) as running:
        yield running


def _target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


def calls(server: RunningServer, method: str) -> float:
    """How many `method` calls the server started (its own metrics)."""
    value = server.metrics.registry.get_sample_value(
        "heserve_requests_total", {"service": SERVICE_NAME, "method": method}
    )
    return value or 0.0


def items_scored(server: RunningServer, catalog: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "heserve_items_scored_total", {"catalog": catalog}
    )
    return value or 0.0


@pytest.fixture
def user() -> np.ndarray:
    vector: np.ndarray = unit_rows(1, DIMENSION, seed=7)[0]
    return vector


# --- policies ----------------------------------------------------------------------------


def test_tls_required_refuses_a_plaintext_channel_before_any_call(server: RunningServer) -> None:
    with pytest.raises(PolicyError, match="require_tls: this client's connection is not TLS") as e:
        Client(_target(server), policy=Policy.mobile(), token="t" * 24)

    assert e.value.requirements == ("require_tls",)
    for method in ("GetServerInfo", "RegisterKeys", "Score", "ListItems"):
        assert calls(server, method) == 0  # not even the token went out


def test_a_longer_key_ttl_is_refused_before_any_upload(
    server: RunningServer, scorer: Scorer, user: np.ndarray
) -> None:
    with pytest.raises(PolicyError) as refused:
        Client(_target(server), policy=Policy(max_key_ttl_seconds=60, forbid_logged=frozenset()))

    assert refused.value.requirements == ("max_key_ttl_seconds",)
    assert "keeps idle keys 600 s, more than 60 s" in str(refused.value)
    assert calls(server, "GetServerInfo") == 1  # the statement was read...
    assert calls(server, "RegisterKeys") == calls(server, "Score") == 0  # ...nothing sent
    assert len(scorer.keys) == 0


def test_every_failed_requirement_is_named(server: RunningServer, scorer: Scorer) -> None:
    strict = Policy(require_tls=True, max_key_ttl_seconds=1)
    # a channel the caller made: its TLS is not known here, so the statement decides
    with grpc.insecure_channel(_target(server)) as channel, pytest.raises(PolicyError) as both:
        Client(_target(server), policy=strict, channel=channel)
    assert both.value.requirements == ("require_tls", "max_key_ttl_seconds")
    assert "the server states transport plaintext" in str(both.value)
    assert calls(server, "RegisterKeys") == calls(server, "Score") == 0

    # a server that writes DEBUG records logs the client's address: mobile() refuses that
    debug = build_statement(scorer, Deployment(transport="tls", log_level=logging.DEBUG))
    unmet = Policy.mobile().unmet(debug, key_ttl_seconds=600, connection_tls=True)
    assert [(u.requirement, u.explanation) for u in unmet] == [
        ("forbid_logged", "the server logs peer")
    ]
    older = Policy.mobile().unmet(None, key_ttl_seconds=600, connection_tls=True)
    assert [u.requirement for u in older] == [
        "require_statement",
        "forbid_logged",
    ]  # the TTL it announces (600 s) is within the hour: only what it cannot state fails


def test_no_policy_talks_to_every_server_as_before(
    server: RunningServer, user: np.ndarray, shelf: Catalog
) -> None:
    with Client(_target(server)) as client:
        assert client.policy == Policy()
        top = client.recommend(user, catalog="shelf", k=3)
    assert [item for item, _ in top] == [
        shelf.ids[i] for i in np.argsort(-(shelf.embeddings @ user), kind="stable")[:3]
    ]


def test_the_mobile_policy_is_met_by_a_default_server_with_tls(
    shelf: Catalog,
    pki: Pki,  # noqa: F811
    user: np.ndarray,
) -> None:
    scorer = Scorer(DEFAULT_PARAMETERS, [shelf])  # default TTL: an hour
    tls = TlsConfig(pki.server_cert, pki.server_key)
    with (
        serving(scorer, tls=tls) as running,
        Client(f"127.0.0.1:{running.port}", tls_ca=pki.ca, policy=Policy.mobile()) as client,
    ):
        assert client.statement is not None and client.statement.transport == "tls"
        assert len(client.recommend(user, catalog="shelf", k=3)) == 3


def test_no_candidate_ids_leave_the_client_under_the_policy(
    server: RunningServer, user: np.ndarray, shelf: Catalog
) -> None:
    candidates = ["s5", "s17", "s200"]
    with pytest.raises(ValueError, match="policy forbids it"):
        Client(_target(server), policy=Policy(send_item_ids=False), rerank_locally=False)
    with Client(_target(server), policy=Policy(send_item_ids=False)) as client:
        scores = client.score(user, catalog="shelf", item_ids=candidates)

    expected = shelf.embeddings[[5, 17, 200]] @ user
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    # the server scored the whole catalog: it was never told which items were candidates
    assert items_scored(server, "shelf") == ITEMS


# --- forget me ---------------------------------------------------------------------------


def test_forget_me_leaves_nothing_on_the_server_or_on_disk(
    server: RunningServer, scorer: Scorer, user: np.ndarray, tmp_path: Path
) -> None:
    key_file = tmp_path / "user.key"
    with Client(_target(server), key_file=key_file) as first:
        first.recommend(user, catalog="shelf", k=3)
        key_id = first._session.key_id
    # a key file keeps its registration: the keys stay on the server between runs
    assert len(scorer.keys) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user.key", "user.key.registration"]

    with Client(_target(server), key_file=key_file) as again:
        report = again.forget_me()

    assert report == ErasureReport(
        _target(server),
        erased=(key_id,),
        files_removed=(key_file, tmp_path / "user.key.registration"),
    )
    assert len(scorer.keys) == 0
    assert list(tmp_path.iterdir()) == []
    assert f"keys erased on {_target(server)}: {key_id[:12]}" in str(report)


def test_forget_me_without_a_key_file_erases_the_sessions_keys(
    server: RunningServer, scorer: Scorer, user: np.ndarray
) -> None:
    client = Client(_target(server))
    client.recommend(user, catalog="shelf", k=1)
    assert len(scorer.keys) == 1
    report = client.forget_me()
    client.close()  # after forget_me, closing again is harmless

    assert len(report.erased) == 1 and report.files_removed == ()
    assert len(scorer.keys) == 0


def test_heserve_forget_erases_and_reports(
    server: RunningServer, scorer: Scorer, user: np.ndarray, tmp_path: Path
) -> None:
    key_file = tmp_path / "user.key"
    with Client(_target(server), key_file=key_file) as client:
        client.recommend(user, catalog="shelf", k=1)
    assert len(scorer.keys) == 1
    # a registration at another server is reported, not contacted
    record = tmp_path / "user.key.registration"
    record.write_text(record.read_text()[:-1] + ', "other:1": {"key_id": "x", "expires_at": 1}}')

    result = run_cli(tmp_path, "forget", "--server", _target(server), "--key-file", "user.key")

    assert result.returncode == 0, result.stderr
    assert "keys erased on" in result.stdout and "user.key.registration" in result.stdout
    assert "registrations at other servers, left to expire: other:1" in result.stdout
    assert len(scorer.keys) == 0
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_server_leaves_the_files_for_a_later_try(
    server: RunningServer, scorer: Scorer, user: np.ndarray, tmp_path: Path
) -> None:
    key_file = tmp_path / "user.key"
    with Client(_target(server), key_file=key_file) as client:
        client.recommend(user, catalog="shelf", k=1)
    target = _target(server)
    server.stop(grace=None)

    with pytest.raises(ServerUnavailableError):
        forget_me(target, key_file, timeout=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user.key", "user.key.registration"]


# --- opting out --------------------------------------------------------------------------


def test_a_user_who_has_not_opted_in_gets_the_published_order_and_sends_nothing(
    server: RunningServer, scorer: Scorer, shelf: Catalog, plain_shelf: Catalog
) -> None:
    with Client(_target(server), policy=Policy(send_item_ids=False)) as client:
        top = client.popular("shelf", k=5)
        unranked = client.popular("plain", k=3)
        popularity = client.item_popularity("shelf")

    assert shelf.popularity is not None and popularity == list(shelf.popularity)
    order = np.argsort(-np.asarray(shelf.popularity), kind="stable")[:5]
    assert top == [shelf.ids[i] for i in order]
    assert unranked == list(plain_shelf.ids[:3])  # no published order: catalog order
    assert calls(server, "RegisterKeys") == calls(server, "Score") == 0
    assert len(scorer.keys) == 0


def test_heserve_privacy_prints_the_statement(server: RunningServer, tmp_path: Path) -> None:
    text = run_cli(tmp_path, "privacy", "--server", _target(server))
    as_json = run_cli(tmp_path, "privacy", "--server", _target(server), "--json")

    assert text.returncode == as_json.returncode == 0, text.stderr + as_json.stderr
    assert text.stdout.startswith("The server never receives a secret key")
    assert "galois_keys: " in text.stdout and "Kept until 600 s pass" in text.stdout
    statement = json.loads(as_json.stdout)
    assert statement["transport"] == "TRANSPORT_SECURITY_PLAINTEXT"
    assert statement["keys"]["ttl_seconds"] == 600


def test_heserve_forget_with_no_key_file_says_so(server: RunningServer, tmp_path: Path) -> None:
    """A mistyped path must not look like a completed erasure."""
    result = run_cli(tmp_path, "forget", "--server", _target(server), "--key-file", "typo.key")
    assert result.returncode == 1
    assert "typo.key: no key file here" in result.stderr
