"""Catalog changes while serving, at scale: incremental updates against full reloads.

    python -m bench.catalog_changes [--items 1000000] [--dimension 128] [--workers 2]
                                    [--upserts 1000] [--preset precise]

One process plays the server's front (a `Scorer` over a `PoolBackend` of `--workers`
worker processes) and the client (keys, queries and decryption in process, no gRPC:
what is measured is the server's work). The catalog is the harness's deterministic
unit-norm rows. After a first query, each change below is made while the catalog
serves, then a query checks that the change is visible (every item's decrypted score
equals numpy's on the new version's rows):

- `append`: `--upserts` new items (they fill the end of the catalog: one or two chunks);
- `replace-clustered`: `--upserts` existing items in consecutive rows;
- `replace-scattered`: `--upserts` existing items drawn at random over the catalog
  (each chunk holding one is encoded again: at 1,000 of 1,000,000, nearly all);
- `delete`: `--upserts` items at random (each hole is filled by the last row);
- `reload`: the whole catalog replaced by another of the same shape (`replace_catalog`).

Reported per change: the seconds until the new version serves (the call returned:
queries started after it score the new version), the chunks encoded again, and
memory. Memory is the resident set of the front and its workers: steady before,
the peak during the change (VmHWM, reset through /proc/<pid>/clear_refs just before
it, so the start-up encode's peak does not count), and steady after (the old
version's chunks dropped). Prints a table; saves JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.methods import unit_vectors
from bench.report import _table
from bench.results import save_run
from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog
from heserve.domain.scorer import CatalogChange, Scorer
from heserve.protocol.params import DEFAULT_PRESET, PRESETS
from heserve.protocol.slots import unpack_complex
from heserve_client import SecretContext

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
TOLERANCE = 1e-3


def _status_bytes(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _pids(backend: PoolBackend) -> list[int]:
    return [os.getpid(), *backend.worker_pids()]


def resident(backend: PoolBackend) -> int:
    """The resident set of the front and its workers now (VmRSS, summed)."""
    return sum(_status_bytes(pid, "VmRSS") for pid in _pids(backend))


def reset_peaks(backend: PoolBackend) -> bool:
    """Restart every process's VmHWM from its current resident set (Linux: clear_refs 5);
    False where the kernel does not let this process do it."""
    try:
        for pid in _pids(backend):
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peaks(backend: PoolBackend) -> int:
    """The sum of each process's VmHWM: an upper bound of their joint peak."""
    return sum(_status_bytes(pid, "VmHWM") for pid in _pids(backend))


@dataclass(frozen=True)
class ChangeRecord:
    name: str
    items_named: int
    visible_seconds: float
    """From the call to the new version serving (the call's return)."""
    chunks_rewritten: int
    chunk_count: int
    before_bytes: int
    peak_bytes: int
    """Sum of VmHWM over the change (reset just before it), or 0 if it could not be reset."""
    after_bytes: int
    check_max_error: float
    """|decrypted − numpy| over every item of the new version, on a query after it."""


