"""The table of settings (heserve.ops.config): every option's flag, environment variable
and config file key resolve to the same `Settings` field, flags over environment over
file over default; `--help` shows every option; each command takes the options it
declares, and `--log-level` goes before or after the command's name. Then the same
through the `heserve` command: merging, refusals that name their source, a real
`heserve serve` and `heserve demo`.

The table tests are generated from `config.OPTIONS`, so that an option added to the
table is tested without editing this file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from heserve.domain.catalog import unit_rows
from heserve.ops import config
from heserve.ops.cli import build_parser

OPTIONS = {option.name: option for option in config.OPTIONS}
FLAGGED = [option.name for option in config.OPTIONS if option.flag]
# Settings that are refused alone, and what each needs beside it (given in the environment).
COMPANIONS = {
    "tls-cert": {"HESERVE_TLS_KEY": "key.pem"},
    "tls-key": {"HESERVE_TLS_CERT": "cert.pem"},
    "tls-client-ca": {"HESERVE_TLS_CERT": "cert.pem", "HESERVE_TLS_KEY": "key.pem"},
}


def _samples(option: config.Option) -> tuple[str, str]:
    """Two distinct valid values of `option`, as a flag would spell them; the first is
    not its default (so that any source giving it is seen to win over the default)."""
    if option.choices:
        others = [choice for choice in option.choices if choice != option.default]
        return others[0], others[1] if len(others) > 1 else str(option.default)
    if option.kind == "int":
        low = int(option.at_least or 0)
        first = low + 1 if low + 1 != option.default else low + 2
        return str(first), str(first + 1)
    if option.kind == "float":
        floor = float(option.at_least or 0)
        return str(floor + 0.25), str(floor + 0.5)
    if option.kind == "path":
        return "one.pem", "two.pem"
    if option.kind == "pairs":  # one NAME: pairs merge by NAME, a later source's wins
        return "one=one.npy", "one=two.npy"
    if option.kind == "entries":
        return "alice:" + "a" * 20, "bob:" + "b" * 20
    return "value-one", "value-two"


def _toml(option: config.Option, raw: str) -> str:
    """`raw` as a TOML value of the option's kind."""
    if option.kind in ("int", "float"):
        return raw
    if option.kind == "pairs":
        return json.dumps([raw])
    return json.dumps(raw)


def _expected(option: config.Option, raw: str, base: Path | None) -> Any:
    """What `raw` resolves to, from the config file in `base` or (None) a flag or variable."""

    def path(text: str) -> Path:
        return Path(text) if base is None else base / text

    if option.kind == "int":
        return int(raw)
    if option.kind == "float":
        return float(raw)
    if option.kind == "path":
        return path(raw)
    if option.kind == "pairs":
        name, _, value = raw.partition("=")
        return ((name, path(value)),)
    return raw


def _resolve(
    options: config.OptionSet, argv: list[str], environ: dict[str, str]
) -> config.Settings:
    return options.resolve(build_parser().parse_args(argv), environ)


class Sources:
    """One option given by any of flag, environment and config file, resolved by `serve`."""

    def __init__(self, option: config.Option, tmp_path: Path, key: str | None = None) -> None:
        self.option = option
        self.file = tmp_path / "conf" / "heserve.toml"
        self.file.parent.mkdir(exist_ok=True)
        self.key = key or option.name

    def resolve(
        self, flag: str | None = None, env: str | None = None, file: str | None = None
    ) -> config.Settings:
        argv = ["serve"]
        given = (flag, env, file) != (None, None, None)
        environ = dict(COMPANIONS.get(self.option.name, {})) if given else {}
        if flag is not None:
            argv += [f"--{self.option.name}", flag]
        if env is not None:
            environ[self.option.env] = env
        if file is not None:
            self.file.write_text(f"{self.key} = {_toml(self.option, file)}\n")
            argv += ["--config", str(self.file)]
        return _resolve(config.SERVE, argv, environ)


@pytest.mark.parametrize("name", FLAGGED)
def test_flag_environment_and_file_set_the_same_field_flag_first(tmp_path: Path, name: str) -> None:
    option = OPTIONS[name]
    given = Sources(option, tmp_path)
    base = given.file.parent
    wins, loses = _samples(option)

    def value(settings: config.Settings) -> Any:
        return getattr(settings, option.dest)

    settings = given.resolve()
    assert value(settings) == option.default and settings.sources[option.dest] == "default"

    settings = given.resolve(file=wins)
    assert value(settings) == _expected(option, wins, base)
    assert settings.sources[option.dest] == "file"

    settings = given.resolve(env=wins, file=loses)
    assert value(settings) == _expected(option, wins, None)
    assert settings.sources[option.dest] == "env"

    settings = given.resolve(flag=wins, env=loses, file=loses)
    assert value(settings) == _expected(option, wins, None)
    assert settings.sources[option.dest] == "flag"

    settings = given.resolve(flag=wins, env=loses)
    assert value(settings) == _expected(option, wins, None)


