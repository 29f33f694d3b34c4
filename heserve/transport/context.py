"""The call a thread is serving: its request id, method and authenticated caller.

The interceptors (heserve.transport.interceptors) bind it while they decide on a
call, and again in the thread that runs it; the servicer (`current_caller`) and the
log formatter (`current_call`) read it. It lives apart from the interceptors so that
reading it pulls in neither gRPC nor anything else of the server.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, replace

from heserve.transport.auth import ANONYMOUS, Caller, UnauthenticatedError

REQUEST_ID_KEY = "x-request-id"
# Matched whole (fullmatch): `$` would let a trailing newline through, which gRPC then
# refuses to echo, failing a call the access log reports as OK.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


@dataclass(frozen=True)
class CallInfo:
    """What the interceptors know about the call this thread is serving.

    `caller` is None for a call that presented no known token: it is being refused.
    """

    request_id: str
    method: str
    caller: Caller | None = ANONYMOUS

    @property
    def caller_name(self) -> str:
        """The caller's name for logs; an unauthenticated call is logged as anonymous."""
        return (self.caller or ANONYMOUS).name


_current: ContextVar[CallInfo | None] = ContextVar("heserve_call", default=None)


_refusal_reason: ContextVar[str] = ContextVar("heserve_refusal_reason", default="")


def note_refusal(reason: str) -> None:
    """Record the ErrorInfo reason of the refusal this thread's call ends with."""
    _refusal_reason.set(reason)


def refusal_reason() -> str:
    """The reason noted by `note_refusal` for this thread's call ("" if none)."""
    return _refusal_reason.get()


def bind_call(info: CallInfo) -> None:
    """Make `info` the call this thread (or task) is serving."""
    _current.set(info)
    _refusal_reason.set("")


def current_call() -> CallInfo | None:
    """The call this thread serves (the last one it started), if any."""
    return _current.get()


def bind_caller(caller: Caller | None) -> None:
    """Record who makes the call this thread is deciding on (None: nobody known)."""
    info = _current.get()
    if info is None:
        raise RuntimeError("bind_caller outside a call: bind_call first")
    _current.set(replace(info, caller=caller))


def current_caller() -> Caller:
    """The authenticated caller of this thread's call; the anonymous one without tokens.

    Raises UnauthenticatedError in a call without a known token, which the
    interceptors refuse before it reaches the servicer: never act for nobody.
    """
    info = _current.get()
    if info is None:
        return ANONYMOUS
    if info.caller is None:
        raise UnauthenticatedError("missing or unknown API token")
    return info.caller


def request_id_of(metadata: dict[str, str]) -> str:
    """The client's x-request-id if it is a sane token, else a fresh one."""
    supplied = metadata.get(REQUEST_ID_KEY, "")
    return supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
