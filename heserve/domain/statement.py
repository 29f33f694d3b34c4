"""The server's privacy statement, built from what it runs with.

Every figure and every on/off in the statement is read from the running
configuration: the Scorer's key retention, limits, protections, backend and
catalogs, and the deployment facts only the transport knows (`Deployment`: TLS,
tokens, query budget, log level). So the statement cannot say one thing while the
server does another; tests/test_privacy_statement.py holds the log records it lists
to what the server writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from heserve.backends.local import LocalBackend
from heserve.backends.pool import PoolBackend
from heserve.domain.scorer import Scorer
from heserve.protocol import privacy
from heserve.protocol.privacy import (
    CatalogProtection,
    KeysKept,
    LoggedRecord,
    Observation,
    PrivacyStatement,
    StoredData,
)

# What each record about a call carries besides time, level, logger and message: the
# access line (heserve.transport.interceptors' AccessLogInterceptor) and the line a
# call starts with (DEBUG). tests/test_privacy_statement.py compares them with real
# records.
ACCESS_FIELDS = (
    "service",
    "method",
    "code",
    "request_id",
    "duration_ms",
    "deadline_ms",
    "caller",
    "bytes_in",
    "bytes_out",
)
SCORE_ACCESS_FIELDS = ("catalog", "queries", "items")
"""What Score's access line carries besides ACCESS_FIELDS."""
CALL_STARTED_FIELDS = ("method", "request_id", "caller", "peer", "deadline_ms")
NEVER_LOGGED = (
    "secret keys",
    "Galois key bytes",
    "queries (ciphertexts)",
    "scores",
    "user vectors",
    "API tokens",
)
_NAME_LEVELS = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING"}


@dataclass(frozen=True)
class Deployment:
    """What the transport serves with, that the Scorer does not know."""

    transport: str = privacy.PLAINTEXT
    """privacy.PLAINTEXT, TLS or MUTUAL_TLS."""
    tokens: bool = False
    """Every call (health checks aside) must carry an API token."""
    query_budget: int = 0
    """Score queries per caller per window; 0: no budget."""
    query_budget_window_seconds: float = 3600.0
    log_level: int = logging.INFO
    """The effective level of the server's loggers."""


def _written(level: int, deployment: Deployment) -> bool:
    return level >= deployment.log_level


def _record(
    name: str, level: int, fields: tuple[str, ...], text: str, deployment: Deployment
) -> LoggedRecord:
    return LoggedRecord(name, _NAME_LEVELS[level], _written(level, deployment), fields, text)


def _where_keys_live(scorer: Scorer) -> str:
    backend = scorer.backend
    if isinstance(backend, LocalBackend):
        return "in the server process's memory"
    if isinstance(backend, PoolBackend):
        return f"in the memory of the server process and of its {backend.shard_count} workers"
    return (
        f"in the memory of the server process and of its {backend.shard_count} Ray actors, "
        "through Ray's object store (which spills to its nodes' disks under memory pressure)"
    )


def _stored(scorer: Scorer, deployment: Deployment) -> tuple[StoredData, ...]:
    retention = scorer.retention
    quota = (
        f"; at most {retention.max_keys_per_caller} key sets per API token"
        if deployment.tokens
        else ""
    )
    items = [
        StoredData(
            "galois_keys",
            f"The public Galois (rotation) keys of each registered key pair, under their "
            f"key_id, {_where_keys_live(scorer)}, never written to disk by heserve: at most "
            f"{retention.max_keys} key sets and {retention.max_bytes / 2**20:g} MiB{quota}, "
            "the least recently used dropped first. They let the server compute on "
            "ciphertexts; they decrypt nothing.",
            retention.ttl_seconds,
            f"until {retention.ttl_seconds} s pass without a call using them, DeleteKeys, "
            "eviction or a restart",
            True,
        )
    ]
    if deployment.query_budget:
        window = deployment.query_budget_window_seconds
        whose = "API token" if deployment.tokens else "server (all callers are one)"
        items.append(
            StoredData(
                "query_budget_counts",
                f"Per {whose}: when its current {window:g} s window began and how many "
                "Score queries it made in it.",
                0,
                "while the server runs (one entry per token name, reset each window)",
                False,
            )
        )
    items.append(
        StoredData(
            "calls_in_flight",
            "Per caller (API token name, else network address): how many calls and streams "
            "it has running, to hold it to its share of the server.",
            0,
            "only while its calls run",
            False,
        )
    )
    return tuple(items)


def _logs(deployment: Deployment) -> tuple[LoggedRecord, ...]:
    return (
        _record(
            "access",
            logging.INFO,
            ACCESS_FIELDS + SCORE_ACCESS_FIELDS,
            "One line a call as it ends: method, status code, duration, deadline, the API "
            "token's name (or anonymous) and message sizes; a Score's also names its catalog "
            "(cut to 64 characters) and counts its queries and the items scored (successful "
            "health checks at DEBUG).",
            deployment,
        ),
        _record(
            "keys_registered",
            logging.INFO,
            ("request_id", "key_id_prefix", "bytes_uploaded"),
            "A key registration: the first 12 characters of its key_id and its size.",
            deployment,
        ),
        _record(
            "refused",
            logging.INFO,
            ("request_id", "method", "code", "message"),
            "A refused call: its status and message, which may name a catalog or an item id "
            "the call sent (clipped).",
            deployment,
        ),
        _record(
            "call_started",
            logging.DEBUG,
            CALL_STARTED_FIELDS,
            "A call as it starts, with the client's network address (peer).",
            deployment,
        ),
        _record(
            "sizes",
            logging.DEBUG,
            ("request_id", "bytes", "items"),
            "Each key chunk's and each score response's size.",
            deployment,
        ),
    )