@pytest.mark.parametrize("name", [option.name for option in config.OPTIONS if "-" in option.name])
def test_config_file_takes_the_field_name_as_well(tmp_path: Path, name: str) -> None:
    option = OPTIONS[name]
    wins, _ = _samples(option)

    settings = Sources(option, tmp_path, key=option.dest).resolve(file=wins)

    assert getattr(settings, option.dest) == _expected(option, wins, tmp_path / "conf")
    assert settings.sources[option.dest] == "file"


@pytest.mark.parametrize("name", [option.name for option in config.OPTIONS if not option.flag])
def test_settings_without_a_flag_come_from_environment_over_file(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    option = OPTIONS[name]
    given = Sources(option, tmp_path)
    wins, loses = _samples(option)

    assert getattr(given.resolve(file=wins), option.dest) == wins
    settings = given.resolve(env=wins, file=loses)
    assert getattr(settings, option.dest) == wins and settings.sources[option.dest] == "env"
    assert getattr(given.resolve(), option.dest) == option.default

    with pytest.raises(SystemExit):  # no flag, so that it never shows in a process listing
        build_parser().parse_args(["serve", f"--{option.name}", wins])
    assert "unrecognized arguments" in capsys.readouterr().err


BOUNDED = [
    option.name
    for option in config.OPTIONS
    if option.flag
    and (option.at_least is not None or option.at_most is not None or option.positive)
]


@pytest.mark.parametrize("name", BOUNDED)
def test_values_out_of_range_are_refused_naming_the_flag_and_the_bounds_accepted(
    name: str,
) -> None:
    option = OPTIONS[name]
    step = 1 if option.kind == "int" else 0.5
    refused: list[float] = []
    accepted: list[float] = []
    if option.at_least is not None:
        refused.append(option.at_least - step)
        accepted.append(option.at_least)
    if option.at_most is not None:
        refused.append(option.at_most + step)
        accepted.append(option.at_most)
    if option.positive:
        refused.append(0)
        accepted.append(step)
    for value in refused:
        with pytest.raises(config.ConfigError, match=f"^--{name}: "):
            _resolve(config.SERVE, ["serve", f"--{name}", str(value)], {})
    for value in accepted:
        settings = _resolve(config.SERVE, ["serve", f"--{name}", str(value)], {})
        assert getattr(settings, option.dest) == value


def test_every_settings_field_is_an_option_with_the_field_default() -> None:
    settings = config.Settings()
    names = {f.name for f in fields(config.Settings)} - {"sources"}
    assert names == {option.dest for option in config.OPTIONS}
    for option in config.OPTIONS:
        assert getattr(settings, option.dest) == option.default, option.name
        assert option.env == "HESERVE_" + option.name.replace("-", "_").upper()
    assert OPTIONS["catalog"].kind == "pairs" and OPTIONS["tokens"].kind == "entries"
    assert OPTIONS["tls-cert"].kind == "path" and OPTIONS["memory-budget-mib"].kind == "int"
    assert config.SERVE.names == tuple(OPTIONS)


def test_choices_are_matched_without_case_and_kept_as_declared() -> None:
    settings = _resolve(
        config.SERVE,
        ["serve", "--log-level", "debug", "--preset", "FAST"],
        {"HESERVE_LOG_FORMAT": "JSON"},
    )
    assert (settings.log_level, settings.preset, settings.log_format) == ("DEBUG", "fast", "json")


def _help(*argv: str) -> str:
    parser = build_parser()
    if argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = actions[0].choices[argv[0]]
    return " ".join(parser.format_help().split())  # undo the wrapping


@pytest.mark.parametrize(
    ("command", "options"),
    [("serve", config.SERVE), ("demo", config.DEMO), ("recommend", config.RECOMMEND)],
)
def test_help_lists_each_option_a_command_takes_with_its_variable_help_and_default(
    command: str, options: config.OptionSet
) -> None:
    text = _help(command)
    for option in config.OPTIONS:
        taken = option.name in options.names
        assert (f"[env {option.env};" in text) == taken, (command, option.name)
        if not taken:
            continue
        assert "".join(option.help.split()) in "".join(text.split()), option.name
        if not option.flag:  # listed apart, with its variable
            assert f"--{option.name} " not in text, option.name
            assert re.search(rf"\b{option.name}\b .* \[env {option.env};", text), option.name
            continue
        assert f"--{option.name} " in text, option.name
        default = options.defaults.get(option.dest, option.default)
        shown = (None if option.dest in options.defaults else option.shown_default) or (
            "none" if default in (None, ()) else default
        )
        assert f"[env {option.env}; default: {shown}]" in text, option.name
    assert ("--config PATH" in text) == options.config_file
    assert "first to last: its flag, its environment variable" in text


def test_top_level_help_lists_the_options_every_command_takes() -> None:
    text = _help()
    for name in config.LOGGING.names:
        assert f"--{name} " in text and f"[env {OPTIONS[name].env};" in text
    assert "INFO for serve, WARNING for demo and recommend" in text


def test_the_help_example_config_file_resolves(tmp_path: Path) -> None:
    (tmp_path / "heserve.toml").write_text(config.EXAMPLE)

    settings = _resolve(config.SERVE, ["serve", "--config", str(tmp_path / "heserve.toml")], {})

    assert settings.catalog == (("books", tmp_path / "books.npz"),)
    assert settings.tls_cert == tmp_path / "server.pem"
    assert (settings.query_budget, settings.metrics_port) == (1000, 9464)
    assert "Example heserve.toml:" in _help("serve")
    assert all(line in _help("serve") for line in config.EXAMPLE.splitlines() if "#" not in line)


RECOMMEND = ["recommend", "--server", "h:1", "--catalog", "c", "--vector", "u.npy"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", *RECOMMEND],
        [*RECOMMEND, "--log-level", "debug"],
        ["--log-level", "error", *RECOMMEND, "--log-level", "debug"],  # the later one
        ["--log-level", "debug", "demo"],
        ["demo", "--log-level", "debug"],
        ["--log-level", "debug", "serve"],
        ["serve", "--log-level", "debug"],
    ],
)
def test_log_level_goes_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    settings = args.options.resolve(args, {})
    assert settings.log_level == "DEBUG" and settings.sources["log_level"] == "flag"


