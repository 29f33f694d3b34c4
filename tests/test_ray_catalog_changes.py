"""Catalogs that change while serving (issue 11) on the Ray backend, on a real local
two-node Ray cluster with real encryption: an update re-encodes only the chunks it
touches and scores like a catalog built from scratch; a query running across a reload or
an update finishes on the version it began on; an actor Ray restarts after an update
rebuilds its shard from the new version's rows, and an update made after an actor died
works; a reload that fails changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs the heserve[ray] extra")
import shared_ray_cluster  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from heserve.backends.ray_cluster import RayBackend  # noqa: E402
from heserve.domain.catalog import Catalog, CatalogError, unit_rows  # noqa: E402
from heserve.domain.errors import FailedPreconditionError, UnavailableError  # noqa: E402
from heserve.domain.scorer import CatalogChange, ScoredRun, Scorer  # noqa: E402
from heserve.protocol.params import DEFAULT_PARAMETERS  # noqa: E402
from heserve.protocol.slots import unpack_complex  # noqa: E402
from heserve_client import SecretContext  # noqa: E402

SLOTS = DEFAULT_PARAMETERS.slot_count
CHUNK = 2 * SLOTS  # rows per chunk
# Three chunks over two shards (shard 0: chunks 0 and 2, shard 1: chunk 1), the last
# one not full.
ITEMS, DIMENSION = 3 * CHUNK - 100, 16
TOLERANCE = 1e-4
PROBE_SEED = 99  # the user vector every score check uses


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The two-node cluster this module shares with the Ray modules run next to it."""
    yield from shared_ray_cluster.two_node_cluster(request)


@pytest.fixture(scope="module")
def backend(ray_cluster: Cluster) -> Iterator[RayBackend]:
    ray_backend = RayBackend(DEFAULT_PARAMETERS, shards=2)
    yield ray_backend
    ray_backend.close()


def _catalog(seed: int, dimension: int = DIMENSION) -> Catalog:
    return Catalog("shop", unit_rows(ITEMS, dimension, seed), tuple(f"s{i}" for i in range(ITEMS)))


@pytest.fixture
def scorer(backend: RayBackend) -> Iterator[Scorer]:
    """A fresh scorer of "shop" over the module's actors (starting actors costs seconds);
    the versions it serves at the end leave the actors with it."""
    served = Scorer(DEFAULT_PARAMETERS, [_catalog(1)], backend=backend, max_update_items=1_000)
    yield served
    for entry in served.catalogs.values():
        backend.remove_catalog(entry.key)


@pytest.fixture
def key_id(scorer: Scorer, secret: SecretContext) -> str:
    return scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))


def _scores(secret: SecretContext, runs: Iterator[ScoredRun]) -> np.ndarray:
    return np.concatenate(
        [unpack_complex(secret.decrypt_complex(run.scores, 1 << 26), run.count) for run in runs]
    )


def _query(scorer: Scorer, secret: SecretContext, vector: np.ndarray) -> bytes:
    return secret.encrypt(scorer.catalog("shop").plan.query_slots(vector))


def _probe() -> np.ndarray:
    vector: np.ndarray = unit_rows(1, DIMENSION, PROBE_SEED)[0]
    return vector


def _expected(catalog: Catalog) -> dict[str, float]:
    return dict(zip(catalog.ids, (catalog.embeddings @ _probe()).tolist(), strict=True))


def _assert_serves(
    scorer: Scorer, secret: SecretContext, key_id: str, expected: dict[str, float]
) -> None:
    """The served catalog holds exactly the ids of `expected`, and the scores the actors
    compute for the probe vector, decrypted, are those values id by id."""
    served = scorer.catalog("shop").catalog
    query = _query(scorer, secret, _probe())
    scores = _scores(secret, scorer.score(key_id, "shop", query, [], complex_scores=True))
    assert sorted(served.ids) == sorted(expected)
    got = dict(zip(served.ids, scores.tolist(), strict=True))
    worst = max(abs(got[item] - value) for item, value in expected.items())
    assert worst < TOLERANCE


