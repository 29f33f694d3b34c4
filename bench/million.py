"""One million items end to end: a gRPC server on loopback and the Python client.

    python -m bench.million [--preset precise|fast|compact] [--workers 2]
                            [--items 1000000] [--dimension 128] [--queries 3]

The server runs in a subprocess (this module with `--serve`), so that its memory
is its own: a `Scorer` over a `PoolBackend` of `--workers` worker processes,
serving a catalog of unit-norm rows (the harness's deterministic catalog) that
is encoded once at start-up (the encode time is reported). This process is the
client: one `heserve_client.Client`, which registers its keys, fetches the item
ids once (1M ids, paged; reported apart), then makes `--queries`
`Client.recommend(k=10)` calls, each reported as total, encrypt, score + stream
(the RPC, as the client sees it, minus decryption) and decrypt seconds (from
`client.stats`) and response bytes. Each top-10 is checked against the top-10 of
the plaintext scores, in order; the exit status is 1 if one misses an item. An
order swap between two scores closer than the preset's error is reported, with
the smallest gap between consecutive plaintext top-10 scores. The server's peak
memory is the VmHWM (peak resident set) of the server process and of each of its
descendants (the workers, and multiprocessing's resource tracker), read from
/proc/<pid>/status just before it is stopped; the sum is an upper bound of their
joint peak. The client is this process and is not counted.

Prints a table and saves JSON under bench/results/ (`<stamp>-million-<preset>.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.methods import CATALOG, CATALOG_SEED, QUERY_SEED, item_ids, unit_vectors
from bench.report import _table
from bench.results import save_run
from heserve.protocol.params import DEFAULT_PRESET, PRESETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
TOP_K = 10


# --------------------------------------------------------------------------- server


def serve(preset: str, workers: int, items: int, dimension: int) -> int:
    """The server side: encode, listen on a free port, report it, serve until stdin closes."""
    from heserve.backends.pool import PoolBackend
    from heserve.domain.catalog import Catalog
    from heserve.domain.scorer import Scorer
    from heserve.transport.server import start_server

    params = PRESETS[preset]
    started = time.perf_counter()
    rows = unit_vectors(items, dimension, CATALOG_SEED + dimension, dtype=np.float32)
    catalog = Catalog(CATALOG, rows, item_ids(items))
    catalog_seconds = time.perf_counter() - started
    backend = PoolBackend(params, workers=workers)
    try:
        started = time.perf_counter()
        scorer = Scorer(params, [catalog], backend=backend)
        encode_seconds = time.perf_counter() - started
        running = start_server(scorer, "127.0.0.1", 0)
        try:
            ready = {
                "port": running.port,
                "pid": os.getpid(),
                "catalog_seconds": catalog_seconds,
                "encode_seconds": encode_seconds,
                "baby_step": scorer.catalog(CATALOG).plan.baby_step,
                "chunks": -(-items // scorer.catalog(CATALOG).plan.items_per_chunk),
            }
            print(json.dumps(ready), flush=True)
            sys.stdin.read()  # until the client closes our stdin
        finally:
            running.stop(grace=None)
    finally:
        backend.close()
    return 0


# ------------------------------------------------------------------------- memory


def _status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024 if value else 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children of each of its threads, recursively)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    for child in children.read().split():
                        found.append(int(child))
                        stack.append(int(child))
            except OSError:
                continue
    return found


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    name: str
    peak_bytes: int
    """VmHWM: the process's peak resident set."""
    resident_bytes: int
    """VmRSS when read."""


