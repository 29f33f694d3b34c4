"""The `heserve` command: serve, demo, recommend, forget, privacy, and admin (reload,
update: the operator's calls to a running server's catalog admin service).

Exit status: 0 success; 1 the command ran and failed (the server refused the request,
or an internal error); 2 the command cannot run as given (flags, settings, or a file
they name: catalog, ids, vector, token, key, certificate); 75 (EX_TEMPFAIL) the server
could not be reached or did not answer in time, so trying again later may work.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from heserve import __version__
from heserve.admin.v1 import admin_pb2, admin_pb2_grpc
from heserve.backends.base import Backend
from heserve.backends.local import LocalBackend
from heserve.backends.pool import PoolBackend
from heserve.domain.catalog import Catalog, CatalogError, demo_catalog, load_catalog, unit_rows
from heserve.domain.protection import ScoreProtection
from heserve.domain.scorer import (
    MAX_UPDATE_ITEMS,
    CatalogChange,
    KeyRetentionPolicy,
    Scorer,
    SizeLimits,
)
from heserve.ops import config, logs
from heserve.ops.progress import ProgressBar
from heserve.protocol.params import PRESETS, CkksParameters
from heserve.protocol.pem import read_pem
from heserve.transport.admin import change_outcome_name
from heserve.transport.auth import ADMIN_PREFIX, Authenticator, QueryBudget, parse_tokens
from heserve.transport.bridge import CallLimits
from heserve.transport.server import (
    AdminConfig,
    OneAtATime,
    TlsConfig,
    handled_signals,
    refuse_shared_tokens,
    serve_until_signalled,
    start_server,
)

log = logging.getLogger("heserve")


def _catalogs(specs: list[tuple[str, Path]], ids: list[tuple[str, Path]]) -> list[Catalog]:
    ids_by_name = dict(ids)
    unknown = set(ids_by_name) - {name for name, _ in specs}
    if unknown:
        raise CatalogError(f"--ids names catalogs that no --catalog gives: {sorted(unknown)}")
    if not specs:
        return [demo_catalog()]
    return [load_catalog(name, path, ids_by_name.get(name)) for name, path in specs]


def _backend(settings: config.Settings, params: CkksParameters) -> Backend:
    budget = None if settings.memory_budget_mib is None else settings.memory_budget_mib << 20
    if settings.backend == "ray":
        try:
            from heserve.backends.ray_cluster import RayBackend
        except ImportError:
            raise config.ConfigError(
                "--backend ray needs Ray: pip install 'heserve[ray]'"
            ) from None
        return RayBackend(params, settings.ray_address, settings.workers or None, budget)
    if settings.workers == 0:
        return LocalBackend(params, budget)
    return PoolBackend(params, settings.workers, budget)


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 75  # sysexits EX_TEMPFAIL: a temporary failure, worth retrying
_EXIT_STATUS = f"""exit status:
  0   success
  1   the command ran and failed (e.g. the server refused the request)
  2   the command cannot run as given: flags, settings, or a file they name
  {EXIT_UNAVAILABLE}  the server could not be reached or did not answer in time: try again later
