"""Run a tier, print its table, plot it, and gate regressions against a baseline.

    python -m bench.report run --tier quick            # pytest-benchmark, then report
    python -m bench.report report RUN.pytest.json      # results doc + table + plot
    python -m bench.report show RUN.json               # print a saved run's tables
    python -m bench.report compare [RUN.json] --baseline BASE.json [--threshold 0.25]

`compare` defaults to ratios: each subject method's (heserve's engine) items/s
divided by a reference measured in the same run (TenSEAL matmul by default), so a
slower or busier machine moves both sides and the ratio stays put. `--mode
absolute` compares raw items/s of every method instead; `--mode both` does both.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.e2e import APPLE_KEY_BYTES, APPLE_QUERY_BYTES, APPLE_RESPONSE_BYTES, APPLE_SECONDS
from bench.methods import METHODS
from bench.results import InnerRecord, Results
from bench.tiers import TIERS

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_THRESHOLD = 0.25
DEFAULT_REFERENCES = ("tenseal-matmul",)
MODES = ("ratio", "absolute", "both")
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------- tables


def _int(value: float) -> str:
    return f"{value:,.0f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}×"
    return f"{value:.3g}×" if value >= 0.01 else f"{value:.2g}×"


def _kib(size: int) -> str:
    return f"{size / 1000:,.0f} KB"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """Plain-text table: the first `left` columns left-aligned, the rest right-aligned."""
    body = [list(header), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(body[0]), rule, *(line(row) for row in body[1:])])


def subjects(results: Results) -> list[str]:
    """Names of the subject methods in this run, in order of first appearance."""
    return list(dict.fromkeys(r.method for r in results.inner if r.role == "subject"))


def groups(results: Results) -> list[tuple[int, int]]:
    """Every (d, catalog size) measured whole by some method, sorted."""
    return sorted({(r.d, r.items) for r in results.inner if not r.sliced})


def record_at(results: Results, method: str, d: int, items: int) -> InnerRecord | None:
    """The method's record standing for (d, items): measured whole there, or on a slice."""
    whole = [r for r in results.inner if r.method == method and r.d == d and r.items == items]
    for record in whole:
        if not record.sliced:
            return record
    sliced = [r for r in results.inner if r.method == method and r.d == d and r.sliced]
    return sliced[0] if sliced else None


def inner_table(results: Results) -> str:
    names = list(dict.fromkeys(r.method for r in results.inner))
    subject_names = subjects(results)
    header = [
        "method",
        "d",
        "items",
        "scored",
        "items/s",
        *(f"{name} ÷ this" for name in subject_names),
        "max err",
    ]
    rows = []
    for d, items in groups(results):
        for name in names:
            record = record_at(results, name, d, items)
            if record is None:
                continue
            ratios = []
            for subject in subject_names:
                reference = record_at(results, subject, d, items)
                ratios.append(
                    _ratio(reference.items_per_second / record.items_per_second)
                    if reference is not None and not reference.sliced
                    else "-"
                )
            rows.append(
                [
                    name,
                    str(d),
                    _int(items),
                    _int(record.scored) + (" (slice)" if record.sliced else ""),
                    _rate(record.items_per_second),
                    *ratios,
                    f"{record.max_abs_error:.1e}",
                ]
            )
    return _table(header, rows)


def pool_scaling(results: Results) -> list[str]:
    """One line per (d, catalog size) with both process pools: 2 workers over 1, and over
    the in-process engine."""
    lines = []
    for d, items in groups(results):
        one = record_at(results, "engine-pool-1", d, items)
        two = record_at(results, "engine-pool-2", d, items)
        if one is None or two is None or one.sliced or two.sliced:
            continue
        line = (
            f"  d={d}, {items:,} items: engine-pool-2 {_rate(two.items_per_second)} items/s, "
            f"engine-pool-1 {_rate(one.items_per_second)}: 2 workers / 1 worker = "
            f"{two.items_per_second / one.items_per_second:.2f}× (medians)"
        )
        if one.best_seconds > 0 and two.best_seconds > 0:
            line += (
                f", {two.best_items_per_second / one.best_items_per_second:.2f}× (fastest rounds)"
            )
        engine = record_at(results, "engine", d, items)
        if engine is not None and not engine.sliced:
            line += (
                f"; pool-1 / in-process engine = "
                f"{one.items_per_second / engine.items_per_second:.2f}×"
            )
        lines.append(line)
    return lines


