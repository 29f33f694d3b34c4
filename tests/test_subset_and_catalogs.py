"""Re-ranking subsets, catalog listing and paging, server info, and catalog files.

Scores are checked against the plaintext product W[rows]·u computed here; the
catalogs come from the shared session server or from real .npy/.npz files
written to a temporary directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from heserve.domain.catalog import MAX_ROW_NORM, Catalog, CatalogError, load_catalog, unit_rows
from heserve.domain.scorer import Scorer, SizeLimits
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots, unpack_complex
from heserve.transport.server import RunningServer, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import Client, SecretContext

FloatArray = npt.NDArray[np.float64]
TIMEOUT = 60.0
SLOTS = DEFAULT_PARAMETERS.slot_count


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    assert isinstance(error, grpc.Call)
    return error.code()


def padded(dimension: int) -> int:
    power = 1
    while power < dimension:
        power *= 2
    return power


@pytest.fixture(scope="module")
def key_id(stub: pb_grpc.ScoringServiceStub, secret: SecretContext) -> Iterator[str]:
    steps = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT).ckks.galois_steps
    blob = secret.galois_keys(list(steps))
    requests = [
        pb.RegisterKeysRequest(galois_keys_chunk=blob[start : start + (1 << 20)])
        for start in range(0, len(blob), 1 << 20)
    ]
    key_id = str(stub.RegisterKeys(iter(requests), timeout=TIMEOUT).key_id)
    yield key_id
    stub.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), timeout=TIMEOUT)


def sample_ids(catalog: Catalog, count: int, seed: int) -> tuple[list[str], list[int]]:
    rows = np.random.default_rng(seed).permutation(catalog.item_count)[:count]
    return [catalog.ids[row] for row in rows], [int(row) for row in rows]


# --- re-ranking subsets --------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 50, 4096, 4097, 4500])
def test_subset_scores_come_back_in_request_order(
    client: Client, books: Catalog, user: FloatArray, count: int
) -> None:
    item_ids, rows = sample_ids(books, count, seed=count)

    scores = client.score(user, catalog="books", item_ids=item_ids)

    assert scores.shape == (count,)
    assert np.abs(scores - books.embeddings[rows] @ user).max() < 1e-4


def test_subset_of_every_item_reversed_equals_the_catalog_reversed(
    client: Client, books: Catalog, user: FloatArray
) -> None:
    reversed_ids = list(reversed(books.ids))

    subset = client.score(user, catalog="books", item_ids=reversed_ids)
    whole = client.score(user, catalog="books")

    assert np.abs(subset - (books.embeddings @ user)[::-1]).max() < 1e-4
    assert np.abs(subset[::-1] - whole).max() < 1e-4


def test_subset_on_the_other_catalog(client: Client, films: Catalog) -> None:
    vector = unit_rows(1, films.dimension, seed=5)[0]
    item_ids = ["films-299", "films-0", "films-150"]

    scores = client.score(vector, catalog="films", item_ids=item_ids)

    assert np.abs(scores - films.embeddings[[299, 0, 150]] @ vector).max() < 1e-4


def responses(stub: pb_grpc.ScoringServiceStub, request: pb.ScoreRequest) -> list[pb.ScoreResponse]:
    return list(stub.Score(request, timeout=TIMEOUT))


def test_large_subset_streams_several_runs_in_request_order(
    stub: pb_grpc.ScoringServiceStub,
    secret: SecretContext,
    key_id: str,
    books: Catalog,
    user: FloatArray,
) -> None:
    item_ids, rows = sample_ids(books, 4500, seed=3)
    query = secret.encrypt(query_slots(user, books.dimension, SLOTS))
    request = pb.ScoreRequest(key_id=key_id, catalog="books", query=query, item_ids=item_ids)

    replies = responses(stub, request)

    assert [(r.offset, r.count, r.chunk_index, r.chunk_count) for r in replies] == [
        (0, SLOTS, 0, 2),
        (SLOTS, 4500 - SLOTS, 1, 2),
    ]
    expected = books.embeddings[rows] @ user
    for reply in replies:
        values = secret.decrypt(reply.scores, 1 << 24)[: reply.count]
        assert np.abs(values - expected[reply.offset : reply.offset + reply.count]).max() < 1e-4


def test_whole_catalog_streams_one_run_per_slot_count(
    stub: pb_grpc.ScoringServiceStub,
    secret: SecretContext,
    key_id: str,
    books: Catalog,
    user: FloatArray,
) -> None:
    query = secret.encrypt(query_slots(user, books.dimension, SLOTS))
    request = pb.ScoreRequest(key_id=key_id, catalog="books", query=query)

    replies = responses(stub, request)

    runs = -(-books.item_count // SLOTS)
    assert [(r.offset, r.chunk_index, r.chunk_count) for r in replies] == [
        (i * SLOTS, i, runs) for i in range(runs)
    ]
    assert sum(r.count for r in replies) == books.item_count
    expected = books.embeddings @ user
    for reply in replies:
        values = secret.decrypt(reply.scores, 1 << 24)[: reply.count]
        assert np.abs(values - expected[reply.offset : reply.offset + reply.count]).max() < 1e-4


# --- complex scores: two items per slot ----------------------------------------------

# Two full chunks of 2S items and 300 more: three complex responses, five real ones.
LARGE_ITEMS, LARGE_DIMENSION = 4 * SLOTS + 300, 24


@pytest.fixture(scope="module")
def large() -> Catalog:
    ids = tuple(f"large-{i}" for i in range(LARGE_ITEMS))
    return Catalog("large", unit_rows(LARGE_ITEMS, LARGE_DIMENSION, seed=31), ids)


@pytest.fixture(scope="module")
def large_target(large: Catalog) -> Iterator[str]:
    running = start_server(Scorer(DEFAULT_PARAMETERS, [large]), "127.0.0.1", 0)
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=None)


@pytest.fixture(scope="module")
def large_stub(large_target: str) -> Iterator[pb_grpc.ScoringServiceStub]:
    with grpc.insecure_channel(large_target) as channel:
        yield pb_grpc.ScoringServiceStub(channel)


@pytest.fixture(scope="module")
def large_key_id(large_stub: pb_grpc.ScoringServiceStub, secret: SecretContext) -> str:
    steps = large_stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT).ckks.galois_steps
    assert steps[0] == 0  # with the conjugation key: real scores work too
    blob = secret.galois_keys(list(steps))
    requests = [
        pb.RegisterKeysRequest(galois_keys_chunk=blob[start : start + (1 << 20)])
        for start in range(0, len(blob), 1 << 20)
    ]
    return str(large_stub.RegisterKeys(iter(requests), timeout=TIMEOUT).key_id)


@pytest.fixture(scope="module")
def large_user() -> FloatArray:
    vector: FloatArray = unit_rows(1, LARGE_DIMENSION, seed=32)[0]
    return vector


def decoded(secret: SecretContext, reply: pb.ScoreResponse, complex_scores: bool) -> FloatArray:
    """A response's `count` scores, decoded as its request asked."""
    if complex_scores:
        return unpack_complex(secret.decrypt_complex(reply.scores, 1 << 24), reply.count)
    values: FloatArray = secret.decrypt(reply.scores, 1 << 24)[: reply.count]
    return values


