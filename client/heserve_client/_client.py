"""The heserve client: encrypt a user vector, have a server score it, decrypt, rank.

The secret key stays in this process (or in a file the user names); the server
only ever receives public Galois keys and ciphertexts.
"""

from __future__ import annotations

import contextlib
import os
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

from heserve.protocol.convert import CatalogInfo, catalog_info_from_message, parameters_from_message
from heserve.protocol.params import CkksParameters
from heserve.protocol.pem import PemSource, read_pem
from heserve.protocol.reasons import KEY_NOT_FOUND
from heserve.protocol.slots import query_slots, unpack_complex
from heserve.v1 import scoring_pb2 as pb
from heserve.v1 import scoring_pb2_grpc as pb_grpc
from heserve_client._errors import (
    HeserveError,
    NotFoundError,
    ParameterMismatchError,
    from_rpc_error,
)
from heserve_client._secret import SecretContext

T = TypeVar("T")
_KEY_CHUNK_BYTES = 1 << 20
_CHANNEL_MESSAGE_BYTES = 16 << 20
# gRPC waits longer after each failed connection attempt, by default up to two minutes,
# and fails calls at once meanwhile: a client used through a server restart would stay
# unavailable long after the server came back. A few seconds' cap keeps that short.
_MAX_RECONNECT_BACKOFF_MS = 2000


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


@dataclass
class _Session:
    """Per-connection state: the secret context and the key_id it registered."""

    secret: SecretContext
    key_id: str = ""
    item_ids: dict[tuple[str, str], list[str]] = field(default_factory=dict)


