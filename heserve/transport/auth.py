"""API tokens: who is calling, which keys are theirs, and how many queries they have left.

Tokens come from a file (one entry per line, `NAME:TOKEN` or a bare `TOKEN`; blank
lines and `#` comments are skipped) and/or the HESERVE_TOKENS setting (the same
entries separated by commas or newlines; comments are dropped before the commas
split, and no token holds a comma). Several tokens may share a name (to rotate
one): they are one caller, with one budget and the same keys. A caller presents a
token in call metadata as exactly `authorization: Bearer TOKEN`. Tokens are looked up by their
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from heserve.domain.errors import ServiceError

MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_BARE_NAME = re.compile(r"token-[LS][0-9]+")  # the names bare tokens get from their place
_TOKEN = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # printable ASCII but space and ','
_COMMENT = re.compile(r"(^|[ \t])#.*")  # from a '#' that starts a line or follows a blank
# Exactly `Bearer TOKEN`: the scheme in any case (RFC 7235), one space, a token's
# characters to the end; no other blank, and no line break of any kind before or after.
_BEARER = re.compile(r"(?i:bearer) ([\x21-\x2b\x2d-\x7e]+)", re.ASCII)


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


def _entries(text: str, commas: bool) -> Iterator[tuple[int, str]]:
    """(position, entry) of each entry in `text`, comments dropped first.

    A comment is a line whose first non-blank character is `#`, or the rest of a line
    from a `#` that follows a blank (a token holds no blanks, so this `#` cannot be part
    of one). Only then are lines split on commas (when `commas`): a revoked entry in a
    comment stays revoked, however it is punctuated. The position is the line number
    without commas, else the entry's number.
    """
    number = 0
    for line_number, line in enumerate(text.splitlines(), 1):
        content = _COMMENT.sub("", line)
        for piece in content.split(",") if commas else [content]:
            entry = piece.strip()
            if entry:
                number += 1
                yield (number if commas else line_number), entry


def parse_tokens(text: str, source: str, *, commas: bool = False) -> list[tuple[str, str]]:
    """(name, token) pairs from `NAME:TOKEN` or `TOKEN` entries.

    A file holds one entry per line (`commas` False); the HESERVE_TOKENS setting also
    separates entries with commas (`commas` True). A token never holds a comma, so
    neither reading is ambiguous: a comma in a file's token is refused, not split into
    two credentials. A bare token is named after its place (`token-L3`: line 3 of the
    file; `token-S2`: entry 2 of the setting), which says nothing about the token;
    those names are reserved. Errors name the source and position, never the entry.
    """
    entries: list[tuple[str, str]] = []
    for position, entry in _entries(text, commas):
        where = f"{source}, {'entry' if commas else 'line'} {position}"
        name, sep, token = entry.partition(":")
        if not sep:
            name, token = f"token-{'S' if commas else 'L'}{position}", entry
        elif _BARE_NAME.fullmatch(name.strip()):
            raise TokenError(f"{where}: names like token-L1 are kept for bare tokens; rename it")
        name, token = name.strip(), token.strip()
        if not _NAME.fullmatch(name):
            raise TokenError(f"{where}: a name is 1-64 of letters, digits and . _ @ -")
        if "," in token:
            raise TokenError(
                f"{where}: a token may not contain ',' (one entry per line; make one with: "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if len(token) < MIN_TOKEN_CHARS or not _TOKEN.fullmatch(token):
            raise TokenError(
                f"{where}: a token is at least {MIN_TOKEN_CHARS} printable ASCII characters "
                "without spaces or commas (make one with: python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )
        entries.append((name, token))
    return entries


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


ADMIN_PREFIX = "admin:"
"""What the names of admin callers begin with (`admin:NAME`). A token's own name holds no
':', so no API token's caller can be taken for an admin one."""


class Authenticator:
    """Maps bearer tokens to callers; with `prefix`, each caller's name begins with it
    (the admin tokens' callers are `admin:NAME`)."""

    def __init__(self, entries: Iterable[tuple[str, str]], *, prefix: str = "") -> None:
        self._callers: dict[bytes, Caller] = {}
        tags: dict[str, str] = {}
        for name, token in entries:
            digest = _digest(token)
            if digest in self._callers:
                raise TokenError(f"a token is listed twice (for {self._callers[digest].name})")
            tag = owner_tag(name)
            if tags.setdefault(tag, name) != name:
                raise TokenError(f"callers {tags[tag]} and {name} would share key ids; rename one")
            self._callers[digest] = Caller(prefix + name, tag)
        if not self._callers:
            raise TokenError("no tokens configured")

    @classmethod
    def load(
        cls,
        tokens_file: Path | None,
        tokens: str | None,
        *,
        setting: str = "HESERVE_TOKENS",
        prefix: str = "",
    ) -> Authenticator | None:
        """Tokens from a file and/or a setting (named `setting` in errors); None when
        neither is given (no authentication)."""
        entries: list[tuple[str, str]] = []
        if tokens_file is not None:
            try:
                text = tokens_file.read_text()
            except OSError as exc:
                raise TokenError(f"cannot read tokens file {tokens_file}: {exc.strerror}") from None
            entries += parse_tokens(text, str(tokens_file))
        if tokens:
            entries += parse_tokens(tokens, setting, commas=True)
        if tokens_file is None and not tokens:
            return None
        return cls(entries, prefix=prefix)

    def shared_with(self, other: Authenticator) -> list[str]:
        """Names (here) of the callers whose token `other` also knows: an admin token that
        is also an API token would be a write capability handed to a client."""
        return sorted(
            caller.name for digest, caller in self._callers.items() if digest in other._callers
        )

    def either(self, other: Authenticator) -> Authenticator:
        """An authenticator that knows the tokens of both (their tokens must be distinct):
        for call admission, which counts a call against its caller whichever service it
        calls; never for deciding what a caller may call."""
        both = object.__new__(Authenticator)
        both._callers = {**self._callers, **other._callers}
        return both

    def __len__(self) -> int:
        return len(self._callers)

    def authenticate(self, metadata: Mapping[str, str]) -> Caller | None:
        """The caller whose token is in `authorization: Bearer ...`, or None."""
        match = _BEARER.fullmatch(metadata.get("authorization", ""))
        return None if match is None else self._callers.get(_digest(match[1]))


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

    def charge(self, name: str, count: int = 1) -> float | None:
        """Count `count` queries for `name`, all or none: None if allowed, else seconds
        until the budget renews."""
        now = self._clock()
        with self._lock:
            start, used = self._windows.get(name, (now, 0))
            if now - start >= self.window_seconds:
                start, used = now, 0
            if used + count > self.limit:
                return start + self.window_seconds - now
            self._windows[name] = (start, used + count)
            return None

    def refund(self, name: str, count: int = 1) -> None:
        """Give back `count` queries charged in the current window (a call that failed
        for a reason that was not the caller's use of the service: its keys had expired)."""
        with self._lock:
            start, used = self._windows.get(name, (self._clock(), 0))
            self._windows[name] = (start, max(0, used - count))