def test_commands_other_than_serve_log_warnings_by_default_and_read_their_variables() -> None:
    for argv in (RECOMMEND, ["demo"]):
        args = build_parser().parse_args(argv)
        assert args.options.resolve(args, {}).log_level == "WARNING"
        settings = args.options.resolve(args, {"HESERVE_LOG_LEVEL": "info"})
        assert settings.log_level == "INFO" and settings.sources["log_level"] == "env"
    assert _resolve(config.SERVE, ["serve"], {}).log_level == "INFO"


def test_demo_takes_the_engine_settings_of_serve_and_nothing_else() -> None:
    environ = {
        "HESERVE_PRESET": "fast",
        "HESERVE_MEMORY_BUDGET_MIB": "64",
        "HESERVE_PORT": "not a port",  # serve's, not demo's: not read
        "HESERVE_BACKEND": "ray",
        "HESERVE_CONFIG": "/nonexistent/heserve.toml",  # demo reads no config file
    }
    settings = _resolve(config.DEMO, ["demo", "--workers", "0"], environ)

    assert (settings.preset, settings.workers, settings.memory_budget_mib) == ("fast", 0, 64)
    assert settings.sources["workers"] == "flag" and settings.sources["preset"] == "env"
    assert (settings.backend, settings.port) == ("process", 50051)
    assert settings.sources["backend"] == "default"
    with pytest.raises(config.ConfigError, match="--workers: must be at least 0"):
        _resolve(config.DEMO, ["demo", "--workers", "-1"], {})
    with pytest.raises(config.ConfigError, match="--preset: expected one of"):
        _resolve(config.DEMO, ["demo", "--preset", "turbo"], {})


def test_an_option_set_names_only_settings_of_the_table() -> None:
    with pytest.raises(ValueError, match="no such settings"):
        config.OptionSet(("port", "colour"))
    with pytest.raises(ValueError, match="no such settings"):
        config.OptionSet(("port",), {"colour": "blue"})


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HESERVE_")}
    env.pop("PYTHONUNBUFFERED", None)
    return env