class Client:
    """A connection to a heserve server. Use as a context manager.

    `key_file`: where to keep the key pair across runs. If the file exists its key
    pair is used (it must match the server's parameters); if not, a new one is
    made and saved there. Without it, a fresh key pair lives in memory only.

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
        forget_keys_on_close: bool = True,
        token: str | None = None,
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = _CHANNEL_MESSAGE_BYTES,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if token is not None and (not token.strip() or any(c.isspace() for c in token.strip())):
            raise ValueError("the API token is empty or contains spaces")
        self.timeout = timeout
        self.forget_keys_on_close = forget_keys_on_close
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
        announced = self.server_info.limits.max_message_bytes
        if self._owns_channel and announced > self.max_message_bytes:
            self._channel.close()  # reopen with room for the server's largest message
            self.max_message_bytes = announced
            self._channel = self._open_channel()
            self._stub = pb_grpc.ScoringServiceStub(self._channel)
        self.params: CkksParameters = parameters_from_message(self.server_info.ckks)
        self._session = _Session(self._secret_context(key_file))
        self._catalogs: dict[str, CatalogInfo] = {}

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
        """Ask the server to forget this client's keys (by default), then close."""
        if self.forget_keys_on_close and self._session.key_id:
            # the server may be gone or may have forgotten already: nothing left to erase
            with contextlib.suppress(HeserveError):
                self.delete_keys()
        self._channel.close()

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
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def _rpc(self, method: Callable[..., T], request: Any) -> T:
        """Call a stub method with the deadline and the metadata, mapping gRPC errors."""
        return self._call(method, request, timeout=self.timeout, metadata=self._metadata())

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
            raise NotFoundError(
                f"the server has no catalog named {name!r}", grpc.StatusCode.NOT_FOUND
            )
        return self._catalogs[name]

    def item_ids(self, catalog: str) -> list[str]:
        """All item ids of a catalog in catalog order (cached per catalog version)."""
        info = self.catalog(catalog)
        cached = self._session.item_ids.get((catalog, info.version))
        if cached is not None:
            return cached
        ids: list[str] = []
        token = ""
        limit = self.server_info.limits.max_page_size
        while True:
            request = pb.ListItemsRequest(catalog=catalog, page_size=limit, page_token=token)
            page = self._rpc(self._stub.ListItems, request)
            ids.extend(page.item_ids)
            token = page.next_page_token
            if not token:
                break
        self._session.item_ids[(catalog, info.version)] = ids
        return ids

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

        reply = self._rpc(self._stub.RegisterKeys, chunks())
        self.stats.key_bytes_sent += len(blob)
        self.stats.registrations += 1
        self._session.key_id = reply.key_id
        return str(reply.key_id)

    def delete_keys(self) -> bool:
        """Ask the server to forget this client's keys now (right to erasure)."""
        if not self._session.key_id:
            return False
        key_id, self._session.key_id = self._session.key_id, ""
        reply = self._rpc(self._stub.DeleteKeys, pb.DeleteKeysRequest(key_id=key_id))
        return bool(reply.deleted)

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
        info = self.catalog(catalog)
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
                catalog_version=info.version,
                complex_scores=True,  # two scores per slot: half the responses and bytes
            )
            results.extend(self._score_registered(request, expected, len(batch)))
        return results

    def _score_registered(
        self, request: pb.ScoreRequest, expected: int, queries: int
    ) -> list[npt.NDArray[np.float64]]:
        """One Score call, registering the keys first (or again, if the server forgot them)."""
        if not self._session.key_id:
            self.register_keys()
        try:
            return self._score_once(request, expected, queries)
        except HeserveError as error:
            if error.reason != KEY_NOT_FOUND:
                raise
            self.register_keys()  # the server forgot our keys (expiry, restart): once more
            return self._score_once(request, expected, queries)

    def _score_once(
        self, request: pb.ScoreRequest, expected: int, queries: int
    ) -> list[npt.NDArray[np.float64]]:
        request.key_id = self._session.key_id
        scores = [np.empty(expected) for _ in range(queries)]
        covered = [0] * queries
        received = 0
        decrypting = 0.0
        max_bytes = self.server_info.limits.max_message_bytes

        def consume() -> None:
            nonlocal received, decrypting
            replies = self._stub.Score(request, timeout=self.timeout, metadata=self._metadata())
            for reply in replies:
                if reply.offset + reply.count > expected or reply.query_index >= queries:
                    raise HeserveError("the server returned scores past the end of the request")
                started = time.perf_counter()
                values = unpack_complex(
                    self._session.secret.decrypt_complex(reply.scores, max_bytes), reply.count
                )
                decrypting += time.perf_counter() - started
                scores[reply.query_index][reply.offset : reply.offset + reply.count] = values
                received += len(reply.scores)
                covered[reply.query_index] += reply.count
            if covered != [expected] * queries:
                raise HeserveError(f"the server returned {covered} scores for {expected} items")

        started = time.perf_counter()
        self._call(consume)
        sent = len(request.query) + sum(len(query) for query in request.more_queries)
        self.stats.last_decrypt_seconds = decrypting
        self.stats.last_score_seconds = time.perf_counter() - started - decrypting
        self.stats.query_bytes_sent += sent
        self.stats.last_query_bytes = sent
        self.stats.score_bytes_received += received
        self.stats.last_response_bytes = received
        return scores

    def recommend(
        self, vector: npt.ArrayLike, *, catalog: str, k: int = 10
    ) -> list[tuple[str, float]]:
        """The k best items for `vector`, best first, ranked here on decrypted scores."""
        return self.recommend_many([vector], catalog=catalog, k=k)[0]

    def recommend_many(
        self,
        vectors: Sequence[npt.ArrayLike] | npt.NDArray[np.float64],
        *,
        catalog: str,
        k: int = 10,
    ) -> list[list[tuple[str, float]]]:
        """`recommend` for several vectors, scored together (see `score_many`)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        all_scores = self.score_many(vectors, catalog=catalog)
        ids = self.item_ids(catalog) if all_scores else []
        rankings = []
        for scores in all_scores:
            top = min(k, len(scores))
            best = np.argpartition(-scores, top - 1)[:top]
            best = best[np.argsort(-scores[best], kind="stable")]
            rankings.append([(ids[i], float(scores[i])) for i in best])
        return rankings
