"""SIGHUP reloads the catalog files of a running `heserve serve` (issue 11, reload): the
changed catalog is served under its new version without a restart, and a file that no
longer loads changes nothing, the reason logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
from conftest import TIMEOUT, cli_env, free_port

from heserve.domain.catalog import unit_rows
from heserve_client import Client


def _lines_until(stream: IO[str], needle: str) -> list[dict[str, object]]:
    """JSON log records read until one whose message holds `needle`."""
    records = []
    deadline = time.monotonic() + TIMEOUT
    for line in stream:
        record = json.loads(line)
        records.append(record)
        if needle in str(record.get("msg", "")):
            return records
        assert time.monotonic() < deadline, records
    raise AssertionError(f"the server ended before logging {needle!r}: {records}")


def _serve(
    folder: Path, port: int, *options: str, own_group: bool = False
) -> subprocess.Popen[str]:
    """`heserve serve` on `port` in `folder`, JSON logs on its stderr (a pipe), once it
    has logged that it listens. `own_group`: a process group of its own, as under a
    terminal or a service manager (signals sent to the group reach its workers too)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "heserve.ops.cli", "serve", "--port", str(port),
         "--log-format", "json", *options],
        cwd=folder, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=own_group,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        _lines_until(process.stderr, "listening")
    except BaseException:
        process.kill()
        process.wait(timeout=TIMEOUT)
        process.stderr.close()
        raise
    return process


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    np.save(tmp_path / "shop.npy", unit_rows(300, 12, seed=91))
    port = free_port()
    process = _serve(tmp_path, port, "--workers", "2", "--catalog", "shop=shop.npy")
    assert process.stderr is not None
    try:
        yield process, f"127.0.0.1:{port}", tmp_path
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)
        process.stderr.close()


def test_sighup_serves_the_changed_file_and_a_broken_one_changes_nothing(
    served: tuple[subprocess.Popen[str], str, Path],
) -> None:
    process, target, folder = served
    assert process.stderr is not None
    vector = unit_rows(1, 12, seed=92)[0]
    with Client(target) as client:
        before = client.catalog("shop").version
        np.testing.assert_allclose(
            client.score(vector, catalog="shop"),
            np.load(folder / "shop.npy") @ vector,
            rtol=0,
            atol=1e-4,
        )

        changed = unit_rows(300, 12, seed=93)
        np.save(folder / "shop.npy", changed)
        process.send_signal(signal.SIGHUP)
        _lines_until(process.stderr, "replaced")
        # the client learns of the new version from the server's refusal and retries
        np.testing.assert_allclose(
            client.score(vector, catalog="shop"), changed @ vector, rtol=0, atol=1e-4
        )
        assert client.catalog("shop").version != before

        (folder / "shop.npy").write_bytes(b"not a numpy file")
        process.send_signal(signal.SIGHUP)
        records = _lines_until(process.stderr, "reload failed")
        assert records[-1]["level"] == "ERROR" and "shop.npy" in str(records[-1]["msg"])
        np.testing.assert_allclose(
            client.score(vector, catalog="shop"), changed @ vector, rtol=0, atol=1e-4
        )

        np.save(folder / "shop.npy", unit_rows(300, 16, seed=94))  # another dimension
        process.send_signal(signal.SIGHUP)
        records = _lines_until(process.stderr, "reload failed")
        assert "dimension changed from 12 to 16" in str(records[-1]["msg"])
        np.testing.assert_allclose(
            client.score(vector, catalog="shop"), changed @ vector, rtol=0, atol=1e-4
        )
    assert process.poll() is None  # still serving


def test_sighup_to_a_server_without_catalog_files_is_logged_and_it_serves_on(
    tmp_path: Path,
) -> None:
    """The demo catalog has no file to read again: SIGHUP (a routine `systemctl reload`)
    must not end the server, as the signal's default action would."""
    port = free_port()
    process = _serve(tmp_path, port)
    assert process.stderr is not None
    try:
        process.send_signal(signal.SIGHUP)
        records = _lines_until(process.stderr, "nothing to reload")
        assert records[-1]["level"] == "WARNING"
        with Client(f"127.0.0.1:{port}") as client:
            assert len(client.recommend(unit_rows(1, 64, seed=95)[0], k=3, catalog="demo")) == 3
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)
        process.stderr.close()


def test_a_hang_up_of_the_whole_process_group_reloads_and_no_worker_dies(
    tmp_path: Path,
) -> None:
    """A terminal's hang-up reaches every process of its group, the workers included: the
    front reloads, and the workers, which leave SIGHUP to it, serve on (none replaced)."""
    np.save(tmp_path / "shop.npy", unit_rows(300, 12, seed=91))
    port = free_port()
    process = _serve(tmp_path, port, "--workers", "2", "--catalog", "shop=shop.npy", own_group=True)
    assert process.stderr is not None
    try:
        changed = unit_rows(300, 12, seed=97)
        np.save(tmp_path / "shop.npy", changed)
        os.killpg(process.pid, signal.SIGHUP)
        _lines_until(process.stderr, "replaced")
        vector = unit_rows(1, 12, seed=98)[0]
        with Client(f"127.0.0.1:{port}") as client:
            scores = client.score(vector, catalog="shop")
        np.testing.assert_allclose(scores, changed @ vector, rtol=0, atol=1e-4)
        process.terminate()
        rest = process.stderr.read().splitlines()  # to the end: the server has stopped
        # every line a JSON record (no multiprocessing warning of a helper that died),
        # and no worker died or was replaced
        events = [json.loads(line).get("event") for line in rest]
        assert "shard_died" not in events and "shard_restarted" not in events, rest
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT)
        process.stderr.close()


def test_a_stop_of_the_whole_process_group_stops_gracefully_and_replaces_no_worker(
    tmp_path: Path,
) -> None:
    """`docker stop` and some service managers send SIGTERM to every process of the
    group: the front stops gracefully, and the workers, which leave it to the front, are
    stopped by it rather than dying first and being replaced."""
    np.save(tmp_path / "shop.npy", unit_rows(300, 12, seed=91))
    port = free_port()
    process = _serve(tmp_path, port, "--workers", "2", "--catalog", "shop=shop.npy", own_group=True)
    assert process.stderr is not None
    try:
        os.killpg(process.pid, signal.SIGTERM)
        rest = process.stderr.read().splitlines()  # to the end: the server has stopped
        assert process.wait(timeout=TIMEOUT) == 0
        records = [json.loads(line) for line in rest]  # JSON only: no traceback
        events = [record.get("event") for record in records]
        assert "stopped" in events
        assert "shard_died" not in events and "shard_restarted" not in events, records
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT)
        process.stderr.close()