"""


def _scorer(
    catalogs: list[Catalog],
    retention: KeyRetentionPolicy,
    params: CkksParameters,
    backend: Backend,
    limits: SizeLimits | None = None,
    protection: ScoreProtection | None = None,
    log_format: str = "text",
) -> Scorer:
    """A Scorer for `catalogs`, its encoding progress shown as a bar on a terminal when
    the logs are text, else as log records (one format on standard error)."""
    draw = log_format == "text"
    bars = {c.name: ProgressBar(f"encoding catalog {c.name!r}", draw=draw) for c in catalogs}
    current = iter(catalogs)
    active = [next(current)]

    def progress(done: int, total: int) -> None:
        bars[active[0].name](done, total)
        if done == total:
            active[0] = next(current, active[0])

    return Scorer(
        params,
        catalogs,
        limits=limits,
        retention=retention,
        progress=progress,
        backend=backend,
        protection=protection,
    )


def cmd_serve(args: argparse.Namespace, settings: config.Settings) -> int:
    # Everything that can be wrong with the files is found before the catalogs are encoded.
    authenticator = Authenticator.load(settings.tokens_file, settings.tokens)
    admin_authenticator = Authenticator.load(
        settings.admin_tokens_file,
        settings.admin_tokens,
        setting="HESERVE_ADMIN_TOKENS",
        prefix=ADMIN_PREFIX,
    )
    if authenticator is not None and admin_authenticator is not None:
        refuse_shared_tokens(authenticator, admin_authenticator)
    budget = (
        QueryBudget(settings.query_budget, settings.query_budget_window)
        if settings.query_budget
        else None
    )
    tls = (
        TlsConfig.from_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.tls_cert is not None and settings.tls_key is not None
        else None
    )
    catalogs = _catalogs(list(settings.catalog), list(settings.ids))
    retention = KeyRetentionPolicy(
        ttl_seconds=settings.key_ttl,
        max_keys=settings.max_keys,
        max_bytes=settings.max_key_store_bytes,
        max_keys_per_caller=settings.max_keys_per_caller,
    )
    params = PRESETS[settings.preset]
    backend = _backend(settings, params)
    try:
        limits = SizeLimits(max_message_bytes=settings.max_message_bytes)
        protection = ScoreProtection(settings.flood_bits, settings.score_noise_std)
        scorer = _scorer(
            catalogs, retention, params, backend, limits, protection, settings.log_format
        )
        # SIGHUP and the admin service's ReloadCatalogs: one reload at a time between them
        reload = OneAtATime(lambda: reload_catalogs(scorer, settings)) if settings.catalog else None
        # handlers first: a signal sent once the server says it listens must find them
        with handled_signals(reload) as stop:
            running = start_server(
                scorer,
                settings.host,
                settings.port,
                settings.threads,
                tls=tls,
                authenticator=authenticator,
                query_budget=budget,
                max_concurrent_rpcs=settings.max_concurrent_rpcs or None,
                metrics_port=settings.metrics_port or None,
                metrics_host=settings.metrics_host,
                call_limits=CallLimits(
                    max_calls_per_caller=settings.max_calls_per_caller,
                    max_streams_per_caller=settings.max_streams_per_caller,
                    upload_idle_seconds=settings.upload_idle_seconds,
                    upload_total_seconds=settings.upload_total_seconds,
                ),
                admin=None
                if admin_authenticator is None
                else AdminConfig(admin_authenticator, reload),
            )
            features = [f"preset {settings.preset}", _shards(backend, settings)]
            if protection.enabled:
                noise = f"flood {settings.flood_bits} bits, score std {settings.score_noise_std:g}"
                features.append(f"noise: {noise}")
            if tls is not None:
                features.append("mutual TLS" if tls.client_ca else "TLS")
            if authenticator is not None:
                features.append(f"{len(authenticator)} API token(s)")
            if admin_authenticator is not None:
                features.append(f"admin service: {len(admin_authenticator)} admin token(s)")
            if running.metrics_port is not None:
                features.append(f"metrics on {settings.metrics_host}:{running.metrics_port}")
            print(
                f"heserve {__version__} serving {len(catalogs)} catalog(s) on "
                f"{settings.host}:{running.port} ({', '.join(features)})",
                flush=True,
            )
            serve_until_signalled(running, stop, settings.shutdown_grace)
    finally:
        backend.close()
    return 0


def reload_catalogs(scorer: Scorer, settings: config.Settings) -> list[CatalogChange]:
    """Read the catalog files named at start-up again and serve what changed (SIGHUP, and
    the admin service's ReloadCatalogs), catalog by catalog; one change per catalog. A
    file that does not load, or a version the server cannot swap in (another dimension,
    or a layout the registered keys do not cover), changes nothing for its catalog: its
    served version stays, and the change (and its log line) says why. The settings (the
    config file included) are not read again."""
    log.info("reloading the catalog files named at start-up (the settings are not read again)")
    ids_by_name = dict(settings.ids)

    def loader(name: str, path: Path) -> Callable[[], Catalog]:
        def load() -> Catalog:
            catalog = load_catalog(name, path, ids_by_name.get(name))
            served = scorer.catalog(name).catalog
            if catalog.dimension != served.dimension:
                raise ValueError(
                    f"catalog {name!r}: the dimension changed from {served.dimension} to "
                    f"{catalog.dimension}: clients' vectors would no longer fit; restart"
                )
            return catalog

        return load

    return [scorer.reload(name, loader(name, path)) for name, path in settings.catalog]


def _shards(backend: Backend, settings: config.Settings) -> str:
    """Where the catalogs are scored, for the start-up line."""
    if isinstance(backend, LocalBackend):
        return "scoring in the server process (no workers)"
    kind = "worker process" if settings.backend == "process" else "Ray actor"
    return f"{backend.shard_count} {kind} shard(s)"


def _print_ranking(rows: Sequence[tuple[str, float]]) -> None:
    for rank, (item_id, score) in enumerate(rows, 1):
        print(f"{rank:>4}  {item_id:<24} {score:+.6f}")


def _client_token(path: Path | None) -> str | None:
    """The token in `path` (its first entry, in the server's tokens-file format: a
    NAME:TOKEN line gives TOKEN), else the HESERVE_TOKEN variable."""
    if path is None:
        return os.environ.get("HESERVE_TOKEN", "").strip() or None
    entries = parse_tokens(path.read_text(), str(path))
    if not entries:
        raise ValueError(f"{path} holds no token")
    return entries[0][1]


class CommandError(Exception):
    """A command failed for a reason its user can act on; printed as one line, and the
    process exits with `status`."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """heserve_client's errors as CommandError: the client is imported only by the
    commands that run it, so that serving never loads it."""
    from heserve_client import HeserveError, ServerUnavailableError

    try:
        yield
    except ServerUnavailableError as exc:
        if _TLS_REFUSED.search(str(exc)):  # a wrong CA or name: retrying cannot help
            raise CommandError(
                f"{exc} (the server's certificate was refused: check --tls-ca and "
                "--tls-server-name)",
                EXIT_USAGE,
            ) from None
        raise CommandError(str(exc), EXIT_UNAVAILABLE) from None
    except HeserveError as exc:
        raise CommandError(str(exc)) from None


_TLS_REFUSED = re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|WRONG_VERSION")


_NPY_MAGIC = b"\x93NUMPY"


def load_vectors(path: Path) -> np.ndarray:
    """One user vector or several, as rows, from `path`: a .npy array (d,) or (k, d), or
    text: numbers separated by blanks or commas, one vector a line (a file of one
    number a line, as `numpy.savetxt` writes a vector, is one vector)."""
    data = path.read_bytes()
    if not data.startswith(_NPY_MAGIC):
        lines = [line for line in data.splitlines() if line.strip()]
        rows = [[f for f in re.split(rb"[\s,;]+", line) if f] for line in lines]
        if len(rows) > 1 and all(len(row) > 1 for row in rows):
            try:
                vectors = np.array([[float(f) for f in row] for row in rows], dtype=np.float64)
            except ValueError:
                raise ValueError(
                    f"{path}: lines of numbers separated by blanks or commas"
                ) from None
            if vectors.ndim != 2:
                raise ValueError(f"{path}: every line (vector) must hold as many numbers")
            return vectors
        return load_vector(path)[None, :]
    try:
        array = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    except ValueError:
        return load_vector(path)[None, :]  # its message says what is wrong
    if array.ndim == 2 and array.shape[0] > 1 and array.shape[1] > 0:
        return array
    return load_vector(path)[None, :]


def load_vector(path: Path) -> np.ndarray:
    """A user vector from `path`: a .npy array, or text numbers separated by blanks,
    commas or new lines (what `numpy.savetxt` or a spreadsheet writes)."""
    data = path.read_bytes()
    if data.startswith(_NPY_MAGIC):
        try:
            vector = np.load(path, allow_pickle=False)
        except ValueError as exc:  # object arrays would need pickle, which is never loaded
            raise ValueError(
                f"{path}: a .npy of numbers is needed ({exc}); save it with "
                "np.save(path, np.asarray(vector, dtype=np.float64))"
            ) from None
    else:
        fields = [field for field in re.split(rb"[\s,;]+", data) if field]
        try:
            vector = np.array([float(field) for field in fields], dtype=np.float64)
        except ValueError:
            raise ValueError(
                f"{path}: neither a .npy file nor numbers separated by blanks or commas"
            ) from None
    vector = np.asarray(vector, dtype=np.float64).squeeze()
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"{path}: a vector is one row of numbers; this has shape {vector.shape}")
    return vector


def _read_item_ids(path: Path) -> list[str]:
    """Candidate ids, one a line (blank lines skipped)."""
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: no item ids (one a line)")
    return ids


def cmd_recommend(args: argparse.Namespace, settings: config.Settings) -> int:
    from heserve_client import Client

    vectors = load_vectors(args.vector)
    candidates = None if args.item_ids is None else _read_item_ids(args.item_ids)
    if args.k < 1:
        raise config.ConfigError("-k: must be at least 1")
    with (
        _client_errors(),
        Client(
            args.server,
            key_file=args.key_file,
            token=_client_token(args.token_file),
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
        ) as client,
    ):
        rankings = client.recommend_many(
            vectors, catalog=args.catalog, k=args.k, item_ids=candidates
        )
    for number, ranking in enumerate(rankings, 1):
        if len(rankings) > 1:  # one header a vector; one vector prints as it always did
            print(f"vector {number}")
        _print_ranking(ranking)
    return 0


def _connection(args: argparse.Namespace) -> dict[str, object]:
    """Client options from the connection flags `_add_connection_arguments` adds."""
    return {
        "token": _client_token(args.token_file),
        "tls": args.tls,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_server_name": args.tls_server_name,
    }


def cmd_forget(args: argparse.Namespace, settings: config.Settings) -> int:
    """Erase the keys the key file registered at the server, then the key file and its
    registration record; print what was erased."""
    from heserve_client import forget_me

    if not Path(args.key_file).exists():
        raise CommandError(
            f"{args.key_file}: no key file here, so nothing is known to erase (a typo?)"
        )
    with _client_errors():
        report = forget_me(args.server, args.key_file, **_connection(args))
    print(report)
    return 0


def cmd_privacy(args: argparse.Namespace, settings: config.Settings) -> int:
    """Print the server's privacy statement (text, or the message as JSON)."""
    from google.protobuf import json_format

    from heserve_client import Client

    with _client_errors(), Client(args.server, **_connection(args)) as client:  # type: ignore[arg-type]
        statement, info = client.statement, client.server_info
    if statement is None:
        raise CommandError(f"{args.server} publishes no privacy statement")
    if args.json:
        print(json_format.MessageToJson(info.privacy, preserving_proto_field_name=True))
    else:
        print(statement.describe())
    return 0


def _size(count: int) -> str:
    return f"{count / 1024:,.1f} KiB" if count < 1 << 20 else f"{count / (1 << 20):,.2f} MiB"


def cmd_demo(args: argparse.Namespace, settings: config.Settings) -> int:
    from heserve_client import Client

    catalog = demo_catalog(args.items, args.dimension)
    params = PRESETS[settings.preset]
    backend = _backend(settings, params)
    started = time.perf_counter()
    scorer = _scorer(
        [catalog], KeyRetentionPolicy(), params, backend, log_format=settings.log_format
    )
    encode_seconds = time.perf_counter() - started
    running = start_server(scorer, "127.0.0.1", 0)
    user = unit_rows(1, args.dimension, seed=args.seed)[0]
    try:
        with _client_errors(), Client(f"127.0.0.1:{running.port}") as client:
            started = time.perf_counter()
            client.register_keys()
            register_seconds = time.perf_counter() - started - client.stats.last_keygen_seconds
            started = time.perf_counter()
            encrypted = client.recommend(user, catalog=catalog.name, k=args.k)
            recommend_seconds = time.perf_counter() - started
            stats = client.stats
    finally:
        running.stop(grace=1.0)
        backend.close()

    plain = catalog.embeddings @ user
    order = np.argsort(-plain, kind="stable")[: args.k]
    print(
        f"\nheserve demo: {catalog.item_count:,} items × {catalog.dimension} dims, top {args.k}, "
        f"preset {settings.preset}, {backend.shard_count} shard(s)"
    )
    print(f"{'rank':>4}  {'encrypted':<30} {'plaintext':<30} same")
    for rank, ((item_id, score), index) in enumerate(zip(encrypted, order, strict=True), 1):
        same = "yes" if item_id == catalog.ids[index] else "NO"
        print(
            f"{rank:>4}  {item_id:<12} {score:+.6f}      {catalog.ids[index]:<12} "
            f"{plain[index]:+.6f}      {same}"
        )
    print("\nsteps (seconds)")
    for label, seconds in [
        ("server: start workers, encode catalog", encode_seconds),
        ("client: generate Galois keys", stats.last_keygen_seconds),
        ("client: register keys (upload)", register_seconds),
        ("client: encrypt query", stats.last_encrypt_seconds),
        ("server: score + stream back", stats.last_score_seconds),
        ("client: decrypt scores", stats.last_decrypt_seconds),
        ("recommend, end to end", recommend_seconds),
    ]:
        print(f"  {label:<36} {seconds:8.3f}")
    print("\nbytes")
    print(f"  client -> server  keys   {_size(stats.key_bytes_sent)}")
    print(f"  client -> server  query  {_size(stats.last_query_bytes)}")
    print(f"  server -> client  scores {_size(stats.last_response_bytes)}")
    agree = [item for item, _ in encrypted] == [catalog.ids[i] for i in order]
    print("\nencrypted ranking equals plaintext ranking:", "yes" if agree else "NO")
    return 0 if agree else 1


# --- heserve admin: the operator's calls to the catalog admin service -------------------

_ADMIN_TIMEOUT_SECONDS = 600.0  # a reload re-encodes every changed catalog (~12 s a million rows)
_MESSAGE_MARGIN_BYTES = 64 << 10  # what an UpdateItems batch leaves of the message limit


def _admin_token(path: Path | None) -> str:
    """The admin token in `path` (its first entry, as in the server's admin tokens file),
    else the HESERVE_ADMIN_TOKEN variable; one is needed."""
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise config.ConfigError(f"--admin-token-file {path}: {exc.strerror}") from None
        entries = parse_tokens(text, str(path))
        if not entries:
            raise config.ConfigError(f"--admin-token-file {path} holds no token")
        return entries[0][1]
    value = os.environ.get("HESERVE_ADMIN_TOKEN", "").strip()
    if not value:
        raise config.ConfigError(
            "the admin service needs an admin token: --admin-token-file PATH, or the "
            "HESERVE_ADMIN_TOKEN variable"
        )
    # one entry as the admin tokens file holds it: TOKEN, or NAME:TOKEN copied from it
    return parse_tokens(value, "HESERVE_ADMIN_TOKEN")[0][1]


def _admin_channel(args: argparse.Namespace) -> Any:
    """A channel to `--server`, with TLS as the flags say (as `heserve recommend` has)."""
    import grpc

    if (args.tls_cert is None) != (args.tls_key is None):
        raise config.ConfigError("--tls-cert and --tls-key go together")
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", args.max_message_bytes),
        ("grpc.max_receive_message_length", args.max_message_bytes),
    ]
    secure = args.tls or any(
        value is not None
        for value in (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    )
    if not secure:
        return grpc.insecure_channel(args.server, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=None if args.tls_ca is None else read_pem(args.tls_ca),
        private_key=None if args.tls_key is None else read_pem(args.tls_key, private=True),
        certificate_chain=None if args.tls_cert is None else read_pem(args.tls_cert),
    )
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.server, credentials, options=options)