def load_table(results: Results) -> str:
    header = [
        "d",
        "items",
        "clients",
        "queries",
        "q/s",
        "items/s",
        "p50 ms",
        "p99 ms",
        "key",
        "query",
        "response",
        "enc ms",
        "dec ms",
        "max err",
    ]
    rows = [
        [
            str(r.d),
            _int(r.items),
            str(r.clients),
            str(r.queries),
            f"{r.queries_per_second:.2f}",
            _int(r.items_per_second),
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            _kib(r.key_bytes),
            _kib(r.query_bytes),
            _kib(r.response_bytes),
            f"{r.encrypt_ms:.1f}",
            f"{r.decrypt_ms:.1f}",
            f"{r.max_abs_error:.1e}",
        ]
        for r in results.load
    ]
    return _table(header, rows, left=0)


def server_side_table(results: Results) -> str:
    """The Apple PNNS case, one column per preset, Apple's figures last."""
    low, high = APPLE_SECONDS
    records = results.server_side
    rounds = sorted({r.rounds for r in records})
    shapes = sorted({(r.items, r.d) for r in records})
    shape = ", ".join(f"{items:,} × {d}" for items, d in shapes)
    rows = [
        ["ring degree", *(f"N={r.poly_modulus_degree}" for r in records), ""],
        [
            f"time, ms ({shape}; median of {'/'.join(map(str, rounds))})",
            *(f"{r.seconds * 1e3:.1f}" for r in records),
            f"{low * 1e3:.1f}–{high * 1e3:.1f}",
        ],
        [
            "  of which: deserialise + check keys",
            *(f"{r.register_seconds * 1e3:.1f}" for r in records),
            "",
        ],
        [
            "  of which: query in, score, responses out",
            *(f"{r.score_seconds * 1e3:.1f}" for r in records),
            "",
        ],
        ["× Apple's upper figure", *(f"{r.seconds / high:.1f}×" for r in records), ""],
        ["key bytes", *(_kib(r.key_bytes) for r in records), _kib(APPLE_KEY_BYTES)],
        ["query bytes", *(_kib(r.query_bytes) for r in records), _kib(APPLE_QUERY_BYTES)],
        [
            "response bytes (ciphertexts)",
            *(f"{_kib(r.response_bytes)} ({r.responses or '?'})" for r in records),
            _kib(APPLE_RESPONSE_BYTES),
        ],
        ["max abs error", *(f"{r.max_abs_error:.1e}" for r in records), ""],
    ]
    header = [
        "server side (Apple PNNS measure)",
        *(f"heserve {r.preset}" for r in records),
        "Apple",
    ]
    return _table(header, rows)


