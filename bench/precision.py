"""Precision of each parameter preset: max absolute error and recall@10.

    python -m bench.precision [--items 16384] [--dimension 128] [--queries 20]

Unit-norm catalog rows and user vectors, scored by the real engine under real
encryption; recall@10 is |encrypted top-10 ∩ plaintext top-10| / 10. Also prints
the bytes of the key upload, one query and the response per 4,096 items, as the
Python client sends them (complex scores: 8,192 per response).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from heserve.domain.catalog import unit_rows
from heserve.domain.protection import NoiseAdder, ScoreProtection
from heserve.he.engine import Engine
from heserve.he.plan import DiagonalPlan
from heserve.protocol import wire
from heserve.protocol.params import DEFAULT_PRESET, PRESETS
from heserve.protocol.slots import query_slots, unpack_complex
from heserve_client import SecretContext


@dataclass(frozen=True)
class PresetPrecision:
    preset: str
    max_abs_error: float
    mean_abs_error: float
    mean_recall_at_10: float
    min_recall_at_10: float
    key_bytes: int
    query_bytes: int
    response_bytes_per_4096_items: float


def measure(
    preset: str,
    items: int,
    dimension: int,
    queries: int,
    seed: int,
    protection: ScoreProtection | None = None,
) -> PresetPrecision:
    """Score `queries` random unit vectors against one random unit-norm catalog."""
    params = PRESETS[preset]
    engine = Engine(params)
    plan = DiagonalPlan.for_catalog(dimension, items, params.slot_count)
    catalog = unit_rows(items, dimension, seed)
    chunks = engine.encode_catalog(plan, catalog)
    add_noise = NoiseAdder(params, preset, protection or ScoreProtection())
    secret = SecretContext(params)
    key_blob = secret.galois_keys(plan.rotation_steps)
    keys = wire.load_galois_keys(engine.context, key_blob, 1 << 30)
    errors: list[float] = []
    absolute: list[float] = []
    recalls: list[float] = []
    query_bytes = response_bytes = 0
    for vector in unit_rows(queries, dimension, seed + 1):
        blob = secret.encrypt(query_slots(vector, dimension, params.slot_count))
        query = wire.load_ciphertext(engine.context, blob, 1 << 24)
        responses = []
        for result in engine.score(plan, chunks, query, keys):
            add_noise.add_to(result)
            responses.append(wire.ciphertext_to_wire(wire.to_bytes(result)))
        per_chunk = plan.items_per_chunk
        scores = np.concatenate(
            [
                unpack_complex(
                    secret.decrypt_complex(r, 1 << 24), min(per_chunk, items - i * per_chunk)
                )
                for i, r in enumerate(responses)
            ]
        )
        plain = catalog @ vector
        difference = np.abs(scores - plain)
        errors.append(float(difference.max()))
        absolute.append(float(difference.mean()))
        best = set(np.argsort(-plain)[:10].tolist())
        recalls.append(len(best & set(np.argsort(-scores)[:10].tolist())) / 10)
        query_bytes, response_bytes = len(blob), sum(len(r) for r in responses)
    return PresetPrecision(
        preset=preset,
        max_abs_error=max(errors),
        mean_abs_error=float(np.mean(absolute)),
        mean_recall_at_10=float(np.mean(recalls)),
        min_recall_at_10=min(recalls),
        key_bytes=len(key_blob),
        query_bytes=query_bytes,
        response_bytes_per_4096_items=response_bytes * 4096 / items,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16_384)
    parser.add_argument("--dimension", type=int, default=128)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument(
        "--protection", action="store_true", help="also measure the recall cost of noise settings"
    )
    args = parser.parse_args()
    print(
        f"precision per preset: {args.items:,} unit-norm items × {args.dimension} dims, "
        f"{args.queries} unit-norm queries (default preset: {DEFAULT_PRESET})\n"
    )
    print(
        "| preset | N | primes (bits) | max abs error | mean abs error | recall@10 mean | "
        "recall@10 min | keys | query | response / 4,096 items |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset, params in PRESETS.items():
        row = measure(preset, args.items, args.dimension, args.queries, args.seed)
        primes = "/".join(map(str, params.coeff_modulus_bits))
        cells = [
            preset,
            str(params.poly_modulus_degree),
            primes,
            f"{row.max_abs_error:.1e}",
            f"{row.mean_abs_error:.1e}",
            f"{row.mean_recall_at_10:.3f}",
            f"{row.min_recall_at_10:.2f}",
            f"{row.key_bytes / 1000:,.0f} KB",
            f"{row.query_bytes / 1000:,.0f} KB",
            f"{row.response_bytes_per_4096_items / 1000:,.0f} KB",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.protection:
        _protection_table(args)


PROTECTION_SETTINGS = [
    ScoreProtection(),
    ScoreProtection(flood_bits=8),
    ScoreProtection(flood_bits=12),
    ScoreProtection(flood_bits=16),
    ScoreProtection(score_noise_std=1e-3),
    ScoreProtection(score_noise_std=1e-2),
    ScoreProtection(flood_bits=12, score_noise_std=1e-3),
]


def _protection_table(args: argparse.Namespace) -> None:
    print(f"\nrecall cost of catalog protection (preset {DEFAULT_PRESET})\n")
    print("| flood bits | score noise std | max abs error | recall@10 mean | recall@10 min |")
    print("|---|---|---|---|---|")
    for setting in PROTECTION_SETTINGS:
        row = measure(DEFAULT_PRESET, args.items, args.dimension, args.queries, args.seed, setting)
        print(
            f"| {setting.flood_bits} | {setting.score_noise_std:g} | {row.max_abs_error:.1e} "
            f"| {row.mean_recall_at_10:.3f} | {row.min_recall_at_10:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
