"""The heserve client: encrypt a user vector, have a server score it, decrypt, rank.

The secret key stays in this process (or in a file the user names); the server
only ever receives public Galois keys and ciphertexts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from heserve.protocol.convert import (
    CatalogInfo,
    catalog_info_from_message,
    parameters_from_message,
    privacy_from_message,
)
from heserve.protocol.params import CkksParameters
from heserve.protocol.pem import PemSource, read_pem
from heserve.protocol.privacy import (
    Policy,
    PrivacyStatement,
    Unmet,
    reranks_locally,
    summary_of,
)
from heserve.protocol.slots import query_slots, unpack_complex
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client._errors import (
    ClientClosedError,
    HeserveError,
    InvalidRequestError,
    KeyNotFoundError,
    NotFoundError,
    ParameterMismatchError,
    PermissionDeniedError,
    PolicyError,
    ServerUnavailableError,
    StaleCatalogError,
    from_rpc_error,
)
from heserve_client._secret import SecretContext

log = logging.getLogger("heserve_client")
T = TypeVar("T")
_KEY_CHUNK_BYTES = 1 << 20
_CHANNEL_MESSAGE_BYTES = 16 << 20
# gRPC waits longer after each failed connection attempt, by default up to two minutes,
# and fails calls at once meanwhile: a client used through a server restart would stay
# unavailable long after the server came back. A few seconds' cap keeps that short.
_MAX_RECONNECT_BACKOFF_MS = 2000
# Retrying UNAVAILABLE: the first pause, doubled after each attempt up to the cap (each
# with +-20% jitter, so that clients cut off together do not come back together), for
# as long as the call's deadline leaves room. The cap matches the channel's reconnection
# backoff: retrying faster than the channel reconnects only fails faster.
_FIRST_RETRY_PAUSE = 0.05
_MAX_RETRY_PAUSE = _MAX_RECONNECT_BACKOFF_MS / 1000
_REGISTRATION_SUFFIX = ".registration"


def _pem(source: PemSource | None) -> bytes | None:
    return None if source is None else read_pem(source)


@dataclass
class TransferStats:
    """Bytes the client has sent and received, by kind, since it was made."""

    key_bytes_sent: int = 0
    query_bytes_sent: int = 0
    score_bytes_received: int = 0
    last_query_bytes: int = 0
    last_response_bytes: int = 0
    registrations: int = 0
    last_encrypt_seconds: float = 0.0
    last_score_seconds: float = 0.0
    last_decrypt_seconds: float = 0.0
    last_keygen_seconds: float = 0.0
    retries: int = 0
    """Calls made again after UNAVAILABLE (a restart, a worker that died)."""
    catalog_refreshes: int = 0
    """Catalog information read again after the server refused a stale version."""


@dataclass
class _Session:
    """Per-connection state: the secret context and the key_id it registered.

    `key_id_restored`: the key_id came from the key file's registration record, not
    from a registration of this client: the server may have forgotten it, or it may
    belong to another token, and either refusal just means registering anew."""

    secret: SecretContext
    key_id: str = ""
    key_id_restored: bool = False
    item_ids: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    popularity: dict[tuple[str, str], list[float] | None] = field(default_factory=dict)


class RegistrationRecord:
    """The key_ids a key pair is registered under, by server, beside its key file.

    `<key_file>.registration` holds JSON: for each target, the key_id and when the
    server forgets it if unused (its idle TTL, from the last use this client saw). A
    later client with the same key file and server uses the key_id until then instead
    of uploading the Galois keys again. A key_id gives nothing without the secret key
    (scores come back encrypted under it), which sits in the file next to it; the
    record is owner-only all the same, and a record that cannot be read is ignored.
    """

    def __init__(self, key_file: Path) -> None:
        self.path = key_file.with_name(key_file.name + _REGISTRATION_SUFFIX)

    def _entries(self) -> dict[str, dict[str, Any]]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def key_id(self, target: str) -> str:
        """The key_id registered at `target`, if the server should still hold it."""
        entry = self._entries().get(target)
        if not isinstance(entry, dict):
            return ""
        key_id, expires = entry.get("key_id"), entry.get("expires_at")
        if not isinstance(key_id, str) or not isinstance(expires, int | float):
            return ""
        return key_id if expires > time.time() else ""

    def save(self, target: str, key_id: str, ttl_seconds: float) -> None:
        entries = self._entries()
        entries[target] = {"key_id": key_id, "expires_at": time.time() + ttl_seconds}
        self._write(entries)

    def forget(self, target: str) -> None:
        entries = self._entries()
        if entries.pop(target, None) is not None:
            self._write(entries)

    def recorded_key_id(self, target: str) -> str:
        """The key_id recorded for `target`, expired or not (what to erase there)."""
        entry = self._entries().get(target)
        key_id = entry.get("key_id") if isinstance(entry, dict) else None
        return key_id if isinstance(key_id, str) else ""

    def targets(self) -> list[str]:
        """Every server the record holds a registration at."""
        return sorted(self._entries())

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        """Replace the record at once (a new owner-only file renamed over it)."""
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(temporary, flags, 0o600), "w") as out:
            json.dump(entries, out)
        os.replace(temporary, self.path)


@dataclass(frozen=True)
class ErasureReport:
    """What `Client.forget_me` erased: on the server, and on this machine."""

    server: str
    erased: tuple[str, ...] = ()
    """Key_ids the server held and dropped now."""
    already_gone: tuple[str, ...] = ()
    """Key_ids the server no longer held (expired, evicted, deleted, a restart)."""
    files_removed: tuple[Path, ...] = ()
    """The key file and its registration record, if they existed."""
    registrations_left: tuple[str, ...] = ()
    """Other servers the registration record named: not contacted, so their keys stay
    until their idle TTL (nothing can use them: the secret key is gone)."""

    def __str__(self) -> str:
        def listed(items: Sequence[object]) -> str:
            return ", ".join(str(item) for item in items) if items else "none"

        lines = [
            f"keys erased on {self.server}: {listed([k[:12] for k in self.erased])}",
            f"keys the server no longer held: {listed([k[:12] for k in self.already_gone])}",
            f"files removed: {listed(self.files_removed)}",
        ]
        if self.registrations_left:
            lines.append(
                "registrations at other servers, left to expire: " + listed(self.registrations_left)
            )
        return "\n".join(lines)


class Client:
    """A connection to a heserve server. Use as a context manager.

    `key_file`: where to keep the key pair across runs. If the file exists its key
    pair is used (it must match the server's parameters); if not, a new one is
    made and saved there. Without it, a fresh key pair lives in memory only. With a
    key file, the registration is kept too (see `RegistrationRecord`): the next client
    with that file re-uses the key_id until the server's idle TTL would have dropped it.

    `forget_keys_on_close`: erase the keys on the server at `close()` (right to
    erasure). Default: yes without a key file, no with one (the registration is kept
    for the next run; `delete_keys()` erases it explicitly).

    Failures and retries: a call refused as UNAVAILABLE (the server restarting, a worker
    process that died) is made again after a pause, doubling from 50 ms up to 2 s, for as
    long as its deadline leaves room (`retry_unavailable=False`: not). Every call the
    client makes is idempotent (a Score is a pure function of its query; RegisterKeys
    of the same bytes gives the same key_id). The first call, in the constructor, is
    not retried, so that a wrong address or TLS setting fails at once. A catalog that
    changed version (a restart or a reload with other content) is read again and the
    call retried once; keys the server forgot are registered again. Errors are
    HeserveError subclasses, one per status and ErrorInfo reason.

    Re-ranking (`score(..., item_ids=...)`): the server encodes a list of candidates
    per query, which costs more than scoring a catalog it holds encoded unless the
    catalog is several times larger than the list. Up to RERANK_LOCALLY_UP_TO
    (heserve.protocol.privacy) catalog chunks per chunk of candidates, the client
    scores the whole catalog and picks the candidates itself (about as fast, and the
    server does not learn the candidates); `rerank_locally` True or False forces one way.

    Privacy: `policy` (heserve_client.Policy) is what this client requires of the
    server's privacy statement (GetServerInfo.privacy): TLS, a key TTL at most so long,
    no log of the client's address... It is checked in the constructor, before anything
    derived from the user is sent (no keys, no query, no candidate ids), and a server
    that fails it raises PolicyError naming each failed requirement; `require_tls` on a
    channel that is not TLS fails before any call, so not even the token is sent in
    clear. `send_item_ids=False` keeps candidate ids here: re-ranking always scores
    the whole catalog. The default requires nothing (`Policy()`); an app on a user's
    device should pass `Policy.mobile()`. `statement` is the server's statement (None
    from a server before statements).

    Connection: `token` is sent as `authorization: Bearer <token>` on every call.
    TLS is used when `tls` is true or any `tls_*` option is given: `tls_ca` is the CA
    that signed the server's certificate (default: the system's roots), `tls_cert` and
    `tls_key` the client's own certificate and key for mutual TLS (each a PEM path or
    PEM bytes), `tls_server_name` the name to check the server's certificate against
    when it differs from the target's host. Every call carries a deadline (`timeout`
    seconds) and a fresh `x-request-id` (the last one is `last_request_id`). The
    channel accepts messages of `max_message_bytes`, or of the server's announced
    limit if that is larger. With `channel`, all of these but `token` and `timeout`
    are the channel's business.
    """

    def __init__(
        self,
        target: str,
        *,
        key_file: str | os.PathLike[str] | None = None,
        timeout: float = 120.0,
        channel: grpc.Channel | None = None,
        forget_keys_on_close: bool | None = None,
        retry_unavailable: bool = True,
        rerank_locally: bool | None = None,
        token: str | None = None,
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = _CHANNEL_MESSAGE_BYTES,
        policy: Policy | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        self.policy = policy or Policy()
        if not self.policy.send_item_ids and rerank_locally is False:
            raise ValueError("rerank_locally=False sends candidate ids; the policy forbids it")
        if token is not None and (not token.strip() or any(c.isspace() for c in token.strip())):
            raise ValueError("the API token is empty or contains spaces")
        self.timeout = timeout
        self.forget_keys_on_close = (
            key_file is None if forget_keys_on_close is None else forget_keys_on_close
        )
        self.retry_unavailable = retry_unavailable
        self.rerank_locally = rerank_locally
        self._row_maps: dict[str, tuple[str, dict[str, int]]] = {}
        self._connected = False  # retries begin once the server has answered once
        self._closed = False
        self.stats = TransferStats()
        self.last_request_id = ""
        self.max_message_bytes = max_message_bytes
        self._token = None if token is None else token.strip()
        self._target = target
        self._credentials: grpc.ChannelCredentials | None = None
        self._server_name = tls_server_name
        if tls or tls_ca is not None or tls_cert is not None or tls_server_name is not None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca),
                private_key=_pem(tls_key),
                certificate_chain=_pem(tls_cert),
            )
        self._owns_channel = channel is None
        connection_tls = None if channel is not None else self._credentials is not None
        if self.policy.require_tls and connection_tls is False:
            # before any call: not even the token crosses the network in clear
            plaintext = Unmet("require_tls", "this client's connection is not TLS")
            raise PolicyError(summary_of([plaintext]), requirements=(plaintext.requirement,))
        self._channel = channel or self._open_channel()
        self._stub = pb_grpc.ScoringServiceStub(self._channel)
        try:
            self.server_info: pb.GetServerInfoResponse = self._rpc(
                self._stub.GetServerInfo, pb.GetServerInfoRequest()
            )
        except HeserveError:
            if self._owns_channel:
                self._channel.close()
            raise
        self.statement: PrivacyStatement | None = privacy_from_message(self.server_info)
        unmet = self.policy.unmet(
            self.statement,
            key_ttl_seconds=self.server_info.key_retention.ttl_seconds,
            connection_tls=connection_tls,
        )
        if unmet:
            if self._owns_channel:
                self._channel.close()
            log.warning("refusing server %s: %s", target, summary_of(unmet))
            raise PolicyError(
                summary_of(unmet), requirements=tuple(item.requirement for item in unmet)
            )
        self._connected = True
        announced = self.server_info.limits.max_message_bytes
        if self._owns_channel and announced > self.max_message_bytes:
            self._channel.close()  # reopen with room for the server's largest message
            self.max_message_bytes = announced
            self._channel = self._open_channel()
            self._stub = pb_grpc.ScoringServiceStub(self._channel)
        self.params: CkksParameters = parameters_from_message(self.server_info.ckks)
        self._session = _Session(self._secret_context(key_file))
        self._catalogs: dict[str, CatalogInfo] = {}
        self._key_file = None if key_file is None else Path(key_file)
        self._record = None if key_file is None else RegistrationRecord(Path(key_file))
        if self._record is not None:
            self._session.key_id = self._record.key_id(self._target)
            self._session.key_id_restored = bool(self._session.key_id)
        self._key_ttl = float(self.server_info.key_retention.ttl_seconds)

    def _secret_context(self, key_file: str | os.PathLike[str] | None) -> SecretContext:
        if key_file is None:
            return SecretContext(self.params)
        path = Path(key_file)
        if not path.exists():
            secret = SecretContext(self.params)
            secret.save(path)
            return secret
        secret = SecretContext.load(path)
        if secret.params != self.params:
            raise ParameterMismatchError(
                f"{path} holds a key pair for {secret.params}, but the server uses {self.params}"
            )
        return secret

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Erase this client's keys on the server if `forget_keys_on_close`, else keep the
        registration in the key file's record (until the TTL); then close the channel."""
        if self.forget_keys_on_close and self._session.key_id:
            # the server may be gone or may have forgotten already: nothing left to erase
            with contextlib.suppress(HeserveError):
                self.delete_keys()
        elif self._record is not None and self._session.key_id:
            # the server's idle TTL runs from the last use, which was at most now
            with contextlib.suppress(OSError):
                self._record.save(self._target, self._session.key_id, self._key_ttl)
        self._channel.close()
        self._closed = True

    def _open_channel(self) -> grpc.Channel:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
        ]
        if self._credentials is None:
            return grpc.insecure_channel(self._target, options=options)
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        return grpc.secure_channel(self._target, self._credentials, options=options)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """This call's metadata: a fresh request id, and the API token if there is one."""
        self.last_request_id = uuid.uuid4().hex
        metadata = [("x-request-id", self.last_request_id)]
        if self._token is not None:
            metadata.append(("authorization", f"Bearer {self._token}"))
        return tuple(metadata)

    def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a stub method (or any callable), mapping gRPC errors."""
        if self._closed:
            raise ClientClosedError("this client is closed; make a new Client")
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def _retrying(self, attempt: Callable[[float], T]) -> T:
        """`attempt(seconds_left)` until it succeeds, made again after UNAVAILABLE with
        capped exponential backoff while the call's deadline (`timeout`) leaves room."""
        deadline = time.monotonic() + self.timeout
        pause = _FIRST_RETRY_PAUSE
        while True:
            try:
                return attempt(max(0.001, deadline - time.monotonic()))
            except ServerUnavailableError as error:
                retryable = (
                    self.retry_unavailable
                    and self._connected
                    and error.code == grpc.StatusCode.UNAVAILABLE
                )
                wait = min(pause, _MAX_RETRY_PAUSE) * random.uniform(0.8, 1.2)
                if not retryable or time.monotonic() + wait >= deadline:
                    raise
                log.info("call unavailable (%s); retrying in %.2f s", error, wait)
                self.stats.retries += 1
                time.sleep(wait)
                pause *= 2

    def _rpc(self, method: Callable[..., T], request: Any | Callable[[], Any]) -> T:
        """Call a stub method with the deadline and the metadata, mapping gRPC errors and
        retrying UNAVAILABLE. `request` may be a function making it (a stream of request
        messages cannot be sent twice)."""

        def attempt(seconds: float) -> T:
            message = request() if callable(request) else request
            return self._call(method, message, timeout=seconds, metadata=self._metadata())

        return self._retrying(attempt)

    def catalogs(self) -> list[CatalogInfo]:
        """Every catalog the server serves, fetched page by page."""
        infos: list[CatalogInfo] = []
        token = ""
        while True:
            request = pb.ListCatalogsRequest(page_token=token)
            page = self._rpc(self._stub.ListCatalogs, request)
            infos.extend(catalog_info_from_message(message) for message in page.catalogs)
            token = page.next_page_token
            if not token:
                break
        self._catalogs = {info.name: info for info in infos}
        return infos

    def catalog(self, name: str) -> CatalogInfo:
        """Information on one catalog (cached; refreshed when unknown)."""
        if name not in self._catalogs:
            self.catalogs()
        if name not in self._catalogs:
            served = ", ".join(repr(known) for known in sorted(self._catalogs)) or "none"
            raise NotFoundError(
                f"the server has no catalog named {name!r} (it serves: {served})",
                grpc.StatusCode.NOT_FOUND,
            )
        return self._catalogs[name]

    def item_ids(self, catalog: str) -> list[str]:
        """All item ids of a catalog in catalog order (cached per catalog version)."""
        return self._item_ids(self.catalog(catalog))

    def _item_ids(self, info: CatalogInfo) -> list[str]:
        catalog = info.name
        cached = self._session.item_ids.get((catalog, info.version))
        if cached is not None:
            return cached
        ids: list[str] = []
        popularity: list[float] = []
        token = ""
        limit = self.server_info.limits.max_page_size
        while True:
            request = pb.ListItemsRequest(catalog=catalog, page_size=limit, page_token=token)
            page = self._rpc(self._stub.ListItems, request)
            ids.extend(page.item_ids)
            popularity.extend(page.popularity)
            token = page.next_page_token
            if not token:
                break
        self._session.item_ids[(catalog, info.version)] = ids
        published = len(popularity) == len(ids) and bool(ids)
        self._session.popularity[(catalog, info.version)] = popularity if published else None
        return ids

    def item_popularity(self, catalog: str) -> list[float] | None:
        """The popularity the catalog publishes, one number an item in catalog order
        (higher first); None if it publishes none. Read with the item ids (ListItems):
        nothing about the user is sent."""
        info = self.catalog(catalog)
        self._item_ids(info)
        return self._session.popularity[(catalog, info.version)]

    def popular(self, catalog: str, k: int = 10) -> list[str]:
        """The k first items of the catalog's published non-personalized order: by
        popularity (ties in catalog order), or in catalog order if it publishes none.

        For a user who has not opted in to personalization: this calls ListItems only
        (catalog name and page tokens), so nothing derived from the user leaves the
        device: no keys, no query, no candidate ids. The order is the same for every
        user and cached per catalog version, so it can be shown again without a call.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        ids = self.item_ids(catalog)
        popularity = self.item_popularity(catalog)
        if popularity is None:
            return ids[:k]
        order = np.argsort(-np.asarray(popularity, dtype=np.float64), kind="stable")[:k]
        return [ids[i] for i in order]

    def register_keys(self) -> str:
        """Upload the public Galois keys the server asks for; returns the key_id.

        Step 0 (complex conjugation) is left out: this client decodes complex
        scores, which do not need it, and one key fewer is a smaller upload.
        """
        started = time.perf_counter()
        steps = [step for step in self.server_info.ckks.galois_steps if step != 0]
        blob = self._session.secret.galois_keys(steps)
        self.stats.last_keygen_seconds = time.perf_counter() - started

        def chunks() -> Iterator[pb.RegisterKeysRequest]:
            for start in range(0, len(blob), _KEY_CHUNK_BYTES):
                yield pb.RegisterKeysRequest(
                    galois_keys_chunk=blob[start : start + _KEY_CHUNK_BYTES]
                )

        reply = self._rpc(self._stub.RegisterKeys, chunks)
        self.stats.key_bytes_sent += len(blob)
        self.stats.registrations += 1
        self._session.key_id = reply.key_id
        self._session.key_id_restored = False
        if reply.ttl_seconds:
            self._key_ttl = float(reply.ttl_seconds)
        if self._record is not None:
            self._record.save(self._target, reply.key_id, self._key_ttl)
        return str(reply.key_id)

    def delete_keys(self) -> bool:
        """Ask the server to forget this client's keys now (right to erasure)."""
        if not self._session.key_id:
            return False
        key_id, self._session.key_id = self._session.key_id, ""
        if self._record is not None:
            self._record.forget(self._target)
        reply = self._rpc(self._stub.DeleteKeys, pb.DeleteKeysRequest(key_id=key_id))
        return bool(reply.deleted)

    def forget_me(self) -> ErasureReport:
        """Forget this user: erase the keys on the server now, then remove the key file and
        its registration record here, report what was erased, and close the client.

        The keys erased are this session's and the one the key file's record names for
        this server. The server is asked first: if it cannot be reached, the error is
        raised and nothing here is removed (the record is what names the keys to erase),
        so calling again later finishes the job. Registrations the record holds at other
        servers are reported, not contacted: their keys expire after those servers' TTL,
        and nothing can use them once the secret key is gone.
        """
        key_ids = [self._session.key_id]
        if self._record is not None:
            key_ids.append(self._record.recorded_key_id(self._target))
        erased: list[str] = []
        gone: list[str] = []
        for key_id in dict.fromkeys(k for k in key_ids if k):
            try:
                reply = self._rpc(self._stub.DeleteKeys, pb.DeleteKeysRequest(key_id=key_id))
            except PermissionDeniedError:
                # registered under another token: this caller cannot hold or use it either
                gone.append(key_id)
                continue
            (erased if reply.deleted else gone).append(key_id)
        self._session.key_id = ""
        removed: list[Path] = []
        left: list[str] = []
        if self._record is not None:
            left = [target for target in self._record.targets() if target != self._target]
            for path in (self._key_file, self._record.path):
                if path is not None and (path.exists() or path.is_symlink()):
                    path.unlink()
                    removed.append(path)
        self._record = None
        self._key_file = None
        self.forget_keys_on_close = False
        self._channel.close()
        self._closed = True
        report = ErasureReport(
            self._target, tuple(erased), tuple(gone), tuple(removed), tuple(left)
        )
        log.info("forgot this user at %s: %d key set(s) erased", self._target, len(erased))
        return report

    def score(
        self,
        vector: npt.ArrayLike,
        *,
        catalog: str,
        item_ids: Sequence[str] | None = None,
    ) -> npt.NDArray[np.float64]:
        """Encrypted scores W·u, decrypted here: in catalog order, or in item_ids order."""
        return self.score_many([vector], catalog=catalog, item_ids=item_ids)[0]

    def score_many(
        self,
        vectors: Sequence[npt.ArrayLike] | npt.NDArray[np.float64],
        *,
        catalog: str,
        item_ids: Sequence[str] | None = None,
    ) -> list[npt.NDArray[np.float64]]:
        """`score` for several vectors (a user's interests, contexts, a batch of sessions).

        They travel in as few Score calls as the server allows
        (ServerInfo.limits.max_queries_per_request), and each call scores all of its
        vectors in one pass over the catalog: much cheaper than one call each.
        """
        return self._score_many(vectors, catalog, item_ids)[1]

    def _score_many(
        self,
        vectors: Sequence[npt.ArrayLike] | npt.NDArray[np.float64],
        catalog: str,
        item_ids: Sequence[str] | None,
    ) -> tuple[CatalogInfo, list[npt.NDArray[np.float64]]]:
        """The scores, and the catalog information (version) they were computed under.

        If the server refuses the version the client knew (the catalog changed: a
        restart or a reload with other content), the client reads the catalog's
        information again and scores once more, under the new version."""
        info = self.catalog(catalog)
        try:
            return info, self._score_under(info, vectors, item_ids)
        except StaleCatalogError:
            self.catalogs()
            self.stats.catalog_refreshes += 1
            fresh = self.catalog(catalog)
            log.info("catalog %r changed version %s -> %s", catalog, info.version, fresh.version)
            return fresh, self._score_under(fresh, vectors, item_ids)

    def _score_under(
        self,
        info: CatalogInfo,
        vectors: Sequence[npt.ArrayLike] | npt.NDArray[np.float64],
        item_ids: Sequence[str] | None,
    ) -> list[npt.NDArray[np.float64]]:
        if item_ids is not None and len(item_ids) == 0:
            # No candidates: no scores, and nothing sent (never the whole catalog).
            return [np.empty(0) for _ in vectors]
        if item_ids and self._select_locally(info, len(item_ids)):
            rows = self._positions(info, item_ids)
            return [scores[rows] for scores in self._score_under(info, vectors, None)]
        catalog = info.name
        encrypted: list[bytes] = []
        started = time.perf_counter()
        for vector in vectors:
            u = np.asarray(vector, dtype=np.float64)
            if u.shape != (info.dimension,):
                raise ValueError(
                    f"catalog {catalog!r} has dimension {info.dimension}; "
                    f"got a vector of shape {u.shape}"
                )
            if not np.isfinite(u).all():
                raise ValueError("the vector contains NaN or infinity")
            slots = query_slots(u, info.dimension, self.params.slot_count)
            encrypted.append(self._session.secret.encrypt(slots))
        if not encrypted:
            return []
        self.stats.last_encrypt_seconds = time.perf_counter() - started
        expected = len(item_ids) if item_ids else info.item_count
        per_call = max(1, self.server_info.limits.max_queries_per_request)
        results: list[npt.NDArray[np.float64]] = []
        for start in range(0, len(encrypted), per_call):
            batch = encrypted[start : start + per_call]
            request = pb.ScoreRequest(
                catalog=catalog,
                query=batch[0],
                more_queries=batch[1:],
                item_ids=list(item_ids or []),
                # A whole-catalog score is read by position, so it must come from the
                # version whose ids this client holds; candidates are named by id and
                # answered in the request's order by whichever version serves, so a
                # re-ranking need not fail (and retry) when the catalog changes.
                catalog_version="" if item_ids else info.version,
                complex_scores=True,  # two scores per slot: half the responses and bytes
            )
            results.extend(self._score_registered(request, expected, len(batch)))
        return results

    def _select_locally(self, info: CatalogInfo, candidates: int) -> bool:
        """Whether to re-rank by scoring the whole catalog and picking the candidates here.

        The server keeps the catalog encoded ahead of time, but a list of candidates it
        must encode per query (d' plaintext encodings per 2S candidates, which cost
        several times the products). Up to RERANK_LOCALLY_UP_TO catalog chunks per
        chunk of candidates, the whole catalog is the faster query, and the server
        then does not learn which items were candidates. `rerank_locally` decides
        instead when set; a policy with send_item_ids=False makes it always.
        """
        if not self.policy.send_item_ids:
            return True
        if self.rerank_locally is not None:
            return self.rerank_locally
        return reranks_locally(info.item_count, info.items_per_response, candidates)

    def _positions(self, info: CatalogInfo, item_ids: Sequence[str]) -> list[int]:
        """Rows of `item_ids` in the catalog; unknown or repeated ids are refused as the
        server would refuse them."""
        if len(set(item_ids)) != len(item_ids):
            raise InvalidRequestError(
                "item_ids contains repeated ids", grpc.StatusCode.INVALID_ARGUMENT
            )
        rows = self._rows_by_id(info)
        missing = next((item for item in item_ids if item not in rows), None)
        if missing is not None:
            raise NotFoundError(
                f"unknown item id {missing[:64]!r} in catalog {info.name!r}",
                grpc.StatusCode.NOT_FOUND,
            )
        return [rows[item] for item in item_ids]

    def _rows_by_id(self, info: CatalogInfo) -> dict[str, int]:
        cached = self._row_maps.get(info.name)
        if cached is None or cached[0] != info.version:
            cached = (info.version, {item: i for i, item in enumerate(self._item_ids(info))})
            self._row_maps[info.name] = cached
        return cached[1]

    def _score_registered(
        self, request: pb.ScoreRequest, expected: int, queries: int
    ) -> list[npt.NDArray[np.float64]]:
        """One Score call, registering the keys first (or again, if the server forgot them,
        or if a key_id kept from an earlier run is not this caller's to use)."""
        if not self._session.key_id:
            self.register_keys()
        try:
            return self._score_once(request, expected, queries)
        except (KeyNotFoundError, PermissionDeniedError) as error:
            if isinstance(error, PermissionDeniedError) and not self._session.key_id_restored:
                raise
            self.register_keys()  # the server forgot our keys (expiry, restart): once more
            return self._score_once(request, expected, queries)

    def _score_once(
        self, request: pb.ScoreRequest, expected: int, queries: int
    ) -> list[npt.NDArray[np.float64]]:
        request.key_id = self._session.key_id
        max_bytes = self.server_info.limits.max_message_bytes
        totals = {"received": 0, "decrypting": 0.0}

        def consume(seconds: float) -> list[npt.NDArray[np.float64]]:
            """One attempt: a retry starts over, from the first response."""
            scores = [np.empty(expected) for _ in range(queries)]
            covered = [0] * queries
            totals["received"] = 0
            replies = self._stub.Score(request, timeout=seconds, metadata=self._metadata())
            for reply in replies:
                if reply.offset + reply.count > expected or reply.query_index >= queries:
                    raise HeserveError("the server returned scores past the end of the request")
                started = time.perf_counter()
                values = unpack_complex(
                    self._session.secret.decrypt_complex(reply.scores, max_bytes), reply.count
                )
                totals["decrypting"] += time.perf_counter() - started
                scores[reply.query_index][reply.offset : reply.offset + reply.count] = values
                totals["received"] += len(reply.scores)
                covered[reply.query_index] += reply.count
            if covered != [expected] * queries:
                raise HeserveError(f"the server returned {covered} scores for {expected} items")
            return scores

        started = time.perf_counter()
        scores = self._retrying(lambda seconds: self._call(consume, seconds))
        decrypting, received = float(totals["decrypting"]), int(totals["received"])
        sent = len(request.query) + sum(len(query) for query in request.more_queries)
        self.stats.last_decrypt_seconds = decrypting
        self.stats.last_score_seconds = time.perf_counter() - started - decrypting
        self.stats.query_bytes_sent += sent
        self.stats.last_query_bytes = sent
        self.stats.score_bytes_received += received
        self.stats.last_response_bytes = received
        return scores

    def recommend(
        self,
        vector: npt.ArrayLike,
        *,
        catalog: str,
        k: int = 10,
        item_ids: Sequence[str] | None = None,
    ) -> list[tuple[str, float]]:
        """The k best items for `vector`, best first, ranked here on decrypted scores;
        among `item_ids` only, if given (re-ranking candidates from elsewhere)."""
        return self.recommend_many([vector], catalog=catalog, k=k, item_ids=item_ids)[0]

    def recommend_many(
        self,
        vectors: Sequence[npt.ArrayLike] | npt.NDArray[np.float64],
        *,
        catalog: str,
        k: int = 10,
        item_ids: Sequence[str] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """`recommend` for several vectors, scored together (see `score_many`)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        info, all_scores = self._score_many(vectors, catalog, item_ids)
        ids = list(item_ids) if item_ids else (self._item_ids(info) if all_scores else [])
        rankings = []
        for scores in all_scores:
            top = min(k, len(scores))
            best = np.argpartition(-scores, top - 1)[:top]
            best = best[np.argsort(-scores[best], kind="stable")]
            rankings.append([(ids[i], float(scores[i])) for i in best])
        return rankings


def forget_me(target: str, key_file: str | os.PathLike[str], **options: Any) -> ErasureReport:
    """`Client.forget_me` for a key file, without loading it or making one where none is:
    connect to `target` (`options` as for Client: token, TLS, policy...), erase at the
    server the keys the key file's registration record names for it, and remove the key
    file and the record. What `heserve forget` runs."""
    client = Client(target, **options)
    path = Path(key_file)
    client._key_file = path
    client._record = RegistrationRecord(path)
    return client.forget_me()
