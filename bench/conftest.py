"""pytest options and fixtures of the benchmark tiers (run with `make bench-quick`)."""

from __future__ import annotations

import pytest

from bench.methods import CatalogSource
from bench.tiers import TIERS, Tier


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--tier",
        default="quick",
        choices=sorted(TIERS),
        help="benchmark tier: quick (about a minute), full (d ∈ {32,128,512} up to 1M items)",
    )


def _tier(config: pytest.Config) -> Tier:
    return TIERS[str(config.getoption("--tier"))]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    tier = _tier(metafunc.config)
    if "inner_case" in metafunc.fixturenames:
        cases = tier.inner_cases()
        metafunc.parametrize("inner_case", cases, ids=[case.id for case in cases])
    if "load_case" in metafunc.fixturenames:
        loads = list(tier.load)
        metafunc.parametrize("load_case", loads, ids=[case.id for case in loads])


@pytest.fixture(scope="session")
def tier(request: pytest.FixtureRequest) -> Tier:
    return _tier(request.config)


@pytest.fixture(scope="session")
def catalogs() -> CatalogSource:
    return CatalogSource()