@contextlib.contextmanager
def _admin_errors(server: str) -> Iterator[None]:
    """A failed admin call as a CommandError: the status and the server's message, with
    what to do about the statuses an operator meets first."""
    import grpc

    try:
        yield
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # a grpc.Call
        details: str = exc.details() or ""
        message = f"{server}: {code.name}: {details}"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            if _TLS_REFUSED.search(details):
                raise CommandError(
                    f"{message} (the server's certificate was refused: check --tls-ca and "
                    "--tls-server-name)",
                    EXIT_USAGE,
                ) from None
            raise CommandError(message, EXIT_UNAVAILABLE) from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            message += (
                " (this server serves no admin service: start it with --admin-tokens-file "
                "or HESERVE_ADMIN_TOKENS)"
            )
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message" in details.lower():
            message += " (lower --max-message-bytes to the server's limit)"
        raise CommandError(message) from None


def _describe_change(change: admin_pb2.CatalogChange) -> str:
    """One line for a CatalogChange message: catalog, outcome, versions, counts, seconds."""
    outcome = change_outcome_name(change.outcome)
    if outcome == "failed":
        return (
            f"{change.catalog}: failed, version {change.version} still served "
            f"({change.seconds:.2f} s): {change.error}"
        )
    if outcome == "unchanged":
        return (
            f"{change.catalog}: unchanged, version {change.version} ({change.item_count:,} items)"
        )
    counts = (
        f"{change.upserted:,} upserted, {change.deleted:,} deleted, "
        if outcome == "updated"
        else ""
    )
    dropped = (
        f"; {change.updates_dropped} update(s) made since its file was read are gone"
        if change.updates_dropped
        else ""
    )
    return (
        f"{change.catalog}: {outcome}, version {change.previous_version} -> {change.version} "
        f"({counts}{change.item_count:,} items, {change.chunks_rewritten} of "
        f"{change.chunk_count} chunks encoded, {change.seconds:.2f} s){dropped}"
    )