def _with_rows(expected: dict[str, float], ids: list[str], rows: np.ndarray) -> dict[str, float]:
    """`expected` with these items written (float32, as a catalog holds them)."""
    scores = rows.astype(np.float32) @ _probe()
    return {**expected, **dict(zip(ids, scores.tolist(), strict=True))}


def test_upserts_and_deletes_on_ray_score_like_a_catalog_built_from_scratch(
    scorer: Scorer, secret: SecretContext, key_id: str
) -> None:
    base = scorer.catalog("shop").catalog
    upserted = ["s5", "s20000", "new-1", "new-2", "new-3"]
    rows = unit_rows(5, DIMENSION, 2)

    change = scorer.update_items("shop", upserted, rows, ["s7"])

    expected = _with_rows(_expected(base), upserted, rows)
    del expected["s7"]
    _assert_serves(scorer, secret, key_id, expected)
    served = scorer.catalog("shop").catalog
    assert change.outcome == "updated" and change.version == served.version != base.version
    assert (change.upserted, change.deleted, change.item_count) == (5, 1, ITEMS + 2)
    # s5 and s7 in chunk 0, s20000 in chunk 2, the appends and the moved last row in
    # chunk 2: both on shard 0; shard 1's chunk 1 is the base version's, shared
    assert (change.chunks_rewritten, change.chunk_count) == (2, 3)

    # a second update, on the derived version: only shard 1's chunk is encoded again
    row = unit_rows(1, DIMENSION, 3)
    second = scorer.update_items("shop", [f"s{CHUNK + 3}"], row, if_version=change.version)
    assert second.previous_version == change.version
    assert (second.chunks_rewritten, second.chunk_count) == (1, 3)
    _assert_serves(scorer, secret, key_id, _with_rows(expected, [f"s{CHUNK + 3}"], row))
    assert scorer.change_counts[("shop", "update", "updated")] == 2


def test_a_query_running_across_a_reload_or_an_update_finishes_on_its_version(
    scorer: Scorer, secret: SecretContext, key_id: str
) -> None:
    old = scorer.catalog("shop").catalog
    vector = _probe()
    query = _query(scorer, secret, vector)

    running = scorer.score(key_id, "shop", query, [], complex_scores=True)
    first = next(running)  # begun on the first version, on both actors
    assert scorer.replace_catalog(_catalog(4)) is True
    new = scorer.catalog("shop").catalog
    assert new.version != old.version
    finished = _scores(secret, iter([first, *running]))
    np.testing.assert_allclose(finished, old.embeddings @ vector, rtol=0, atol=TOLERANCE)
    _assert_serves(scorer, secret, key_id, _expected(new))

    running = scorer.score(key_id, "shop", query, [], complex_scores=True)
    first = next(running)  # begun on the reloaded version
    for chunk in range(3):  # every chunk, on both shards, changes under it
        scorer.update_items("shop", [f"s{chunk * CHUNK + 1}"], unit_rows(1, DIMENSION, 10 + chunk))
    finished = _scores(secret, iter([first, *running]))
    np.testing.assert_allclose(finished, new.embeddings @ vector, rtol=0, atol=TOLERANCE)

    for pinned in (old.version, new.version):  # a query pinned to a version gone is refused
        with pytest.raises(FailedPreconditionError):
            list(scorer.score(key_id, "shop", query, [], pinned, complex_scores=True))
    _assert_serves(scorer, secret, key_id, _expected(scorer.catalog("shop").catalog))


def test_an_actor_restarted_after_an_update_rebuilds_its_shard_of_the_new_version(
    scorer: Scorer, backend: RayBackend, secret: SecretContext, key_id: str
) -> None:
    base = scorer.catalog("shop").catalog
    # chunk 1 (shard 1's only chunk) changes: a shard rebuilt from the base version's
    # rows would score s{CHUNK + 3} by its old row
    ids, rows = [f"s{CHUNK + 3}", "s1"], unit_rows(2, DIMENSION, 5)
    scorer.update_items("shop", ids, rows)
    expected = _with_rows(_expected(base), ids, rows)
    before = backend.actor_pids()

    backend.kill_actor(1)  # as a crash would: Ray restarts it, holding nothing
    with pytest.raises(UnavailableError):
        list(scorer.score(key_id, "shop", _query(scorer, secret, _probe()), []))

    _assert_serves(scorer, secret, key_id, expected)  # actor 1 rebuilt its shard of it
    after = backend.actor_pids()
    assert after[0] == before[0] and after[1] != before[1]


