"""The committed gRPC stubs are what the protos generate (heserve.v1, and the admin
service's heserve.admin.v1), and the protos are buf-lint clean."""

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
# Each package's folder under heserve/, and the stub files protoc writes there.
PACKAGES = {
    Path("v1"): ("scoring_pb2.py", "scoring_pb2.pyi", "scoring_pb2_grpc.py"),
    Path("admin", "v1"): ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py"),
}
STUBS = [folder / name for folder, names in PACKAGES.items() for name in names]


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
    return out / "heserve"


def test_generates_exactly_the_committed_stub_files(generated: Path) -> None:
    """Every proto's stubs, and nothing else (no stray package, no stub left behind)."""
    written = sorted(p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    assert written == sorted(STUBS)


def test_every_generated_package_is_importable_and_installed() -> None:
    """A package folder without __init__.py, or missing from pyproject's package list,
    would import here (the source tree) and not from an installed wheel."""
    listed = (ROOT / "pyproject.toml").read_text()
    for folder in PACKAGES:
        for depth in range(1, len(folder.parts) + 1):
            package = Path(*folder.parts[:depth])
            assert (ROOT / "heserve" / package / "__init__.py").is_file(), package
            assert f'"heserve.{".".join(package.parts)}"' in listed, package


@pytest.mark.parametrize("name", STUBS, ids=str)
def test_committed_stub_is_up_to_date(generated: Path, name: Path) -> None:
    fresh = (generated / name).read_bytes()
    committed = (ROOT / "heserve" / name).read_bytes()
    assert fresh == committed, (
        f"heserve/{name} is stale: run `make stubs` (scripts/gen_stubs.py) and commit it"
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