def _role(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if "bench.million" in command:
        return "server" if "--serve" in command else "client"
    if "resource_tracker" in command:
        return "resource tracker"
    if "spawn_main" in command:
        return "worker"
    return command.split(" ", 1)[0]


def process_memory(pid: int) -> ProcessMemory:
    status = _status(pid)
    return ProcessMemory(
        pid,
        _role(pid),
        _kib(status.get("VmHWM", "")),
        _kib(status.get("VmRSS", "")),
    )


def tree_memory(pid: int) -> list[ProcessMemory]:
    """The server process and its descendants (those still alive)."""
    records = []
    for member in [pid, *descendants(pid)]:
        try:
            records.append(process_memory(member))
        except OSError:
            continue
    return records


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class QueryRecord:
    total_seconds: float
    encrypt_seconds: float
    score_stream_seconds: float
    decrypt_seconds: float
    query_bytes: int
    response_bytes: int
    top10_equal: bool
    top10_overlap: int
    max_abs_error_top10: float
    """|decrypted − plaintext| over the returned top-10."""
    top10_gap: float
    """Smallest gap between consecutive plaintext top-10 scores: an error of half of it
    can swap two of them."""


@dataclass
class MillionRecord:
    preset: str
    poly_modulus_degree: int
    workers: int
    items: int
    dimension: int
    chunks: int
    baby_step: int
    catalog_seconds: float
    """Server: generating and checking the float catalog (not encoding)."""
    encode_seconds: float
    """Server: Scorer construction, the catalog encoded by the workers."""
    key_bytes: int
    register_seconds: float
    """Client: key generation, upload and the server's check."""
    ids_seconds: float
    """Client: fetching the 1M item ids (once, cached for the recommend calls)."""
    queries: list[QueryRecord]
    server_processes: list[ProcessMemory]
    server_peak_bytes: int
    """Sum of the VmHWM of the server and its descendants."""
    client_peak_bytes: int
    """VmHWM of this (client) process, which also held the plaintext catalog."""
    load_average: tuple[float, float]
    """1-minute load average before the server started and after the last query: other
    work on the machine takes cores from the workers."""
    notes: list[str] = field(default_factory=list)


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    command = [
        sys.executable,
        "-m",
        "bench.million",
        "--serve",
        f"--preset={args.preset}",
        f"--workers={args.workers}",
        f"--items={args.items}",
        f"--dimension={args.dimension}",
    ]
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    stdout: IO[str] | None = server.stdout
    assert stdout is not None
    line = stdout.readline()
    if not line:
        server.wait()
        raise SystemExit(f"the server exited with status {server.returncode} before it was ready")
    ready: dict[str, Any] = json.loads(line)
    return server, ready


def run(args: argparse.Namespace) -> MillionRecord:
    from heserve_client import Client

    params = PRESETS[args.preset]
    load_before = os.getloadavg()[0]
    print(
        f"starting the server ({args.preset}, {args.workers} workers, "
        f"{args.items:,} × {args.dimension}) ...",
        flush=True,
    )
    server, ready = _start_server(args)
    try:
        print(f"server ready: encoded in {ready['encode_seconds']:.1f} s", flush=True)
        rows = unit_vectors(args.items, args.dimension, CATALOG_SEED + args.dimension)
        vectors = unit_vectors(args.queries, args.dimension, QUERY_SEED + args.dimension)
        plain = [rows @ vector for vector in vectors]
        del rows
        queries: list[QueryRecord] = []
        with Client(f"127.0.0.1:{ready['port']}", timeout=3600.0) as client:
            started = time.perf_counter()
            client.register_keys()
            register_seconds = time.perf_counter() - started
            started = time.perf_counter()
            ids = client.item_ids(CATALOG)
            ids_seconds = time.perf_counter() - started
            position = {item: i for i, item in enumerate(ids)}
            for vector, scores in zip(vectors, plain, strict=True):
                started = time.perf_counter()
                top = client.recommend(vector, catalog=CATALOG, k=TOP_K)
                total = time.perf_counter() - started
                stats = client.stats
                expected = np.argsort(-scores, kind="stable")[:TOP_K]
                got = [position[item] for item, _ in top]
                record = QueryRecord(
                    total_seconds=total,
                    encrypt_seconds=stats.last_encrypt_seconds,
                    score_stream_seconds=stats.last_score_seconds,
                    decrypt_seconds=stats.last_decrypt_seconds,
                    query_bytes=stats.last_query_bytes,
                    response_bytes=stats.last_response_bytes,
                    top10_equal=got == [int(i) for i in expected],
                    top10_overlap=len(set(got) & {int(i) for i in expected}),
                    top10_gap=float(np.min(-np.diff(scores[expected]))),
                    max_abs_error_top10=max(
                        abs(value - scores[i]) for i, (_, value) in zip(got, top, strict=True)
                    ),
                )
                queries.append(record)
                print(
                    f"query {len(queries)}: {total:.2f} s, top-10 equal: {record.top10_equal}",
                    flush=True,
                )
            key_bytes = client.stats.key_bytes_sent
        members = tree_memory(int(ready["pid"]))
    finally:
        stdin: IO[str] | None = server.stdin
        if stdin is not None:
            stdin.close()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    load_after = os.getloadavg()[0]
    client_peak = process_memory(os.getpid()).peak_bytes
    return MillionRecord(
        preset=args.preset,
        poly_modulus_degree=params.poly_modulus_degree,
        workers=args.workers,
        items=args.items,
        dimension=args.dimension,
        chunks=int(ready["chunks"]),
        baby_step=int(ready["baby_step"]),
        catalog_seconds=float(ready["catalog_seconds"]),
        encode_seconds=float(ready["encode_seconds"]),
        key_bytes=key_bytes,
        register_seconds=register_seconds,
        ids_seconds=ids_seconds,
        queries=queries,
        server_processes=members,
        server_peak_bytes=sum(member.peak_bytes for member in members),
        client_peak_bytes=client_peak,
        load_average=(load_before, load_after),
    )


# --------------------------------------------------------------------------- report


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def render(record: MillionRecord) -> str:
    head = (
        f"{record.items:,} × {record.dimension}, preset {record.preset} "
        f"(N={record.poly_modulus_degree}), {record.workers} workers, {record.chunks} chunks, "
        f"baby step {record.baby_step}"
    )
    lines = [
        head,
        f"  server: catalog made in {record.catalog_seconds:.1f} s, "
        f"encoded in {record.encode_seconds:.1f} s",
        f"  client: keys {record.key_bytes / 1000:,.0f} KB registered in "
        f"{record.register_seconds:.2f} s; "
        f"{record.items:,} item ids fetched in {record.ids_seconds:.2f} s (once)",
        f"  load average (1 min, {os.cpu_count()} cores): {record.load_average[0]:.2f} before, "
        f"{record.load_average[1]:.2f} after",
        "",
    ]
    rows = [
        [
            str(i + 1),
            f"{q.total_seconds:.2f}",
            f"{q.encrypt_seconds:.3f}",
            f"{q.score_stream_seconds:.2f}",
            f"{q.decrypt_seconds:.2f}",
            f"{q.query_bytes / 1000:,.0f} KB",
            f"{q.response_bytes / 1e6:,.1f} MB",
            "yes" if q.top10_equal else f"no: {q.top10_overlap}/10 same items",
            f"{q.top10_gap:.1e}",
            f"{q.max_abs_error_top10:.1e}",
        ]
        for i, q in enumerate(record.queries)
    ]
    lines.append(
        _table(
            [
                "recommend",
                "total s",
                "encrypt s",
                "score+stream s",
                "decrypt s",
                "query",
                "response",
                "top-10 = plaintext",
                "min gap",
                "err",
            ],
            rows,
            left=0,
        )
    )
    lines += ["", "server peak memory (VmHWM, from /proc/<pid>/status):"]
    lines += [
        f"  pid {m.pid} {m.name}: {_gb(m.peak_bytes)} peak, "
        f"{_gb(m.resident_bytes)} resident at the end"
        for m in record.server_processes
    ]
    lines.append(f"  server total (sum of peaks): {_gb(record.server_peak_bytes)}")
    lines.append(
        "  client process (not included; it also held the plaintext catalog): "
        f"{_gb(record.client_peak_bytes)} peak"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.million",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=128)
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.preset, args.workers, args.items, args.dimension)
    record = run(args)
    print()
    print(render(record))
    save_run(
        args.out_dir,
        "million",
        asdict(record),
        label=f"million-{record.preset}",
    )
    return 0 if all(q.top10_overlap == TOP_K for q in record.queries) else 1


if __name__ == "__main__":
    sys.exit(main())
