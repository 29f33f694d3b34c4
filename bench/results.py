"""The records a benchmark run produces, and the results document that holds them.

One results document per run (`bench/results/<timestamp>-<tier>.json`): the
inner-loop records, the end-to-end load records and the server-side case, with
the machine and commit they were measured on. The pytest-benchmark JSON of the
same run keeps the raw timings; each of its benchmarks carries one record in
`extra_info` (with `kind` saying which), from which this document is built.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar

from bench.methods import Info, Prepared

SCHEMA = 1
Kind = Literal["inner", "load", "server_side"]
R = TypeVar("R", "InnerRecord", "LoadRecord", "ServerSideRecord")


@dataclass(frozen=True)
class InnerRecord:
    """Items per second of one method on one (d, catalog size)."""

    method: str
    role: str
    d: int
    items: int
    """Catalog size the record stands for."""
    scored: int
    """Items one timed call scored (less than `items` for a sliced peer)."""
    seconds: float
    """Median seconds per call."""
    rounds: int
    iterations: int
    items_per_second: float
    max_abs_error: float
    setup_seconds: float
    resident_mib: float
    sliced: bool = False
    """Timed on a slice of `scored` items; the rate per item stands for every size of this d."""
    info: Info = field(default_factory=dict)
    best_seconds: float = 0.0
    """Seconds per call of the fastest round: the one least disturbed by other work on
    the machine (0: not recorded)."""

    @property
    def best_items_per_second(self) -> float:
        return self.scored / self.best_seconds if self.best_seconds > 0 else 0.0

    @classmethod
    def build(
        cls,
        prepared: Prepared,
        items: int,
        seconds: float,
        rounds: int,
        iterations: int,
        error: float,
        sliced: bool = False,
        best_seconds: float = 0.0,
    ) -> InnerRecord:
        scored = prepared.runner.scored
        return cls(
            method=prepared.method.name,
            role=prepared.method.role,
            d=prepared.workload.dimension,
            items=items,
            scored=scored,
            seconds=seconds,
            rounds=rounds,
            iterations=iterations,
            items_per_second=scored / seconds,
            max_abs_error=error,
            setup_seconds=prepared.setup_seconds,
            resident_mib=prepared.resident_bytes / (1 << 20),
            sliced=sliced,
            info=dict(prepared.runner.info),
            best_seconds=best_seconds,
        )


@dataclass(frozen=True)
class LoadRecord:
    """End to end over gRPC on loopback: concurrent clients, each its own connection."""

    d: int
    items: int
    clients: int
    queries: int
    """Timed queries in total (over all clients)."""
    wall_seconds: float
    queries_per_second: float
    items_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    key_bytes: int
    query_bytes: int
    response_bytes: int
    register_seconds: float
    """Median per client: key generation plus upload and server-side validation."""
    encrypt_ms: float
    decrypt_ms: float
    max_abs_error: float


@dataclass(frozen=True)
class ServerSideRecord:
    """Apple's PNNS measure: server side, from deserialising key and query to the response."""

    d: int
    items: int
    rounds: int
    seconds: float
    """Median of register_keys(blob) + the score generator fully consumed."""
    register_seconds: float
    score_seconds: float
    key_bytes: int
    query_bytes: int
    response_bytes: int
    max_abs_error: float
    preset: str = "precise"
    poly_modulus_degree: int = 8192
    responses: int = 0
    """Response ciphertexts (complex scores: one per 2S items)."""


def to_extra_info(
    kind: Kind, record: InnerRecord | LoadRecord | ServerSideRecord
) -> dict[str, Any]:
    return {"kind": kind, **asdict(record)}


def _from_dict(cls: type[R], data: dict[str, Any]) -> R:
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class Results:
    """One run's results document."""

    tier: str
    created: str
    commit: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    pytest_json: str = ""
    inner: list[InnerRecord] = field(default_factory=list)
    load: list[LoadRecord] = field(default_factory=list)
    server_side: list[ServerSideRecord] = field(default_factory=list)
    schema: int = SCHEMA

    def add(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "inner":
            self.inner.append(_from_dict(InnerRecord, data))
        elif kind == "load":
            self.load.append(_from_dict(LoadRecord, data))
        elif kind == "server_side":
            self.server_side.append(_from_dict(ServerSideRecord, data))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a heserve results document of schema {SCHEMA}")
        results = cls(
            tier=str(data["tier"]),
            created=str(data["created"]),
            commit=str(data.get("commit", "")),
            machine=dict(data.get("machine", {})),
            pytest_json=str(data.get("pytest_json", "")),
        )
        for kind in ("inner", "load", "server_side"):
            for record in data.get(kind, []):
                results.add(kind, record)
        return results

    @classmethod
    def read(cls, path: Path) -> Results:
        return cls.from_json(json.loads(path.read_text()))

    @classmethod
    def from_pytest_benchmark(cls, path: Path, tier: str) -> Results:
        """Build the document from a pytest-benchmark --benchmark-json file."""
        data = json.loads(path.read_text())
        commit = data.get("commit_info", {})
        results = cls(
            tier=tier,
            created=str(data.get("datetime", "")),
            commit=str(commit.get("id", "")) + ("+dirty" if commit.get("dirty") else ""),
            machine=machine_info(),
            pytest_json=str(path),
        )
        for benchmark in data.get("benchmarks", []):
            extra = dict(benchmark.get("extra_info", {}))
            kind = extra.pop("kind", None)
            if isinstance(kind, str):
                results.add(kind, extra)
        return results


def machine_info() -> dict[str, Any]:
    """Where the run happened, so a baseline from another machine is recognisable."""
    info: dict[str, Any] = {
        "node": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
    }
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    for package in ("tenseal", "numpy", "grpcio"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    return info


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.strip()


def save_run(out_dir: str | Path, kind: str, body: dict[str, Any], label: str = "") -> Path:
    """Write one script's results as `<stamp>-<label or kind>.json`, with the run's context.

    Every document says what it is (`kind`), when, at which commit and on what
    machine, then the script's own fields.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now()
    path = out / f"{now.strftime('%Y%m%d-%H%M%S')}-{label or kind}.json"
    document = {
        "kind": kind,
        "created": now.isoformat(),
        "commit": git_commit(Path(__file__).resolve().parents[1]),
        "machine": machine_info(),
        **body,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {path}")
    return path
