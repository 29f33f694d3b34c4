"""The encrypted inner loop, items scored per second, for every registered method.

Setup (encoding the catalog, keys, encrypting the query) happens outside the
timing; one warm-up call sizes the rounds to the tier's time budget. A method's
runner is closed after its case (the pool methods stop their worker processes).
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.methods import (
    METHODS,
    CatalogSource,
    choose_rounds,
    memory_budget_bytes,
    prepare,
)
from bench.results import InnerRecord, to_extra_info
from bench.tiers import InnerCase, Tier
from bench.timed import median_seconds, min_seconds, pedantic


def test_inner_loop(
    benchmark: BenchmarkFixture, inner_case: InnerCase, tier: Tier, catalogs: CatalogSource
) -> None:
    method = METHODS[inner_case.method]
    needed = method.memory_bytes(inner_case.d, inner_case.scored)
    needed += inner_case.items * inner_case.d * 8  # the float64 catalog itself
    budget = memory_budget_bytes()
    if needed > budget:
        pytest.skip(
            f"needs ~{needed / (1 << 30):.1f} GiB, budget {budget / (1 << 30):.1f} GiB "
            "(BENCH_MAX_GIB raises the cap)"
        )
    workload = catalogs.workload(inner_case.d, inner_case.items).head(inner_case.scored)
    prepared = prepare(method, workload)
    try:
        rounds, iterations = choose_rounds(
            prepared.first_call_seconds, tier.budget_seconds, tier.min_rounds
        )
        benchmark.group = f"inner d={inner_case.d}"
        result = pedantic(benchmark, prepared.runner.run, rounds, iterations)
        error = prepared.runner.error(result)
    finally:
        prepared.runner.close()  # worker processes do not outlive their case
    record = InnerRecord.build(
        prepared,
        inner_case.items,
        median_seconds(benchmark),
        rounds,
        iterations,
        error,
        sliced=inner_case.sliced,
        best_seconds=min_seconds(benchmark),
    )
    benchmark.extra_info.update(to_extra_info("inner", record))
    assert error < method.max_abs_error