def _admin_call(args: argparse.Namespace, method: str, request: Any) -> Any:
    """One call of the admin service, with the admin token, the TLS flags and --timeout;
    a failure as the CommandError `_admin_errors` makes of it."""
    metadata = (("authorization", f"Bearer {_admin_token(args.admin_token_file)}"),)
    with _admin_channel(args) as channel, _admin_errors(args.server):
        call = getattr(admin_pb2_grpc.CatalogAdminServiceStub(channel), method)
        return call(request, timeout=args.timeout, metadata=metadata)


def cmd_admin_reload(args: argparse.Namespace, settings: config.Settings) -> int:
    """Have the server re-read its catalog files; one line per catalog; 1 if any failed."""
    reply = _admin_call(args, "ReloadCatalogs", admin_pb2.ReloadCatalogsRequest())
    for change in reply.changes:
        print(_describe_change(change))
    failed = [c for c in reply.changes if c.outcome == admin_pb2.CATALOG_CHANGE_OUTCOME_FAILED]
    return EXIT_FAILED if failed else 0


def cmd_admin_catalogs(args: argparse.Namespace, settings: config.Settings) -> int:
    """The served catalogs, one line each: version, size, updates not in their file."""
    reply = _admin_call(args, "ListCatalogs", admin_pb2.ListCatalogsRequest())
    for state in reply.catalogs:
        line = (
            f"{state.catalog}: version {state.version}, {state.item_count:,} items × "
            f"{state.dimension}, {state.chunk_count} chunks"
        )
        if state.updates_since_source:
            line += f", {state.updates_since_source} update(s) not in its file"
        print(line)
    return 0


