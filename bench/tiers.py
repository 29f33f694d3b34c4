"""What each benchmark tier covers: methods, dimensions, catalog sizes, load runs.

- quick: d = 128, 4,096 and 16,384 items, peers on slices, the engine and the
  1- and 2-worker process pools at 65,536 items, one end-to-end run with 2
  clients and the server-side Apple case under each preset; about two minutes
  (`make bench-quick`).
- full: d ∈ {32, 128, 512}, 4,096 to 1,000,000 items (the pools at 65,536 and
  1,000,000), end-to-end runs with 1 to 8 clients and a 65,536-item catalog;
  cases whose encoded catalog would not fit the memory budget are skipped, with
  the reason (`make bench`).
- ci: d = 32, 4,096 items, tiny slices; for tests/test_bench_quick.py, which
  exercises the harness and the regression gate in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bench.methods import (
    METHODS,
    CatalogSource,
    choose_rounds,
    memory_budget_bytes,
    prepare,
    time_calls,
)
from bench.results import InnerRecord


@dataclass(frozen=True)
class InnerCase:
    """One inner-loop measurement: a method on the first `scored` of `items` items."""

    method: str
    d: int
    items: int
    scored: int
    sliced: bool = False
    """Timed on a slice: the rate per item stands for every catalog size of this d."""

    @property
    def id(self) -> str:
        where = f"slice{self.scored}" if self.sliced else f"n{self.items}"
        return f"{self.method}-d{self.d}-{where}"


@dataclass(frozen=True)
class LoadCase:
    """One end-to-end run: `clients` concurrent clients, each sending `queries`."""

    d: int
    items: int
    clients: int
    queries: int

    @property
    def id(self) -> str:
        return f"d{self.d}-n{self.items}-c{self.clients}"


@dataclass(frozen=True)
class Tier:
    name: str
    dimensions: tuple[int, ...]
    sizes: tuple[int, ...]
    budget_seconds: float
    """Time to spend timing one case (after its warm-up call); at least min_rounds."""
    min_rounds: int = 3
    methods: tuple[str, ...] | None = None
    """Registered method names to run; None runs every registered method."""
    slices: Mapping[str, int] = field(default_factory=dict)
    """Per-method slice sizes overriding the method's own `slice_items`."""
    method_sizes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Per-method catalog sizes replacing `sizes` for that method (the process pools
    run only where they have chunks to spread; the engine runs there too, as their
    one-process reference)."""
    load: tuple[LoadCase, ...] = ()
    server_side_rounds: int = 0
    """Rounds of the server-side Apple case (4,096 × 128); 0 skips it."""

    def method_names(self) -> list[str]:
        return list(self.methods) if self.methods is not None else list(METHODS)

    def sizes_of(self, name: str) -> tuple[int, ...]:
        """The catalog sizes method `name` runs at in this tier."""
        return tuple(sorted(self.method_sizes.get(name, self.sizes)))

    def inner_cases(self) -> list[InnerCase]:
        """Cases ordered d by d, size by size (one catalog in memory at a time).

        A sliced method runs once per d, on a slice of its smallest catalog: its
        rate per item does not depend on the catalog size.
        """
        names = self.method_names()
        every_size = sorted({items for name in names for items in self.sizes_of(name)})
        cases = []
        for d in self.dimensions:
            for items in every_size:
                for name in names:
                    method = METHODS[name]
                    sizes = self.sizes_of(name)
                    slice_items = self.slices.get(name, method.slice_items)
                    if slice_items is None:
                        if items in sizes:
                            cases.append(InnerCase(name, d, items, items))
                    elif items == sizes[0]:
                        cases.append(
                            InnerCase(name, d, items, min(slice_items, items), sliced=True)
                        )
        return cases

    def measure_inner(self, case: InnerCase, source: CatalogSource) -> InnerRecord | None:
        """Time one case directly (no pytest-benchmark); None if it exceeds the memory budget.

        The same steps as bench/test_inner_loop.py: setup, one warm-up call that
        sizes the rounds, the rounds, the error of the last result.
        """
        method = METHODS[case.method]
        needed = method.memory_bytes(case.d, case.scored) + case.items * case.d * 8
        if needed > memory_budget_bytes():
            return None
        prepared = prepare(method, source.workload(case.d, case.items).head(case.scored))
        try:
            rounds, iterations = choose_rounds(
                prepared.first_call_seconds, self.budget_seconds, self.min_rounds
            )
            seconds, best, result = time_calls(prepared.runner.run, rounds, iterations)
            error = prepared.runner.error(result)
        finally:
            prepared.runner.close()
        return InnerRecord.build(
            prepared,
            case.items,
            seconds,
            rounds,
            iterations,
            error,
            sliced=case.sliced,
            best_seconds=best,
        )


QUICK = Tier(
    name="quick",
    dimensions=(128,),
    sizes=(4_096, 16_384),
    budget_seconds=3.0,
    slices={"tenseal-dot": 64},
    method_sizes={
        "engine": (4_096, 16_384, 65_536),
        "engine-seal": (4_096, 65_536),
        "engine-8-queries": (65_536,),
        "desilofhe": (4_096, 65_536),
        "rerank-100-server": (65_536,),
        "rerank-100-local": (65_536,),
        "engine-pool-1": (65_536,),
        "engine-pool-2": (65_536,),
    },
    load=(LoadCase(d=128, items=4_096, clients=2, queries=5),),
    server_side_rounds=10,
)

FULL = Tier(
    name="full",
    dimensions=(32, 128, 512),
    sizes=(4_096, 16_384, 65_536, 262_144, 1_000_000),
    budget_seconds=8.0,
    slices={"tenseal-dot": 256},
    method_sizes={
        "engine-pool-1": (65_536, 1_000_000),
        "engine-pool-2": (65_536, 1_000_000),
    },
    load=(
        LoadCase(d=128, items=4_096, clients=1, queries=20),
        LoadCase(d=128, items=4_096, clients=2, queries=20),
        LoadCase(d=128, items=4_096, clients=4, queries=10),
        LoadCase(d=128, items=4_096, clients=8, queries=5),
        LoadCase(d=128, items=65_536, clients=1, queries=5),
        LoadCase(d=128, items=65_536, clients=4, queries=3),
    ),
    server_side_rounds=30,
)

CI = Tier(
    name="ci",
    dimensions=(32,),
    sizes=(4_096,),
    budget_seconds=0.2,
    min_rounds=2,
    slices={"tenseal-dot": 8, "tenseal-matmul": 1_024},
)

TIERS: dict[str, Tier] = {tier.name: tier for tier in (QUICK, FULL, CI)}
