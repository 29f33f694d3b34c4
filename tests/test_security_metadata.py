"""Issue 10, findings 4 and 5 (metadata): what a caller can do with the bytes of its
call's headers, against a real server on loopback.

gRPC's own client refuses to send most of these headers (a non-ASCII byte, a line
break, a header list past its limit), and an attacker does not use it: the calls here
are written as raw HTTP/2 frames (HPACK literals, no Huffman), headers first, before
the server's settings are acknowledged, as any HTTP/2 library can. What the server
answers is read from its frames: a unary call that succeeded sends a DATA frame (its
response) before the trailers; a refused one sends trailers only. The access log says
which code it was.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from conftest import TIMEOUT, serving

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.ops.logs import KeyValueFormatter
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.auth import Authenticator
from heserve.transport.interceptors import MAX_METADATA_BYTES
from heserve.transport.server import RunningServer
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc

GET_SERVER_INFO = "/heserve.v1.ScoringService/GetServerInfo"

# --- a raw HTTP/2 client ---------------------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _CONTINUATION = 0, 1, 3, 4, 6, 7, 9
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1
_MAX_FRAME = 16384  # HTTP/2's default frame size limit


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    """An HPACK integer with a `prefix_bits` prefix (RFC 7541 5.1); flag bits zero."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = bytearray([limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as an HPACK literal without indexing, new name, no Huffman (6.2.2)."""
    return b"\x00" + _hpack_int(len(name)) + name + _hpack_int(len(value)) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
    return head + payload


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            raise EOFError("the server closed the connection")
        data += piece
    return bytes(data)


def _read_hpack_int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_hpack_string(block: bytes, pos: int) -> tuple[str, int]:
    if block[pos] & 0x80:
        raise AssertionError("a Huffman-coded header: this decoder reads literals only")
    size, pos = _read_hpack_int(block, pos, 7)
    return block[pos : pos + size].decode("latin-1"), pos + size


def decode_headers(block: bytes) -> list[tuple[str, str]]:
    """The literal headers of a header block, in order.

    gRPC's server writes each header of a new connection's first call as a literal
    with a new name and no Huffman code; an indexed field (`:status 200`) is skipped.
    Anything else fails the test rather than being misread.
    """
    headers: list[tuple[str, str]] = []
    pos = 0
    while pos < len(block):
        first = block[pos]
        if first & 0x80:  # indexed field: from the static table only, here
            _, pos = _read_hpack_int(block, pos, 7)
            continue
        if first in (0x40, 0x00, 0x10):  # literal, new name (incremental, without, never)
            name, pos = _read_hpack_string(block, pos + 1)
            value, pos = _read_hpack_string(block, pos)
            headers.append((name, value))
            continue
        raise AssertionError(f"an HPACK representation this decoder does not read: {first:#x}")
    return headers


@dataclass(frozen=True)
class RawReply:
    """The frames the server sent on the call's stream: (type, flags, payload)."""

    frames: list[tuple[int, int, bytes]]

    @property
    def headers(self) -> dict[str, str]:
        """Initial metadata and trailers together (a header sent in both: the last)."""
        blocks = [payload for kind, _, payload in self.frames if kind in (_HEADERS, _CONTINUATION)]
        return dict(decode_headers(b"".join(blocks)))

    @property
    def code(self) -> grpc.StatusCode:
        """The call's status code (its trailers' grpc-status)."""
        number = int(self.headers["grpc-status"])
        return next(code for code in grpc.StatusCode if code.value[0] == number)

    @property
    def answered(self) -> bool:
        """Whether a response message came back (a DATA frame)."""
        return any(kind == _DATA and payload for kind, _, payload in self.frames)

    @property
    def ended(self) -> bool:
        """Whether the server ended the stream (trailers, or a reset)."""
        return any(kind == _RST_STREAM or flags & _END_STREAM for kind, flags, _ in self.frames)


