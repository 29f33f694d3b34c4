"""End to end over gRPC on loopback, and the server-side Apple PNNS case per preset."""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.e2e import ServerSideCase, preset_tolerance, run_load, running_server
from bench.methods import CatalogSource
from bench.results import LoadRecord, to_extra_info
from bench.tiers import LoadCase, Tier
from bench.timed import median_seconds, pedantic
from heserve.protocol.params import PRESETS

MAX_ABS_ERROR = 1e-4  # default parameters; the service promises 1e-4
APPLE_ITEMS, APPLE_DIMENSION = 4_096, 128


def test_load(benchmark: BenchmarkFixture, load_case: LoadCase, catalogs: CatalogSource) -> None:
    workload = catalogs.workload(load_case.d, load_case.items)
    records: list[LoadRecord] = []
    with running_server(workload) as (_, running):
        target = f"127.0.0.1:{running.port}"
        benchmark.group = "end to end"
        pedantic(
            benchmark,
            lambda: records.append(
                run_load(target, workload, load_case.clients, load_case.queries)
            ),
            rounds=1,
        )
    record = records[-1]
    benchmark.extra_info.update(to_extra_info("load", record))
    assert record.max_abs_error < MAX_ABS_ERROR


@pytest.mark.parametrize("preset", list(PRESETS))
def test_server_side_apple_case(
    benchmark: BenchmarkFixture, tier: Tier, catalogs: CatalogSource, preset: str
) -> None:
    if not tier.server_side_rounds:
        pytest.skip(f"tier {tier.name} has no server-side case")
    case = ServerSideCase.build(catalogs.workload(APPLE_DIMENSION, APPLE_ITEMS), preset)
    case.run()  # warm-up
    benchmark.group = "server side (Apple PNNS case)"
    responses = pedantic(benchmark, case.run, tier.server_side_rounds, setup=case.reset)
    record = case.record(median_seconds(benchmark), tier.server_side_rounds, responses)
    benchmark.extra_info.update(to_extra_info("server_side", record))
    assert record.max_abs_error < preset_tolerance(preset)
