"""Generate the Python gRPC stubs of every package under proto/ into heserve/:
proto/heserve/v1 (the ScoringService) into heserve/v1, proto/heserve/admin/v1 (the
CatalogAdminService) into heserve/admin/v1.

One script, one pinned grpcio-tools (see pyproject's dev extra), so the committed
stubs are reproducible; tests/test_stubs.py regenerates them and fails on a diff.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: Path) -> None:
    """Write NAME_pb2.py, NAME_pb2.pyi and NAME_pb2_grpc.py of each proto/**/NAME.proto
    under out_dir, in its package's folder (heserve/v1, heserve/admin/v1)."""
    proto_root = ROOT / "proto"
    sources = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
