"""A JavaScript client with no Python in it, against a real server on loopback.

clients/js speaks the proto through @grpc/grpc-js and does CKKS in node-seal
(Microsoft SEAL 4.1 in WebAssembly): it proves the proto and SEAL's own
serialization are all an integrator needs. Its npm dependencies are installed
here (`npm ci`) when missing, as on a fresh clone.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from cryptography.hazmat.primitives import serialization
from test_security import _ca, _issue

from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.protocol.slots import query_slots
from heserve.transport.auth import Authenticator
from heserve.transport.server import TlsConfig, start_server
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client._secret import SecretContext

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "clients" / "js"
NPM_TIMEOUT = 300
NODE_TIMEOUT = 180
SEAL_HEADER = struct.Struct("<HBBBBHQ")
JS_TOKEN = "js-client-" + "j" * 24


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable, with clients/js's npm dependencies installed from the lockfile."""
    node_path, npm_path = shutil.which("node"), shutil.which("npm")
    if node_path is None or npm_path is None:
        missing = "node and npm are needed on PATH to run the JavaScript client"
        if os.environ.get("CI") == "true":  # CI must run these, not go green without them
            pytest.fail(missing)
        pytest.skip(missing)
    installed = JS_DIR / "node_modules" / ".package-lock.json"
    lockfile = JS_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lockfile.stat().st_mtime:
        subprocess.run(
            [
                npm_path,
                "ci",
                "--prefix",
                str(JS_DIR),
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
            ],
            check=True,
            timeout=NPM_TIMEOUT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    return node_path


def run_recommend_js(
    node: str,
    target: str,
    catalog: str,
    vector_file: Path,
    k: int,
    *flags: str,
    token: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run clients/js/recommend.mjs (with HESERVE_TOKEN set to `token`, if given)."""
    environment = {key: value for key, value in os.environ.items() if key != "HESERVE_TOKEN"}
    if token is not None:
        environment["HESERVE_TOKEN"] = token
    return subprocess.run(
        [node, str(JS_DIR / "recommend.mjs"), target, catalog, str(vector_file), str(k), *flags],
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
        env=environment,
    )


def recommend_js(
    node: str,
    target: str,
    catalog: str,
    vector_file: Path,
    k: int,
    *flags: str,
    token: str | None = None,
) -> tuple[list[tuple[str, float]], dict[str, object]]:
    """Run clients/js/recommend.mjs; return its top-k and the timings it reports."""
    result = run_recommend_js(node, target, catalog, vector_file, k, *flags, token=token)
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stderr.strip().splitlines()[-1])
    top = [(str(item), float(score)) for item, score in json.loads(result.stdout)]
    return top, report


@pytest.mark.parametrize(
    ("compression", "encryption"),
    [("none", "symmetric"), ("zstd", "symmetric"), ("none", "public"), ("zlib", "public")],
)
def test_js_client_top_10_equals_plaintext(
    node: str,
    target: str,
    books: Catalog,
    user: npt.NDArray[np.float64],
    tmp_path: Path,
    compression: str,
    encryption: str,
) -> None:
    u = user / np.linalg.norm(user)
    vector_file = tmp_path / "user.json"
    vector_file.write_text(json.dumps(u.tolist()))
    expected_scores = books.embeddings @ u
    expected = np.argsort(-expected_scores, kind="stable")[:10]

    top, report = recommend_js(
        node,
        target,
        "books",
        vector_file,
        10,
        "--compression",
        compression,
        "--encryption",
        encryption,
        "--timings",
    )

    print(json.dumps(report))  # timings and bytes, shown with pytest -s
    assert [item for item, _ in top] == [books.ids[i] for i in expected]
    assert np.allclose([score for _, score in top], expected_scores[expected], atol=1e-3)


@pytest.fixture(scope="module")
def pool_target(books: Catalog) -> Iterator[str]:
    """A server scoring on a pool of worker processes, which reload the uploads."""
    backend = PoolBackend(DEFAULT_PARAMETERS, workers=2)
    running = start_server(Scorer(DEFAULT_PARAMETERS, [books], backend=backend), "127.0.0.1", 0)
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=None)
    backend.close()


def test_js_client_zstd_uploads_through_a_process_pool(
    node: str, pool_target: str, books: Catalog, user: npt.NDArray[np.float64], tmp_path: Path
) -> None:
    vector_file = tmp_path / "user.json"
    vector_file.write_text(json.dumps(user.tolist()))
    expected_scores = books.embeddings @ user
    expected = np.argsort(-expected_scores, kind="stable")[:10]

    top, _ = recommend_js(
        node, pool_target, "books", vector_file, 10, "--compression", "zstd", "--timings"
    )

    assert [item for item, _ in top] == [books.ids[i] for i in expected]
    assert np.allclose([score for _, score in top], expected_scores[expected], atol=1e-3)


@pytest.fixture(scope="module")
def mutual_tls_target(
    books: Catalog, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A server with mutual TLS and a token; the folder holding the CA and the client's
    certificate and key."""
    ca = _ca("heserve js test CA")
    server_cert, server_key = _issue(ca, "heserve js test server", server=True)
    client_cert, client_key = _issue(ca, "heserve js test client", server=False)
    folder = tmp_path_factory.mktemp("js-pki")
    (folder / "ca.pem").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    (folder / "client.pem").write_bytes(client_cert)
    (folder / "client-key.pem").write_bytes(client_key)
    running = start_server(
        Scorer(DEFAULT_PARAMETERS, [books]),
        "127.0.0.1",
        0,
        tls=TlsConfig(server_cert, server_key, client_ca=(folder / "ca.pem").read_bytes()),
        authenticator=Authenticator([("js", JS_TOKEN)]),
    )
    yield f"127.0.0.1:{running.port}", folder
    running.stop(grace=None)


def test_js_client_speaks_mutual_tls_and_sends_its_token(
    node: str,
    mutual_tls_target: tuple[str, Path],
    books: Catalog,
    user: npt.NDArray[np.float64],
    tmp_path: Path,
) -> None:
    target, pki = mutual_tls_target
    vector_file = tmp_path / "user.json"
    vector_file.write_text(json.dumps(user.tolist()))
    tls = [
        "--tls-ca",
        str(pki / "ca.pem"),
        "--tls-cert",
        str(pki / "client.pem"),
        "--tls-key",
        str(pki / "client-key.pem"),
    ]
    expected_scores = books.embeddings @ user
    expected = np.argsort(-expected_scores, kind="stable")[:10]

    top, _ = recommend_js(node, target, "books", vector_file, 10, *tls, "--timings", token=JS_TOKEN)
    without_token = run_recommend_js(node, target, "books", vector_file, 10, *tls)
    plaintext = run_recommend_js(node, target, "books", vector_file, 10, token=JS_TOKEN)

    assert [item for item, _ in top] == [books.ids[i] for i in expected]
    assert np.allclose([score for _, score in top], expected_scores[expected], atol=1e-3)
    assert without_token.returncode == 1
    assert "UNAUTHENTICATED" in without_token.stderr
    assert JS_TOKEN not in without_token.stderr + plaintext.stderr
    assert plaintext.returncode == 1  # plaintext gRPC to a TLS port: no answer


def test_score_responses_are_seal_4_1_uncompressed(target: str, books: Catalog) -> None:
    """The wire contract node-seal relies on: SEAL 4.1 serialization; responses uncompressed."""
    secret = SecretContext(DEFAULT_PARAMETERS)
    with grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 16 << 20)]
    ) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        steps = list(stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60).ckks.galois_steps)
        keys = secret.galois_keys(steps)
        chunks = [keys[i : i + (1 << 20)] for i in range(0, len(keys), 1 << 20)]
        key_id = stub.RegisterKeys(
            (pb.RegisterKeysRequest(galois_keys_chunk=chunk) for chunk in chunks), timeout=60
        ).key_id
        query = secret.encrypt(
            query_slots(
                np.ones(books.dimension) / 10, books.dimension, DEFAULT_PARAMETERS.slot_count
            )
        )
        replies = [
            reply
            for complex_scores in (False, True)  # real slots (split by the server) and complex
            for reply in stub.Score(
                pb.ScoreRequest(
                    key_id=key_id, catalog="books", query=query, complex_scores=complex_scores
                ),
                timeout=60,
            )
        ]
        assert len(replies) == 2 + 1  # books: two real-slot responses, one complex
        stub.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), timeout=60)

    # Uploads may be zstd-compressed (the Python client compresses them); responses
    # are always uncompressed.
    uploads = [(blob, {0, 2}) for blob in (keys, query)]
    for blob, modes in [*uploads, *((reply.scores, {0}) for reply in replies)]:
        magic, header_size, major, minor, mode, _, size = SEAL_HEADER.unpack_from(blob)
        assert (magic, header_size, major, minor, size) == (0xA15E, 16, 4, 1, len(blob))
        assert mode in modes


