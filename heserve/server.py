"""Run the ScoringService: a gRPC server with health checking, reflection and a
graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from heserve.scoring import Scorer
from heserve.service import SERVICE_NAME, ScoringServicer
from heserve.v1 import scoring_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    """A started server, the port it is bound to, and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, then let in-flight calls finish within `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start_server(
    scorer: Scorer, host: str = "127.0.0.1", port: int = 50051, max_workers: int = 8
) -> RunningServer:
    """Bind and start a server for `scorer`; port 0 picks a free port."""
    size = scorer.limits.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="heserve"),
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ],
    )
    pb_grpc.add_ScoringServiceServicer_to_server(ScoringServicer(scorer), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("heserve listening on %s:%d", host, bound)
    return RunningServer(server, bound, health_servicer)


def serve_until_signalled(running: RunningServer, grace: float = 5.0) -> None:
    """Block until SIGTERM or SIGINT, then shut down gracefully."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d, shutting down", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        running.stop(grace)