def test_an_update_made_after_an_actor_died_serves_the_new_version(
    scorer: Scorer, backend: RayBackend, secret: SecretContext, key_id: str
) -> None:
    base = scorer.catalog("shop").catalog
    before = backend.actor_pids()
    # chunks 0 and 2, both on the dead actor's shard
    ids, rows = ["s3", f"s{2 * CHUNK + 3}", "new-1"], unit_rows(3, DIMENSION, 6)

    backend.kill_actor(0)
    try:
        change = scorer.update_items("shop", ids, rows, ["s9"])
    except UnavailableError:  # the actor died under the update: nothing changed, retry
        assert scorer.catalog("shop").catalog.version == base.version
        change = scorer.update_items("shop", ids, rows, ["s9"])

    assert (change.outcome, change.previous_version) == ("updated", base.version)
    expected = _with_rows(_expected(base), ids, rows)
    del expected["s9"]
    _assert_serves(scorer, secret, key_id, expected)
    after = backend.actor_pids()
    assert after[0] != before[0] and after[1] == before[1]
    # and the restarted actor derives the next version from the one it rebuilt
    row = unit_rows(1, DIMENSION, 7)
    assert scorer.update_items("shop", ["s4"], row).chunks_rewritten == 1
    _assert_serves(scorer, secret, key_id, _with_rows(expected, ["s4"], row))


def _corrupt() -> Catalog:
    raise CatalogError("catalog 'shop': shop.npy is not a numpy file")


def _nan_rows() -> Catalog:
    rows = unit_rows(ITEMS, DIMENSION, 8)
    rows[17] = np.nan
    return Catalog("shop", rows, tuple(f"s{i}" for i in range(ITEMS)))


def _repeated_ids() -> Catalog:
    return Catalog("shop", unit_rows(3, DIMENSION, 8), ("a", "b", "a"))


def _missing_file() -> Catalog:
    raise FileNotFoundError("shop.npy")


@pytest.mark.parametrize(
    "load",
    [_corrupt, _nan_rows, _repeated_ids, _missing_file, lambda: _catalog(9, DIMENSION + 1)],
    ids=["corrupt", "nan-rows", "repeated-ids", "missing-file", "wrong-dimension"],
)
def test_a_failed_reload_keeps_the_served_version_serving(
    scorer: Scorer, secret: SecretContext, key_id: str, load: Callable[[], Catalog]
) -> None:
    served = scorer.catalog("shop")

    change: CatalogChange = scorer.reload("shop", load)

    assert (change.outcome, change.version, change.previous_version) == (
        "failed",
        served.catalog.version,
        served.catalog.version,
    )
    assert change.error and "\n" not in change.error
    assert scorer.catalog("shop") is served and scorer.reloads == 0
    assert scorer.change_counts[("shop", "reload", "failed")] == 1
    _assert_serves(scorer, secret, key_id, _expected(served.catalog))
    # and the next good reload still swaps
    assert scorer.reload("shop", lambda: _catalog(10)).outcome == "replaced"
    _assert_serves(scorer, secret, key_id, _expected(_catalog(10)))


def test_a_reload_during_which_an_actor_dies_fails_and_changes_nothing(
    scorer: Scorer, backend: RayBackend, secret: SecretContext, key_id: str
) -> None:
    served = scorer.catalog("shop")
    backend.kill_actor(1)  # dies while it encodes its shard of the new version

    change = scorer.reload("shop", lambda: _catalog(11))

    assert (change.outcome, change.version) == ("failed", served.catalog.version)
    assert "Ray" not in change.error  # its internals stay in the server's log
    assert scorer.catalog("shop") is served
    assert scorer.change_counts[("shop", "reload", "failed")] == 1
    _assert_serves(scorer, secret, key_id, _expected(served.catalog))
    assert scorer.reload("shop", lambda: _catalog(11)).outcome == "replaced"
    _assert_serves(scorer, secret, key_id, _expected(_catalog(11)))