def _score(scorer: Scorer, secret: SecretContext, key_id: str, vector: Any) -> Any:
    entry = scorer.catalog("shop")
    query = secret.encrypt(entry.plan.query_slots(vector))
    runs = scorer.score(key_id, "shop", query, [], complex_scores=True)
    return np.concatenate(
        [unpack_complex(secret.decrypt_complex(run.scores, 1 << 26), run.count) for run in runs]
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    params = PRESETS[args.preset]
    rng = np.random.default_rng(7)
    started = time.perf_counter()
    rows = unit_vectors(args.items, args.dimension, seed=11, dtype=np.float32)
    catalog = Catalog("shop", rows, tuple(f"item-{i}" for i in range(args.items)))
    del rows
    backend = PoolBackend(params, workers=args.workers)
    scorer = Scorer(params, [catalog], backend=backend)
    encode_seconds = time.perf_counter() - started
    secret = SecretContext(params)
    key_id = scorer.register_keys(secret.galois_keys(list(scorer.galois_steps)))
    vector = unit_vectors(1, args.dimension, seed=12)[0]
    started = time.perf_counter()
    first = _score(scorer, secret, key_id, vector)
    query_seconds = time.perf_counter() - started
    assert np.abs(first - catalog.embeddings @ vector).max() < TOLERANCE
    del first, catalog  # the scorer holds the served version; the base goes when replaced

    count = args.upserts
    records: list[ChangeRecord] = []

    def measure(name: str, named: int, change: Callable[[], CatalogChange | None]) -> None:
        before = resident(backend)
        reset = reset_peaks(backend)
        started = time.perf_counter()
        made = change()
        visible = time.perf_counter() - started
        peak = peaks(backend) if reset else 0
        served = scorer.catalog("shop")
        scores = _score(scorer, secret, key_id, vector)
        # block by block: the whole array would be a copy the server never makes
        expected = np.concatenate([block @ vector for block in served.catalog.rows.blocks])
        error = float(np.abs(scores - expected).max())
        total = served.plan.chunk_count(served.catalog.item_count)
        records.append(
            ChangeRecord(
                name,
                named,
                visible,
                made.chunks_rewritten if made is not None else total,
                total,
                before,
                peak,
                resident(backend),
                error,
            )
        )
        print(f"  {name}: {visible:.2f} s, max error {error:.1e}", flush=True)

    new_rows = unit_vectors(count, args.dimension, seed=13, dtype=np.float32)
    measure(
        "append",
        count,
        lambda: scorer.update_items("shop", [f"new-{i}" for i in range(count)], new_rows),
    )
    start = int(rng.integers(0, args.items - count))
    clustered = [f"item-{i}" for i in range(start, start + count)]
    measure(
        "replace-clustered",
        count,
        lambda: scorer.update_items("shop", clustered, new_rows[::-1]),
    )
    scattered = [f"item-{i}" for i in rng.choice(args.items, count, replace=False)]
    measure("replace-scattered", count, lambda: scorer.update_items("shop", scattered, new_rows))
    held = scorer.catalog("shop").catalog.ids
    doomed = [held[i] for i in rng.choice(len(held), count, replace=False)]
    measure(
        "delete",
        count,
        lambda: scorer.update_items("shop", [], np.empty((0, args.dimension)), doomed),
    )

    def load() -> Catalog:  # what a reload reads: made during the change, as from a file
        rows = unit_vectors(args.items, args.dimension, seed=14, dtype=np.float32)
        return Catalog("shop", rows, tuple(f"item-{i}" for i in range(args.items)))

    measure("reload", args.items, lambda: scorer.reload("shop", load))
    backend.close()
    return {
        "preset": args.preset,
        "items": args.items,
        "dimension": args.dimension,
        "workers": args.workers,
        "encode_seconds": encode_seconds,
        "query_seconds": query_seconds,
        "changes": [asdict(record) for record in records],
    }


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f}" if size else "—"


def render(body: dict[str, Any]) -> str:
    lines = [
        f"{body['items']:,} × {body['dimension']}, {body['workers']} workers, {body['preset']}: "
        f"start-up encode {body['encode_seconds']:.1f} s, one query {body['query_seconds']:.2f} s",
        "",
    ]
    header = [
        "change",
        "items",
        "visible s",
        "chunks encoded",
        "GB before",
        "GB peak",
        "GB after",
        "max err",
    ]
    rows = [
        [
            c["name"],
            f"{c['items_named']:,}",
            f"{c['visible_seconds']:.2f}",
            f"{c['chunks_rewritten']} of {c['chunk_count']}",
            _gb(c["before_bytes"]),
            _gb(c["peak_bytes"]),
            _gb(c["after_bytes"]),
            f"{c['check_max_error']:.1e}",
        ]
        for c in body["changes"]
    ]
    return "\n".join([*lines, _table(header, rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--upserts", type=int, default=1_000)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    args = parser.parse_args(argv)
    body = run(args)
    print(render(body))
    save_run(RESULTS_DIR, "catalog-changes", body)
    bad = [c["name"] for c in body["changes"] if c["check_max_error"] >= TOLERANCE]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
