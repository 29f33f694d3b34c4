"""The process pool's scaling, measured side by side: 2 workers against 1.

    python -m bench.pool_bench [--items 65536] [--dimension 128] [--rounds 15]
                               [--preset precise]

The quick tier times `engine-pool-1` and `engine-pool-2` one after the other, so
on a machine shared with other work each meets different contention and their
ratio wanders (0.75× to 1.6× over runs minutes apart on a busy 2-core box). Here
the in-process `engine`, `engine-pool-1` and `engine-pool-2` are set up at once
(the same registry runners) and called in turn, round by round, the order
rotating, so the other work weighs on all three alike; the ratio is the median
of the per-round ratios. Also printed: what the split predicts on an idle
machine. A query costs every worker the b − 1 baby rotations of the query (not
divisible) plus its share of the chunks; both parts are timed in this process
under the 1-shard and the 2-shard plans, and (baby₁ + chunks₁) / (baby₂ + chunks₂)
is the speed-up two workers can give at best.

Prints a table and saves JSON under bench/results/ (`<stamp>-pool.json`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench.methods import (
    _MAX_BLOB_BYTES,
    METHODS,
    CatalogSource,
    Runner,
    Workload,
    secret_context,
)
from bench.report import _table
from bench.results import save_run
from heserve.he.engine import EncodedChunk, Engine, ResidueChunk
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PRESET, PRESETS, CkksParameters

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
NAMES = ("engine", "engine-pool-1", "engine-pool-2")


def split_seconds(
    workload: Workload, params: CkksParameters, shards: int, rounds: int = 5
) -> tuple[float, float, int, int]:
    """(baby rotations s, one shard's chunks s, baby step, chunks per shard), medians,
    in this process, for the plan a `shards`-way backend uses."""
    engine = Engine(params)
    plan = DiagonalPlan.for_catalog(workload.dimension, workload.items, params.slot_count, shards)
    per_shard = -(-workload.items // plan.items_per_chunk // shards) * plan.items_per_chunk
    rows = workload.catalog[: min(workload.items, per_shard)]
    chunks = engine.encode_catalog(plan, rows)
    secret = secret_context(params)
    keys = wire.load_galois_keys(
        engine.context, secret.galois_keys(plan.rotation_steps), _MAX_BLOB_BYTES
    )
    query = wire.load_ciphertext(
        engine.context, secret.encrypt(plan.query_slots(workload.query)), _MAX_BLOB_BYTES
    )
    babies, scoring = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        rotated = engine.baby_rotations(plan, query, keys)
        middle = time.perf_counter()
        for chunk in chunks:
            assert isinstance(chunk, EncodedChunk | ResidueChunk)
            engine.giant_steps(plan, engine.inner_sums(plan, chunk, rotated), keys)
        babies.append(middle - started)
        scoring.append(time.perf_counter() - middle)
    return statistics.median(babies), statistics.median(scoring), plan.baby_step, len(chunks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pool_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--items", type=int, default=65_536)
    parser.add_argument("--dimension", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.preset != DEFAULT_PRESET:
        raise SystemExit("the registry's pool methods run the default preset")
    params = PRESETS[args.preset]
    workload = CatalogSource().workload(args.dimension, args.items)
    load_before = os.getloadavg()[0]

    predicted = {shards: split_seconds(workload, params, shards) for shards in (1, 2)}
    runners: dict[str, Runner] = {}
    samples: dict[str, list[float]] = {name: [] for name in NAMES}
    errors: dict[str, float] = {}
    try:
        for name in NAMES:
            runners[name] = METHODS[name].setup(workload)
            runners[name].run()  # warm-up (ships the keys to the workers)
        for round_ in range(args.rounds):
            order = NAMES[round_ % 3 :] + NAMES[: round_ % 3]
            for name in order:
                started = time.perf_counter()
                result = runners[name].run()
                samples[name].append(time.perf_counter() - started)
                errors[name] = max(errors.get(name, 0.0), runners[name].error(result))
    finally:
        for runner in runners.values():
            runner.close()
    load_after = os.getloadavg()[0]

    def paired(name: str, reference: str) -> float:
        pairs = zip(samples[reference], samples[name], strict=True)
        return statistics.median(ref / value for ref, value in pairs)

    rows = []
    for name in NAMES:
        median = statistics.median(samples[name])
        rows.append(
            [
                name,
                f"{median * 1e3:.0f}",
                f"{min(samples[name]) * 1e3:.0f}",
                f"{workload.items / median:,.0f}",
                f"{paired(name, 'engine-pool-1'):.2f}×",
                f"{paired(name, 'engine'):.2f}×",
                f"{errors[name]:.1e}",
            ]
        )
    header = [
        f"{workload.items:,} × {workload.dimension}",
        "median ms",
        "fastest ms",
        "items/s",
        "speed ÷ pool-1",
        "speed ÷ engine",
        "max err",
    ]
    (baby1, chunks1, b1, c1), (baby2, chunks2, b2, c2) = predicted[1], predicted[2]
    bound = (baby1 + chunks1) / (baby2 + chunks2)
    lines = [
        f"{args.rounds} rounds, the three called in turn each round (ratios: median of the "
        "per-round ratios)",
        _table(header, rows),
        "",
        "What the split allows (in-process, this machine): one worker does baby rotations "
        f"{baby1 * 1e3:.0f} ms (b={b1}) + {c1} chunks {chunks1 * 1e3:.0f} ms; each of two does "
        f"{baby2 * 1e3:.0f} ms (b={b2}) + {c2} chunks {chunks2 * 1e3:.0f} ms: "
        f"at best {bound:.2f}× with 2 workers",
        f"load average (1 min, {os.cpu_count()} cores): {load_before:.2f} before, "
        f"{load_after:.2f} after",
    ]
    print("\n".join(lines))
    save_run(
        args.out_dir,
        "pool",
        {
            "items": workload.items,
            "dimension": workload.dimension,
            "preset": args.preset,
            "samples": samples,
            "errors": errors,
            "speed_pool2_over_pool1": paired("engine-pool-2", "engine-pool-1"),
            "speed_pool1_over_engine": paired("engine-pool-1", "engine"),
            "predicted": {str(k): list(v) for k, v in predicted.items()},
            "predicted_bound": bound,
            "load_average": [load_before, load_after],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
