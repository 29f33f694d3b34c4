"""Run the ScoringService: a gRPC server with health checking, reflection, TLS,
per-call policy (request ids, access log, metrics, tokens, budgets; see `interceptors`),
bounded concurrency, message and metadata sizes, grpcio's own log records kept free
of request data, and a graceful shutdown on SIGTERM/SIGINT.

With admin tokens (`AdminConfig`), the same server also serves the CatalogAdminService
(heserve.admin.v1, see heserve.transport.admin) behind its own token check; without
them it is not served at all (UNIMPLEMENTED, and absent from reflection). SIGHUP and
the admin ReloadCatalogs call run one reload at a time between them (`OneAtATime`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from heserve.admin.v1 import admin_pb2_grpc as admin_grpc
from heserve.domain.scorer import CatalogChange, Scorer
from heserve.domain.statement import Deployment
from heserve.protocol import privacy
from heserve.protocol.pem import read_pem
from heserve.transport.admin import ADMIN_SERVICE_NAME, CatalogAdminServicer
from heserve.transport.auth import Authenticator, QueryBudget, TokenError
from heserve.transport.bridge import CallAdmission, CallLimits, SyncBridge
from heserve.transport.interceptors import (
    MAX_METADATA_BYTES,
    AccessLogInterceptor,
    AdminAuthenticationInterceptor,
    AuthenticationInterceptor,
    MetadataLimitInterceptor,
    MetricsInterceptor,
    QueryBudgetInterceptor,
    RequestIdInterceptor,
    ServerInterceptor,
)
from heserve.transport.metrics import Metrics
from heserve.transport.servicer import SERVICE_NAME, ScoringServicer
from heserve.v1 import scoring_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
_AIO_LOOP_NOTE = "[_cygrpc] Loaded running loop"


class GrpcLogRedactor(logging.Filter):
    """Keeps request data out of grpcio's own log records.

    grpcio logs some failures with the offending value as an argument: a metadata
    value that is not UTF-8 is logged at ERROR, with a traceback, as the raw bytes of
    the whole header (a caller's `authorization` header, token and all). This filter,
    on every `grpc.*` logger, keeps a record's level, logger and message template but
    drops its arguments, and replaces its traceback by the exception's type. grpcio's
    templates are constants, so what is left names the kind of failure and no data.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG and str(record.msg).startswith(_AIO_LOOP_NOTE):
            return False  # grpc.aio notes, once a call, which event loop it found: noise
        if record.args:
            record.msg = f"{record.msg} (details withheld: they may hold request data)"
            record.args = None
        if record.exc_info:
            kind = record.exc_info[0]
            record.msg = f"{record.msg} [{getattr(kind, '__name__', 'exception')}]"
            record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def redact_grpc_logs() -> None:
    """Install `GrpcLogRedactor` on grpcio's loggers (idempotent).

    A logger's filters see only the records logged on that very logger, so the filter
    goes on each one grpcio made (they are made when its modules are imported, which
    `import grpc` has done), and on "grpc" itself.
    """
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] == "grpc"]
    for name in {"grpc", "grpc._cython.cygrpc", "grpc._common", "grpc._server", *names}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, GrpcLogRedactor) for f in logger.filters):
            logger.addFilter(GrpcLogRedactor())


@dataclass(frozen=True)
class TlsConfig:
    """The server's certificate chain and key (PEM); with `client_ca`, clients must
    present a certificate that CA signed (mutual TLS)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: Path, key: Path, client_ca: Path | None = None) -> TlsConfig:
        """Read the PEM files; a private key every local user can read is refused."""
        return cls(
            read_pem(cert),
            read_pem(key, private=True),
            None if client_ca is None else read_pem(client_ca),
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


Reload = Callable[[], Sequence[CatalogChange]]
"""Re-read the catalog sources named at start-up; one CatalogChange per catalog."""


class OneAtATime:
    """A reload that runs one at a time, whoever asks (SIGHUP, the admin call): a second
    request waits for the running one, then runs (it may find newer files)."""

    def __init__(self, reload: Reload) -> None:
        self._reload = reload
        self._lock = threading.Lock()

    def __call__(self) -> Sequence[CatalogChange]:
        with self._lock:
            return self._reload()


@dataclass(frozen=True)
class AdminConfig:
    """What the admin service needs: who may call it, and how to reload (None: the
    server was started without catalog files, so ReloadCatalogs has nothing to read)."""

    authenticator: Authenticator
    reload: OneAtATime | None = None


def interceptors(
    metrics: Metrics,
    authenticator: Authenticator | None = None,
    query_budget: QueryBudget | None = None,
    admin_authenticator: Authenticator | None = None,
) -> list[ServerInterceptor]:
    """The per-call policy, outermost first (gRPC runs the first interceptor first).

    1. Request id: every call is named first, so each line logged about it, refusals
       included, carries its id, and the client gets the id back even when refused.
    2. Access log and 3. metrics: outside the refusals, so a refused call is still
       logged and counted with its status.
    4. Metadata size: an oversized call is refused before anything reads its metadata.
    5. Admin authentication (with admin tokens): a call of the admin service without
       an admin token is refused; it binds the admin caller the next one checks for.
    6. Authentication, then 7. the query budget: the budget charges the caller the
       authentication found, and a call without a known token charges nobody.
    All refuse in the dispatch thread, before the request is read.
    """
    chain: list[ServerInterceptor] = [
        RequestIdInterceptor(),
        AccessLogInterceptor(),
        MetricsInterceptor(metrics),
        MetadataLimitInterceptor(),
    ]
    if admin_authenticator is not None:
        chain.append(AdminAuthenticationInterceptor(admin_authenticator))
    if authenticator is not None:
        chain.append(AuthenticationInterceptor(authenticator))
    if query_budget is not None:
        chain.append(QueryBudgetInterceptor(query_budget))
    return chain


class _LoopThread:
    """An asyncio event loop run by a daemon thread: the aio server's home, driven from
    synchronous code (the CLI, tests) through `run`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="heserve-loop", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@dataclass
