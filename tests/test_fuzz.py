"""Every field of every request, fuzzed (hypothesis) against a live server on loopback.

Each call carries a deadline; for every example: the call returns within it (no hang),
its status is one the API documents (OK, INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION; UNAUTHENTICATED and PERMISSION_DENIED only
where tokens are on), never UNKNOWN or INTERNAL, and the server still answers
GetServerInfo afterwards (no crash). Requests are well-formed protobuf with hostile
values, and raw bytes that are no protobuf at all (truncated, random, invalid UTF-8
in a string field): the server refuses those with INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import KeyRetentionPolicy, Scorer, SizeLimits
from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots
from heserve.transport.auth import Authenticator, owner_tag
from heserve.transport.server import RunningServer, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client import SecretContext

T = TypeVar("T")
DEADLINE = 10.0
SLOTS = DEFAULT_PARAMETERS.slot_count
SEAL_HEADER = struct.Struct("<HBBBBHQ")
MAX_ITEM_IDS = 64
MAX_PAGE_SIZE = 100
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
WITH_TOKENS = DOCUMENTED | {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
ALICE, BOB = "alice-" + "a" * 24, "bob-" + "b" * 24

FUZZ = settings(
    # 300 each keeps the file to ~20 s; HESERVE_FUZZ_EXAMPLES=5000 digs deeper.
    max_examples=int(os.environ.get("HESERVE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


# --- the live servers and what a real client would send ----------------------------------


class Live:
    """A running server, a channel to it, and real keys, queries and ids to mutate."""

    def __init__(self, server: RunningServer, scorer: Scorer, token: str | None = None) -> None:
        self.server = server
        self.scorer = scorer
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.ScoringServiceStub(self.channel)
        self.metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self.party = party = SecretContext(DEFAULT_PARAMETERS)
        # step 0 (conjugation) too, so real-slot (complex_scores false) scores work as well
        compressed = party.galois_keys([0, *scorer.galois_steps])
        self.keys = wire.galois_keys_to_wire(compressed)  # uncompressed, mutable by layout
        self.keys_compressed = compressed
        self.key_id = str(
            self.stub.RegisterKeys(
                chunks(self.keys), timeout=DEADLINE, metadata=self.metadata
            ).key_id
        )
        tiny = scorer.catalogs["tiny"].catalog
        self.ids = list(tiny.ids)
        self.version = tiny.version
        vector = unit_rows(1, tiny.dimension, seed=81)[0]
        self.expected = tiny.embeddings @ vector
        self.query = party.encrypt(query_slots(vector, tiny.dimension, SLOTS))
        self.query_wire = wire.ciphertext_to_wire(self.query)

    def ensure_keys(self) -> None:
        """Register the reference keys again, in case an example deleted or evicted them."""
        self.stub.RegisterKeys(chunks(self.keys), timeout=DEADLINE, metadata=self.metadata)

    def alive(self) -> None:
        request = pb.GetServerInfoRequest()
        info = self.stub.GetServerInfo(request, timeout=DEADLINE, metadata=self.metadata)
        assert info.ckks.poly_modulus_degree == DEFAULT_PARAMETERS.poly_modulus_degree


def _scorer() -> Scorer:
    catalogs = [
        Catalog("tiny", unit_rows(300, 16, 82), tuple(f"tiny-{i}" for i in range(300))),
        Catalog("pair", unit_rows(2, 3, 83), ("left", "right")),
    ]
    return Scorer(
        DEFAULT_PARAMETERS,
        catalogs,
        limits=SizeLimits(max_item_ids=MAX_ITEM_IDS, max_page_size=MAX_PAGE_SIZE),
        retention=KeyRetentionPolicy(max_keys=16),
    )


@pytest.fixture(scope="session")
def live() -> Iterator[Live]:
    scorer = _scorer()
    server = start_server(scorer, "127.0.0.1", 0)
    state = Live(server, scorer)
    yield state
    state.channel.close()
    server.stop(grace=None)


@pytest.fixture(scope="session")
def guarded() -> Iterator[Live]:
    """The same, with API tokens: alice's and bob's key_ids are their own."""
    scorer = _scorer()
    server = start_server(
        scorer, "127.0.0.1", 0, authenticator=Authenticator([("alice", ALICE), ("bob", BOB)])
    )
    state = Live(server, scorer, token=ALICE)
    yield state
    state.channel.close()
    server.stop(grace=None)


def chunks(blob: bytes, size: int = 1 << 20) -> Iterator[pb.RegisterKeysRequest]:
    for start in range(0, len(blob), size):
        yield pb.RegisterKeysRequest(galois_keys_chunk=blob[start : start + size])


def outcome(
    call: Callable[[], T], allowed: set[grpc.StatusCode]
) -> tuple[grpc.StatusCode, T | None]:
    """Make the call; check it ended in time with a documented status."""
    started = time.monotonic()
    try:
        result: T | None = call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        code, result = error.code(), None
        detail = error.details()
    else:
        detail = ""
    elapsed = time.monotonic() - started
    assert elapsed < DEADLINE + 2, f"the call took {elapsed:.1f} s"
    assert code in allowed, (code, detail)
    event(code.name)  # --hypothesis-show-statistics counts the statuses seen
    return code, result


# --- value strategies --------------------------------------------------------------------

texts = st.text(max_size=60)
page_tokens = st.one_of(
    texts,
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["", "0", "1", "2", "-1", "299", "300", "301", " 7 ", "1_0", "0x10", "1e3"]),
    st.sampled_from(["٣", "𝟗", "+5", "9" * 5000, "\x00", "%s", "{}"]),
)
page_sizes = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, MAX_PAGE_SIZE, MAX_PAGE_SIZE + 1])
catalog_names = (
    st.sampled_from(["tiny", "pair", "", "TINY", "tiny ", "tiny\x00", "../tiny"]) | texts
)
hex_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)


@st.composite
def seal_headed(draw: st.DrawFn) -> bytes:
    """Random bytes under a SEAL header that is plausible in every field but one or two."""
    payload = draw(st.binary(max_size=512))
    size = SEAL_HEADER.size + len(payload)
    header = SEAL_HEADER.pack(
        draw(st.sampled_from([0xA15E, 0xA15E, 0xA15E, 0x5EA1, 0])),
        draw(st.sampled_from([16, 16, 16, 0, 255])),
        draw(st.sampled_from([4, 4, 4, 3, 5])),
        draw(st.sampled_from([1, 3, 1, 3, 0, 2, 255])),
        draw(st.sampled_from([0, 1, 2, 0, 1, 2, 3, 255])),
        draw(st.sampled_from([0, 0, 0, 1])),
        draw(st.sampled_from([size, size, size, 0, size - 1, size + 1, 2**64 - 1])),
    )
    return header + payload


# Keys and queries are too large to print in a failure report, so the strategies for
# them draw a recipe, (what, source, details), and `cook` makes the bytes from it.
Recipe = tuple[str, str, Any]


def recipes(sources: list[str], sizes: dict[str, int]) -> st.SearchStrategy[Recipe]:
    """Cut, mutated or intact real objects (`sources` name them in a Live)."""

    @st.composite
    def cut(draw: st.DrawFn) -> Recipe:
        source = draw(st.sampled_from(sources))
        return ("cut", source, (draw(st.integers(0, sizes[source] - 1)), draw(st.booleans())))

    @st.composite
    def mutated(draw: st.DrawFn) -> Recipe:
        source = draw(st.sampled_from(sources))
        at = st.integers(0, sizes[source] - 1)
        return (
            "flip",
            source,
            draw(st.lists(st.tuples(at, st.integers(1, 255)), min_size=1, max_size=4)),
        )

    @st.composite
    def split(draw: st.DrawFn) -> Recipe:
        source = draw(st.sampled_from(sources))
        return ("split", source, sorted(draw(st.lists(st.integers(0, sizes[source]), max_size=6))))

    intact = st.sampled_from(sources).map(lambda source: ("intact", source, None))
    return st.one_of(cut(), mutated(), split(), intact)


def cook(live: Live, recipe: Recipe) -> list[bytes]:
    """The bytes a recipe names, as chunks (one unless it was split)."""
    what, source, details = recipe
    if what == "raw":
        return [details]
    blob: bytes = getattr(live, source)
    if what == "cut":
        length, patch = details
        cut = bytearray(blob[:length])
        if patch and len(cut) >= SEAL_HEADER.size:
            struct.pack_into("<Q", cut, 8, len(cut))  # the header's size made to match
        return [bytes(cut)]
    if what == "flip":
        changed = bytearray(blob)
        for at, xor in details:
            changed[at] ^= xor
        return [bytes(changed)]
    if what == "split":
        edges = [0, *details, len(blob)]
        return [blob[a:b] for a, b in itertools.pairwise(edges)]
    return [blob]


def queries(live: Live) -> st.SearchStrategy[Recipe]:
    sizes = {"query": len(live.query), "query_wire": len(live.query_wire)}
    return st.one_of(
        st.binary(max_size=512).map(lambda blob: ("raw", "", blob)),
        seal_headed().map(lambda blob: ("raw", "", blob)),
        recipes(list(sizes), sizes),
    )


def item_id_lists(live: Live) -> st.SearchStrategy[list[str]]:
    real = st.sampled_from(live.ids)
    return st.one_of(
        st.lists(real, max_size=10, unique=True),
        st.lists(real, min_size=2, max_size=10),  # repeats likely
        st.lists(real | texts, max_size=10),
        st.lists(real, min_size=MAX_ITEM_IDS - 2, max_size=MAX_ITEM_IDS + 3),
        st.just(["tiny-0", "tiny-0"]),
        st.just(["left", "right"]),
    )


def mostly(data: st.DataObject, valid: T, hostile: st.SearchStrategy[T], label: str) -> T:
    """`valid` two times in three, else a hostile value: so that, with several fields
    fuzzed at once, examples still get past the first check to the later ones."""
    if data.draw(st.sampled_from([False, False, True]), label=f"{label} is hostile"):
        return data.draw(hostile, label=label)
    return valid


# --- one test per RPC --------------------------------------------------------------------


@FUZZ
@given(unknown=st.lists(st.tuples(st.integers(1, 2**29 - 1), st.binary(max_size=64)), max_size=4))
def test_get_server_info_ignores_unknown_fields(
    live: Live, unknown: list[tuple[int, bytes]]
) -> None:
    # GetServerInfoRequest has no fields: anything sent is an unknown (future) field.
    message = b"".join(
        _varint(number << 3 | 2) + _varint(len(value)) + value for number, value in unknown
    )
    raw = live.channel.unary_unary(
        "/heserve.v1.ScoringService/GetServerInfo",
        request_serializer=lambda data: data,
        response_deserializer=pb.GetServerInfoResponse.FromString,
    )
    _, info = outcome(lambda: raw(message, timeout=DEADLINE), {grpc.StatusCode.OK})
    assert info is not None and info.ckks.slot_count == SLOTS


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@FUZZ
@given(page_size=page_sizes, page_token=page_tokens)
def test_list_catalogs(live: Live, page_size: int, page_token: str) -> None:
    request = pb.ListCatalogsRequest(page_size=page_size, page_token=page_token)
    _, page = outcome(lambda: live.stub.ListCatalogs(request, timeout=DEADLINE), DOCUMENTED)
    if page is not None:
        assert len(page.catalogs) <= max(1, min(page_size or 1000, MAX_PAGE_SIZE))
        assert {c.name for c in page.catalogs} <= {"tiny", "pair"}
    live.alive()


@FUZZ
@given(data=st.data(), page_size=page_sizes, page_token=page_tokens)
def test_list_items(live: Live, data: st.DataObject, page_size: int, page_token: str) -> None:
    catalog = mostly(data, "tiny", catalog_names, "catalog")
    request = pb.ListItemsRequest(catalog=catalog, page_size=page_size, page_token=page_token)
    _, page = outcome(lambda: live.stub.ListItems(request, timeout=DEADLINE), DOCUMENTED)
    if page is not None:
        assert catalog in {"tiny", "pair"}
        assert len(page.item_ids) <= MAX_PAGE_SIZE
        ids = live.ids if catalog == "tiny" else ["left", "right"]
        start = ids.index(page.item_ids[0]) if page.item_ids else 0
        assert list(page.item_ids) == ids[start : start + len(page.item_ids)]
    live.alive()


@FUZZ
@given(data=st.data())
def test_register_keys(live: Live, data: st.DataObject) -> None:
    sizes = {"keys": len(live.keys), "keys_compressed": len(live.keys_compressed)}
    kind = data.draw(st.sampled_from(["random", "headed", "real", "oversized"]), label="kind")
    if kind == "random":
        keys = data.draw(st.lists(st.binary(max_size=2048), max_size=5), label="chunks")
    elif kind == "headed":
        keys = data.draw(st.lists(seal_headed(), min_size=1, max_size=2), label="chunks")
    elif kind == "real":
        keys = cook(live, data.draw(recipes(list(sizes), sizes), label="keys"))
    else:
        keys = [b"\0" * ((1 << 20) + 1)]
    requests = [pb.RegisterKeysRequest(galois_keys_chunk=chunk) for chunk in keys]
    _, reply = outcome(lambda: live.stub.RegisterKeys(iter(requests), timeout=DEADLINE), DOCUMENTED)
    if b"".join(keys) == live.keys and max(map(len, keys)) <= 1 << 20:
        # however the same bytes were cut, they are the same keys
        assert reply is not None and reply.key_id == live.key_id
    live.alive()


@FUZZ
@given(key_id=st.one_of(texts, hex_ids, st.just("")), real=st.booleans())
def test_delete_keys(live: Live, key_id: str, real: bool) -> None:
    if real:
        key_id = live.key_id + key_id  # the real one, or the real one with a suffix
    request = pb.DeleteKeysRequest(key_id=key_id)
    _, reply = outcome(lambda: live.stub.DeleteKeys(request, timeout=DEADLINE), DOCUMENTED)
    if reply is not None and reply.deleted:
        assert key_id == live.key_id
        live.ensure_keys()
    live.alive()


@FUZZ
@given(data=st.data())
def test_score(live: Live, data: st.DataObject) -> None:
    live.ensure_keys()
    request = pb.ScoreRequest(
        key_id=mostly(data, live.key_id, texts | hex_ids, "key_id"),
        catalog=mostly(data, "tiny", catalog_names, "catalog"),
        query=b"".join(cook(live, mostly(data, ("intact", "query", None), queries(live), "query"))),
        item_ids=mostly(data, [], item_id_lists(live), "item_ids"),
        catalog_version=mostly(data, "", st.just(live.version) | texts, "catalog_version"),
        complex_scores=data.draw(st.booleans(), label="complex_scores"),
    )
    _, replies = outcome(lambda: list(live.stub.Score(request, timeout=DEADLINE)), DOCUMENTED)
    if replies is not None:
        expected = len(request.item_ids) or {"tiny": 300, "pair": 2}[request.catalog]
        assert sum(reply.count for reply in replies) == expected
        assert [reply.chunk_index for reply in replies] == list(range(len(replies)))
    live.alive()


# --- with tokens: the caller's metadata and key ownership, fuzzed too ----------------------

headers = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@FUZZ
@given(data=st.data())
def test_calls_with_tokens(guarded: Live, data: st.DataObject) -> None:
    authorization: str | None = mostly(
        data,
        f"Bearer {ALICE}",
        st.one_of(
            st.none(),
            headers,
            st.sampled_from([f"Bearer {BOB}", f"bearer  {ALICE} ", ALICE, f"Bearer {ALICE}x"]),
            headers.map(lambda token: f"Bearer {token}"),
        ),
        "authorization",
    )
    metadata = () if authorization is None else (("authorization", authorization),)
    guarded.ensure_keys()
    key_id = mostly(
        data,
        guarded.key_id,
        st.sampled_from([guarded.key_id[:-1], guarded.key_id[:32], ""])
        | texts.map(lambda text: text + guarded.key_id[32:])  # alice's tag, not her key
        | texts,
        "key_id",
    )
    method = data.draw(st.sampled_from(["Score", "DeleteKeys", "ListItems", "RegisterKeys"]))
    call: Callable[[], Any]
    if method == "Score":
        request = pb.ScoreRequest(
            key_id=key_id, catalog="tiny", query=guarded.query, complex_scores=True
        )
        call = lambda: list(guarded.stub.Score(request, timeout=DEADLINE, metadata=metadata))  # noqa: E731
    elif method == "DeleteKeys":
        delete = pb.DeleteKeysRequest(key_id=key_id)
        call = lambda: guarded.stub.DeleteKeys(delete, timeout=DEADLINE, metadata=metadata)  # noqa: E731
    elif method == "ListItems":
        items = pb.ListItemsRequest(catalog="pair")
        call = lambda: guarded.stub.ListItems(items, timeout=DEADLINE, metadata=metadata)  # noqa: E731
    else:
        sizes = {"keys": len(guarded.keys)}
        blob = b"".join(cook(guarded, data.draw(recipes(["keys"], sizes), label="keys")))
        call = lambda: guarded.stub.RegisterKeys(  # noqa: E731
            chunks(blob), timeout=DEADLINE, metadata=metadata
        )
    code, _ = outcome(call, WITH_TOKENS)
    # exactly "Bearer <token>" (scheme in any case), nothing around it: see transport.auth
    match = re.fullmatch(r"(?i:bearer) ([\x21-\x2b\x2d-\x7e]+)", authorization or "", re.ASCII)
    caller = {ALICE: "alice", BOB: "bob"}.get(match[1]) if match else None
    if caller is None:
        assert code == grpc.StatusCode.UNAUTHENTICATED
    elif method in {"Score", "DeleteKeys"} and not key_id:
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # "key_id is empty", checked first
    elif method in {"Score", "DeleteKeys"} and not key_id.endswith(owner_tag(caller)):
        assert code == grpc.StatusCode.PERMISSION_DENIED
    else:
        assert code not in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    guarded.alive()


# --- raw bytes: requests that do not parse --------------------------------------------------

RAW_METHODS = {
    "GetServerInfo": "unary",
    "ListCatalogs": "unary",
    "ListItems": "unary",
    "DeleteKeys": "unary",
    "Score": "stream_out",
    "RegisterKeys": "stream_in",
}


def _raw_call(live: Live, method: str, payloads: list[bytes]) -> Callable[[], object]:
    """A call of `method` that sends `payloads` as they are (no serializer)."""
    path = f"/heserve.v1.ScoringService/{method}"
    kind = RAW_METHODS[method]
    options: dict[str, Any] = {"timeout": DEADLINE, "metadata": live.metadata}
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    channel: Any = live.channel  # bytes in, bytes out: no (de)serializer
    if kind == "unary":
        return lambda: channel.unary_unary(path, **raw)(payloads[0], **options)
    if kind == "stream_out":
        return lambda: list(channel.unary_stream(path, **raw)(payloads[0], **options))
    return lambda: channel.stream_unary(path, **raw)(iter(payloads), **options)


def _string_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


@FUZZ
@given(
    method=st.sampled_from(sorted(RAW_METHODS)),
    payloads=st.lists(
        st.one_of(
            st.binary(max_size=256),
            # field 2 of ScoreRequest / field 1 of the others, a string: invalid UTF-8
            st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80"]).flatmap(
                lambda bad: st.integers(1, 3).map(lambda n: _string_field(n, bad))
            ),
            # a length prefix that runs past the end (truncated)
            st.integers(1, 3).map(lambda n: _varint(n << 3 | 2) + _varint(1000) + b"x"),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_raw_bytes_are_invalid_argument_or_ok_never_internal(
    live: Live, method: str, payloads: list[bytes]
) -> None:
    code, _ = outcome(_raw_call(live, method, payloads), DOCUMENTED)
    parse: Callable[[bytes], object] = {
        "GetServerInfo": pb.GetServerInfoRequest,
        "ListCatalogs": pb.ListCatalogsRequest,
        "ListItems": pb.ListItemsRequest,
        "DeleteKeys": pb.DeleteKeysRequest,
        "Score": pb.ScoreRequest,
        "RegisterKeys": pb.RegisterKeysRequest,
    }[method].FromString  # type: ignore[attr-defined]
    unreadable = False
    for payload in payloads if RAW_METHODS[method] == "stream_in" else payloads[:1]:
        try:
            parse(payload)
        except Exception:
            unreadable = True
    if unreadable:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    live.alive()


def test_unreadable_request_is_one_log_line_without_traceback(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("DEBUG"), pytest.raises(grpc.RpcError) as refused:
        _raw_call(live, "Score", [b"\x12\x02\xff\xfe"])()
    assert isinstance(refused.value, grpc.Call)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    mentions = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(mentions) == 1
    assert all(r.exc_info is None and r.levelno < 40 for r in caplog.records)


@pytest.mark.parametrize("size", [257, 10_000, 1 << 20])
def test_long_strings_are_refused_by_length_and_never_echoed(
    live: Live, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller's string past `SizeLimits.max_name_chars` (or max_item_id_chars) is
    refused with INVALID_ARGUMENT naming its length; nothing echoes it whole, in the
    status or the log (a 10 KB value once made the trailer too large for the client)."""
    long = "n" * size
    calls: dict[str, Callable[[], object]] = {
        "ListItems catalog": lambda: live.stub.ListItems(
            pb.ListItemsRequest(catalog=long), timeout=DEADLINE
        ),
        "ListItems page_token": lambda: live.stub.ListItems(
            pb.ListItemsRequest(catalog="tiny", page_token=long), timeout=DEADLINE
        ),
        "DeleteKeys key_id": lambda: live.stub.DeleteKeys(
            pb.DeleteKeysRequest(key_id=long), timeout=DEADLINE
        ),
    }
    for field in ("catalog", "catalog_version", "key_id", "item_ids"):
        request = pb.ScoreRequest(
            key_id=live.key_id, catalog="tiny", query=live.query, catalog_version=live.version
        )
        if field == "item_ids":
            request.item_ids.extend([live.ids[0], long])
        else:
            setattr(request, field, long)
        calls[f"Score {field}"] = functools.partial(_score_all, live, request)
    for name, call in calls.items():
        with caplog.at_level("DEBUG"):
            caplog.clear()
            with pytest.raises(grpc.RpcError) as refused:
                call()
        error = refused.value
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
        assert long not in (error.details() or ""), name
        assert len(error.details() or "") < 200, name
        assert all(long[:300] not in r.getMessage() for r in caplog.records), name


