"""Issue 10, findings 3 and 5 (tokens): a revoked token in a comment, a token holding a
comma, the name a bare token is logged under, and the exact form of the Authorization
header; on a real server on loopback where a call decides it."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import grpc
import pytest
from conftest import TIMEOUT, serving

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.auth import Authenticator, TokenError, parse_tokens
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc


def _token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    catalog = Catalog("shop", unit_rows(20, 4, seed=5), tuple(f"sku-{i}" for i in range(20)))
    return Scorer(DEFAULT_PARAMETERS, [catalog])


def _codes(scorer: Scorer, authenticator: Authenticator, headers: list[str]) -> list[str]:
    """The status of GetServerInfo with each `authorization` header, on a real server."""
    codes = []
    with (
        serving(scorer, authenticator=authenticator) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.ScoringServiceStub(channel)
        for header in headers:
            try:
                stub.GetServerInfo(
                    pb.GetServerInfoRequest(),
                    timeout=TIMEOUT,
                    metadata=(("authorization", header),),
                )
                codes.append("OK")
            except grpc.RpcError as error:
                assert isinstance(error, grpc.Call)
                codes.append(error.code().name)
    return codes


# --- finding 3: comments and commas -----------------------------------------------------


def test_a_revoked_token_in_a_comment_no_longer_authenticates(
    tmp_path: Path, scorer: Scorer
) -> None:
    alice, mallory, eve, carol = _token(), _token(), _token(), _token()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(
        f"# revoked: mallory:{mallory}, eve:{eve}\nalice:{alice}   # rotated on Monday, eve:{eve}\n"
    )
    setting = f"# revoked: eve:{eve}, mallory:{mallory}\ncarol:{carol}"

    authenticator = Authenticator.load(tokens, setting)

    assert authenticator is not None and len(authenticator) == 2
    codes = _codes(scorer, authenticator, [f"Bearer {t}" for t in (alice, carol, eve, mallory)])
    assert codes == ["OK", "OK", "UNAUTHENTICATED", "UNAUTHENTICATED"]


def test_a_token_holding_a_comma_is_refused_at_start_up_without_showing_it(
    tmp_path: Path,
) -> None:
    first, second = _token(), _token()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"alice:{first},{second}\n")  # one token, or two credentials?

    with pytest.raises(TokenError) as refused:
        Authenticator.load(tokens, None)

    message = str(refused.value)
    assert f"{tokens}, line 1" in message and "','" in message and "\n" not in message
    assert first[:8] not in message and second[:8] not in message


def test_in_the_setting_commas_separate_entries_and_errors_hold_no_secret() -> None:
    alice, bob = _token(), _token()
    entries = parse_tokens(f"alice:{alice}, bob:{bob}\n", "HESERVE_TOKENS", commas=True)
    assert entries == [("alice", alice), ("bob", bob)]

    short = "s3cr3t-but-short"[:10]
    for text in (f"alice:{short}", f"{short}:{alice}x y", f"al ice:{alice}"):
        with pytest.raises(TokenError) as refused:
            parse_tokens(text, "HESERVE_TOKENS", commas=True)
        assert short not in str(refused.value) and alice[:8] not in str(refused.value)


# --- finding 5: a bare token's name; the Authorization header -------------------------------


def test_a_bare_token_is_named_after_its_place_not_its_hash(tmp_path: Path) -> None:
    bare, other = _token(), _token()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# team\n\n{bare}\n")

    authenticator = Authenticator.load(tokens, other)

    assert authenticator is not None
    caller = authenticator.authenticate({"authorization": f"Bearer {bare}"})
    assert caller is not None and caller.name == "token-L3"
    from_setting = authenticator.authenticate({"authorization": f"Bearer {other}"})
    assert from_setting is not None and from_setting.name == "token-S1"
    # nothing of the token's digest (the old name carried 32 bits of it)
    digest = hashlib.sha256(bare.encode()).hexdigest()
    assert not any(digest[i : i + 4] in caller.name for i in range(len(digest) - 3))
    with pytest.raises(TokenError, match="kept for bare tokens"):
        parse_tokens(f"token-L3:{_token()}", "test")


def test_the_authorization_header_is_exactly_bearer_space_token(scorer: Scorer) -> None:
    alice = _token()
    headers = {
        f"Bearer {alice}": "OK",
        f"bearer {alice}": "OK",  # the scheme is case-insensitive (RFC 7235)
        f"BEARER {alice}": "OK",
        f"Bearer  {alice}": "UNAUTHENTICATED",  # two spaces
        f" Bearer {alice}": "UNAUTHENTICATED",
        f"Bearer {alice} ": "UNAUTHENTICATED",
        f"Bearer {alice},": "UNAUTHENTICATED",
        f"Bearer {alice} {alice}": "UNAUTHENTICATED",
        f"Bearer{alice}": "UNAUTHENTICATED",
        alice: "UNAUTHENTICATED",
        f"Basic {alice}": "UNAUTHENTICATED",
    }

    codes = _codes(scorer, Authenticator([("alice", alice)]), list(headers))

    assert dict(zip(headers, codes, strict=True)) == headers


@pytest.mark.parametrize("suffix", ["\r", "\n", "\v", "\u2028", "\x00", "\r\n"], ids=repr)
def test_no_line_break_or_control_character_passes_the_parser(suffix: str) -> None:
    # gRPC's client will not send these; tests/test_security_metadata.py sends them raw
    alice = _token()
    authenticator = Authenticator([("alice", alice)])
    for header in (f"Bearer {alice}{suffix}", f"{suffix}Bearer {alice}", f"Bearer{suffix}{alice}"):
        assert authenticator.authenticate({"authorization": header}) is None
    assert authenticator.authenticate({"authorization": f"Bearer {alice}"}) is not None