def _positive_seconds(text: str) -> float:
    """A --timeout: a finite number of seconds above 0 (argparse reports the error)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (0 < seconds < float("inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return seconds


def _read_lines(path: Path) -> list[str]:
    """Non-blank lines, trimmed (a file of ids, one a line, as a catalog's ids file is
    read; no id begins or ends with blanks)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def update_batches(
    catalog: str,
    upserts: Catalog | None,
    delete_ids: Sequence[str],
    max_message_bytes: int,
    max_items: int,
) -> list[admin_pb2.UpdateItemsRequest]:
    """The UpdateItemsRequests of one change: the deletes first, then the upserts, each
    request holding at most `max_items` of them and staying `_MESSAGE_MARGIN_BYTES`
    under `max_message_bytes`. Their if_version is the caller's business."""
    budget = max_message_bytes - _MESSAGE_MARGIN_BYTES
    if budget <= 0:
        raise config.ConfigError(
            f"--max-message-bytes: must be above {_MESSAGE_MARGIN_BYTES} (a server's is at least "
            f"{config.MIN_MESSAGE_BYTES})"
        )
    requests = [admin_pb2.UpdateItemsRequest(catalog=catalog)]
    size, count = requests[0].ByteSize(), 0

    def room(item_bytes: int) -> admin_pb2.UpdateItemsRequest:
        nonlocal size, count
        item_bytes += 8  # the field's tag and length
        if count and (size + item_bytes > budget or count >= max_items):
            requests.append(admin_pb2.UpdateItemsRequest(catalog=catalog))
            size, count = requests[-1].ByteSize(), 0
        size, count = size + item_bytes, count + 1
        return requests[-1]

    for item_id in delete_ids:
        room(len(item_id.encode())).delete_ids.append(item_id)
    if upserts is not None:
        popularity = upserts.popularity
        for row, item_id in enumerate(upserts.ids):
            item = admin_pb2.Item(id=item_id, embedding=upserts.embeddings[row].tolist())
            if popularity is not None:
                item.popularity = popularity[row]
            room(item.ByteSize()).upserts.append(item)
    return requests