def streamed_scores(
    secret: SecretContext, replies: list[pb.ScoreResponse], complex_scores: bool, count: int
) -> FloatArray:
    scores = np.full(count, np.nan)
    for reply in replies:
        scores[reply.offset : reply.offset + reply.count] = decoded(secret, reply, complex_scores)
    assert not np.isnan(scores).any()
    return scores


def expected_layout(count: int, per_response: int) -> list[tuple[int, int, int, int]]:
    """(offset, count, chunk_index, chunk_count) of each response for `count` items."""
    total = -(-count // per_response)
    return [
        (i * per_response, min(per_response, count - i * per_response), i, total)
        for i in range(total)
    ]


@pytest.mark.parametrize("complex_scores", [True, False], ids=["complex", "real"])
def test_whole_large_catalog_streams_in_complex_or_real_slots(
    large_stub: pb_grpc.ScoringServiceStub,
    secret: SecretContext,
    large_key_id: str,
    large: Catalog,
    large_user: FloatArray,
    complex_scores: bool,
) -> None:
    query = secret.encrypt(query_slots(large_user, LARGE_DIMENSION, SLOTS))
    request = pb.ScoreRequest(
        key_id=large_key_id, catalog="large", query=query, complex_scores=complex_scores
    )

    replies = responses(large_stub, request)

    per_response = 2 * SLOTS if complex_scores else SLOTS
    layout = [(r.offset, r.count, r.chunk_index, r.chunk_count) for r in replies]
    assert layout == expected_layout(LARGE_ITEMS, per_response)
    assert len(replies) == (3 if complex_scores else 5)
    scores = streamed_scores(secret, replies, complex_scores, LARGE_ITEMS)
    assert np.abs(scores - large.embeddings @ large_user).max() < 1e-4


def test_complex_and_real_scores_are_the_same_scores(
    large_stub: pb_grpc.ScoringServiceStub,
    secret: SecretContext,
    large_key_id: str,
    large: Catalog,
    large_user: FloatArray,
) -> None:
    query = secret.encrypt(query_slots(large_user, LARGE_DIMENSION, SLOTS))
    both = {}
    for complex_scores in (True, False):
        request = pb.ScoreRequest(
            key_id=large_key_id, catalog="large", query=query, complex_scores=complex_scores
        )
        replies = responses(large_stub, request)
        both[complex_scores] = streamed_scores(secret, replies, complex_scores, LARGE_ITEMS)
        if complex_scores:
            complex_bytes = sum(len(r.scores) for r in replies)
        else:
            real_bytes = sum(len(r.scores) for r in replies)

    # the server's split into real slots is exact: it adds no error of its own
    assert np.abs(both[True] - both[False]).max() < 1e-6
    assert np.abs(both[True] - large.embeddings @ large_user).max() < 1e-4
    assert complex_bytes < 0.7 * real_bytes  # 3 ciphertexts instead of 5


@pytest.mark.parametrize("count", [1, 2, SLOTS, SLOTS + 1, 2 * SLOTS, 2 * SLOTS + 1, 10_000])
def test_complex_subset_scores_come_back_in_request_order(
    large_stub: pb_grpc.ScoringServiceStub,
    secret: SecretContext,
    large_key_id: str,
    large: Catalog,
    large_user: FloatArray,
    count: int,
) -> None:
    item_ids, rows = sample_ids(large, count, seed=count)
    query = secret.encrypt(query_slots(large_user, LARGE_DIMENSION, SLOTS))
    request = pb.ScoreRequest(
        key_id=large_key_id, catalog="large", query=query, item_ids=item_ids, complex_scores=True
    )

    replies = responses(large_stub, request)

    layout = [(r.offset, r.count, r.chunk_index, r.chunk_count) for r in replies]
    assert layout == expected_layout(count, 2 * SLOTS)
    assert all(r.count <= 2 * SLOTS for r in replies)
    scores = streamed_scores(secret, replies, True, count)
    assert np.abs(scores - large.embeddings[rows] @ large_user).max() < 1e-4


def test_client_scores_over_several_complex_responses(
    large_target: str, large: Catalog, large_user: FloatArray
) -> None:
    item_ids, rows = sample_ids(large, 2 * SLOTS + 500, seed=34)
    with Client(large_target, timeout=TIMEOUT, rerank_locally=False) as client:
        whole = client.score(large_user, catalog="large")
        whole_bytes = client.stats.last_response_bytes
        subset = client.score(large_user, catalog="large", item_ids=item_ids)
        subset_bytes = client.stats.last_response_bytes

    expected = large.embeddings @ large_user
    assert np.abs(whole - expected).max() < 1e-4
    assert np.abs(subset - expected[rows]).max() < 1e-4
    # the client asks for complex scores: 3 equal ciphertexts for the catalog, 2 for the subset
    assert 2 * whole_bytes == 3 * subset_bytes


def test_complex_scores_of_the_shared_catalogs(
    stub: pb_grpc.ScoringServiceStub,
    secret: SecretContext,
    key_id: str,
    books: Catalog,
    films: Catalog,
    user: FloatArray,
) -> None:
    # one complex response each: books' 5,000 items spill into the imaginary parts
    for catalog, vector in ((books, user), (films, unit_rows(1, films.dimension, seed=33)[0])):
        query = secret.encrypt(query_slots(vector, catalog.dimension, SLOTS))
        request = pb.ScoreRequest(
            key_id=key_id, catalog=catalog.name, query=query, complex_scores=True
        )

        replies = responses(stub, request)

        layout = [(r.offset, r.count, r.chunk_index, r.chunk_count) for r in replies]
        assert layout == [(0, catalog.item_count, 0, 1)]
        scores = streamed_scores(secret, replies, True, catalog.item_count)
        assert np.abs(scores - catalog.embeddings @ vector).max() < 1e-4


# --- ListItems -----------------------------------------------------------------------


def list_all_items(
    stub: pb_grpc.ScoringServiceStub, catalog: str, page_size: int
) -> list[pb.ListItemsResponse]:
    pages = []
    token = ""
    while True:
        request = pb.ListItemsRequest(catalog=catalog, page_size=page_size, page_token=token)
        page = stub.ListItems(request, timeout=TIMEOUT)
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


def test_list_items_pages_through_the_catalog_in_order(
    stub: pb_grpc.ScoringServiceStub, films: Catalog
) -> None:
    pages = list_all_items(stub, "films", page_size=7)

    assert [len(p.item_ids) for p in pages] == [7] * 42 + [6]
    assert [item for p in pages for item in p.item_ids] == list(films.ids)
    assert {p.catalog_version for p in pages} == {films.version}
    assert all(p.next_page_token for p in pages[:-1])


def test_list_items_default_page_holds_a_small_catalog(
    stub: pb_grpc.ScoringServiceStub, films: Catalog, books: Catalog
) -> None:
    page = stub.ListItems(pb.ListItemsRequest(catalog="films"), timeout=TIMEOUT)
    assert list(page.item_ids) == list(films.ids)
    assert page.next_page_token == ""

    pages = list_all_items(stub, "books", page_size=0)
    assert [item for p in pages for item in p.item_ids] == list(books.ids)


@pytest.mark.parametrize("token", ["abc", "-1", "301", "1e3", " "])
def test_list_items_refuses_a_token_it_did_not_issue(
    stub: pb_grpc.ScoringServiceStub, token: str
) -> None:
    request = pb.ListItemsRequest(catalog="films", page_size=10, page_token=token)

    with pytest.raises(grpc.RpcError) as info:
        stub.ListItems(request, timeout=TIMEOUT)

    assert code_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.ListItems(pb.ListItemsRequest(catalog="films"), timeout=TIMEOUT).item_ids


def test_list_items_of_an_unknown_catalog_is_not_found(stub: pb_grpc.ScoringServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ListItems(pb.ListItemsRequest(catalog="no-such-catalog"), timeout=TIMEOUT)

    assert code_of(info.value) == grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def small_pages(films: Catalog) -> Iterator[RunningServer]:
    scorer = Scorer(DEFAULT_PARAMETERS, [films], limits=SizeLimits(max_page_size=16))
    running = start_server(scorer, "127.0.0.1", 0)
    yield running
    running.stop(grace=None)


def test_page_size_is_clamped_to_the_servers_limit(
    small_pages: RunningServer, films: Catalog
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{small_pages.port}") as channel:
        small = pb_grpc.ScoringServiceStub(channel)
        info = small.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)
        assert info.limits.max_page_size == 16

        pages = list_all_items(small, "films", page_size=1000)

        assert all(len(p.item_ids) == 16 for p in pages[:-1])
        assert [item for p in pages for item in p.item_ids] == list(films.ids)


def test_client_item_ids_walks_every_page(small_pages: RunningServer, films: Catalog) -> None:
    with Client(f"127.0.0.1:{small_pages.port}", timeout=TIMEOUT) as client:
        assert client.item_ids("films") == list(films.ids)


# --- ListCatalogs and GetServerInfo -----------------------------------------------------


def test_list_catalogs_describes_every_catalog(
    stub: pb_grpc.ScoringServiceStub, books: Catalog, films: Catalog
) -> None:
    reply = stub.ListCatalogs(pb.ListCatalogsRequest(), timeout=TIMEOUT)

    described = [
        (c.name, c.version, c.dimension, c.item_count, c.padded_dimension, c.items_per_response)
        for c in reply.catalogs
    ]
    assert described == [
        (c.name, c.version, c.dimension, c.item_count, padded(c.dimension), SLOTS)
        for c in (books, films)  # ordered by name
    ]
    assert [c.padded_dimension for c in reply.catalogs] == [128, 32]
    assert reply.next_page_token == ""


def test_list_catalogs_pages(stub: pb_grpc.ScoringServiceStub) -> None:
    first = stub.ListCatalogs(pb.ListCatalogsRequest(page_size=1), timeout=TIMEOUT)
    assert [c.name for c in first.catalogs] == ["books"]
    assert first.next_page_token

    second = stub.ListCatalogs(
        pb.ListCatalogsRequest(page_size=1, page_token=first.next_page_token), timeout=TIMEOUT
    )
    assert [c.name for c in second.catalogs] == ["films"]
    assert second.next_page_token == ""

    with pytest.raises(grpc.RpcError) as info:
        stub.ListCatalogs(pb.ListCatalogsRequest(page_token="zzz"), timeout=TIMEOUT)
    assert code_of(info.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_client_catalogs_match_the_catalogs(client: Client, books: Catalog) -> None:
    infos = {info.name: info for info in client.catalogs()}

    assert set(infos) == {"books", "films"}
    book = client.catalog("books")
    assert book == infos["books"]
    assert (book.version, book.dimension, book.item_count) == (
        books.version,
        books.dimension,
        books.item_count,
    )


def test_server_info_lists_the_union_of_the_catalogs_rotation_steps(
    stub: pb_grpc.ScoringServiceStub, scorer: Scorer, books: Catalog, films: Catalog
) -> None:
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT)

    plans = {name: entry.plan for name, entry in scorer.catalogs.items()}
    assert plans["books"].dimension == books.dimension
    assert plans["films"].dimension == films.dimension
    union = set(plans["books"].rotation_steps) | set(plans["films"].rotation_steps)
    steps = list(info.ckks.galois_steps)
    assert steps[0] == 0  # complex conjugation first: for real scores only
    assert 0 not in union
    assert sorted(steps[1:]) == sorted(union)
    assert tuple(steps) == scorer.galois_steps
    assert len(steps) == len(set(steps))
    assert 1 in steps  # both catalogs have baby steps > 1
    assert info.ckks.security_bits == 128
    assert info.ckks.poly_modulus_degree == DEFAULT_PARAMETERS.poly_modulus_degree
    assert tuple(info.ckks.coeff_modulus_bits) == DEFAULT_PARAMETERS.coeff_modulus_bits
    assert info.ckks.scale_bits == DEFAULT_PARAMETERS.scale_bits
    assert info.ckks.slot_count == SLOTS


def test_server_info_reports_the_servers_limits(small_pages: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{small_pages.port}") as channel:
        info = pb_grpc.ScoringServiceStub(channel).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=TIMEOUT
        )

    defaults = SizeLimits()
    assert info.limits.max_page_size == 16
    assert info.limits.max_key_chunk_bytes == defaults.max_key_chunk_bytes
    assert info.limits.max_key_bytes == defaults.max_key_bytes
    assert info.limits.max_item_ids == defaults.max_item_ids
    assert info.limits.max_message_bytes == defaults.max_message_bytes
    assert info.limits.max_query_bytes > 0


# --- catalog files ------------------------------------------------------------------


@pytest.fixture
def matrix() -> FloatArray:
    return unit_rows(40, 12, seed=21)


@pytest.fixture
def names() -> list[str]:
    return [f"sku-{i:03d}" for i in range(40)]


def test_npy_with_ids_file(tmp_path: Path, matrix: FloatArray, names: list[str]) -> None:
    np.save(tmp_path / "c.npy", matrix)
    (tmp_path / "ids.txt").write_text("\n".join(names) + "\n")

    catalog = load_catalog("c", tmp_path / "c.npy", tmp_path / "ids.txt")

    assert catalog.name == "c"
    assert catalog.ids == tuple(names)
    assert catalog.embeddings.dtype == np.float32  # held as float32, what models produce
    assert np.array_equal(catalog.embeddings, matrix.astype(np.float32))
    assert (catalog.item_count, catalog.dimension) == (40, 12)


def test_npy_without_ids_uses_row_numbers(tmp_path: Path, matrix: FloatArray) -> None:
    np.save(tmp_path / "c.npy", matrix.astype(np.float32))

    catalog = load_catalog("c", tmp_path / "c.npy")

    assert catalog.ids == tuple(str(i) for i in range(40))
    assert np.allclose(catalog.embeddings, matrix, atol=1e-6)


def test_ids_file_lines_are_stripped_and_blank_lines_skipped(
    tmp_path: Path, matrix: FloatArray, names: list[str]
) -> None:
    np.save(tmp_path / "c.npy", matrix)
    (tmp_path / "ids.txt").write_text("\n\n".join(f"  {name}\t" for name in names) + "\n\n")

    assert load_catalog("c", tmp_path / "c.npy", tmp_path / "ids.txt").ids == tuple(names)


def test_npz_matches_npy_with_ids(tmp_path: Path, matrix: FloatArray, names: list[str]) -> None:
    np.savez(tmp_path / "c.npz", embeddings=matrix, ids=np.array(names))
    np.save(tmp_path / "c.npy", matrix)
    (tmp_path / "ids.txt").write_text("\n".join(names))

    from_npz = load_catalog("c", tmp_path / "c.npz")
    from_npy = load_catalog("c", tmp_path / "c.npy", tmp_path / "ids.txt")

    assert from_npz.ids == tuple(names)
    assert np.array_equal(from_npz.embeddings, matrix.astype(np.float32))
    assert from_npz.version == from_npy.version


def test_version_follows_the_content(tmp_path: Path, matrix: FloatArray, names: list[str]) -> None:
    base = Catalog("c", matrix, tuple(names)).version
    renamed = Catalog("c", matrix, (*names[:-1], "sku-new")).version
    changed = matrix.copy()
    changed[3, 4] += 1e-6  # a change float32, which the catalog holds, keeps
    moved = Catalog("c", changed, tuple(names)).version

    assert len({base, renamed, moved}) == 3
    assert Catalog("other-name", matrix.copy(), tuple(names)).version == base


def test_a_catalog_file_served_and_scored(tmp_path: Path, matrix: FloatArray) -> None:
    ids = np.array([f"doc/{i}" for i in range(matrix.shape[0])])
    np.savez_compressed(tmp_path / "docs.npz", embeddings=matrix, ids=ids)
    catalog = load_catalog("docs", tmp_path / "docs.npz")
    running = start_server(Scorer(DEFAULT_PARAMETERS, [catalog]), "127.0.0.1", 0)
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=TIMEOUT) as client:
            vector = unit_rows(1, matrix.shape[1], seed=8)[0]
            scores = client.score(vector, catalog="docs")
            assert np.abs(scores - matrix @ vector).max() < 1e-4
            top = client.recommend(vector, catalog="docs", k=3)
            assert [item for item, _ in top] == [
                f"doc/{i}" for i in np.argsort(-(matrix @ vector), kind="stable")[:3]
            ]
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_refused(
    tmp_path: Path, matrix: FloatArray, names: list[str], bad: float
) -> None:
    broken = matrix.copy()
    broken[17, 5] = bad
    np.savez(tmp_path / "c.npz", embeddings=broken, ids=np.array(names))

    with pytest.raises(CatalogError, match="NaN or infinity"):
        load_catalog("c", tmp_path / "c.npz")


def test_rows_above_the_norm_bound_are_refused(tmp_path: Path, matrix: FloatArray) -> None:
    np.save(tmp_path / "ok.npy", matrix * MAX_ROW_NORM)  # exactly on the bound: fine
    assert load_catalog("ok", tmp_path / "ok.npy").item_count == 40

    large = matrix.copy()
    large[0] *= MAX_ROW_NORM * 1.01
    np.save(tmp_path / "c.npy", large)
    with pytest.raises(CatalogError, match="norm"):
        load_catalog("c", tmp_path / "c.npy")


def test_duplicate_ids_are_refused(tmp_path: Path, matrix: FloatArray, names: list[str]) -> None:
    duplicated = [*names[:-1], names[0]]
    np.savez(tmp_path / "c.npz", embeddings=matrix, ids=np.array(duplicated))
    np.save(tmp_path / "c.npy", matrix)
    (tmp_path / "ids.txt").write_text("\n".join(duplicated))

    with pytest.raises(CatalogError, match="not unique"):
        load_catalog("c", tmp_path / "c.npz")
    with pytest.raises(CatalogError, match="not unique"):
        load_catalog("c", tmp_path / "c.npy", tmp_path / "ids.txt")


@pytest.mark.parametrize("count", [39, 41, 0])
def test_wrong_id_count_is_refused(
    tmp_path: Path, matrix: FloatArray, names: list[str], count: int
) -> None:
    np.save(tmp_path / "c.npy", matrix)
    ids = [*names, "sku-extra"] if count > len(names) else names[:count]
    (tmp_path / "ids.txt").write_text("\n".join(ids))

    with pytest.raises(CatalogError, match="ids for 40 embeddings"):
        load_catalog("c", tmp_path / "c.npy", tmp_path / "ids.txt")


def test_pickled_object_arrays_are_never_loaded(
    tmp_path: Path, matrix: FloatArray, names: list[str]
) -> None:
    objects = np.empty(matrix.shape, dtype=object)
    objects[...] = matrix
    np.save(tmp_path / "c.npy", objects, allow_pickle=True)
    with pytest.raises(CatalogError):
        load_catalog("c", tmp_path / "c.npy")

    np.savez(tmp_path / "c.npz", embeddings=matrix, ids=np.array(names, dtype=object))
    with pytest.raises(CatalogError):
        load_catalog("c", tmp_path / "c.npz")


@pytest.mark.parametrize(
    "ids",
    [["", *[f"sku-{i}" for i in range(1, 40)]], ["x" * 257, *[f"sku-{i}" for i in range(1, 40)]]],
    ids=["empty", "too-long"],
)
def test_ids_must_be_1_to_256_bytes(tmp_path: Path, matrix: FloatArray, ids: list[str]) -> None:
    np.savez(tmp_path / "c.npz", embeddings=matrix, ids=np.array(ids))

    with pytest.raises(CatalogError, match="bytes"):
        load_catalog("c", tmp_path / "c.npz")


def test_malformed_catalog_files_are_refused(
    tmp_path: Path, matrix: FloatArray, names: list[str]
) -> None:
    np.savez(tmp_path / "no-ids.npz", embeddings=matrix)
    np.savez(tmp_path / "c.npz", embeddings=matrix, ids=np.array(names))
    (tmp_path / "ids.txt").write_text("\n".join(names))
    np.save(tmp_path / "vector.npy", matrix[0])
    np.save(tmp_path / "empty.npy", np.zeros((0, 12)))
    (tmp_path / "c.csv").write_text("1,2,3\n")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")

    cases = [
        (tmp_path / "no-ids.npz", None),
        (tmp_path / "c.npz", tmp_path / "ids.txt"),
        (tmp_path / "vector.npy", None),
        (tmp_path / "empty.npy", None),
        (tmp_path / "c.csv", None),
        (tmp_path / "junk.npy", None),
        (tmp_path / "missing.npy", None),
        (tmp_path / "c.npy", tmp_path / "missing.txt"),
    ]
    np.save(tmp_path / "c.npy", matrix)
    for path, ids_path in cases:
        with pytest.raises(CatalogError):
            load_catalog("c", path, ids_path)


def test_a_file_that_is_not_an_npz_says_so(tmp_path: Path) -> None:
    """Not numpy's pickle warning (the file holds no objects: it is no zip at all)."""
    (tmp_path / "g.npz").write_text("garbage")
    with pytest.raises(CatalogError, match=r"not an \.npz file"):
        load_catalog("g", tmp_path / "g.npz")
