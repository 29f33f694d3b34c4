"""The call a thread is serving: its request id, method and authenticated caller.

The interceptors bind it when a call starts; the servicer (`current_caller`) and
the log formatter (`current_call`) read it. It lives apart from the interceptors
so that reading it pulls in neither gRPC nor anything else of the server.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

from heserve.transport.auth import ANONYMOUS, Caller

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


@dataclass(frozen=True)
class CallInfo:
    """What the interceptor knows about the call this thread is serving."""

    request_id: str
    method: str
    caller: Caller


_current: ContextVar[CallInfo | None] = ContextVar("heserve_call", default=None)


def bind_call(info: CallInfo) -> None:
    """Make `info` the call this thread (or task) is serving."""
    _current.set(info)


def current_call() -> CallInfo | None:
    """The call this thread serves (the last one it started), if any."""
    return _current.get()


def current_caller() -> Caller:
    """The authenticated caller of this thread's call; the anonymous one without tokens."""
    info = _current.get()
    return ANONYMOUS if info is None else info.caller


def request_id_of(metadata: dict[str, str]) -> str:
    """The client's x-request-id if it is a sane token, else a fresh one."""
    supplied = metadata.get(REQUEST_ID_KEY, "")
    return supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