def cmd_admin_update(args: argparse.Namespace, settings: config.Settings) -> int:
    """Upsert and delete items of one catalog; one line per UpdateItems call."""
    deletes = list(args.delete or ())
    if args.delete_file is not None:
        deletes += _read_lines(args.delete_file)
    if args.upsert is None and not deletes:
        raise config.ConfigError("nothing to change: give --upsert FILE, --delete or --delete-file")
    if args.ids is not None and args.upsert is None:
        raise config.ConfigError("--ids names the ids of an --upsert .npy file")
    if args.upsert is not None and args.upsert.suffix == ".npy" and args.ids is None:
        raise config.ConfigError(
            f"--upsert {args.upsert}: an .npy holds no ids; give --ids FILE (one id a line), "
            "or the rows' numbers would overwrite the items named '0', '1', ..."
        )
    if any(not item.strip() for item in deletes):
        raise config.ConfigError("an empty id to --delete")
    # the same loader and checks as the server's catalog files (ids, finite, norm <= 1)
    upserts = None if args.upsert is None else load_catalog(args.catalog, args.upsert, args.ids)
    token = _admin_token(args.admin_token_file)
    requests = update_batches(
        args.catalog,
        upserts,
        deletes,
        args.max_message_bytes,
        MAX_UPDATE_ITEMS,
    )
    version = args.if_version or ""
    with _admin_channel(args) as channel:
        stub = admin_pb2_grpc.CatalogAdminServiceStub(channel)
        for number, request in enumerate(requests, 1):
            # each call after the first is made against the version the one before made:
            # a writer changing the catalog in between stops the rest (FAILED_PRECONDITION)
            request.if_version = version
            try:
                with _admin_errors(args.server):
                    reply = stub.UpdateItems(
                        request,
                        timeout=args.timeout,
                        metadata=(("authorization", f"Bearer {token}"),),
                    )
            except CommandError as exc:
                if number > 1:
                    exc.args = (
                        f"{exc} (call {number} of {len(requests)}; the {number - 1} before it "
                        f"were applied and made version {version}; `heserve admin catalogs` "
                        "says which serves now)",
                    )
                elif "DEADLINE_EXCEEDED" in str(exc):
                    exc.args = (
                        f"{exc} (the server drops a change it could not serve in time; "
                        "`heserve admin catalogs` says which version serves)",
                    )
                raise
            version = reply.change.version
            prefix = f"[{number}/{len(requests)}] " if len(requests) > 1 else ""
            print(prefix + _describe_change(reply.change), flush=True)
    return 0


