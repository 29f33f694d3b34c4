"""`heserve admin reload` and `heserve admin update` against a real `heserve serve`
subprocess with admin tokens (issue 11): each prints one line per change and exits as
the other commands do (0 done, 1 refused or a catalog failed, 2 cannot run as given);
the changes show in what a client decrypts."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TIMEOUT, cli_env, free_port, run_cli

from heserve.domain.catalog import unit_rows
from heserve_client import Client

ADMIN_TOKEN = "ops-admin-" + "a" * 24
API_TOKEN = "shop-api-" + "b" * 24
ITEMS, DIMENSION = 120, 12


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A `heserve serve` of shop.npz (two worker processes) with an API token and an admin
    token; yields its address and folder."""
    rows = unit_rows(ITEMS, DIMENSION, seed=81)
    ids = np.asarray([f"sku-{i}" for i in range(ITEMS)])
    np.savez(tmp_path / "shop.npz", embeddings=rows, ids=ids)
    (tmp_path / "admin-tokens.txt").write_text(f"ops:{ADMIN_TOKEN}\n")
    (tmp_path / "tokens.txt").write_text(f"shop:{API_TOKEN}\n")
    port = free_port()
    with (tmp_path / "serve.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "heserve.ops.cli", "serve", "--port", str(port),
             "--workers", "2", "--catalog", "shop=shop.npz", "--tokens-file", "tokens.txt",
             "--admin-tokens-file", "admin-tokens.txt"],
            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    assert process.stdout is not None
    try:
        started = process.stdout.readline()  # the start-up line, once it serves
        assert "admin service: 1 admin token(s)" in started, started
        yield f"127.0.0.1:{port}", tmp_path
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)
        process.stdout.close()