def _observations(scorer: Scorer, deployment: Deployment) -> tuple[Observation, ...]:
    who = (
        "The name of the API token each call carries"
        if deployment.tokens
        else "Nothing of who calls beyond the network address: without API tokens every "
        "caller is the same anonymous caller"
    )
    if deployment.transport == privacy.MUTUAL_TLS:
        who += ", and the client certificate each connection presents"
    peer_logged = (
        "written to the log at this level"
        if _written(logging.DEBUG, deployment)
        else "not logged at this level"
    )
    local_limit = privacy.largest_catalog_reranked_locally(scorer.params.slot_count)
    catalogs_local = [
        name for name, entry in scorer.catalogs.items() if entry.catalog.item_count <= local_limit
    ]
    local = ", ".join(catalogs_local) if catalogs_local else "none"
    return (
        Observation("caller", f"{who}."),
        Observation(
            "peer_address",
            f"The network address each connection comes from ({peer_logged}).",
        ),
        Observation("catalog", "Which catalog each call names, and the catalog's size."),
        Observation("timing", "When each call comes and how long it takes."),
        Observation(
            "sizes",
            "The size of the keys, of each query and of the responses, and how many queries "
            "a call carries; nothing of the user vector or the scores, which are CKKS "
            "ciphertexts under 128-bit parameters.",
        ),
        Observation(
            "rerank_candidate_ids",
            "The candidate item ids of a re-ranking call (ScoreRequest.item_ids), if a client "
            "sends them. heserve's Python client sends none for a catalog of at most "
            f"{local_limit} items (it scores the whole catalog and picks the candidates "
            f"itself; catalogs here: {local}), nor under a policy with send_item_ids=False.",
        ),
        Observation(
            "linkability",
            "Calls under one key_id are one key pair's: a client that keeps its key file "
            "links its sessions until it deletes its keys or they expire.",
        ),
    )


def _protections(scorer: Scorer, deployment: Deployment) -> tuple[CatalogProtection, ...]:
    protection = scorer.protection
    scaling = (
        "a client that scales its query: the noise has a fixed size, so scores 10^k times "
        "larger make it 10^k times smaller relatively (the server cannot check the norm of "
        "an encrypted vector)"
    )
    budget = deployment.query_budget
    per = "caller" if deployment.tokens else "server (no tokens: all callers share it)"
    return (
        CatalogProtection(
            "query_budget",
            bool(budget),
            f"{budget} queries per {per} per {deployment.query_budget_window_seconds:g} s"
            if budget
            else "off",
            "how many queries one identity makes (about d of them solve for the catalog)",
            "a client with many API tokens, or one whose queries stay under the budget "
            "over the catalog's lifetime",
        ),
        CatalogProtection(
            "flood_bits",
            protection.flood_bits > 0,
            f"{protection.flood_bits} bits of noise flooding" if protection.flood_bits else "off",
            "what the CKKS noise of a result tells of the catalog beyond the scores",
            scaling,
        ),
        CatalogProtection(
            "score_noise_std",
            protection.score_noise_std > 0,
            f"Gaussian noise of std {protection.score_noise_std:g} on every score"
            if protection.score_noise_std
            else "off",
            "what each released score tells of the catalog, for vectors of norm at most 1 "
            "(costs the user's ranking some precision)",
            scaling,
        ),
    )


def _summary(scorer: Scorer, deployment: Deployment) -> tuple[str, ...]:
    ttl = scorer.retention.ttl_seconds
    transport = {
        privacy.PLAINTEXT: "without TLS: API tokens, key_ids, catalog names and item ids "
        "cross the network in clear",
        privacy.TLS: "over TLS",
        privacy.MUTUAL_TLS: "over mutual TLS",
    }[deployment.transport]
    on = [p.name for p in _protections(scorer, deployment) if p.enabled]
    return (
        "The server never receives a secret key, a user vector or a score: it holds public "
        "Galois keys and computes on CKKS ciphertexts.",
        f"It keeps the keys, in memory, until {ttl} s pass unused or the client deletes "
        "them; nothing else per user.",
        (
            "It logs one line a call (method, status, duration, caller name, sizes)"
            if _written(logging.INFO, deployment)
            else f"At its log level ({logging.getLevelName(deployment.log_level)}) it logs "
            "no line about calls"
        )
        + "; never keys, queries, scores, vectors or tokens.",
        "It can learn who calls, when, which catalog, message sizes, and the candidate ids "
        "of a re-ranking call that sends them.",
        f"It is served {transport}.",
        "Catalog protections on: " + (", ".join(on) if on else "none") + ".",
    )


def build_statement(scorer: Scorer, deployment: Deployment | None = None) -> PrivacyStatement:
    """The statement of a server running `scorer` as `deployment` says."""
    deployment = deployment or Deployment()
    retention = scorer.retention
    return PrivacyStatement(
        statement_version=privacy.STATEMENT_VERSION,
        keys=KeysKept(
            retention.ttl_seconds,
            retention.max_keys,
            retention.max_bytes,
            retention.max_keys_per_caller,
        ),
        stored=_stored(scorer, deployment),
        logs=_logs(deployment),
        never_logged=NEVER_LOGGED,
        observations=_observations(scorer, deployment),
        transport=deployment.transport,
        caller_identity=privacy.API_TOKEN if deployment.tokens else privacy.ANONYMOUS,
        catalog_protections=_protections(scorer, deployment),
        summary=_summary(scorer, deployment),
    )
