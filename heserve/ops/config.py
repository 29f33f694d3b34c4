"""`heserve` settings, declared once: each is a field of `Settings`.

A field's type, default, help and bounds are all there is to a setting; everything else
is derived from them: the flag `--max-keys 10`, the environment variable
`HESERVE_MAX_KEYS=10`, the config file key `max-keys = 10` (or `max_keys`), the line in
`--help`, the conversion and the range check. A flag beats the environment, which
beats the config file (`--config heserve.toml` or HESERVE_CONFIG, `serve` only), which
beats the default. `tokens` and `admin-tokens` have no flag, so that no token shows
in a process listing. Relative paths in the config file are relative to it.

Every setting is checked when it is resolved, before anything starts, and a bad one is
one line naming where it came from: numbers must be finite, in range, and not a nonzero
written value that parses to zero or to a denormal (`1e-400` would silently turn a
protection off); bounds follow the fields that carry a setting on the wire (key-ttl is
a uint32); a config file may not set one key twice (`query-budget` and `query_budget`);
addresses may not be empty. An error shows the offending value, truncated, unless the
setting holds secrets (`tokens`, `admin-tokens`): then only its type.

Each command takes some of the settings (an `OptionSet`): `serve` all of them, `demo`
the engine's and the logs', `recommend` the logs'. What a command does not take stays
at its default, whatever the environment says.
"""

from __future__ import annotations

import argparse
import decimal
import math
import os
import sys
import textwrap
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NewType

from heserve.ops.logs import FORMATS, LEVELS
from heserve.protocol.params import DEFAULT_PRESET, PRESETS

ENV_PREFIX = "HESERVE_"
CONFIG_ENV = "HESERVE_CONFIG"
MIN_MESSAGE_BYTES = 2 << 20  # a 1 MiB key chunk, or the largest query, with room to spare
UINT32_MAX = (1 << 32) - 1  # settings reported in uint32 fields of the protocol
INT32_MAX = (1 << 31) - 1  # gRPC's channel arguments are C ints
_SHOWN_VALUE_CHARS = 40  # an offending value is shown up to this many characters
Kind = Literal["int", "float", "str", "path", "pairs", "entries"]

Pairs = tuple[tuple[str, Path], ...]
"""NAME=PATH entries: repeated flags, a comma-separated variable, a TOML list or table."""
Entries = NewType("Entries", str)
"""Newline-separated entries: a string, or (in a TOML file) a list of strings."""

_OPTION = "heserve.option"  # the key of a field's Option in its metadata
_KINDS: dict[object, Kind] = {
    int: "int",
    float: "float",
    str: "str",
    Path: "path",
    Pairs: "pairs",
    Entries: "entries",
}


class ConfigError(ValueError):
    """A setting that cannot be used, with where it came from."""


@dataclass(frozen=True)
class Option:
    """One setting: what `Settings` declares for a field, with its derived spellings."""

    name: str  # the flag's and the config file's spelling: the field's name with '-'
    kind: Kind  # from the field's type
    default: Any
    help: str
    choices: tuple[str, ...] = ()  # matched case-insensitively; the value is the choice
    metavar: str | None = None
    flag: bool = True
    shown_default: str | None = None  # for --help, when `default` depends on the machine
    at_least: float | None = None
    at_most: float | None = None
    positive: bool = False
    out_of_range: str | None = None  # the message when above `at_most`
    secret: bool = False  # its value is never shown in an error

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def check(self, value: Any, origin: str) -> None:
        """Refuse a value outside the option's range, naming where it came from."""
        if value is None:
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{origin}: must be a finite number, not {value}")
        if self.at_least is not None and value < self.at_least:
            raise ConfigError(f"{origin}: must be at least {self.at_least}, not {value}")
        if self.positive and value <= 0:
            raise ConfigError(f"{origin}: must be positive")
        if self.at_most is not None and value > self.at_most:
            raise ConfigError(f"{origin}: {self.out_of_range or f'must be at most {self.at_most}'}")


