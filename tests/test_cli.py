"""The `heserve` command, run as real subprocesses against a real server on loopback."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from heserve.domain.catalog import demo_catalog, unit_rows
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc

SERVICE = "heserve.v1.ScoringService"
SERVING_LINE = re.compile(r"^heserve \S+ serving (\d+) catalog\(s\) on ([\d.]+):(\d+)\b")
RANK_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s+([+-]\d+\.\d+)$")
STARTUP_SECONDS = 60.0
COMMAND_SECONDS = 180.0


def _env() -> dict[str, str]:
    """The environment without PYTHONUNBUFFERED: stdout is a pipe, as under a supervisor."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    return env


def heserve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heserve.ops.cli", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        check=False,
    )


@dataclass
class Served:
    process: subprocess.Popen[str]
    catalogs: int
    target: str
    line: str = ""


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first line the process prints, waiting at most `timeout` seconds for it."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                return process.stdout.readline()
            if process.poll() is not None:
                break
    return ""


def serve(tmp_path: Path, servers: list[Served], *args: str) -> Served:
    """Start `heserve serve --port 0 ARGS` and read the address from its first line."""
    with (tmp_path / "serve.stderr").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "heserve.ops.cli", "serve", "--port", "0", *args],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    served = Served(process, 0, "")
    servers.append(served)  # the fixture stops it, whatever happens next
    line = _first_line(process, STARTUP_SECONDS)
    if not line:
        pytest.fail(
            "heserve serve printed no line while running (block-buffered stdout?); stderr:\n"
            + (tmp_path / "serve.stderr").read_text()
        )
    match = SERVING_LINE.match(line.strip())
    assert match, f"unexpected first line {line!r}"
    served.catalogs, served.target = int(match[1]), f"{match[2]}:{match[3]}"
    served.line = line.strip()
    return served


@pytest.fixture
def servers() -> Iterator[list[Served]]:
    """Servers started by a test; any still running at the end are killed."""
    started: list[Served] = []
    yield started
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait(timeout=30)
        if served.process.stdout is not None:
            served.process.stdout.close()


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    return int(reply.status)


def _reflected_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    assert len(replies) == 1
    return [service.name for service in replies[0].list_services_response.service]


@pytest.fixture
def small_catalog(tmp_path: Path) -> tuple[np.ndarray, list[str]]:
    embeddings = unit_rows(300, 20, seed=31)
    ids = [f"sku-{i:03d}" for i in range(300)]
    np.save(tmp_path / "shop.npy", embeddings)
    (tmp_path / "shop.txt").write_text("\n".join(ids) + "\n")
    return embeddings, ids