_SCORE_ACROSS_A_CHANGE = """
import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { HeserveClient } from %(client)s

const [target, vectorFile] = process.argv.slice(2)
const vector = JSON.parse(readFileSync(vectorFile, 'utf8'))
const client = await HeserveClient.connect(target)
const before = await client.score(vector, 'shop')
console.log(JSON.stringify({ scores: Array.from(before), ids: await client.itemIds('shop') }))
const lines = createInterface({ input: process.stdin })
for await (const line of lines) break  // the test changed the catalog
const after = await client.score(vector, 'shop')
console.log(JSON.stringify({ scores: Array.from(after), ids: await client.itemIds('shop') }))
lines.close()
await client.close()
"""


def test_js_client_reads_a_changed_catalog_again_and_scores_the_new_version(
    node: str, tmp_path: Path
) -> None:
    """The JavaScript client pins the version it read; after an update the server refuses
    that version (CATALOG_VERSION_CHANGED), and the client reads the catalog again and
    scores the new one, ids and scores from the same version."""
    items, dimension = 500, 16
    rows = np.random.default_rng(61).standard_normal((items, dimension))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    shop = Catalog("shop", rows, tuple(f"p{i}" for i in range(items)))
    scorer = Scorer(DEFAULT_PARAMETERS, [shop])
    running = start_server(scorer, "127.0.0.1", 0)
    vector = rows[3] * 0.5
    (tmp_path / "user.json").write_text(json.dumps(vector.tolist()))
    script = tmp_path / "across.mjs"
    client_url = json.dumps((JS_DIR / "heserve-client.mjs").as_uri())
    script.write_text(_SCORE_ACROSS_A_CHANGE % {"client": client_url})
    command = [node, str(script), f"127.0.0.1:{running.port}", str(tmp_path / "user.json")]
    try:
        with subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            assert process.stdout is not None and process.stdin is not None
            assert process.stderr is not None
            line = process.stdout.readline()
            assert line, process.stderr.read()
            first = json.loads(line)
            np.testing.assert_allclose(first["scores"], shop.embeddings @ vector, atol=1e-4)

            fresh = np.random.default_rng(62).standard_normal((2, dimension))
            fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
            scorer.update_items("shop", ["p3", "new"], fresh, ["p7"])
            process.stdin.write("changed\n")
            process.stdin.flush()
            line = process.stdout.readline()
            assert line, process.stderr.read()
            second = json.loads(line)
            assert process.wait(timeout=NODE_TIMEOUT) == 0, process.stderr.read()
    finally:
        running.stop(grace=None)
    changed = scorer.catalog("shop").catalog
    assert second["ids"] == list(changed.ids)
    np.testing.assert_allclose(second["scores"], changed.embeddings @ vector, atol=1e-4)