def option(
    help: str,
    *,
    choices: Iterable[str] = (),
    metavar: str | None = None,
    flag: bool = True,
    shown_default: str | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    positive: bool = False,
    out_of_range: str | None = None,
    secret: bool = False,
) -> dict[str, Option]:
    """A `Settings` field's metadata: its Option but for the name, kind and default, which
    come from the field's name, type and default."""
    filled_in_later: dict[str, Any] = {"name": "", "kind": "str", "default": None}
    details = Option(
        **filled_in_later,
        help=help,
        choices=tuple(choices),
        metavar=metavar,
        flag=flag,
        shown_default=shown_default,
        at_least=at_least,
        at_most=at_most,
        positive=positive,
        out_of_range=out_of_range,
        secret=secret,
    )
    return {_OPTION: details}


def port_option(help: str) -> dict[str, Option]:
    """A TCP port number: 0 (any free port, or off) to 65535."""
    return option(help, at_least=0, at_most=65535, out_of_range="not a port number")


@dataclass(frozen=True)
class Settings:
    """The resolved settings; `sources` says where each came from (flag, env, file, default)."""

    host: str = field(default="127.0.0.1", metadata=option("address to listen on"))
    port: int = field(default=50051, metadata=port_option("port to listen on (0: any free port)"))
    catalog: Pairs = field(
        default=(),
        metadata=option(
            "serve an .npy (n × d), .npz (embeddings, ids) or .parquet (columns id and "
            "embedding; PATH#id:embedding[:popularity] names others) catalog as NAME; "
            "repeatable "
            "(environment: comma-separated; file: a list or a table). Without any, the "
            "embedded demo catalog is served. Catalogs merge by NAME across the config "
            "file, the environment and the flags: a later source's NAME replaces the "
            "earlier one's, other names stay",
            metavar="NAME=PATH",
        ),
    )
    ids: Pairs = field(
        default=(),
        metadata=option(
            "item ids for an .npy catalog, one per line (default: row numbers). They travel "
            "with their catalog: ids given where a catalog's NAME was replaced are dropped "
            "with it, unless given again beside the new one",
            metavar="NAME=PATH",
        ),
    )
    preset: str = field(
        default=DEFAULT_PRESET,
        metadata=option(
            "CKKS parameter preset; see the README for precision and speed of each",
            choices=sorted(PRESETS),
        ),
    )
    workers: int = field(
        default=os.cpu_count() or 1,
        metadata=option(
            "worker processes holding catalog shards (0: score in the server process)",
            shown_default="one per core",
            at_least=0,
        ),
    )
    backend: str = field(
        default="process",
        metadata=option(
            "where catalog shards live: worker processes on this machine (process) or Ray "
            "actors on a Ray cluster (ray, needs heserve[ray])",
            choices=("process", "ray"),
        ),
    )
    ray_address: str | None = field(
        default=None,
        metadata=option(
            "Ray cluster to join with --backend ray (e.g. ray://head:10001 or HOST:6379; "
            "default: RAY_ADDRESS, else a local Ray)",
            metavar="ADDRESS",
        ),
    )
    memory_budget_mib: int | None = field(
        default=None,
        metadata=option(
            "memory for encoded catalog chunks, in MiB; chunks past it are encoded per query",
            shown_default="no limit",
            at_least=0,
        ),
    )
    flood_bits: int = field(
        default=0,
        metadata=option(
            "noise flooding: fresh noise 2^BITS times the preset's CKKS noise on every score, "
            "which bounds (not closes) what the decrypted noise tells of the catalog; costs "
            "BITS bits of precision "
            "(0: off). Calibrated to a query of norm <= 1: a client that scales its query "
            "by 10^k makes this noise 10^k times smaller relative to its scores, so against "
            "a malicious client it does little and the query budget is the defence (see "
            "docs/threat-model.md)",
            metavar="BITS",
            at_least=0,
            at_most=40,
        ),
    )
    score_noise_std: float = field(
        default=0.0,
        metadata=option(
            "Gaussian noise of this standard deviation on every score (differential privacy "
            "for the catalog, only for queries of norm <= 1, which the server cannot check "
            "on an encrypted vector: a client that scales its query by 10^k makes the noise "
            "10^k times smaller relative to its scores; against it only the query budget "
            "holds; see docs/threat-model.md; 0: off)",
            metavar="STD",
            at_least=0,
        ),
    )
    key_ttl: int = field(
        default=3600,
        metadata=option("seconds an unused key lives", at_least=1, at_most=UINT32_MAX),
    )
    max_keys: int = field(
        default=256, metadata=option("most key sets held", at_least=1, at_most=UINT32_MAX)
    )
    max_keys_per_caller: int = field(
        default=0,
        metadata=option(
            "most key sets one caller (token) holds; past it the caller's own least "
            "recently used goes, never another's (0: a quarter of --max-keys)",
            at_least=0,
            at_most=UINT32_MAX,
        ),
    )
    max_key_store_bytes: int = field(
        default=1 << 30,
        metadata=option("most bytes of keys held", at_least=1, at_most=(1 << 64) - 1),
    )
    threads: int = field(default=8, metadata=option("gRPC worker threads", at_least=1))
    max_concurrent_rpcs: int = field(
        default=32,
        metadata=option(
            "most calls running or queued at once, health checks included; the next gets "
            "RESOURCE_EXHAUSTED (0: no limit)",
            at_least=0,
        ),
    )
    max_calls_per_caller: int = field(
        default=32,
        metadata=option(
            "calls one caller (its token's name; without tokens, its address) may run at "
            "once; the next gets RESOURCE_EXHAUSTED at once",
            at_least=1,
        ),
    )
    max_streams_per_caller: int = field(
        default=8,
        metadata=option(
            "of those, streaming calls (RegisterKeys, Score, health Watch): a caller cannot "
            "starve the others by holding streams open",
            at_least=1,
        ),
    )
    upload_idle_seconds: float = field(
        default=30.0,
        metadata=option(
            "a key upload that sends nothing for this long ends DEADLINE_EXCEEDED",
            at_least=0.1,
        ),
    )
    upload_total_seconds: float = field(
        default=300.0,
        metadata=option(
            "a key upload not complete after this long ends DEADLINE_EXCEEDED", at_least=1.0
        ),
    )
    max_message_bytes: int = field(
        default=4 << 20,
        metadata=option(
            f"largest gRPC message received or sent, at least {MIN_MESSAGE_BYTES}; "
            "GetServerInfo reports it and clients size their channels from it",
            at_least=MIN_MESSAGE_BYTES,
            at_most=INT32_MAX,
        ),
    )
    tls_cert: Path | None = field(
        default=None, metadata=option("certificate chain (PEM): serve TLS", metavar="PATH")
    )
    tls_key: Path | None = field(
        default=None, metadata=option("private key of --tls-cert (PEM)", metavar="PATH")
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata=option(
            "CA certificate(s) (PEM): require mutual TLS, with client certificates it signed",
            metavar="PATH",
        ),
    )
    tokens_file: Path | None = field(
        default=None,
        metadata=option(
            "API tokens, one NAME:TOKEN (or bare TOKEN) per line: every call but health "
            "checks must send 'authorization: Bearer TOKEN'; keys belong to the token that "
            "registered them",
            metavar="PATH",
        ),
    )
    tokens: Entries | None = field(
        default=None,
        metadata=option(
            "API tokens as in --tokens-file, comma-separated; added to the file's",
            flag=False,
            secret=True,
        ),
    )
    admin_tokens_file: Path | None = field(
        default=None,
        metadata=option(
            "admin tokens, as in --tokens-file: serve the catalog admin service "
            "(heserve.admin.v1: reload catalogs, upsert and delete items) to callers "
            "sending 'authorization: Bearer ADMIN_TOKEN'; without admin tokens it is not "
            "served. An admin token may not also be an API token",
            metavar="PATH",
        ),
    )
    admin_tokens: Entries | None = field(
        default=None,
        metadata=option(
            "admin tokens as in --admin-tokens-file, comma-separated; added to the file's",
            flag=False,
            secret=True,
        ),
    )
    query_budget: int = field(
        default=0,
        metadata=option(
            "Score calls each token (or, without tokens, all callers together) may make per "
            "window; then RESOURCE_EXHAUSTED (0: unlimited)",
            at_least=0,
        ),
    )
    query_budget_window: float = field(
        default=3600.0, metadata=option("seconds of one query budget window", positive=True)
    )
    metrics_port: int = field(
        default=0,
        metadata=port_option(
            "serve Prometheus metrics at http://METRICS-HOST:PORT/metrics (0: off)"
        ),
    )
    metrics_host: str = field(
        default="127.0.0.1", metadata=option("address of the metrics endpoint")
    )
    log_level: str = field(
        default="INFO",
        metadata=option(
            "least severe log level written",
            choices=LEVELS,
            shown_default="INFO for serve, WARNING for demo and recommend",
        ),
    )
    log_format: str = field(
        default="text",
        metadata=option(
            "log lines as key=value pairs (text) or JSON objects (json), on standard error",
            choices=FORMATS,
        ),
    )
    shutdown_grace: float = field(
        default=5.0,
        metadata=option(
            "seconds in-flight calls get to finish after SIGTERM or SIGINT", at_least=0
        ),
    )
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for option in OPTIONS:
            option.check(getattr(self, option.dest), self._origin(option))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls-cert and tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls-client-ca (mutual TLS) needs tls-cert and tls-key")
        for name in ("host", "metrics_host", "ray_address"):
            address = getattr(self, name)
            if address is not None and (not address or any(c.isspace() for c in address)):
                raise ConfigError(
                    f"{self._origin(_BY_KEY[name])}: an address, not empty and without blanks "
                    "(127.0.0.1: this machine only; 0.0.0.0: every interface)"
                )

    def _origin(self, option: Option) -> str:
        source = self.sources.get(option.dest, "default")
        return {"flag": f"--{option.name}", "env": option.env}.get(source, option.name)


