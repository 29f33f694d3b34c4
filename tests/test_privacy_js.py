"""The JavaScript client's side of issue 13: its policy refuses a server before any
upload (naming the requirement, as the Python client does), forgetMe erases the keys
on the server, and popular() reads the published order and sends nothing else."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import serving
from test_js_client import JS_DIR, NODE_TIMEOUT, node  # noqa: F401  (node: the fixture)

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import KeyRetentionPolicy, Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.server import RunningServer
from heserve.transport.servicer import SERVICE_NAME

ITEMS, DIMENSION = 200, 8
SCRIPT = """
import { HeserveClient } from %(module)s
const [target, policy] = [process.argv[1], JSON.parse(process.argv[2])]
const result = {}
try {
  const client = await HeserveClient.connect(target, { policy })
  try {
    result.popular = await client.popular('shelf', 4)
    result.transport = client.statement.transport
    await client.registerKeys()
    result.forgot = await client.forgetMe()
  } finally {
    await client.close()
  }
} catch (error) {
  result.error = { code: error.code, requirements: error.requirements, message: error.message }
}
process.stdout.write(JSON.stringify(result))
"""


@pytest.fixture
def scorer() -> Scorer:
    popularity = tuple(float((i * 13) % 29) for i in range(ITEMS))
    shelf = Catalog(
        "shelf", unit_rows(ITEMS, DIMENSION, 7), tuple(f"s{i}" for i in range(ITEMS)), popularity
    )
    return Scorer(DEFAULT_PARAMETERS, [shelf], retention=KeyRetentionPolicy(ttl_seconds=600))


@pytest.fixture
def server(scorer: Scorer) -> Iterator[RunningServer]:
    with serving(scorer) as running:
        yield running


def _run(node: str, server: RunningServer, policy: Any) -> dict[str, Any]:  # noqa: F811
    module = json.dumps(str(JS_DIR / "heserve-client.mjs"))
    result = subprocess.run(
        [node, "--input-type=module", "-e", SCRIPT % {"module": module},
         f"127.0.0.1:{server.port}", json.dumps(policy)],
        capture_output=True, text=True, timeout=NODE_TIMEOUT, stdin=subprocess.DEVNULL,
        check=False, cwd=JS_DIR,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _calls(server: RunningServer, method: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "heserve_requests_total", {"service": SERVICE_NAME, "method": method}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("policy", "requirements", "server_info_calls"),
    [
        ("mobile", ["require_tls"], 0),  # refused before any call: no token in clear
        ({"maxKeyTtlSeconds": 60}, ["max_key_ttl_seconds"], 1),
    ],
)
def test_js_policy_refuses_before_any_upload(
    node: str,  # noqa: F811
    server: RunningServer,
    scorer: Scorer,
    policy: Any,
    requirements: list[str],
    server_info_calls: int,
) -> None:
    report = _run(node, server, policy)

    error = report["error"]
    assert error["code"] == "POLICY"
    assert error["requirements"] == requirements
    assert error["message"].startswith("the server does not meet this client's policy: ")
    assert _calls(server, "GetServerInfo") == server_info_calls
    assert _calls(server, "RegisterKeys") == _calls(server, "Score") == 0
    assert len(scorer.keys) == 0


def test_js_forget_me_and_the_published_order(
    node: str,  # noqa: F811
    server: RunningServer,
    scorer: Scorer,
) -> None:
    report = _run(node, server, "permissive")

    shelf = scorer.catalogs["shelf"].catalog
    assert shelf.popularity is not None
    order = np.argsort(-np.asarray(shelf.popularity), kind="stable")[:4]
    assert report["popular"] == [shelf.ids[i] for i in order]
    assert report["transport"] == "TRANSPORT_SECURITY_PLAINTEXT"
    assert len(report["forgot"]["erased"]) == 1 and report["forgot"]["alreadyGone"] == []
    assert _calls(server, "RegisterKeys") == 1 and _calls(server, "Score") == 0
    assert len(scorer.keys) == 0
