"""docs/integrating.md, followed literally: its shell block generates the stubs, its
Python blocks, joined in order, are the client, run in a process of its own against a
real server on loopback (with a token). The client imports neither heserve nor
heserve_client, builds its keys and query with TenSEAL's SEAL (which writes SEAL 4.3
headers) and loads the responses as they come: no byte is re-tagged."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from heserve.domain.catalog import Catalog, unit_rows
from heserve.domain.scorer import Scorer
from heserve.protocol.params import DEFAULT_PARAMETERS
from heserve.transport.auth import Authenticator
from heserve.transport.server import RunningServer, start_server

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "integrating.md"
TOKEN = "integrator-" + "i" * 24
# Ids as a catalog loaded without them has: row numbers.
CATALOG = Catalog("shop", unit_rows(3000, 24, seed=95), tuple(str(i) for i in range(3000)))


def blocks(language: str) -> list[str]:
    """The fenced code blocks of the doc in `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(), re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def guarded() -> Iterator[RunningServer]:
    running = start_server(
        Scorer(DEFAULT_PARAMETERS, [CATALOG]),
        "127.0.0.1",
        0,
        authenticator=Authenticator([("integrator", TOKEN)]),
    )
    yield running
    running.stop(grace=None)


def test_the_doc_is_a_client_of_its_own() -> None:
    client = "\n".join(blocks("python"))
    assert len(blocks("sh")) == 1 and len(blocks("python")) >= 5
    assert not re.search(r"^\s*(from|import) heserve(_client)?[ .]", client, re.MULTILINE)
    assert "heserve_stubs" in client


def test_a_client_written_from_the_doc_gets_the_plaintext_top_10(
    guarded: RunningServer, tmp_path: Path
) -> None:
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HESERVE_PROTO": str(ROOT / "proto" / "heserve" / "v1" / "scoring.proto"),
    }
    (shell,) = blocks("sh")
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", shell],
        cwd=tmp_path,
        env=environment,
        check=True,
        timeout=120,
        capture_output=True,
    )
    script = tmp_path / "client.py"
    script.write_text("\n".join(blocks("python")))
    vector = unit_rows(1, CATALOG.dimension, seed=96)[0]
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={
            **environment,
            # the generated stubs only: not the repository, where heserve lives
            "PYTHONPATH": str(tmp_path / "gen"),
            "HESERVE_TARGET": f"127.0.0.1:{guarded.port}",
            "HESERVE_TOKEN": TOKEN,
            "HESERVE_CATALOG": CATALOG.name,
            "HESERVE_VECTOR": json.dumps(vector.tolist()),
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    top = json.loads(result.stdout.strip().splitlines()[-1])
    expected_scores = CATALOG.embeddings @ vector
    expected = np.argsort(-expected_scores, kind="stable")[:10]
    assert [item for item, _ in top] == [CATALOG.ids[i] for i in expected]
    assert np.abs([score for _, score in top] - expected_scores[expected]).max() < 1e-4
