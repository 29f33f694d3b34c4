"""Typed wrappers over pytest-benchmark's `pedantic` (its own signature is untyped)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture


def pedantic(
    benchmark: BenchmarkFixture,
    target: Callable[[], Any],
    rounds: int,
    iterations: int = 1,
    setup: Callable[[], None] | None = None,
) -> Any:
    """Time `target` for exactly `rounds` × `iterations` calls; return its last result."""
    return benchmark.pedantic(  # type: ignore[no-untyped-call]
        target, setup=setup, rounds=rounds, iterations=iterations, warmup_rounds=0
    )


def min_seconds(benchmark: BenchmarkFixture) -> float:
    """Seconds per call of the fastest round of the benchmark just run."""
    if benchmark.stats is None:
        raise RuntimeError("pytest-benchmark recorded no timings (is --benchmark-disable on?)")
    return float(benchmark.stats.stats.min)


def median_seconds(benchmark: BenchmarkFixture) -> float:
    """Median seconds per call of the benchmark just run."""
    if benchmark.stats is None:
        raise RuntimeError("pytest-benchmark recorded no timings (is --benchmark-disable on?)")
    return float(benchmark.stats.stats.median)