Handler = Callable[[argparse.Namespace, config.Settings], int]


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Handler,
    options: config.OptionSet,
    summary: str,
) -> argparse.ArgumentParser:
    """A subcommand taking `options` (flags, environment, and for serve the config file)."""
    parser = commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=options.epilog() + "\n" + _EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--tokens SECRET` must not pass for `--tokens-file SECRET`
    )
    options.add_arguments(parser)
    parser.set_defaults(handler=handler, options=options)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heserve",
        description="Privacy-preserving recommendation scoring with CKKS.",
        epilog=_EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"heserve {__version__}")
    config.LOGGING.add_arguments(parser)  # also after the command's name: each command has them
    commands = parser.add_subparsers(dest="command", required=True)

    _command(commands, "serve", cmd_serve, config.SERVE, "run the gRPC scoring server")

    demo = _command(
        commands, "demo", cmd_demo, config.DEMO, "run a server and a client end to end, in process"
    )
    demo.add_argument("--items", type=int, default=10_000, help="demo catalog size")
    demo.add_argument("--dimension", type=int, default=64, help="demo embedding dimension")
    demo.add_argument("-k", type=int, default=10, help="how many items to recommend")
    demo.add_argument("--seed", type=int, default=7, help="seed of the demo user vector")

    recommend = _command(
        commands,
        "recommend",
        cmd_recommend,
        config.RECOMMEND,
        "recommend items from a running server",
    )
    recommend.description = (
        "Recommend items from a running server: encrypt the user vector here, have the "
        "server score the catalog (or the --item-ids candidates) under encryption, decrypt "
        "the scores here and print the best k, one a line: rank, item id, score. The "
        "server never sees the vector nor the scores."
    )
    _add_server_arguments(recommend)
    recommend.add_argument(
        "--catalog",
        required=True,
        metavar="NAME",
        help="catalog to rank (an unknown name is answered with the ones the server serves)",
    )
    recommend.add_argument(
        "--vector",
        required=True,
        type=Path,
        metavar="PATH",
        help="user vector: a .npy file, or text numbers separated by blanks or commas; "
        "several vectors (a (k, d) .npy, or one vector a line) are scored in one pass and "
        "ranked one after the other",
    )
    recommend.add_argument(
        "-k", type=int, default=10, metavar="N", help="how many items to print (default: 10)"
    )
    recommend.add_argument(
        "--item-ids",
        type=Path,
        metavar="PATH",
        help="re-rank only these candidates: a file of item ids, one a line",
    )
    recommend.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        help="keep the key pair in this file across runs, and the server's registration "
        "of it beside it (PATH.registration), so that later runs do not upload the keys "
        "again until the server's key TTL",
    )
    _add_tls_arguments(recommend)

    forget = _command(
        commands,
        "forget",
        cmd_forget,
        config.RECOMMEND,
        "erase a user's keys at a server and the key file that holds them",
    )
    forget.description = (
        "Forget a user: erase at the server the keys the key file's registration record "
        "names (PATH.registration, which heserve recommend --key-file keeps), then remove "
        "the key file and the record, and print what was erased. If the server cannot be "
        "reached nothing is removed: run it again later."
    )
    _add_server_arguments(forget)
    forget.add_argument(
        "--key-file", required=True, type=Path, metavar="PATH", help="the user's key file"
    )
    _add_tls_arguments(forget)

    statement = _command(
        commands,
        "privacy",
        cmd_privacy,
        config.RECOMMEND,
        "print a server's privacy statement",
    )
    statement.description = (
        "Print what a server states it keeps, logs and can learn about its callers "
        "(GetServerInfo.privacy, made from the server's running configuration)."
    )
    _add_server_arguments(statement)
    statement.add_argument(
        "--json", action="store_true", help="print the statement message as JSON"
    )
    _add_tls_arguments(statement)
    _add_admin_commands(commands)
    return parser


def _add_admin_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    admin = commands.add_parser(
        "admin",
        help="change a running server's catalogs (its catalog admin service)",
        description=(
            "Call a running server's catalog admin service (heserve.admin.v1), which it "
            "serves only when started with admin tokens (--admin-tokens-file or "
            "HESERVE_ADMIN_TOKENS). Each call carries an admin token: --admin-token-file, "
            "else the HESERVE_ADMIN_TOKEN variable."
        ),
        epilog=_EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    verbs = admin.add_subparsers(dest="admin_command", required=True)
    reload = _command(
        verbs,
        "reload",
        cmd_admin_reload,
        config.RECOMMEND,
        "have the server read its catalog files again",
    )
    reload.description = (
        "Have the server read the catalog files it was started with again, as SIGHUP "
        "does, and print one line per catalog: replaced (with the versions, chunks "
        "encoded and seconds), unchanged, or failed (with why; the served version "
        "stays). Exit status 1 if any catalog failed. The call returns when every "
        "catalog is done."
    )
    _add_admin_connection(reload)

    catalogs = _command(
        verbs,
        "catalogs",
        cmd_admin_catalogs,
        config.RECOMMEND,
        "list the served catalogs and their versions",
    )
    catalogs.description = (
        "List the catalogs the server serves, one line each: the version (what "
        "`heserve admin update --if-version` compares with), items, dimension, chunks, "
        "and the updates made since the catalog's file was read (a reload or a restart "
        "serves the file without them)."
    )
    _add_admin_connection(catalogs)

    update = _command(
        verbs,
        "update",
        cmd_admin_update,
        config.RECOMMEND,
        "upsert and delete items of a served catalog",
    )
    update.description = (
        "Upsert and delete items of a served catalog by id: the server re-encodes only "
        "the chunks the items fall in and serves a new version. The upserts come from a "
        "file in a catalog's formats (.npz with embeddings and ids, and popularity if the "
        "catalog publishes it; .parquet; .npy with --ids), checked here as the server "
        "checks catalog files. A change larger than one message (--max-message-bytes) "
        "or than 65,536 items is sent in several calls, the deletes first, each made "
        "against the version the call before it served (so a concurrent writer stops "
        "it rather than being overwritten); if one fails, those before it stay applied, "
        "and the error says which version serves. One line per call."
    )
    _add_admin_connection(update)
    update.add_argument("--catalog", required=True, metavar="NAME", help="catalog to change")
    update.add_argument(
        "--upsert",
        type=Path,
        metavar="FILE",
        help="items to write: .npz (embeddings, ids[, popularity]), .parquet (id, "
        "embedding[, popularity] columns; FILE#id:embedding[:popularity] names others) "
        "or .npy (with --ids); an id the catalog has is replaced, a new one is added",
    )
    update.add_argument(
        "--ids", type=Path, metavar="FILE", help="ids of an --upsert .npy file, one a line"
    )
    update.add_argument(
        "--delete", action="append", metavar="ID", help="id of an item to remove; repeatable"
    )
    update.add_argument(
        "--delete-file", type=Path, metavar="FILE", help="ids of items to remove, one a line"
    )
    update.add_argument(
        "--if-version",
        metavar="VERSION",
        help="change only if the catalog is at this version (see `heserve admin "
        "catalogs`); else nothing changes and the command fails",
    )