def _admin(folder: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return run_cli(folder, "admin", *argv, "--admin-token-file", "admin-tokens.txt")


def _scores(target: str, vector: np.ndarray) -> tuple[list[str], np.ndarray]:
    with Client(target, token=API_TOKEN) as client:
        return client.item_ids("shop"), client.score(vector, catalog="shop")


def test_admin_update_upserts_and_deletes_and_the_client_sees_it(
    served: tuple[str, Path],
) -> None:
    target, folder = served
    vector = unit_rows(1, DIMENSION, seed=82)[0]
    fresh = unit_rows(2, DIMENSION, seed=83)
    np.savez(folder / "new.npz", embeddings=fresh, ids=np.asarray(["sku-3", "sku-new"]))

    result = _admin(
        folder, "update", "--server", target, "--catalog", "shop",
        "--upsert", "new.npz", "--delete", "sku-10",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("shop: updated, version ") and "2 upserted, 1 deleted" in line
    assert f"{ITEMS + 1 - 1:,} items" in line
    ids, scores = _scores(target, vector)
    with np.load(folder / "shop.npz") as archive:
        rows = dict(zip(archive["ids"].tolist(), archive["embeddings"], strict=True))
    rows |= {"sku-3": fresh[0], "sku-new": fresh[1]}
    del rows["sku-10"]
    assert sorted(ids) == sorted(rows)
    expected = np.array([rows[item_id] for item_id in ids], dtype=np.float64) @ vector
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)

    listed = _admin(folder, "catalogs", "--server", target)
    assert listed.returncode == 0, listed.stderr
    version = line.split(" -> ")[1].split(" ")[0]  # "old -> new (...)": the new one
    assert listed.stdout.splitlines() == [
        f"shop: version {version}, {ITEMS:,} items × {DIMENSION}, 1 chunks, "
        "1 update(s) not in its file"
    ]


def test_admin_update_splits_a_change_larger_than_a_message_into_calls(
    served: tuple[str, Path],
) -> None:
    target, folder = served
    count = 60
    np.save(folder / "many.npy", unit_rows(count, DIMENSION, seed=84))
    (folder / "many-ids.txt").write_text("".join(f"bulk-{i}\n" for i in range(count)))

    result = _admin(
        folder, "update", "--server", target, "--catalog", "shop", "--upsert", "many.npy",
        "--ids", "many-ids.txt", "--max-message-bytes", str((64 << 10) + 2000),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) > 1 and lines[0].startswith(f"[1/{len(lines)}] shop: updated")
    counts = [re.search(r"\((\d+) upserted", line) for line in lines]
    assert sum(int(found[1]) for found in counts if found is not None) == count
    ids, _ = _scores(target, unit_rows(1, DIMENSION, seed=85)[0])
    assert len(ids) == ITEMS + count


def test_admin_reload_reports_each_catalog_and_a_broken_file_exits_1(
    served: tuple[str, Path],
) -> None:
    target, folder = served
    vector = unit_rows(1, DIMENSION, seed=86)[0]
    changed = unit_rows(ITEMS, DIMENSION, seed=87)
    ids = np.asarray([f"sku-{i}" for i in range(ITEMS)])

    unchanged = _admin(folder, "reload", "--server", target)
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout.startswith("shop: unchanged, version ")

    np.savez(folder / "shop.npz", embeddings=changed, ids=ids)
    replaced = _admin(folder, "reload", "--server", target)
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stdout.startswith("shop: replaced, version ")
    np.testing.assert_allclose(_scores(target, vector)[1], changed @ vector, rtol=0, atol=1e-4)

    (folder / "shop.npz").write_bytes(b"corrupt")
    failed = _admin(folder, "reload", "--server", target)
    assert failed.returncode == 1
    assert failed.stdout.startswith("shop: failed, version ") and "shop.npz" in failed.stdout
    np.testing.assert_allclose(_scores(target, vector)[1], changed @ vector, rtol=0, atol=1e-4)


def test_admin_commands_without_the_admin_token_fail_and_change_nothing(
    served: tuple[str, Path],
) -> None:
    target, folder = served
    (folder / "api-token.txt").write_text(API_TOKEN + "\n")
    with Client(target, token=API_TOKEN) as client:
        version = client.catalog("shop").version

    with_api_token = run_cli(
        folder, "admin", "update", "--server", target, "--catalog", "shop",
        "--delete", "sku-1", "--admin-token-file", "api-token.txt",
    )  # fmt: skip
    assert with_api_token.returncode == 1
    assert "UNAUTHENTICATED" in with_api_token.stderr and API_TOKEN not in with_api_token.stderr

    no_token = run_cli(folder, "admin", "reload", "--server", target)  # nor HESERVE_ADMIN_TOKEN
    assert no_token.returncode == 2 and "--admin-token-file" in no_token.stderr

    from_variable = subprocess.run(
        [sys.executable, "-m", "heserve.ops.cli", "admin", "reload", "--target", target],
        cwd=folder, env=cli_env() | {"HESERVE_ADMIN_TOKEN": ADMIN_TOKEN},
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert from_variable.returncode == 0, from_variable.stderr
    assert from_variable.stdout.startswith(f"shop: unchanged, version {version}")
    with Client(target, token=API_TOKEN) as client:
        assert client.catalog("shop").version == version


def test_admin_update_needs_something_to_change(served: tuple[str, Path]) -> None:
    target, folder = served
    result = _admin(folder, "update", "--server", target, "--catalog", "shop")
    assert result.returncode == 2 and "nothing to change" in result.stderr


def test_admin_update_refuses_what_would_change_the_wrong_items(
    served: tuple[str, Path],
) -> None:
    """Refused before any call (exit 2), the catalog unchanged: an .npy without --ids
    (its row numbers would overwrite items '0', '1', ...), an empty id to delete, a token
    file that is not there."""
    target, folder = served
    with Client(target, token=API_TOKEN) as client:
        version = client.catalog("shop").version
    np.save(folder / "rows.npy", unit_rows(2, DIMENSION, seed=40))
    no_ids = _admin(
        folder, "update", "--server", target, "--catalog", "shop", "--upsert", "rows.npy"
    )
    assert no_ids.returncode == 2 and "--ids" in no_ids.stderr
    empty = _admin(folder, "update", "--server", target, "--catalog", "shop", "--delete", "")
    assert empty.returncode == 2 and "empty id" in empty.stderr
    for timeout in ("0", "-1", "nan"):
        refused = _admin(folder, "reload", "--server", target, "--timeout", timeout)
        assert refused.returncode == 2 and "--timeout" in refused.stderr
    missing = run_cli(
        folder, "admin", "reload", "--server", target, "--admin-token-file", "nowhere.txt"
    )
    assert missing.returncode == 2 and "--admin-token-file nowhere.txt" in missing.stderr
    with Client(target, token=API_TOKEN) as client:
        assert client.catalog("shop").version == version


def test_admin_against_a_server_without_admin_tokens_says_how_to_turn_it_on(
    tmp_path: Path,
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "heserve.ops.cli", "serve", "--port", str(port),
         "--workers", "0", "--log-level", "WARNING"],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        assert "serving" in process.stdout.readline()
        (tmp_path / "admin-tokens.txt").write_text(ADMIN_TOKEN + "\n")
        result = _admin(tmp_path, "reload", "--server", f"127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)
        process.stdout.close()
    assert result.returncode == 1
    assert "UNIMPLEMENTED" in result.stderr and "--admin-tokens-file" in result.stderr