def render(results: Results) -> str:
    parts = [
        f"heserve bench, tier {results.tier}, {results.created}, commit {results.commit[:12]}",
    ]
    if results.inner:
        parts += [
            "",
            "Inner loop: items scored per second (median per call; a slice's rate is per item",
            "and stands for every catalog size of its d). 'X ÷ this' = X's items/s / this row's.",
            inner_table(results),
            *(
                f"  {name}: {METHODS[name].description}"
                for name in dict.fromkeys(r.method for r in results.inner)
                if name in METHODS
            ),
        ]
        scaling = pool_scaling(results)
        if scaling:
            parts += ["", "Process pool scaling (same run, same catalog):", *scaling]
    if results.load:
        parts += [
            "",
            "End to end over gRPC on loopback (latency = encrypt + RPC + score + decrypt):",
            load_table(results),
        ]
    if results.server_side:
        parts += ["", server_side_table(results)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------- plot


def plot(results: Results, path: Path) -> None:
    """items/s against catalog size, log-log, one line per method and d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.method for r in results.inner))
    dims = sorted({r.d for r in results.inner})
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    styles = ["o-", "s--", "^-.", "D:"]
    figure, axes = plt.subplots(figsize=(12, 6))
    for name in names:
        for k, d in enumerate(dims):
            style = styles[k % len(styles)]
            records = sorted(
                (r for r in results.inner if r.method == name and r.d == d and not r.sliced),
                key=lambda r: r.items,
            )
            if records:
                axes.plot(
                    [r.items for r in records],
                    [r.items_per_second for r in records],
                    style,
                    color=colours[name],
                    label=f"{name}, d={d}",
                )
            sliced = [r for r in results.inner if r.method == name and r.d == d and r.sliced]
            if sliced:
                sizes = [items for dim, items in groups(results) if dim == d] or [sliced[0].items]
                rate = sliced[0].items_per_second
                axes.plot(
                    [min(sizes), max(sizes)],
                    [rate, rate],
                    linestyle=(0, (4, 2 + k)),
                    marker=style[0],
                    markersize=4,
                    color=colours[name],
                    alpha=0.7,
                    label=f"{name}, d={d} (slice of {sliced[0].scored}, per item)",
                )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("catalog size (items)")
    axes.set_ylabel("items scored per second")
    axes.set_title(f"heserve inner loop, tier {results.tier}, {results.created[:19]}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------- compare


def gated(method: str) -> bool:
    """Whether the gate compares this subject (methods no longer registered: yes)."""
    registered = METHODS.get(method)
    return registered is None or registered.gated


def ratio_metrics(results: Results, references: Sequence[str]) -> dict[str, float]:
    """Each subject's items/s over each reference's, per (d, catalog size), same run."""
    metrics = {}
    for record in results.inner:
        if record.role != "subject" or record.sliced or not gated(record.method):
            continue
        for name in references:
            reference = record_at(results, name, record.d, record.items)
            if reference is None or name == record.method:
                continue
            key = f"{record.method} ÷ {name}, d={record.d}, n={record.items}"
            metrics[key] = record.items_per_second / reference.items_per_second
    return metrics


def absolute_metrics(results: Results) -> dict[str, float]:
    """Every method's items/s, keyed by what was measured."""
    metrics = {}
    for record in results.inner:
        where = f"slice={record.scored}" if record.sliced else f"n={record.items}"
        metrics[f"{record.method} items/s, d={record.d}, {where}"] = record.items_per_second
    return metrics


@dataclass(frozen=True)
class Comparison:
    lines: list[str]
    failures: list[str]
    compared: int

    @property
    def ok(self) -> bool:
        return self.compared > 0 and not self.failures


def compare(
    current: Results,
    baseline: Results,
    threshold: float = DEFAULT_THRESHOLD,
    mode: str = "ratio",
    references: Sequence[str] = DEFAULT_REFERENCES,
) -> Comparison:
    """Fail on any metric more than `threshold` (a fraction) below the baseline's."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    pairs: list[tuple[dict[str, float], dict[str, float]]] = []
    if mode in ("ratio", "both"):
        pairs.append((ratio_metrics(current, references), ratio_metrics(baseline, references)))
    if mode in ("absolute", "both"):
        pairs.append((absolute_metrics(current), absolute_metrics(baseline)))
    rows, failures, missing = [], [], []
    for now, before in pairs:
        for key, base in before.items():
            if key not in now:
                missing.append(key)
                continue
            value = now[key]
            change = value / base - 1 if base > 0 else math.inf
            status = "ok"
            if change < -threshold:
                status = "REGRESSED"
                failures.append(f"{key}: {base:.4g} -> {value:.4g} ({change:+.0%})")
            rows.append([key, f"{base:.4g}", f"{value:.4g}", f"{change:+.1%}", status])
    lines = [
        f"compare ({mode}, fail below -{threshold:.0%}): current {current.created} "
        f"[{current.tier}] vs baseline {baseline.created} [{baseline.tier}]",
        _table(["metric", "baseline", "current", "change", ""], rows),
    ]
    if missing:
        lines.append(f"not in the current run (not compared): {', '.join(missing)}")
    if not rows:
        lines.append("nothing to compare: the runs share no metric")
    elif failures:
        lines.append(f"{len(failures)} regression(s) beyond {threshold:.0%}")
    else:
        lines.append(f"no regression beyond {threshold:.0%} in {len(rows)} metric(s)")
    return Comparison(lines, failures, len(rows))


# ------------------------------------------------------------------------------- CLI


def latest_results(directory: Path = RESULTS_DIR) -> Path:
    runs = sorted(p for p in directory.glob("*.json") if not p.name.endswith(".pytest.json"))
    if not runs:
        raise SystemExit(f"no results in {directory}; run `make bench-quick` first")
    return runs[-1]


def write_report(results: Results, prefix: Path) -> tuple[Path, Path]:
    """Save the results document and the plot beside each other; print the tables."""
    document, picture = prefix.with_suffix(".json"), prefix.with_suffix(".png")
    results.save(document)
    if results.inner:
        plot(results, picture)
    print(render(results))
    print(f"\nresults: {document}\nplot:    {picture}")
    return document, picture


def _run(args: argparse.Namespace) -> int:
    tier = TIERS[args.tier]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f"{stamp}-{tier.name}"
    raw = prefix.with_suffix(".pytest.json")
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "bench"),
        f"--tier={tier.name}",
        f"--benchmark-json={raw}",
        "--benchmark-columns=median,rounds,iterations",
        "--benchmark-sort=name",
        "-o",
        "timeout=3600",
        "-p",
        "no:cacheprovider",
        *args.pytest_args,
    ]
    for variable in BLAS_THREAD_VARIABLES:
        # One BLAS thread: every method on one core, and numpy's rate stops
        # collapsing when the other core is busy (two spinning BLAS threads did).
        os.environ.setdefault(variable, "1")
    print("+", " ".join(command), flush=True)
    status = subprocess.run(command, cwd=ROOT, check=False).returncode
    if not raw.exists():
        print(f"pytest wrote no {raw}", file=sys.stderr)
        return status or 1
    results = Results.from_pytest_benchmark(raw, tier.name)
    results.created = results.created or stamp
    write_report(results, prefix)
    return status


def _report(args: argparse.Namespace) -> int:
    raw = Path(args.pytest_json)
    results = Results.from_pytest_benchmark(raw, args.tier)
    name = raw.name.removesuffix(".pytest.json").removesuffix(".json")
    write_report(results, Path(args.out_dir) / name)
    return 0


def _show(args: argparse.Namespace) -> int:
    print(render(Results.read(Path(args.results) if args.results else latest_results())))
    return 0


def _compare(args: argparse.Namespace) -> int:
    current_path = Path(args.current) if args.current else latest_results()
    result = compare(
        Results.read(current_path),
        Results.read(Path(args.baseline)),
        threshold=args.threshold,
        mode=args.mode,
        references=args.reference or DEFAULT_REFERENCES,
    )
    print(f"current: {current_path}\nbaseline: {args.baseline}")
    print("\n".join(result.lines))
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="heserve benchmarks: run, report, compare"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a tier with pytest-benchmark, then report")
    run.add_argument("--tier", choices=sorted(TIERS), default="quick")
    run.add_argument("--out-dir", default=str(RESULTS_DIR))
    run.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    run.set_defaults(handler=_run)

    report = commands.add_parser("report", help="results doc, table and plot from pytest JSON")
    report.add_argument("pytest_json")
    report.add_argument("--tier", default="custom")
    report.add_argument("--out-dir", default=str(RESULTS_DIR))
    report.set_defaults(handler=_report)

    show = commands.add_parser("show", help="print the tables of a results doc (latest)")
    show.add_argument("results", nargs="?")
    show.set_defaults(handler=_show)

    gate = commands.add_parser("compare", help="exit 1 if a run regressed against a baseline")
    gate.add_argument("current", nargs="?", help="results doc (default: the latest run)")
    gate.add_argument("--baseline", required=True)
    gate.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="largest allowed drop, as a fraction (default 0.25)",
    )
    gate.add_argument("--mode", choices=MODES, default="ratio")
    gate.add_argument(
        "--reference",
        action="append",
        help="method the subjects are divided by (repeatable; default tenseal-matmul)",
    )
    gate.set_defaults(handler=_compare)

    args = parser.parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