def _kind(hint: object, name: str) -> Kind:
    """The kind of a field's type (`X | None` as X)."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is not tuple and len(arguments) == 1:
        hint = arguments[0]
    kind = _KINDS.get(hint)
    if kind is None:
        raise TypeError(f"Settings.{name}: no setting kind for type {hint!r}")
    return kind


def _options() -> tuple[Option, ...]:
    hints = typing.get_type_hints(Settings)
    return tuple(
        replace(
            f.metadata[_OPTION],
            name=f.name.replace("_", "-"),
            kind=_kind(hints[f.name], f.name),
            default=f.default,
        )
        for f in fields(Settings)
        if _OPTION in f.metadata
    )


OPTIONS: tuple[Option, ...] = _options()
_BY_KEY = {key: option for option in OPTIONS for key in {option.name, option.dest}}


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


class _TomlFloat(float):
    """A float from a TOML file that remembers how it was written (tomllib's parse_float),
    so that `1e-400`, which parses to 0.0, can be told from `0.0`."""

    text: str

    def __new__(cls, text: str) -> _TomlFloat:
        value = super().__new__(cls, text)
        value.text = text
        return value


def _float(value: int | float | str, origin: str) -> float:
    """A finite float that is zero only if written as zero, and never a denormal."""
    text = getattr(value, "text", None) or (value if isinstance(value, str) else None)
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{origin}: must be a finite number, not {number}")
    if text is not None and abs(number) < sys.float_info.min:
        try:
            written = decimal.Decimal(text.replace("_", "").strip())
        except decimal.InvalidOperation:
            written = decimal.Decimal(number)
        if written != 0:
            raise ConfigError(
                f"{origin}: {_shown(text)} is too small for a float (it would be "
                f"{number:g}); write 0 for off, or at least {sys.float_info.min:g}"
            )
    return number


def _shown(value: object) -> str:
    """`value` for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[: _SHOWN_VALUE_CHARS - 3] + "..."


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
            return _float(value, origin)
        if not isinstance(value, str):
            raise TypeError
        if kind == "path":
            if not value.strip():
                raise ConfigError(f"{origin}: expected a path, got an empty string")
            return _path(value, base)
        if option.choices:
            chosen = {choice.casefold(): choice for choice in option.choices}.get(value.casefold())
            if chosen is None:
                raise ConfigError(f"{origin}: expected one of {', '.join(option.choices)}")
            return chosen
        return value
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        expected = {
            "pairs": "NAME=PATH entries",
            "int": "an integer",
            "float": "a number",
            "entries": "a string or a list of strings",
        }
        # A secret setting's value is never shown: it may be (or hold) a token.
        got = f"a value of type {type(value).__name__}" if option.secret else _shown(value)
        wanted = expected.get(kind, "a string")
        raise ConfigError(f"{origin}: expected {wanted}, got {got}") from None


def _file_settings(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            document = tomllib.load(file, parse_float=_TomlFloat)
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
            raise ConfigError(f"config file {path}: unknown setting {_shown(key)} (known: {known})")
        if option.dest in settings:
            raise ConfigError(
                f"config file {path}: {option.name} is set twice ({option.name} and "
                f"{option.dest} are one setting); keep one"
            )
        settings[option.dest] = _convert(option, value, f"{path}: {key}", base)
    return settings


_CATALOG_PAIRS = ("catalog", "ids")
_SOURCE_ORDER = ("file", "env", "flag")


def _merged_catalogs(layers: dict[str, dict[str, Pairs]]) -> tuple[Pairs, Pairs]:
    """The catalogs and ids of every source, merged by NAME, later sources first.

    A later source's NAME=PATH replaces an earlier source's entry of that NAME, and the
    ids travel with their catalog: ids from a source earlier than the one whose catalog
    won are dropped with the catalog they were for. So a --catalog flag no longer
    throws away the config file's other catalogs, nor attaches the file's ids to
    another file than theirs (issue 12, finding 8).
    """
    catalogs: dict[str, tuple[Path, int]] = {}
    ids: dict[str, tuple[Path, int]] = {}
    for rank, source in enumerate(_SOURCE_ORDER):
        layer = layers.get(source, {})
        for name, path in layer.get("catalog", ()):
            catalogs[name] = (path, rank)
        for name, path in layer.get("ids", ()):
            ids[name] = (path, rank)
    kept_ids = tuple(
        (name, path)
        for name, (path, rank) in ids.items()
        if name not in catalogs or rank >= catalogs[name][1]
    )
    return tuple((name, path) for name, (path, _) in catalogs.items()), kept_ids


@dataclass(frozen=True)
class OptionSet:
    """The settings one command takes: its flags, and how they resolve into `Settings`.

    `defaults` replaces the table's default for this command (by field name);
    `config_file` adds `--config` (and HESERVE_CONFIG) as the lowest source but defaults.
    """

    names: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    config_file: bool = False

    def __post_init__(self) -> None:
        unknown = {name for name in self.names if name not in _BY_KEY} | {
            name for name in self.defaults if name not in _BY_KEY
        }
        if unknown:
            raise ValueError(f"no such settings: {sorted(unknown)}")

    @property
    def options(self) -> tuple[Option, ...]:
        return tuple(option for option in OPTIONS if option.name in self.names)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add a flag per option (and `--config`), each documenting its variable and default.

        Flags default to "not given" (argparse.SUPPRESS) so that `resolve` can tell a flag
        from a default, and so that a flag given both before and after the subcommand
        keeps the later one.
        """
        if self.config_file:
            parser.add_argument(
                "--config",
                type=Path,
                default=argparse.SUPPRESS,
                metavar="PATH",
                help=f"TOML file of settings (keys as the flags' names) [env {CONFIG_ENV}]",
            )
        for option in self.options:
            if not option.flag:
                continue
            default = self.defaults.get(option.dest, option.default)
            shown = (None if option.dest in self.defaults else option.shown_default) or (
                "none" if default in (None, ()) else default
            )
            text = f"{option.help} [env {option.env}; default: {shown}]".replace("%", "%%")
            parser.add_argument(
                f"--{option.name}",
                dest=option.dest,
                default=argparse.SUPPRESS,
                action="append" if option.kind == "pairs" else "store",
                metavar=_metavar(option),
                help=text,
            )

    def resolve(self, args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
        """Merge flags (in `args`), environment and config file over the defaults."""
        given = vars(args)
        config_path = None
        if self.config_file:
            config_path = given.get("config") or (
                Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None
            )
        from_file = _file_settings(config_path) if config_path is not None else {}
        values: dict[str, Any] = dict(self.defaults)
        sources: dict[str, str] = {}
        # catalog and ids merge by NAME, source over source (see _merged_catalogs)
        layers: dict[str, dict[str, Pairs]] = {}
        for option in self.options:
            dest = option.dest
            if dest in _CATALOG_PAIRS:
                found: dict[str, Pairs] = {}
                if dest in from_file:
                    found["file"] = from_file[dest]
                if environ.get(option.env, "").strip():
                    found["env"] = _convert(option, environ[option.env].strip(), option.env)
                if option.flag and dest in given:
                    found["flag"] = _convert(option, list(given[dest]), f"--{option.name}")
                for source, pairs in found.items():
                    layers.setdefault(source, {})[dest] = pairs
                if found:
                    sources[dest] = list(found)[-1]  # the source whose entries win
                continue
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
        if layers:
            values["catalog"], values["ids"] = _merged_catalogs(layers)
        sources = {option.dest: sources.get(option.dest, "default") for option in OPTIONS}
        return Settings(**values, sources=sources)

    def epilog(self) -> str:
        """The sources in order, the settings without a flag, and (with a file) an example."""
        sources = [
            "its flag",
            "its environment variable (HESERVE_ and the flag's name in capitals with '_' for '-')",
        ]
        if self.config_file:
            sources.append(
                f"the config file (--config or {CONFIG_ENV}; TOML, keys as the flags' names)"
            )
        sources.append("its default")
        subject = "Each setting" if self.config_file else "Each setting marked [env ...]"
        lines = textwrap.wrap(f"{subject} comes from, first to last: {', '.join(sources)}.", 78)
        hidden = [option for option in self.options if not option.flag]
        if hidden:
            lines += ["", "Settings without a flag (so that they never show in a process listing):"]
            width = max(8, *(len(option.name) for option in hidden))
            for option in hidden:
                where = f"[env {option.env}"
                where += (
                    f'; config file: {option.name} = "..." or a list' if self.config_file else ""
                )
                lines += [f"  {option.name:<{width}} {option.help}", f"  {'':<{width}} {where}]"]
        if self.config_file:
            lines += ["", "Example heserve.toml:", *(f"  {line}" for line in EXAMPLE.splitlines())]
        return "\n".join(lines) + "\n"


EXAMPLE = """\
port = 50051
catalog = ["books=books.npz"]      # or: [catalog] books = "books.npz"
tls-cert = "server.pem"
tls-key = "server-key.pem"
tokens-file = "tokens.txt"
query-budget = 1000
metrics-port = 9464
"""
"""The config file example --help shows (tests resolve it)."""

_CLIENT_DEFAULTS = {"log_level": "WARNING"}  # these commands print results; INFO would bury them
LOGGING = OptionSet(("log-level", "log-format"))
"""The settings every command takes, before or after the command's name."""
SERVE = OptionSet(tuple(option.name for option in OPTIONS), config_file=True)
DEMO = OptionSet(("preset", "workers", "memory-budget-mib", *LOGGING.names), _CLIENT_DEFAULTS)
RECOMMEND = OptionSet(LOGGING.names, _CLIENT_DEFAULTS)