def test_one_logging_setup_for_every_command_in_the_chosen_format(tmp_path: Path) -> None:
    """A real `heserve demo`: --log-format before the command and --log-level after it
    both reach the one logging setup; without --log-level, demo logs warnings only."""
    demo = ["demo", "--items", "300", "--dimension", "8", "-k", "3", "--workers", "0"]

    def run(*argv: str) -> list[dict[str, Any]]:
        result = subprocess.run(
            [sys.executable, "-m", "heserve.ops.cli", *argv],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "encrypted ranking equals plaintext ranking: yes" in result.stdout
        return [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]

    records = run("--log-format", "json", *demo, "--log-level", "INFO")
    assert any(r["msg"].startswith("heserve listening") for r in records), records
    assert any(r["logger"] == "heserve.access" for r in records)
    assert {r["level"] for r in records} <= {"INFO", "WARNING", "ERROR", "CRITICAL"}

    quiet = run("--log-format", "json", *demo)
    assert all(r["level"] in {"WARNING", "ERROR", "CRITICAL"} for r in quiet), quiet


def _metric(port: int, name: str) -> float:
    """The value of the unlabelled sample `name` at http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name} at port {port}")


def _serve(argv: list[str], environ: dict[str, str]) -> config.Settings:
    return _resolve(config.SERVE, ["serve", *argv], environ)


def test_settings_take_flags_over_environment_over_file_over_defaults(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    file = tmp_path / "conf" / "heserve.toml"
    file.write_text(
        'port = 3333\nmax-keys = 5\nkey_ttl = 99\nlog-level = "debug"\n'
        'tokens = ["alice:' + "a" * 20 + '"]\n'
        'tls-cert = "certs/server.pem"\ntls-key = "/abs/key.pem"\n'
        '[catalog]\nbooks = "books.npz"\n'
    )
    environ = {
        "HESERVE_CONFIG": str(file),
        "HESERVE_PORT": "2222",
        "HESERVE_MAX_KEYS": "7",
        "HESERVE_CATALOG": "films=films.npy,music=music.npy",
        "HESERVE_THREADS": "",  # empty: not set
        "UNRELATED": "1",
    }

    settings = _serve(["--port", "1111", "--catalog", "x=x.npy"], environ)

    assert settings.port == 1111 and settings.sources["port"] == "flag"
    assert settings.max_keys == 7 and settings.sources["max_keys"] == "env"
    assert settings.key_ttl == 99 and settings.sources["key_ttl"] == "file"
    assert settings.log_level == "DEBUG"
    assert settings.threads == 8 and settings.sources["threads"] == "default"
    # catalogs merge by NAME across the sources (issue 12, finding 8)
    assert settings.catalog == (
        ("books", tmp_path / "conf" / "books.npz"),
        ("films", Path("films.npy")),
        ("music", Path("music.npy")),
        ("x", Path("x.npy")),
    )
    assert settings.tokens == "alice:" + "a" * 20
    # paths in the file are relative to the file
    assert settings.tls_cert == tmp_path / "conf" / "certs" / "server.pem"
    assert settings.tls_key == Path("/abs/key.pem")

    settings = _serve([], environ)
    assert settings.port == 2222
    assert settings.catalog == (
        ("books", tmp_path / "conf" / "books.npz"),
        ("films", Path("films.npy")),
        ("music", Path("music.npy")),
    )

    settings = _serve([], {"HESERVE_CONFIG": str(file)})
    assert settings.port == 3333
    assert settings.catalog == (("books", tmp_path / "conf" / "books.npz"),)

    other = tmp_path / "other.toml"
    other.write_text("port = 4444\n")
    assert _serve(["--config", str(other)], {"HESERVE_CONFIG": str(file)}).port == 4444

    defaults = _serve([], {})
    assert (defaults.port, defaults.host, defaults.max_concurrent_rpcs) == (50051, "127.0.0.1", 32)
    assert defaults.tls_cert is None and defaults.tokens_file is None
    assert set(defaults.sources.values()) == {"default"}


@pytest.mark.parametrize(
    ("argv", "environ", "file", "message"),
    [
        (["--port", "x"], {}, None, "--port: expected an integer"),
        ([], {"HESERVE_MAX_KEYS": "many"}, None, "HESERVE_MAX_KEYS: expected an integer"),
        ([], {}, "mystery = 1\n", "unknown setting 'mystery'"),
        ([], {}, 'port = "high"\n', "port: expected an integer"),
        ([], {}, "port = [\n", "config file"),
        (["--tls-key", "k.pem"], {}, None, "tls-cert and tls-key go together"),
        ([], {"HESERVE_TLS_CLIENT_CA": "ca.pem"}, None, "needs tls-cert"),
        (["--max-message-bytes", "1000"], {}, None, "--max-message-bytes: must be at least"),
        ([], {"HESERVE_PORT": "70000"}, None, "HESERVE_PORT: not a port number"),
        (["--log-level", "LOUD"], {}, None, "--log-level: expected one of"),
        (["--catalog", "books"], {}, None, "expected NAME=PATH"),
        ([], {}, "query-budget-window = 0\n", "must be positive"),
    ],
)
def test_bad_settings_name_their_source(
    tmp_path: Path, argv: list[str], environ: dict[str, str], file: str | None, message: str
) -> None:
    if file is not None:
        (tmp_path / "heserve.toml").write_text(file)
        argv = ["--config", str(tmp_path / "heserve.toml"), *argv]
    with pytest.raises(config.ConfigError) as refused:
        _serve(argv, environ)
    assert message in str(refused.value)


SECRET = "alice:S3CRET-token-value-0123456789"


@pytest.mark.parametrize(
    ("argv", "environ", "file", "message"),
    [
        # issue 10, finding 6: each of these was accepted, or refused with a secret shown
        ([], {}, f'tokens = ["{SECRET}", 5]\n', "tokens: expected a string or a list of strings"),
        (
            [],
            {},
            "tokens = 5\n",
            "tokens: expected a string or a list of strings, got a value of type int",
        ),
        ([], {}, "score-noise-std = 1e-400\n", "too small for a float"),
        ([], {}, "score-noise-std = 1e-310\n", "too small for a float"),  # a denormal
        (["--score-noise-std", "1e-400"], {}, None, "--score-noise-std: '1e-400' is too small"),
        ([], {"HESERVE_SCORE_NOISE_STD": "4e-324"}, None, "HESERVE_SCORE_NOISE_STD: '4e-324'"),
        ([], {}, "query-budget-window = nan\n", "must be a finite number"),
        (["--query-budget-window", "nan"], {}, None, "--query-budget-window: must be a finite"),
        ([], {"HESERVE_SHUTDOWN_GRACE": "inf"}, None, "HESERVE_SHUTDOWN_GRACE: must be a finite"),
        ([], {}, "score-noise-std = -inf\n", "must be a finite number"),
        ([], {}, f"key-ttl = {1 << 32}\n", "key-ttl: must be at most 4294967295"),
        (["--max-message-bytes", str(1 << 31)], {}, None, "--max-message-bytes: must be at most"),
        (["--flood-bits", "41"], {}, None, "--flood-bits: must be at most 40"),
        ([], {}, "query-budget = 5\nquery_budget = 500\n", "query-budget is set twice"),
        ([], {}, 'host = ""\n', "host: an address, not empty"),
        (["--host", " "], {}, None, "--host: an address, not empty"),
        ([], {"HESERVE_METRICS_HOST": "a b"}, None, "HESERVE_METRICS_HOST: an address"),
        ([], {}, 'tls-cert = ""\ntls-key = "k.pem"\n', "tls-cert: expected a path"),
        ([], {}, "port = 5.0\n", "port: expected an integer, got 5.0"),
        ([], {}, f'threads = "{"9" * 5000}"\n', "threads: expected an integer, got '999"),
    ],
)
def test_every_setting_is_validated_in_one_line_without_secrets(
    tmp_path: Path, argv: list[str], environ: dict[str, str], file: str | None, message: str
) -> None:
    if file is not None:
        (tmp_path / "heserve.toml").write_text(file)
        argv = ["--config", str(tmp_path / "heserve.toml"), *argv]
    with pytest.raises(config.ConfigError) as refused:
        _serve(argv, environ)
    text = str(refused.value)
    assert message in text
    assert "\n" not in text and len(text) < 300 + len(str(tmp_path))
    assert "S3CRET" not in text


def test_zero_and_small_normal_numbers_are_still_accepted(tmp_path: Path) -> None:
    (tmp_path / "heserve.toml").write_text("score-noise-std = 0.0\nshutdown-grace = 0\n")
    settings = _serve(["--config", str(tmp_path / "heserve.toml")], {})
    assert (settings.score_noise_std, settings.shutdown_grace) == (0.0, 0.0)
    assert _serve(["--score-noise-std", "1e-300"], {}).score_noise_std == 1e-300
    assert _serve(["--score-noise-std", "0e-999"], {}).score_noise_std == 0.0
    assert _serve([], {"HESERVE_KEY_TTL": str((1 << 32) - 1)}).key_ttl == (1 << 32) - 1


def test_heserve_serve_refuses_a_bad_setting_with_one_line_and_no_secret(tmp_path: Path) -> None:
    (tmp_path / "heserve.toml").write_text(f'tokens = ["{SECRET}", 5]\nhost = ""\n')
    result = subprocess.run(
        [sys.executable, "-m", "heserve.ops.cli", "serve", "--config", "heserve.toml"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("heserve: error: ") and result.stderr.count("\n") == 1
    assert "S3CRET" not in result.stderr and "Traceback" not in result.stderr


def test_serve_help_documents_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "heserve.ops.cli", "serve", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    text = " ".join(result.stdout.split())  # undo the wrapping
    assert "--config" in text and "HESERVE_CONFIG" in text
    for option in config.OPTIONS:
        assert option.env in text, option.name
        if option.flag:
            assert f"--{option.name} " in text, option.name
        else:
            assert re.search(rf"\b{option.name}\b", text), option.name
    assert "flag, its environment variable" in text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_heserve_serve_reads_flags_environment_and_config_file(tmp_path: Path) -> None:
    """A real `heserve serve`: the file sets the metrics port, the environment overrides it
    and sets JSON logs, a flag overrides the log level; the server shows each choice."""
    np.save(tmp_path / "shop.npy", unit_rows(50, 4, seed=56))
    file_port, env_port = _free_port(), _free_port()
    (tmp_path / "heserve.toml").write_text(
        f'catalog = ["shop=shop.npy"]\nworkers = 0\nmetrics-port = {file_port}\n'
        'log-level = "ERROR"\nmax-concurrent-rpcs = 9\n'
    )
    env = _env() | {
        "HESERVE_CONFIG": "heserve.toml",
        "HESERVE_METRICS_PORT": str(env_port),
        "HESERVE_LOG_FORMAT": "json",
        "HESERVE_LOG_LEVEL": "WARNING",
    }
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "heserve.ops.cli",
                "serve",
                "--port",
                "0",
                "--log-level",
                "INFO",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert f"metrics on 127.0.0.1:{env_port}" in line, (line, log.read_text())
        assert _metric(env_port, "heserve_max_concurrent_rpcs") == 9
        process.terminate()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
    records = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert any(r["msg"].startswith("heserve listening") for r in records)  # INFO, as flagged
    assert all(r["level"] in {"INFO", "WARNING", "ERROR", "CRITICAL"} for r in records)


def test_a_catalogs_ids_travel_with_it_across_sources(tmp_path: Path) -> None:
    """The file's ids for books stay with the file's books; a flag that replaces books
    drops them (they were for another file) unless it gives ids too (issue 12, finding 8)."""
    (tmp_path / "conf").mkdir()
    file = tmp_path / "conf" / "heserve.toml"
    file.write_text(
        '[catalog]\nbooks = "books.npy"\nfilms = "films.npy"\n'
        '[ids]\nbooks = "books.txt"\nfilms = "films.txt"\n'
    )
    environ = {"HESERVE_CONFIG": str(file)}
    conf = tmp_path / "conf"

    added = _serve(["--catalog", "music=music.npy"], environ)
    assert dict(added.catalog) == {
        "books": conf / "books.npy",
        "films": conf / "films.npy",
        "music": Path("music.npy"),
    }
    assert dict(added.ids) == {"books": conf / "books.txt", "films": conf / "films.txt"}

    replaced = _serve(["--catalog", "books=new.npz"], environ)
    assert dict(replaced.catalog)["books"] == Path("new.npz")
    assert dict(replaced.ids) == {"films": conf / "films.txt"}  # books.txt went with books

    with_ids = _serve(["--catalog", "books=new.npy", "--ids", "books=new.txt"], environ)
    assert dict(with_ids.ids)["books"] == Path("new.txt")


def test_serve_applies_the_per_caller_limits(tmp_path: Path) -> None:
    """--max-streams-per-caller reaches the server a real `heserve serve` runs: its
    start line reports the limit its admission holds callers to."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "heserve.ops.cli", "serve", "--port", str(port),
         "--workers", "0", "--max-streams-per-caller", "3", "--log-format", "json"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        for line in process.stderr:
            record = json.loads(line)
            if "listening" in record["msg"]:
                assert record["max_streams_per_caller"] == 3
                break
        else:
            raise AssertionError("the server never said it was listening")
    finally:
        process.terminate()
        process.wait(timeout=30)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
