"""The benchmark harness and its regression gate, on a tiny tier (d = 32, 4,096 items).

Every registered method is timed by direct calls (no pytest-benchmark), the
results document is written and read back, and the gate is checked both ways: a
run compared with itself passes, and against a baseline whose engine was 10×
faster relative to the same references it fails.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import report
from bench.methods import METHODS, CatalogSource
from bench.results import Results, git_commit, machine_info
from bench.tiers import TIERS


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tier = TIERS["ci"]
    source = CatalogSource()
    results = Results(
        tier=tier.name,
        created=datetime.now(UTC).isoformat(),
        commit=git_commit(),
        machine=machine_info(),
    )
    for case in tier.inner_cases():
        record = tier.measure_inner(case, source)
        assert record is not None, f"{case.id} does not fit the memory budget"
        results.inner.append(record)
    path = tmp_path_factory.mktemp("bench") / "run.json"
    results.save(path)
    return path


def _doctored(run: Path, target: Path, method: str, factor: float) -> Path:
    data = json.loads(run.read_text())
    for record in data["inner"]:
        if record["method"] == method:
            record["items_per_second"] *= factor
    target.write_text(json.dumps(data))
    return target


def test_every_method_is_measured_and_accurate(run: Path) -> None:
    results = Results.read(run)
    assert {record.method for record in results.inner} == set(METHODS)
    for record in results.inner:
        assert record.items_per_second > 0
        assert record.max_abs_error < METHODS[record.method].max_abs_error, record
    assert report.ratio_metrics(results, report.DEFAULT_REFERENCES)


def test_results_document_round_trips(run: Path, tmp_path: Path) -> None:
    results = Results.read(run)
    copy = tmp_path / "copy.json"
    results.save(copy)
    assert Results.read(copy) == results


def test_gate_passes_against_the_same_run(run: Path) -> None:
    assert report.main(["compare", str(run), "--baseline", str(run)]) == 0
    assert report.main(["compare", str(run), "--baseline", str(run), "--mode", "both"]) == 0


def test_gate_fails_when_the_engine_ratio_drops_tenfold(run: Path, tmp_path: Path) -> None:
    baseline = _doctored(run, tmp_path / "faster.json", "engine", 10.0)
    for mode in ("ratio", "absolute", "both"):
        assert report.main(["compare", str(run), "--baseline", str(baseline), "--mode", mode]) == 1
    assert (
        report.main(["compare", str(run), "--baseline", str(baseline), "--reference", "numpy"]) == 1
    )


def test_gate_threshold_is_honoured(run: Path, tmp_path: Path) -> None:
    baseline = _doctored(run, tmp_path / "slightly-faster.json", "engine", 1.2)  # -17%
    assert report.main(["compare", str(run), "--baseline", str(baseline)]) == 0
    assert (
        report.main(["compare", str(run), "--baseline", str(baseline), "--threshold", "0.1"]) == 1
    )


def test_gate_refuses_runs_with_nothing_in_common(run: Path, tmp_path: Path) -> None:
    data = json.loads(run.read_text())
    data["inner"] = [r for r in data["inner"] if r["role"] != "subject"]
    empty = tmp_path / "no-subjects.json"
    empty.write_text(json.dumps(data))
    assert report.main(["compare", str(empty), "--baseline", str(run)]) == 1


def test_table_and_plot(run: Path, tmp_path: Path) -> None:
    results = Results.read(run)
    table = report.render(results)
    for name in METHODS:
        assert name in table
    document, picture = report.write_report(results, tmp_path / "run")
    assert document.exists()
    assert picture.read_bytes().startswith(b"\x89PNG")
