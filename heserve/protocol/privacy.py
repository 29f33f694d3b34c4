"""The privacy statement a server publishes, and the policy a client holds it to.

The server builds a `PrivacyStatement` from its running configuration
(heserve.domain.statement) and announces it in GetServerInfo; a client reads it back
(heserve.protocol.convert) and checks it against its `Policy` before it sends
anything derived from its user: no keys, no query, no candidate ids. Both ends use
the values here, so what the server states and what the client checks are spelled
once.

The statement says what the server keeps (keys: idle TTL and limits; nothing else
per user), what each log record holds, what the server can learn, whether the
connection is TLS, and which catalog protections are on and what they do not hold
against. `Policy` names requirements a client app can hold a server to; a failed
one is reported by name (`Unmet.requirement`), so an app can show or log which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

STATEMENT_VERSION = 1

# TransportSecurity and CallerIdentity values, as the statement spells them in Python.
PLAINTEXT = "plaintext"
TLS = "tls"
MUTUAL_TLS = "mutual_tls"
UNSPECIFIED = "unspecified"
ANONYMOUS = "anonymous"
API_TOKEN = "api_token"

RERANK_LOCALLY_UP_TO = 6
"""Catalog chunks per chunk of candidates up to which heserve's Python client re-ranks
by scoring the whole catalog and picking the candidates itself, so the server never
sees them. Measured with 100 candidates (one run, 2-core machine): 7 chunks at
d = 256, 221 ms for the whole catalog against 251 ms for the server's re-ranking
(it encodes the candidates' 256 diagonals per query); 8 chunks at d = 128, 187 ms
against 162 ms; 16 chunks, 200 ms against 149 ms. Here (not in the client) because
the server's statement says which catalogs that covers."""


def reranks_locally(item_count: int, items_per_response: int, candidates: int) -> bool:
    """Whether heserve's Python client (by default) re-ranks `candidates` of a catalog of
    `item_count` items locally: scores per chunk are two per slot (complex scores)."""
    per_chunk = 2 * items_per_response
    catalog_chunks = -(-item_count // per_chunk)
    candidate_chunks = -(-candidates // per_chunk)
    return catalog_chunks <= RERANK_LOCALLY_UP_TO * candidate_chunks


def largest_catalog_reranked_locally(items_per_response: int) -> int:
    """The most items a catalog may have for the Python client to re-rank any candidate
    list locally (one candidate chunk: up to RERANK_LOCALLY_UP_TO catalog chunks)."""
    return RERANK_LOCALLY_UP_TO * 2 * items_per_response


@dataclass(frozen=True)
class KeysKept:
    """How long and how many key sets the server keeps (heserve.v1.KeyRetentionPolicy)."""

    ttl_seconds: int
    """Idle time after which a key set is forgotten: each use starts it again."""
    max_keys: int
    max_bytes: int
    max_keys_per_caller: int


@dataclass(frozen=True)
class StoredData:
    """One kind of data the server holds about its callers (heserve.v1.StoredData)."""

    subject: str
    description: str
    idle_ttl_seconds: int
    """Seconds kept after its last use; 0: not bounded by an idle time (see kept_for)."""
    kept_for: str
    erasable: bool
    """Its owner can erase it at once (DeleteKeys)."""


@dataclass(frozen=True)
class LoggedRecord:
    """One record the server writes about calls (heserve.v1.LoggedRecord)."""

    name: str
    level: str
    written: bool
    """Whether the server's log level writes it."""
    fields: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Observation:
    """One thing the server can learn from the calls it serves (heserve.v1.Observation)."""

    subject: str
    description: str


@dataclass(frozen=True)
class CatalogProtection:
    """One defence of the catalog, on or off (heserve.v1.CatalogProtection)."""

    name: str
    enabled: bool
    setting: str
    holds_against: str
    does_not_hold_against: str


@dataclass(frozen=True)
class PrivacyStatement:
    """What a server keeps, logs and can learn (heserve.v1.PrivacyStatement)."""

    statement_version: int
    keys: KeysKept
    stored: tuple[StoredData, ...]
    logs: tuple[LoggedRecord, ...]
    never_logged: tuple[str, ...]
    observations: tuple[Observation, ...]
    transport: str
    """PLAINTEXT, TLS or MUTUAL_TLS (UNSPECIFIED: not said)."""
    caller_identity: str
    """ANONYMOUS or API_TOKEN (UNSPECIFIED: not said)."""
    catalog_protections: tuple[CatalogProtection, ...]
    summary: tuple[str, ...]

    def logged_fields(self) -> frozenset[str]:
        """Every field some record the server writes at its log level carries."""
        return frozenset(name for record in self.logs if record.written for name in record.fields)

    def protection(self, name: str) -> CatalogProtection | None:
        return next((p for p in self.catalog_protections if p.name == name), None)

    def describe(self) -> str:
        """The statement as text a person reads (what `heserve privacy` prints)."""
        lines = [*self.summary, "", "Kept about callers:"]
        lines += [
            f"  {item.subject}: {item.description} Kept {item.kept_for}." for item in self.stored
        ]
        lines.append("Logged (at the server's log level):")
        for record in self.logs:
            state = "written" if record.written else "not written at this log level"
            lines.append(
                f"  {record.name} ({record.level}, {state}): {', '.join(record.fields)}. "
                f"{record.description}"
            )
        lines.append(f"Never logged: {', '.join(self.never_logged)}.")
        lines.append("The server can learn:")
        lines += [f"  {item.subject}: {item.description}" for item in self.observations]
        lines.append("Catalog protections:")
        for protection in self.catalog_protections:
            lines.append(
                f"  {protection.name}: {protection.setting}. Limits {protection.holds_against}; "
                f"does not hold against {protection.does_not_hold_against}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Unmet:
    """A requirement of a client's policy that a server does not meet, and why."""

    requirement: str
    """The Policy field that failed, e.g. "require_tls"."""
    explanation: str

    def __str__(self) -> str:
        return f"{self.requirement}: {self.explanation}"


@dataclass(frozen=True)
class Policy:
    """What a client requires of a server before it sends anything derived from its user.

    The default requires nothing a heserve server might not offer, so a client given no
    policy talks to every server as before. `Policy.mobile()` is the preset for an app
    on a user's device (see its docstring); build your own with the fields below.
    """

    require_tls: bool = False
    """The connection must be TLS: the client's own channel, and the server's statement."""
    max_key_ttl_seconds: int | None = None
    """The server may keep idle keys at most this long (its key TTL)."""
    send_item_ids: bool = True
    """False: candidate ids never leave the client; re-ranking always scores the whole
    catalog and picks the candidates locally (the server learns no candidate)."""
    require_statement: bool = False
    """The server must publish a privacy statement (servers before it do not)."""
    forbid_logged: frozenset[str] = field(default_factory=frozenset)
    """Log fields the server must not write, e.g. {"peer"} (the client's address)."""

    @classmethod
    def permissive(cls) -> Policy:
        """No requirement: the default, what clients did before policies."""
        return cls()

    @classmethod
    def mobile(cls) -> Policy:
        """For an app on a user's device: TLS; keys forgotten within an hour idle; no
        candidate ids sent; a statement required; the device's network address not
        logged. Every requirement holds of a default heserve server given TLS."""
        return cls(
            require_tls=True,
            max_key_ttl_seconds=3600,
            send_item_ids=False,
            require_statement=True,
            forbid_logged=frozenset({"peer"}),
        )

    def unmet(
        self,
        statement: PrivacyStatement | None,
        *,
        key_ttl_seconds: int,
        connection_tls: bool | None,
    ) -> list[Unmet]:
        """The requirements a server fails, in the order of the fields; none: it complies.

        `statement` is None for a server that publishes none; `key_ttl_seconds` is its
        announced key TTL (GetServerInfo.key_retention, known from every server);
        `connection_tls` whether the client's own channel is TLS (None: not known, a
        channel the caller made).
        """
        failed: list[Unmet] = []
        if self.require_tls:
            if connection_tls is False:
                failed.append(Unmet("require_tls", "this client's connection is not TLS"))
            elif statement is not None and statement.transport not in (TLS, MUTUAL_TLS):
                failed.append(
                    Unmet("require_tls", f"the server states transport {statement.transport}")
                )
            elif statement is None and connection_tls is None:
                failed.append(
                    Unmet("require_tls", "neither the channel nor a statement says it is TLS")
                )
        if self.max_key_ttl_seconds is not None:
            ttl = statement.keys.ttl_seconds if statement is not None else key_ttl_seconds
            if ttl > self.max_key_ttl_seconds:
                failed.append(
                    Unmet(
                        "max_key_ttl_seconds",
                        f"the server keeps idle keys {ttl} s, more than "
                        f"{self.max_key_ttl_seconds} s",
                    )
                )
        if self.require_statement and statement is None:
            failed.append(Unmet("require_statement", "the server publishes no privacy statement"))
        if self.forbid_logged:
            if statement is None:
                failed.append(
                    Unmet("forbid_logged", "the server publishes no statement of what it logs")
                )
            else:
                logged = sorted(self.forbid_logged & statement.logged_fields())
                if logged:
                    failed.append(Unmet("forbid_logged", f"the server logs {', '.join(logged)}"))
        return failed


def summary_of(unmet: Sequence[Unmet]) -> str:
    """One line naming every failed requirement."""
    return "the server does not meet this client's policy: " + "; ".join(map(str, unmet))
