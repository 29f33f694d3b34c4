"""The Ray backend on a real local Ray cluster: a head and a second node on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs the heserve[ray] extra")
import shared_ray_cluster  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from heserve.backends.ray_cluster import RayBackend  # noqa: E402
from heserve.domain.catalog import Catalog, unit_rows  # noqa: E402
from heserve.domain.errors import UnavailableError  # noqa: E402
from heserve.domain.scorer import ScoredRun, Scorer  # noqa: E402
from heserve.protocol.params import DEFAULT_PARAMETERS  # noqa: E402
from heserve.protocol.slots import query_slots  # noqa: E402
from heserve.transport.server import start_server  # noqa: E402
from heserve_client import Client, SecretContext  # noqa: E402

SLOTS = DEFAULT_PARAMETERS.slot_count
# Three chunks of 2 x 4,096 items over two shards, a dimension that is not a power of two.
ITEMS, DIMENSION = 4 * SLOTS + 808, 40


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The two-node cluster this module shares with the Ray modules run next to it."""
    yield from shared_ray_cluster.two_node_cluster(request)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog("ray", unit_rows(ITEMS, DIMENSION, 21), tuple(f"r{i}" for i in range(ITEMS)))


@pytest.fixture(scope="module")
def backend(ray_cluster: Cluster) -> Iterator[RayBackend]:
    ray_backend = RayBackend(DEFAULT_PARAMETERS)
    yield ray_backend
    ray_backend.close()


@pytest.fixture(scope="module")
def scorer(backend: RayBackend, catalog: Catalog) -> Scorer:
    return Scorer(DEFAULT_PARAMETERS, [catalog], backend=backend)


def _query(secret: SecretContext, vector: np.ndarray) -> bytes:
    return secret.encrypt(query_slots(vector, DIMENSION, SLOTS))


def _decrypt(secret: SecretContext, runs: list[ScoredRun]) -> np.ndarray:
    return np.concatenate([secret.decrypt(run.scores, 1 << 22)[: run.count] for run in runs])


def test_the_cluster_has_two_nodes_and_the_shards_spread_over_them(
    backend: RayBackend, ray_cluster: Cluster
) -> None:
    assert len([node for node in ray.nodes() if node["Alive"]]) == 2
    assert backend.shard_count == 2
    assert len(set(backend.actor_pids())) == 2


def test_ray_scores_equal_local_scores_in_layout_and_value(
    scorer: Scorer, catalog: Catalog, secret: SecretContext
) -> None:
    local = Scorer(DEFAULT_PARAMETERS, [catalog])
    vector = unit_rows(1, DIMENSION, 22)[0]
    query = _query(secret, vector)
    on_ray = list(
        scorer.score(
            scorer.register_keys(secret.galois_keys(scorer.galois_steps)), "ray", query, []
        )
    )
    in_process = list(
        local.score(local.register_keys(secret.galois_keys(local.galois_steps)), "ray", query, [])
    )

    layout = [(run.offset, run.count, run.index, run.total) for run in on_ray]
    assert layout == [(run.offset, run.count, run.index, run.total) for run in in_process]
    # real scores: each of the three chunks split in two, the last half empty
    assert layout == [
        *((i * SLOTS, SLOTS, i, 5) for i in range(4)),
        (4 * SLOTS, ITEMS - 4 * SLOTS, 4, 5),
    ]
    ray_scores = _decrypt(secret, on_ray)
    assert np.abs(ray_scores - _decrypt(secret, in_process)).max() < 1e-4
    assert np.abs(ray_scores - catalog.embeddings @ vector).max() < 1e-4


def test_ray_actors_score_re_ranking_subsets(
    scorer: Scorer, catalog: Catalog, secret: SecretContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the front process scored a query itself")

    monkeypatch.setattr(scorer.engine, "score", refuse)
    key_id = scorer.register_keys(secret.galois_keys(scorer.galois_steps))
    vector = unit_rows(1, DIMENSION, 27)[0]
    # one chunk (one actor idle), then three chunks over both actors
    for count in (5, 4 * SLOTS + 9):
        rows = np.random.default_rng(count).permutation(ITEMS)[:count]
        ids = [catalog.ids[row] for row in rows]
        runs = list(scorer.score(key_id, "ray", _query(secret, vector), ids))
        assert sum(run.count for run in runs) == count
        assert np.abs(_decrypt(secret, runs) - catalog.embeddings[rows] @ vector).max() < 1e-4


def test_keys_reach_each_actor_once_and_leave_on_delete(
    scorer: Scorer, backend: RayBackend, secret: SecretContext
) -> None:
    key_id = scorer.register_keys(secret.galois_keys(scorer.galois_steps))
    for seed in (23, 24):
        list(scorer.score(key_id, "ray", _query(secret, unit_rows(1, DIMENSION, seed)[0]), []))
    assert all(held.count(key_id) == 1 for held in backend.actor_keys())

    scorer.delete_keys(key_id)

    assert not any(key_id in held for held in backend.actor_keys())


def test_a_dead_actor_fails_the_query_with_unavailable_then_is_restarted(
    scorer: Scorer, backend: RayBackend, catalog: Catalog, secret: SecretContext
) -> None:
    key_id = scorer.register_keys(secret.galois_keys(scorer.galois_steps))
    vector = unit_rows(1, DIMENSION, 25)[0]
    query = _query(secret, vector)
    before = backend.actor_pids()

    backend.kill_actor(1)  # as a crash would: Ray restarts it
    with pytest.raises(UnavailableError):
        list(scorer.score(key_id, "ray", query, []))

    started = time.perf_counter()
    scores = _decrypt(secret, list(scorer.score(key_id, "ray", query, [])))
    assert np.abs(scores - catalog.embeddings @ vector).max() < 1e-4
    assert time.perf_counter() - started < 120
    after = backend.actor_pids()
    assert after[0] == before[0] and after[1] != before[1]


def test_recommend_over_grpc_with_the_ray_backend(scorer: Scorer, catalog: Catalog) -> None:
    running = start_server(scorer, "127.0.0.1", 0)
    try:
        with Client(f"127.0.0.1:{running.port}") as client:
            vector = unit_rows(1, DIMENSION, 26)[0]
            top = client.recommend(vector, catalog="ray", k=10)
    finally:
        running.stop(grace=None)
    expected = np.argsort(-(catalog.embeddings @ vector), kind="stable")[:10]
    assert [item for item, _ in top] == [catalog.ids[i] for i in expected]
