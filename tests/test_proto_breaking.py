"""The wire contract against the last release: `buf breaking` (rules WIRE_JSON, see
buf.yaml) finds no breaking change between proto/ and the release's buf image, and it
does find one when a change breaks the wire.

The image of each release is kept in proto/releases/ (see README, Develop) and the
newest is the baseline: 0.1.0, the first, until the next release adds its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from heserve.v1 import scoring_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def _newest_release() -> Path:
    """proto/releases/heserve-v1-X.Y.Z.binpb with the highest version."""
    images = {
        tuple(int(part) for part in match.groups()): path
        for path in (ROOT / "proto" / "releases").glob("heserve-v1-*.binpb")
        if (match := re.fullmatch(r"heserve-v1-(\d+)\.(\d+)\.(\d+)\.binpb", path.name))
    }
    assert images, "no release image in proto/releases"
    return images[max(images)]


RELEASE = _newest_release()


def _buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    npx = shutil.which("npx")
    if npx is None:
        if os.environ.get("CI") == "true":  # CI must run buf, not go green without it
            pytest.fail("npx is not on PATH, so buf cannot be run")
        pytest.skip("npx is not on PATH, so buf cannot be run")
    # --prefer-offline: once the package is in npm's cache, no registry round trip
    # (without it, npx asks the registry for the latest version on every run, and
    # offline it waits minutes for that to time out).
    return subprocess.run(
        [npx, "--prefer-offline", "-y", "@bufbuild/buf", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _buf_stderr(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without npm's warnings about its own configuration."""
    return [line for line in result.stderr.splitlines() if line and not line.startswith("npm ")]


def test_the_release_image_is_the_v1_service() -> None:
    """The image parses (a buf image is a FileDescriptorSet on the wire), and every
    field of the release is still in the generated stubs, under its number, name and
    type: a check of the same contract that needs no npx."""
    image = descriptor_pb2.FileDescriptorSet.FromString(RELEASE.read_bytes())
    (release,) = [f for f in image.file if f.name == "heserve/v1/scoring.proto"]
    assert release.package == "heserve.v1"
    current = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(current)
    (service,) = release.service
    (now,) = current.service
    assert [(m.name, m.input_type, m.output_type) for m in service.method] == [
        (m.name, m.input_type, m.output_type) for m in now.method
    ]
    messages = {message.name: message for message in current.message_type}
    for message in release.message_type:
        fields = {field.number: field for field in messages[message.name].field}
        for field in message.field:
            kept = fields[field.number]
            assert (kept.name, kept.type, kept.label, kept.type_name) == (
                field.name,
                field.type,
                field.label,
                field.type_name,
            ), f"{message.name}.{field.name}"


def test_buf_breaking_finds_nothing_against_the_last_release() -> None:
    result = _buf("breaking", "--against", str(RELEASE), cwd=ROOT)
    assert (result.returncode, result.stdout, _buf_stderr(result)) == (0, "", [])


@pytest.mark.parametrize(
    ("change", "old", "new", "breaks"),
    [
        ("a renumbered field", "bytes query = 3;", "bytes query = 70;", True),
        ("a renamed field", "string catalog_version = 5;", "string version = 5;", True),
        (
            "a removed method",
            "  rpc DeleteKeys(DeleteKeysRequest) returns (DeleteKeysResponse);\n",
            "",
            True,
        ),
        (
            "a new field",
            "bool complex_scores = 6;",
            "bool complex_scores = 6;\n  bool x = 99;",
            False,
        ),
    ],
)
def test_buf_breaking_catches_a_breaking_change(
    tmp_path: Path, change: str, old: str, new: str, breaks: bool
) -> None:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto" / "heserve", tmp_path / "proto" / "heserve")
    proto = tmp_path / "proto" / "heserve" / "v1" / "scoring.proto"
    text = proto.read_text()
    assert text.count(old) == 1, change
    proto.write_text(text.replace(old, new))

    result = _buf("breaking", "--against", str(RELEASE), cwd=tmp_path)

    if breaks:
        assert result.returncode != 0, change
        assert "heserve/v1/scoring.proto" in result.stdout, result.stdout
    else:
        assert (result.returncode, result.stdout) == (0, ""), change