def _score_all(live: Live, request: pb.ScoreRequest) -> list[pb.ScoreResponse]:
    return list(live.stub.Score(request, timeout=DEADLINE))


def test_short_unknown_values_are_echoed_clipped() -> None:
    """Within the limits, a NOT_FOUND or FAILED_PRECONDITION names the value, cut."""
    scorer = _scorer()
    for call in (
        lambda: scorer.catalog("x" * 200),
        lambda: list(scorer.score("k", "tiny", b"q", ["y" * 200])),
        lambda: list(scorer.score("k", "tiny", b"q", [], "v" * 200)),
    ):
        with pytest.raises(Exception) as refused:
            call()
        message = str(refused.value)
        assert "characters)" in message and len(message) < 200, message


def test_the_fuzzed_servers_still_score_correctly(live: Live, guarded: Live) -> None:
    for state in (live, guarded):
        state.ensure_keys()
        request = pb.ScoreRequest(
            key_id=state.key_id, catalog="tiny", query=state.query, complex_scores=True
        )
        (reply,) = state.stub.Score(request, timeout=DEADLINE, metadata=state.metadata)
        scores = state.party.decrypt_complex(reply.scores, 1 << 24).real[: reply.count]
        assert reply.count == 300
        assert np.abs(scores - state.expected).max() < 1e-4