def _add_admin_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        "--target",
        dest="server",
        required=True,
        metavar="HOST:PORT",
        help="address of the heserve server",
    )
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="PATH",
        help="file holding the admin token (its first entry; default: the "
        "HESERVE_ADMIN_TOKEN variable)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=SizeLimits().max_message_bytes,
        metavar="N",
        help="the server's message limit (its --max-message-bytes; default: %(default)s): "
        "an update larger than one message is sent in several calls",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=_ADMIN_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="seconds to wait for the server's answer (default: %(default)g)",
    )
    _add_tls_arguments(parser)


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", required=True, metavar="HOST:PORT", help="address of the heserve server"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="file holding the API token (default: the HESERVE_TOKEN variable, if set)",
    )


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's CA certificates"
    )
    parser.add_argument(
        "--tls-ca", type=Path, metavar="PATH", help="use TLS, trusting this CA (PEM)"
    )
    parser.add_argument(
        "--tls-cert", type=Path, metavar="PATH", help="client certificate (PEM), for mutual TLS"
    )
    parser.add_argument(
        "--tls-key", type=Path, metavar="PATH", help="private key of --tls-cert (PEM)"
    )
    parser.add_argument(
        "--tls-server-name", metavar="NAME", help="name the server's certificate must carry"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, resolve the command's settings, set up logging once, run the command."""
    args = build_parser().parse_args(argv)
    options: config.OptionSet = args.options
    handler: Handler = args.handler
    settings: config.Settings | None = None
    try:
        settings = options.resolve(args, os.environ)
        logs.configure(settings.log_level, settings.log_format)
        return handler(args, settings)
    except CommandError as exc:
        _report_error(str(exc), settings)
        return exc.status
    except (CatalogError, OSError, ValueError) as exc:  # settings, or files they name
        _report_error(str(exc), settings)
        return EXIT_USAGE


def _report_error(message: str, settings: config.Settings | None) -> None:
    """The one line a failed command leaves on stderr: a JSON record when the logs are
    JSON (a log shipper reads one format per stream), else `heserve: error: ...`."""
    if settings is not None and settings.log_format == "json":
        log.error(message)
    else:
        print(f"heserve: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
