"""The google.rpc.ErrorInfo domain and the reasons a client acts on.

A status code says what kind of failure it was; a reason says what to do about
it (KEY_NOT_FOUND: register the keys again, then retry). Client and server both
read these names from here.
"""

from __future__ import annotations

ERROR_DOMAIN = "heserve.v1"
KEY_NOT_FOUND = "KEY_NOT_FOUND"
