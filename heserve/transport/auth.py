"""API tokens: who is calling, which keys are theirs, and how many queries they have left.

Tokens come from a file (one entry per line, `NAME:TOKEN` or a bare `TOKEN`; blank
lines and `#` comments are skipped) and/or the HESERVE_TOKENS setting (the same
entries separated by commas or newlines). Several tokens may share a name (to rotate
one): they are one caller, with one budget and the same keys. A caller presents a
token in call metadata as `authorization: Bearer TOKEN`. Tokens are looked up by their
SHA-256 digest and never logged; logs and metrics name the caller only.

Key ownership needs no table: every key_id a caller registers ends in that caller's
owner tag (which also enters the hash that makes the key_id), so two callers who
upload the same bytes get two separate entries, and a key_id with another caller's tag
is refused with PERMISSION_DENIED whether or not it exists. Without tokens there is
one anonymous caller with an empty tag, and key_ids are what they always were.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from heserve.domain.errors import ServiceError

MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces (a metadata value)


class TokenError(ValueError):
    """A tokens file or setting that cannot be used."""


class UnauthenticatedError(ServiceError):
    """The call carries no token, or one the server does not know."""

    status = "UNAUTHENTICATED"


class PermissionDeniedError(ServiceError):
    """The caller is authenticated but the object belongs to another caller."""

    status = "PERMISSION_DENIED"


@dataclass(frozen=True)
class Caller:
    """Who is calling: a name for logs and budgets, and the tag their key_ids end in."""

    name: str
    owner_tag: str = ""


ANONYMOUS = Caller("anonymous")


def owner_tag(name: str) -> str:
    """The suffix of every key_id `name` registers: '.' and 10 hex digits of a hash."""
    return "." + hashlib.sha256(b"heserve-key-owner\0" + name.encode()).hexdigest()[:10]


def parse_tokens(text: str, source: str) -> list[tuple[str, str]]:
    """(name, token) pairs from `NAME:TOKEN` or `TOKEN` entries, by line or comma.

    A bare token is named after a short hash of itself, so logs can tell callers
    apart without showing any part of the token.
    """
    entries: list[tuple[str, str]] = []
    for number, raw in enumerate(re.split(r"[\n,]", text), 1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, token = entry.partition(":")
        if not sep:
            name, token = "token-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
        name, token = name.strip(), token.strip()
        where = f"{source}, entry {number}"
        if not _NAME.match(name):
            raise TokenError(f"{where}: a name is 1-64 of letters, digits and . _ @ -")
        if len(token) < MIN_TOKEN_CHARS or not _TOKEN.match(token):
            raise TokenError(
                f"{where} ({name}): a token is at least {MIN_TOKEN_CHARS} printable characters "
                "without spaces (make one with: python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )
        entries.append((name, token))
    return entries


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Maps bearer tokens to callers."""

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        self._callers: dict[bytes, Caller] = {}
        tags: dict[str, str] = {}
        for name, token in entries:
            digest = _digest(token)
            if digest in self._callers:
                raise TokenError(f"a token is listed twice (for {self._callers[digest].name})")
            tag = owner_tag(name)
            if tags.setdefault(tag, name) != name:
                raise TokenError(f"callers {tags[tag]} and {name} would share key ids; rename one")
            self._callers[digest] = Caller(name, tag)
        if not self._callers:
            raise TokenError("no tokens configured")

    @classmethod
    def load(cls, tokens_file: Path | None, tokens: str | None) -> Authenticator | None:
        """Tokens from a file and/or a setting; None when neither is given (no authentication)."""
        entries: list[tuple[str, str]] = []
        if tokens_file is not None:
            try:
                text = tokens_file.read_text()
            except OSError as exc:
                raise TokenError(f"cannot read tokens file {tokens_file}: {exc.strerror}") from None
            entries += parse_tokens(text, str(tokens_file))
        if tokens:
            entries += parse_tokens(tokens, "HESERVE_TOKENS")
        if tokens_file is None and not tokens:
            return None
        return cls(entries)

    def __len__(self) -> int:
        return len(self._callers)

    def authenticate(self, metadata: Mapping[str, str]) -> Caller | None:
        """The caller whose token is in `authorization: Bearer ...`, or None."""
        scheme, _, token = metadata.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._callers.get(_digest(token.strip()))


def check_owner(caller: Caller, key_id: str) -> None:
    """Refuse a key_id that is not the caller's (any key_id, when there is no authentication)."""
    if caller.owner_tag and not key_id.endswith(caller.owner_tag):
        raise PermissionDeniedError("this key_id was not registered with your API token")


class QueryBudget:
    """At most `limit` Score calls per caller in each fixed window of `window_seconds`."""

    def __init__(
        self,
        limit: int,
        window_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window_seconds <= 0:
            raise ValueError("a query budget needs a positive limit and window")
        self.limit = limit
        self.window_seconds = window_seconds
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def charge(self, name: str) -> float | None:
        """Count one query for `name`: None if allowed, else seconds until the budget renews."""
        now = self._clock()
        with self._lock:
            start, used = self._windows.get(name, (now, 0))
            if now - start >= self.window_seconds:
                start, used = now, 0
            if used >= self.limit:
                return start + self.window_seconds - now
            self._windows[name] = (start, used + 1)
            return None
