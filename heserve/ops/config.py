"""`heserve serve` settings from flags, HESERVE_* environment variables and a TOML file.

Every setting has three spellings: the flag `--max-keys 10`, the environment variable
`HESERVE_MAX_KEYS=10` and the config file key `max-keys = 10` (or `max_keys`). A flag
beats the environment, which beats the config file (`--config heserve.toml` or
HESERVE_CONFIG), which beats the default. `tokens` has no flag, so that no API token
shows in a process listing. Relative paths in the config file are relative to it.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from heserve.ops.logs import FORMATS, LEVELS
from heserve.protocol.params import DEFAULT_PRESET, PRESETS

ENV_PREFIX = "HESERVE_"
CONFIG_ENV = "HESERVE_CONFIG"
MIN_MESSAGE_BYTES = 2 << 20  # a 1 MiB key chunk, or the largest query, with room to spare
Kind = Literal["int", "float", "str", "path", "pairs", "entries"]


class ConfigError(ValueError):
    """A setting that cannot be used, with where it came from."""


@dataclass(frozen=True)
class Option:
    """One setting of `heserve serve`."""

    name: str
    kind: Kind
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    flag: bool = True
    shown_default: str | None = None  # for --help, when `default` depends on the machine

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS: tuple[Option, ...] = (
    Option("host", "str", "127.0.0.1", "address to listen on"),
    Option("port", "int", 50051, "port to listen on (0: any free port)"),
    Option(
        "catalog",
        "pairs",
        (),
        "serve an .npy (n × d) or .npz (embeddings, ids) catalog as NAME; repeatable "
        "(environment: comma-separated; file: a list or a table). Without any, the "
        "embedded demo catalog is served",
        metavar="NAME=PATH",
    ),
    Option(
        "ids",
        "pairs",
        (),
        "item ids for an .npy catalog, one per line (default: row numbers)",
        metavar="NAME=PATH",
    ),
    Option(
        "preset",
        "str",
        DEFAULT_PRESET,
        "CKKS parameter preset; see the README for precision and speed of each",
        choices=tuple(sorted(PRESETS)),
    ),
    Option(
        "workers",
        "int",
        os.cpu_count() or 1,
        "worker processes holding catalog shards (0: score in the server process)",
        shown_default="one per core",
    ),
    Option(
        "backend",
        "str",
        "process",
        "where catalog shards live: worker processes on this machine (process) or Ray "
        "actors on a Ray cluster (ray, needs heserve[ray])",
        choices=("process", "ray"),
    ),
    Option(
        "ray-address",
        "str",
        None,
        "Ray cluster to join with --backend ray (e.g. ray://head:10001 or HOST:6379; "
        "default: RAY_ADDRESS, else a local Ray)",
        metavar="ADDRESS",
    ),
    Option(
        "memory-budget-mib",
        "int",
        None,
        "memory for encoded catalog chunks, in MiB; chunks past it are encoded per query",
        shown_default="no limit",
    ),
    Option(
        "flood-bits",
        "int",
        0,
        "noise flooding: fresh noise 2^BITS times the preset's CKKS noise on every score, "
        "so decrypted noise says nothing of the catalog; costs BITS bits of precision "
        "(0: off; see the README's threat model)",
        metavar="BITS",
    ),
    Option(
        "score-noise-std",
        "float",
        0.0,
        "Gaussian noise of this standard deviation on every score (differential privacy "
        "for the catalog; 0: off)",
        metavar="STD",
    ),
    Option("key-ttl", "int", 3600, "seconds an unused key lives"),
    Option("max-keys", "int", 256, "most key sets held"),
    Option("max-key-store-bytes", "int", 1 << 30, "most bytes of keys held"),
    Option("threads", "int", 8, "gRPC worker threads"),
    Option(
        "max-concurrent-rpcs",
        "int",
        32,
        "most calls running or queued at once, health checks included; the next gets "
        "RESOURCE_EXHAUSTED (0: no limit)",
    ),
    Option(
        "max-message-bytes",
        "int",
        4 << 20,
        f"largest gRPC message received or sent, at least {MIN_MESSAGE_BYTES}; "
        "GetServerInfo reports it and clients size their channels from it",
    ),
    Option("tls-cert", "path", None, "certificate chain (PEM): serve TLS", metavar="PATH"),
    Option("tls-key", "path", None, "private key of --tls-cert (PEM)", metavar="PATH"),
    Option(
        "tls-client-ca",
        "path",
        None,
        "CA certificate(s) (PEM): require mutual TLS, with client certificates it signed",
        metavar="PATH",
    ),
    Option(
        "tokens-file",
        "path",
        None,
        "API tokens, one NAME:TOKEN (or bare TOKEN) per line: every call but health "
        "checks must send 'authorization: Bearer TOKEN'; keys belong to the token that "
        "registered them",
        metavar="PATH",
    ),
    Option(
        "tokens",
        "entries",
        None,
        "API tokens as in --tokens-file, comma-separated; added to the file's",
        flag=False,
    ),
    Option(
        "query-budget",
        "int",
        0,
        "Score calls each token (or, without tokens, all callers together) may make per "
        "window; then RESOURCE_EXHAUSTED (0: unlimited)",
    ),
    Option("query-budget-window", "float", 3600.0, "seconds of one query budget window"),
    Option(
        "metrics-port",
        "int",
        0,
        "serve Prometheus metrics at http://METRICS-HOST:PORT/metrics (0: off)",
    ),
    Option("metrics-host", "str", "127.0.0.1", "address of the metrics endpoint"),
    Option("log-level", "str", "INFO", "least severe log level written", choices=LEVELS),
    Option(
        "log-format",
        "str",
        "text",
        "log lines as key=value pairs (text) or JSON objects (json), on standard error",
        choices=FORMATS,
    ),
    Option(
        "shutdown-grace",
        "float",
        5.0,
        "seconds in-flight calls get to finish after SIGTERM or SIGINT",
    ),
)
_BY_KEY = {key: option for option in OPTIONS for key in {option.name, option.dest}}


@dataclass(frozen=True)
class ServeConfig:
    """The resolved settings; `sources` says where each came from (flag, env, file, default)."""

    host: str
    port: int
    catalog: tuple[tuple[str, Path], ...]
    ids: tuple[tuple[str, Path], ...]
    preset: str
    workers: int
    backend: str
    ray_address: str | None
    memory_budget_mib: int | None
    flood_bits: int
    score_noise_std: float
    key_ttl: int
    max_keys: int
    max_key_store_bytes: int
    threads: int
    max_concurrent_rpcs: int
    max_message_bytes: int
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None
    tokens_file: Path | None
    tokens: str | None
    query_budget: int
    query_budget_window: float
    metrics_port: int
    metrics_host: str
    log_level: str
    log_format: str
    shutdown_grace: float
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        at_least = {
            "port": 0,
            "metrics_port": 0,
            "workers": 0,
            "memory_budget_mib": 0,
            "key_ttl": 1,
            "max_keys": 1,
            "max_key_store_bytes": 1,
            "threads": 1,
            "max_concurrent_rpcs": 0,
            "max_message_bytes": MIN_MESSAGE_BYTES,
            "query_budget": 0,
            "shutdown_grace": 0,
            "flood_bits": 0,
            "score_noise_std": 0,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{self._origin(name)}: must be at least {low}, not {value}")
        for name in ("port", "metrics_port"):
            if getattr(self, name) > 65535:
                raise ConfigError(f"{self._origin(name)}: not a port number")
        if self.query_budget_window <= 0:
            raise ConfigError(f"{self._origin('query_budget_window')}: must be positive")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls-cert and tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls-client-ca (mutual TLS) needs tls-cert and tls-key")

    def _origin(self, dest: str) -> str:
        option = _BY_KEY[dest]
        source = self.sources.get(dest, "default")
        return {"flag": f"--{option.name}", "env": option.env}.get(source, option.name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and a flag per option, each documenting its variable and default.

    Flags default to "not given" (argparse.SUPPRESS) so that `resolve` can tell a flag
    from a default.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"TOML file of settings (keys as the flags' names) [env {CONFIG_ENV}]",
    )
    for option in OPTIONS:
        if not option.flag:
            continue
        default = option.default
        shown = option.shown_default or ("none" if default in (None, ()) else default)
        text = f"{option.help} [env {option.env}; default: {shown}]".replace("%", "%%")
        parser.add_argument(
            f"--{option.name}",
            dest=option.dest,
            default=argparse.SUPPRESS,
            action="append" if option.kind == "pairs" else "store",
            metavar=_metavar(option),
            help=text,
        )


EPILOG = f"""\
Each setting comes from, first to last: its flag, its environment variable
(HESERVE_ and the flag's name in capitals with '_' for '-'), the config file
(--config or {CONFIG_ENV}; TOML, keys as the flags' names), its default.

Settings without a flag (so that they never show in a process listing):
  tokens   API tokens as in --tokens-file, comma-separated
           [env HESERVE_TOKENS; config file: tokens = "..." or a list]

Example heserve.toml:
  port = 50051
  catalog = ["books=books.npz"]      # or: [catalog] books = "books.npz"
  tls-cert = "server.pem"
  tls-key = "server-key.pem"
  tokens-file = "tokens.txt"
  query-budget = 1000
  metrics-port = 9464
"""


def _metavar(option: Option) -> str:
    if option.metavar:
        return option.metavar
    if option.choices:
        return "{" + ",".join(option.choices) + "}"
    if option.name.endswith(("port", "host")):
        return option.name.rpartition("-")[2].upper()
    return {"int": "N", "float": "SECONDS"}.get(option.kind, option.dest.upper())


def _pair(text: str, origin: str, base: Path | None) -> tuple[str, Path]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ConfigError(f"{origin}: expected NAME=PATH, got {text!r}")
    return name.strip(), _path(value.strip(), base)


def _path(text: str, base: Path | None) -> Path:
    path = Path(text).expanduser()
    return path if base is None or path.is_absolute() else base / path


def _convert(option: Option, value: object, origin: str, base: Path | None = None) -> Any:
    """A flag's or variable's string, or a TOML value, as the option's type."""
    kind = option.kind
    try:
        if kind == "pairs":
            if isinstance(value, str):
                items: list[object] = [part for part in value.split(",") if part.strip()]
            elif isinstance(value, dict):
                items = [f"{name}={path}" for name, path in value.items()]
            elif isinstance(value, list):
                items = value
            else:
                raise TypeError
            if not all(isinstance(item, str) for item in items):
                raise TypeError
            return tuple(_pair(str(item), origin, base) for item in items)
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise TypeError
            return int(value)
        if kind == "entries":  # a string, or (in a file) a list of strings, one entry each
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                return "\n".join(value)
            if not isinstance(value, str):
                raise TypeError
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        if kind == "path":
            return _path(value, base)
        if option.choices:
            chosen = value.upper() if option.name == "log-level" else value
            if chosen not in option.choices:
                raise ConfigError(f"{origin}: expected one of {', '.join(option.choices)}")
            return chosen
        return value
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        expected = {"pairs": "NAME=PATH entries", "int": "an integer", "float": "a number"}
        raise ConfigError(
            f"{origin}: expected {expected.get(kind, 'a string')}, got {value!r}"
        ) from None


def _file_settings(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    settings: dict[str, Any] = {}
    base = path.parent
    for key, value in document.items():
        option = _BY_KEY.get(key)
        if option is None:
            known = ", ".join(option.name for option in OPTIONS)
            raise ConfigError(f"config file {path}: unknown setting {key!r} (known: {known})")
        settings[option.dest] = _convert(option, value, f"{path}: {key}", base)
    return settings


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeConfig:
    """Merge flags (in `args`), environment and config file over the defaults."""
    given = vars(args)
    config_path = given.get("config") or (
        Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None
    )
    from_file = _file_settings(config_path) if config_path is not None else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        dest = option.dest
        if option.flag and dest in given:
            raw = given[dest]
            if option.kind == "pairs":
                raw = list(raw)
            values[dest] = _convert(option, raw, f"--{option.name}")
            sources[dest] = "flag"
        elif environ.get(option.env, "").strip():
            values[dest] = _convert(option, environ[option.env].strip(), option.env)
            sources[dest] = "env"
        elif dest in from_file:
            values[dest] = from_file[dest]
            sources[dest] = "file"
        else:
            values[dest] = option.default
            sources[dest] = "default"
    names = {f.name for f in fields(ServeConfig)} - {"sources"}
    assert names == set(values), names ^ set(values)
    return ServeConfig(**values, sources=sources)