class RunningServer:
    """A started server, the port it is bound to, its health servicer and metrics.

    The server is `grpc.aio` on an event loop of its own thread (see
    heserve.transport.bridge): `stop` and `wait` may be called from any other thread.
    """

    server: aio.Server
    port: int
    health: health_async.HealthServicer
    metrics: Metrics
    metrics_port: int | None = None
    admission: CallAdmission | None = None
    _loop: _LoopThread | None = None
    _executor: futures.ThreadPoolExecutor | None = None
    _servicer: ScoringServicer | None = None

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, then let in-flight calls finish within `grace` seconds;
        calls still running then are ended, logged as the shutdown's doing."""
        loop = self._loop
        if loop is None:
            return
        self._loop = None
        started = time.monotonic()
        if self._servicer is not None:
            self._servicer.stopping.set()
        with contextlib.suppress(TimeoutError):
            loop.run(self.health.enter_graceful_shutdown(), timeout=1.0)
        loop.run(self.server.stop(grace))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        loop.close()
        self.metrics.close()
        log.info(
            "heserve stopped in %.2f s",
            time.monotonic() - started,
            extra={"fields": {"event": "stopped", "grace_seconds": grace}},
        )


def start_server(
    scorer: Scorer,
    host: str = "127.0.0.1",
    port: int = 50051,
    max_workers: int = 8,
    *,
    tls: TlsConfig | None = None,
    authenticator: Authenticator | None = None,
    query_budget: QueryBudget | None = None,
    max_concurrent_rpcs: int | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    call_limits: CallLimits | None = None,
    admin: AdminConfig | None = None,
) -> RunningServer:
    """Bind and start a server for `scorer`; port 0 picks a free port.

    `max_workers` threads compute (parse, score, run the per-call policy); waiting for
    a client takes none. `max_concurrent_rpcs` bounds the calls running or queued at
    once (health checks included); gRPC refuses the next with RESOURCE_EXHAUSTED.
    `call_limits` bounds what one caller may hold and how long an upload or an unread
    response may wait (see CallLimits). `metrics_port` serves Prometheus metrics on
    metrics_host (0: a free port; None: not served). `admin` serves the admin service
    (heserve.admin.v1) to its tokens' holders; an admin token that is also an API token
    is refused (TokenError).
    """
    if admin is not None and authenticator is not None:
        refuse_shared_tokens(authenticator, admin.authenticator)
    size = scorer.limits.max_message_bytes
    limits = call_limits or CallLimits()
    redact_grpc_logs()
    metrics = Metrics(scorer, max_concurrent_rpcs)
    executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="heserve")
    bridge = SyncBridge(
        interceptors(
            metrics, authenticator, query_budget, None if admin is None else admin.authenticator
        ),
        executor,
        limits,
        metrics,
        max_upload_bytes=scorer.limits.max_key_bytes + scorer.limits.max_key_chunk_bytes,
    )
    deployment = Deployment(
        transport=privacy.PLAINTEXT
        if tls is None
        else privacy.MUTUAL_TLS
        if tls.client_ca
        else privacy.TLS,
        tokens=authenticator is not None,
        query_budget=query_budget.limit if query_budget else 0,
        query_budget_window_seconds=query_budget.window_seconds if query_budget else 3600.0,
        # what the access log (and every heserve logger under it) writes from
        log_level=logging.getLogger("heserve.access").getEffectiveLevel(),
    )
    servicer = ScoringServicer(scorer, deployment)
    pb_grpc.add_ScoringServiceServicer_to_server(servicer, bridge)
    services = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
    if admin is not None:
        admin_grpc.add_CatalogAdminServiceServicer_to_server(
            CatalogAdminServicer(scorer, admin.reload), bridge
        )
        services.append(ADMIN_SERVICE_NAME)
    # Admission counts an admin's calls against the admin's share, as a client's
    # against the client's (which token opens which service is the chain's business).
    admission = CallAdmission(
        limits,
        authenticator
        if admin is None
        else admin.authenticator
        if authenticator is None
        else authenticator.either(admin.authenticator),
    )
    health_servicer = health_async.HealthServicer()
    loop = _LoopThread()

    async def build() -> tuple[aio.Server, int]:
        server = aio.server(
            interceptors=[admission],
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                # Both the soft limit (past it grpcio refuses at random) and the hard
                # one; gRPC applies them once the client has acknowledged the server's
                # HTTP/2 settings, CallAdmission before that too.
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
                # gRPC binds with SO_REUSEPORT by default: a second server on a port in
                # use would start, and clients would reach either one at random.
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers((bridge,))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(services, server)
        address = f"{host}:{port}"
        try:
            bound = (
                server.add_secure_port(address, tls.credentials())
                if tls is not None
                else server.add_insecure_port(address)
            )
        except RuntimeError:  # grpcio's "Failed to bind to address"
            bound = 0
        if bound == 0:
            raise OSError(f"cannot listen on {address}: in use, or not an address of this host")
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return server, bound

    try:
        server, bound = loop.run(build())
    except BaseException:
        loop.close()
        executor.shutdown(wait=False)
        raise
    served_metrics = None if metrics_port is None else metrics.serve(metrics_host, metrics_port)
    log.info(
        "heserve listening on %s:%d",
        host,
        bound,
        extra={
            "fields": {
                "tls": "off" if tls is None else "mutual" if tls.client_ca else "on",
                "tokens": len(authenticator) if authenticator else 0,
                "admin_tokens": len(admin.authenticator) if admin else 0,
                "query_budget": query_budget.limit if query_budget else 0,
                "max_concurrent_rpcs": max_concurrent_rpcs or 0,
                "max_message_bytes": size,
                "metrics_port": served_metrics or 0,
                "max_streams_per_caller": limits.max_streams_per_caller,
            }
        },
    )
    return RunningServer(
        server, bound, health_servicer, metrics, served_metrics, admission, loop, executor, servicer
    )


def refuse_shared_tokens(api: Authenticator, admin: Authenticator) -> None:
    """Refuse an admin token that is also an API token: every client holding it could
    change the catalogs."""
    shared = admin.shared_with(api)
    if shared:
        raise TokenError(
            f"admin token(s) of {', '.join(shared)} are also API tokens: an admin token is a "
            "write capability over the catalogs and must not be a client's; make new ones"
        )


@contextlib.contextmanager
def handled_signals(on_reload: OneAtATime | None = None) -> Iterator[threading.Event]:
    """While inside, SIGTERM and SIGINT set the event yielded (the server is to stop),
    and each SIGHUP runs `on_reload` in a thread of its own while the server serves; it
    is the same `OneAtATime` the admin service reloads with, so one reload runs at a
    time. Without it (no catalog files: the demo catalog), a SIGHUP is logged and
    changes nothing: a routine `systemctl reload` must not end the server, as SIGHUP's
    default would. Entered before the server listens, so that a signal sent as soon as
    it says it listens finds these handlers; the previous ones are restored on exit."""
    stop = threading.Event()

    # A handler runs in the main thread between two of its bytecodes, maybe in the middle
    # of its own write to stderr: what it logs, another thread writes (a log call here
    # would be a reentrant write, which Python refuses).
    def in_thread(work: Callable[[], object], name: str) -> None:
        threading.Thread(target=work, name=name, daemon=True).start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        in_thread(lambda: log.info("received signal %d, shutting down", signum), "heserve-stop")

    def hangup() -> None:
        if on_reload is None:
            log.warning(
                "received SIGHUP: nothing to reload (the server was started without "
                "catalog files); still serving"
            )
            return
        log.info("received SIGHUP: reloading the catalogs")
        on_reload()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        in_thread(hangup, "heserve-reload")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_until_signalled(
    running: RunningServer, stop: threading.Event, grace: float = 5.0
) -> None:
    """Serve until `stop` is set (see `handled_signals`), then shut down gracefully."""
    try:
        stop.wait()
    finally:
        running.stop(grace)