def _children(pid: int) -> set[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.update(int(child) for child in (task / "children").read_text().split())
    return children


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited and been reaped, waiting a little for it."""
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(
    "workers", [[], ["--workers", "0"]], ids=["worker-processes", "in-process"]
)
def test_serve_health_reflection_recommend_and_graceful_sigterm(
    tmp_path: Path,
    servers: list[Served],
    small_catalog: tuple[np.ndarray, list[str]],
    workers: list[str],
) -> None:
    embeddings, ids = small_catalog
    served = serve(
        tmp_path, servers, "--catalog", "shop=shop.npy", "--ids", "shop=shop.txt", *workers
    )
    assert served.catalogs == 1
    assert served.target.startswith("127.0.0.1:")
    if workers:  # --workers 0: no "1 process shard(s)", which would be a worker process
        assert "scoring in the server process (no workers)" in served.line
        assert "shard" not in served.line
    else:
        assert re.search(r"\b\d+ worker process shard\(s\)", served.line), served.line

    with grpc.insecure_channel(served.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=STARTUP_SECONDS)
        for service in ("", SERVICE):
            assert _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
        assert SERVICE in _reflected_services(channel)

    user = unit_rows(1, 20, seed=32)[0]
    np.save(tmp_path / "u.npy", user)
    result = heserve(
        "recommend", "--server", served.target, "--catalog", "shop", "--vector", "u.npy", "-k", "5",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    rows = [RANK_LINE.match(line) for line in result.stdout.splitlines() if line.strip()]
    assert all(rows), result.stdout
    plain = embeddings @ user
    order = np.argsort(-plain, kind="stable")[:5]
    assert [int(m[1]) for m in rows if m] == [1, 2, 3, 4, 5]
    assert [m[2] for m in rows if m] == [ids[i] for i in order]
    np.testing.assert_allclose([float(m[3]) for m in rows if m], plain[order], atol=1e-4)

    children = _children(served.process.pid) if Path("/proc/self/task").is_dir() else set()
    if not workers and Path("/proc/self/task").is_dir():
        assert children, "the default serve runs worker processes"
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0
    assert "Traceback" not in (tmp_path / "serve.stderr").read_text()
    assert [pid for pid in children if not _gone(pid)] == []  # no worker left behind


def test_serve_without_catalogs_serves_the_demo_catalog(
    tmp_path: Path, servers: list[Served]
) -> None:
    served = serve(tmp_path, servers)
    assert served.catalogs == 1

    with grpc.insecure_channel(served.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=STARTUP_SECONDS)
        reply = pb_grpc.ScoringServiceStub(channel).ListCatalogs(
            pb.ListCatalogsRequest(), timeout=30
        )
    demo = demo_catalog()
    assert [c.name for c in reply.catalogs] == ["demo"]
    (info,) = reply.catalogs
    assert (info.item_count, info.dimension, info.version) == (
        demo.item_count,
        demo.dimension,
        demo.version,
    )

    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(timeout=30) == 0


def _bad_inputs(tmp_path: Path) -> dict[str, list[str]]:
    good = unit_rows(6, 4, seed=3)
    np.save(tmp_path / "good.npy", good)
    with_nan = good.copy()
    with_nan[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    np.save(tmp_path / "huge.npy", good * 1e4)
    (tmp_path / "five.txt").write_text("a\nb\nc\nd\ne\n")
    (tmp_path / "good.csv").write_text("1,2,3\n")
    np.savez(tmp_path / "noids.npz", embeddings=good)
    return {
        "missing file": ["--catalog", "c=missing.npy"],
        "NaN in embeddings": ["--catalog", "c=nan.npy"],
        "--ids for an unknown catalog": ["--catalog", "c=good.npy", "--ids", "other=five.txt"],
        "missing ids file": ["--catalog", "c=good.npy", "--ids", "c=missing.txt"],
        "ids count mismatch": ["--catalog", "c=good.npy", "--ids", "c=five.txt"],
        "row norm too large": ["--catalog", "c=huge.npy"],
        "not .npy or .npz": ["--catalog", "c=good.csv"],
        ".npz without ids": ["--catalog", "c=noids.npz"],
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "NaN in embeddings",
        "--ids for an unknown catalog",
        "missing ids file",
        "ids count mismatch",
        "row norm too large",
        "not .npy or .npz",
        ".npz without ids",
    ],
)
def test_serve_refuses_bad_catalogs_with_one_line(tmp_path: Path, case: str) -> None:
    args = _bad_inputs(tmp_path)[case]

    result = heserve("serve", "--port", "0", *args, cwd=tmp_path)

    assert result.returncode == 2  # the command cannot run as given
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("heserve: error: ")
    assert "Traceback" not in result.stderr


def test_demo_agrees_with_plaintext_and_reports_bytes_and_timings(tmp_path: Path) -> None:
    result = heserve("demo", "--items", "3000", "--dimension", "24", "-k", "5", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "encrypted ranking equals plaintext ranking: yes" in out.splitlines()
    assert "3,000 items × 24 dims, top 5" in out

    # the encrypted column, checked here against our own plaintext ranking
    catalog = demo_catalog(3000, 24)
    plain = catalog.embeddings @ unit_rows(1, 24, seed=7)[0]
    expected = [catalog.ids[i] for i in np.argsort(-plain, kind="stable")[:5]]
    ranks = re.findall(r"^\s+(\d)\s+(\S+)\s+[+-]\d\.\d+\s+(\S+)\s+[+-]\d\.\d+\s+(\S+)$", out, re.M)
    assert [(r, enc, same) for r, enc, _, same in ranks] == [
        (str(i), item, "yes") for i, item in enumerate(expected, 1)
    ]

    for direction in ("keys", "query", "scores"):
        assert re.search(rf"->\s+\w+\s+{direction}\s+[\d,]+\.\d+ (KiB|MiB)$", out, re.M), direction
    for step in ("client: encrypt query", "server: score + stream back", "recommend, end to end"):
        assert re.search(rf"^\s+{re.escape(step)}\s+\d+\.\d{{3}}$", out, re.M), step


# --- operating the CLI (issue 12, items 3 and 7) ------------------------------------------


def test_recommend_help_describes_the_command_its_options_and_exit_statuses(
    tmp_path: Path,
) -> None:
    result = heserve("recommend", "--help", cwd=tmp_path)

    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "the server never sees the vector nor the scores" in text.lower()
    for flag, words in [
        ("--server HOST:PORT", "address of the heserve server"),
        ("--catalog NAME", "catalog to rank"),
        ("-k N", "how many items to print"),
        ("--vector PATH", "text numbers separated by blanks or commas"),
        ("--item-ids PATH", "re-rank only these candidates"),
        ("--key-file PATH", "do not upload the keys again"),
    ]:
        assert f"{flag} {words}" in text or (flag in text and words in text), flag
    assert "75 the server could not be reached" in text
    assert "2 the command cannot run as given" in text


@pytest.fixture
def json_server(
    tmp_path: Path, servers: list[Served], small_catalog: tuple[np.ndarray, list[str]]
) -> Served:
    return serve(
        tmp_path, servers, "--catalog", "shop=shop.npy", "--ids", "shop=shop.txt",
        "--workers", "2", "--log-format", "json",
    )  # fmt: skip


def test_with_json_logs_every_line_on_standard_error_is_a_json_object(
    tmp_path: Path, json_server: Served, small_catalog: tuple[np.ndarray, list[str]]
) -> None:
    np.save(tmp_path / "u.npy", unit_rows(1, 20, seed=33)[0])
    result = heserve(
        "recommend", "--server", json_server.target, "--catalog", "shop", "--vector", "u.npy",
        "--log-format", "json", "--log-level", "INFO", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    json_server.process.send_signal(signal.SIGTERM)
    assert json_server.process.wait(timeout=30) == 0

    records = []
    for stream in ((tmp_path / "serve.stderr").read_text(), result.stderr):
        for number, line in enumerate(stream.splitlines(), 1):
            record = json.loads(line)  # every line, or this fails naming it
            assert isinstance(record, dict), (number, line)
            assert {"ts", "level", "logger", "msg"} <= record.keys(), (number, line)
            records.append(record)
    progress = [r for r in records if r["logger"] == "heserve.progress"]
    assert progress, "catalog encoding showed no progress records"
    assert progress[-1]["task"] == "encoding catalog 'shop'"
    assert progress[-1]["done"] == progress[-1]["total"] > 0


def test_recommend_re_ranks_candidates_and_reads_text_vectors(
    tmp_path: Path, json_server: Served, small_catalog: tuple[np.ndarray, list[str]]
) -> None:
    embeddings, ids = small_catalog
    user = unit_rows(1, 20, seed=34)[0]
    (tmp_path / "u.txt").write_text(", ".join(f"{x:.17g}" for x in user) + "\n")
    candidates = [ids[i] for i in (7, 70, 140, 210, 280)]
    (tmp_path / "candidates.txt").write_text("\n".join(candidates) + "\n")

    result = heserve(
        "recommend", "--server", json_server.target, "--catalog", "shop",
        "--vector", "u.txt", "--item-ids", "candidates.txt", "-k", "3", cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    rows = [RANK_LINE.match(line) for line in result.stdout.splitlines()]
    assert all(rows), result.stdout
    plain = {item: float(embeddings[ids.index(item)] @ user) for item in candidates}
    expected = sorted(candidates, key=lambda item: -plain[item])[:3]
    assert [m[2] for m in rows if m] == expected
    np.testing.assert_allclose(
        [float(m[3]) for m in rows if m], [plain[i] for i in expected], atol=1e-4
    )


def test_recommend_scores_several_vectors_in_one_call(
    tmp_path: Path, json_server: Served, small_catalog: tuple[np.ndarray, list[str]]
) -> None:
    """A (k, d) .npy or one vector a line: each ranked, under a header, in file order."""
    embeddings, ids = small_catalog
    users = unit_rows(3, 20, seed=35)
    np.save(tmp_path / "users.npy", users)
    (tmp_path / "users.txt").write_text(
        "\n".join(" ".join(f"{x:.17g}" for x in user) for user in users) + "\n"
    )
    for name in ("users.npy", "users.txt"):
        result = heserve(
            "recommend", "--server", json_server.target, "--catalog", "shop",
            "--vector", name, "-k", "2", cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert [line for line in lines if line.startswith("vector")] == [
            "vector 1",
            "vector 2",
            "vector 3",
        ]
        ranked = [m[2] for m in map(RANK_LINE.match, lines) if m]
        expected = [
            ids[i] for user in users for i in np.argsort(-(embeddings @ user), kind="stable")[:2]
        ]
        assert ranked == expected


def test_recommend_exit_statuses_and_one_line_errors(tmp_path: Path, json_server: Served) -> None:
    np.save(tmp_path / "u.npy", unit_rows(1, 20, seed=35)[0])
    (tmp_path / "garbage.bin").write_bytes(b"\x00\x01not numbers\xff")
    np.save(tmp_path / "objects.npy", np.array(["a", 1], dtype=object), allow_pickle=True)
    base = ["recommend", "--server", json_server.target, "--vector", "u.npy"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = heserve(*args, cwd=tmp_path)
        assert result.stdout == ""
        assert result.stderr.startswith("heserve: error: "), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        return result

    unknown = run(*base, "--catalog", "films")
    assert unknown.returncode == 1  # the server was asked, and has no such catalog
    assert "no catalog named 'films' (it serves: 'shop')" in unknown.stderr

    garbage = run(*base[:-1], "garbage.bin", "--catalog", "shop")
    assert garbage.returncode == 2
    assert "neither a .npy file nor numbers" in garbage.stderr

    objects = run(*base[:-1], "objects.npy", "--catalog", "shop")
    assert objects.returncode == 2
    assert "a .npy of numbers is needed" in objects.stderr

    # --log-level after the command's name is the command's own option
    level = heserve(*base, "--catalog", "shop", "--log-level", "ERROR", "-k", "1", cwd=tmp_path)
    assert level.returncode == 0, level.stderr

    json_server.process.send_signal(signal.SIGTERM)
    assert json_server.process.wait(timeout=30) == 0
    gone = run(*base, "--catalog", "shop")
    assert gone.returncode == 75  # nobody there: try again later
    assert "UNAVAILABLE" in gone.stderr


def test_a_failed_command_reports_in_json_when_the_logs_are_json(tmp_path: Path) -> None:
    """One format per stream: the error line is a JSON record too."""
    result = heserve(
        "--log-format", "json", "serve", "--port", "0", "--catalog", "a=missing.npy",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1]["level"] == "ERROR" and "missing.npy" in lines[-1]["msg"]
