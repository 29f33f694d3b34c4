"""The committed gRPC stubs are what the proto generates, and the proto is buf-lint clean."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "heserve" / "v1"
STUBS = ("scoring_pb2.py", "scoring_pb2.pyi", "scoring_pb2_grpc.py")


def _generate() -> Callable[[Path], None]:
    """scripts/gen_stubs.py's generate(), loaded from the file (scripts is no package)."""
    spec = importlib.util.spec_from_file_location("gen_stubs", ROOT / "scripts" / "gen_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cast(Callable[[Path], None], module.generate)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    _generate()(out)
    return out / "heserve" / "v1"


def test_generates_exactly_the_committed_stub_files(generated: Path) -> None:
    assert sorted(p.name for p in generated.iterdir()) == sorted(STUBS)


@pytest.mark.parametrize("name", STUBS)
def test_committed_stub_is_up_to_date(generated: Path, name: str) -> None:
    fresh = (generated / name).read_bytes()
    committed = (COMMITTED / name).read_bytes()
    assert fresh == committed, (
        f"heserve/v1/{name} is stale: run `make stubs` (scripts/gen_stubs.py) and commit it"
    )


def test_buf_lint_is_clean() -> None:
    npx = shutil.which("npx")
    if npx is None:
        if os.environ.get("CI") == "true":  # CI must run buf, not go green without it
            pytest.fail("npx is not on PATH, so buf cannot be run")
        pytest.skip("npx is not on PATH, so buf cannot be run")
    result = subprocess.run(
        [npx, "--prefer-offline", "-y", "@bufbuild/buf", "lint"],  # cached: no registry trip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # npm may warn about its own configuration on stderr; anything else is buf's.
    buf_stderr = [
        line for line in result.stderr.splitlines() if line and not line.startswith("npm warn")
    ]
    assert (result.returncode, result.stdout, buf_stderr) == (0, "", [])