def raw_call(
    port: int, metadata: list[tuple[bytes, bytes]], path: str = GET_SERVER_INFO
) -> RawReply:
    """One unary call with an empty request message and exactly these extra headers,
    sent before the server's settings are read (so before they are acknowledged).
    Returns once the server has ended the stream: by then it has logged the call."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", f"127.0.0.1:{port}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *metadata,
    ]
    block = b"".join(_literal(name, value) for name, value in headers)
    pieces = [block[i : i + _MAX_FRAME] for i in range(0, len(block), _MAX_FRAME)]
    out = bytearray(_PREFACE + _frame(_SETTINGS, 0, 0, b""))
    for index, piece in enumerate(pieces):
        kind = _HEADERS if index == 0 else _CONTINUATION
        out += _frame(kind, _END_HEADERS if index == len(pieces) - 1 else 0, 1, piece)
    out += _frame(_DATA, _END_STREAM, 1, b"\x00" + struct.pack(">I", 0))
    frames: list[tuple[int, int, bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(out)
        while True:
            head = _read_exact(sock, 9)
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = _read_exact(sock, int.from_bytes(head[:3], "big"))
            if kind == _SETTINGS and not flags & _ACK:
                sock.sendall(_frame(_SETTINGS, _ACK, 0, b""))
            elif kind == _PING and not flags & _ACK:
                sock.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind == _GOAWAY:
                raise AssertionError("the server closed the connection (GOAWAY)")
            if stream == 1:
                frames.append((kind, flags, payload))
                reply = RawReply(frames)
                if reply.ended:
                    return reply


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    catalog = Catalog("shop", unit_rows(20, 4, seed=3), tuple(f"sku-{i}" for i in range(20)))
    return Scorer(DEFAULT_PARAMETERS, [catalog])


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def server(scorer: Scorer, token: str) -> Iterator[RunningServer]:
    with serving(scorer, authenticator=Authenticator([("alice", token)])) as running:
        yield running


@pytest.fixture
def server_log() -> Iterator[io.StringIO]:
    """Every log record, from every logger (grpcio's included), as heserve writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _codes(log: str) -> list[str]:
    """The codes of the access log's end-of-call lines, in order."""
    return re.findall(r"logger=heserve\.access msg=\"\S+ (\w+) [\d.]+ ms\"", log)


def _request_ids(log: str) -> list[str]:
    return re.findall(r"logger=heserve\.access msg=\"\S+ \w+ [\d.]+ ms\" request_id=(\S+)", log)


# --- finding 4: tokens in grpcio's log; floods of headers ----------------------------------


def test_a_non_utf8_byte_in_metadata_does_not_put_the_token_in_the_log(
    server: RunningServer, token: str, server_log: io.StringIO, capfd: pytest.CaptureFixture[str]
) -> None:
    bearer = b"Bearer " + token.encode()
    attacks = [
        [(b"authorization", bearer + b"\xff")],  # the token's own header
        [(b"authorization", bearer), (b"x-note", b"\xfe" + bearer)],  # any other header
    ]
    replies = [raw_call(server.port, metadata) for metadata in attacks]

    assert [reply.code for reply in replies] == [
        grpc.StatusCode.UNAUTHENTICATED,  # not the token, with a byte more
        grpc.StatusCode.OK,
    ]
    assert replies[1].answered
    log = server_log.getvalue()
    assert _codes(log) == ["UNAUTHENTICATED", "OK"]
    # grpcio did log the bad encoding (the attack reached it), without the value
    assert log.count("logger=grpc._cython.cygrpc") == 2
    assert "[UnicodeDecodeError]" in log and "Traceback" not in log
    captured = capfd.readouterr()
    for text in (log, captured.out, captured.err):
        assert token not in text and token[:12] not in text


def test_oversized_metadata_is_refused_even_before_the_settings_are_acknowledged(
    server: RunningServer, token: str, server_log: io.StringIO
) -> None:
    bearer = (b"authorization", b"Bearer " + token.encode())
    flood = [bearer, (b"x-flood", b"f" * (1 << 20))]  # 1 MiB of one header
    many = [bearer, *((f"x-flood-{i}".encode(), b"f" * 8000) for i in range(128))]

    replies = [raw_call(server.port, flood), raw_call(server.port, many)]
    within = raw_call(server.port, [bearer, (b"x-note", b"n" * (MAX_METADATA_BYTES // 2))])

    assert [reply.code for reply in replies] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert not any(reply.answered for reply in replies)
    assert within.code == grpc.StatusCode.OK and within.answered
    log = server_log.getvalue()
    # A flood reaches heserve's interceptor (logged RESOURCE_EXHAUSTED) unless gRPC's core,
    # once the client acknowledged its settings, refused it first (then nothing reached
    # heserve to log): which one does depends on timing, so either counts.
    codes = _codes(log)
    assert codes.count("OK") == 1 and set(codes) <= {"RESOURCE_EXHAUSTED", "OK"}
    assert len(codes) <= 3
    assert len(log) < 4096  # 2 MiB of headers sent: a few lines logged, none of them
    assert "ffffffffff" not in log and token not in log


def test_grpc_clients_with_large_metadata_get_resource_exhausted(
    server: RunningServer, token: str
) -> None:
    options = [("grpc.max_metadata_size", 8 << 20), ("grpc.absolute_max_metadata_size", 8 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"), ("x-flood", "f" * (64 << 10)))
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT, metadata=metadata)
        error = caught.value
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = stub.GetServerInfo(
            pb.GetServerInfoRequest(), timeout=TIMEOUT, metadata=metadata[:1]
        )
        assert reply.ckks.slot_count


# --- finding 5: request ids and the Authorization header ------------------------------------


def test_a_request_id_with_a_trailing_newline_is_replaced_and_the_call_answered(
    server: RunningServer, token: str, server_log: io.StringIO
) -> None:
    bearer = (b"authorization", b"Bearer " + token.encode())

    replies = [
        raw_call(server.port, [bearer, (b"x-request-id", b"checkout-1\n")]),
        raw_call(server.port, [bearer, (b"x-request-id", b"checkout-2")]),
    ]

    # before: INTERNAL for the client (echoing the id failed), OK in the access log
    assert [reply.code for reply in replies] == [grpc.StatusCode.OK] * 2
    assert all(reply.answered for reply in replies)
    log = server_log.getvalue()
    assert _codes(log) == ["OK", "OK"]
    fresh, kept = _request_ids(log)
    assert re.fullmatch(r"[0-9a-f]{32}", fresh) and kept == "checkout-2"
    assert [reply.headers["x-request-id"] for reply in replies] == [fresh, kept]


@pytest.mark.parametrize("suffix", [b"\r", b"\n", b"\x0b", b"\xe2\x80\xa8", b" ", b"\t"], ids=repr)
def test_the_token_followed_by_any_blank_or_line_break_is_refused(
    server: RunningServer, token: str, server_log: io.StringIO, suffix: bytes
) -> None:
    bearer = b"Bearer " + token.encode()

    refused = raw_call(server.port, [(b"authorization", bearer + suffix)])
    accepted = raw_call(server.port, [(b"authorization", bearer)])

    assert refused.code == grpc.StatusCode.UNAUTHENTICATED and not refused.answered
    assert accepted.code == grpc.StatusCode.OK and accepted.answered
    assert _codes(server_log.getvalue()) == ["UNAUTHENTICATED", "OK"]
