"""The google.rpc.ErrorInfo domain and the reasons a client acts on.

A status code says what kind of failure it was; a reason says what to do about
it (KEY_NOT_FOUND: register the keys again, then retry). Client and server both
read these names from here.
"""

from __future__ import annotations

ERROR_DOMAIN = "heserve.v1"
KEY_NOT_FOUND = "KEY_NOT_FOUND"
"""NOT_FOUND: the key_id is unknown or expired; register the keys again, then retry."""
CATALOG_VERSION_CHANGED = "CATALOG_VERSION_CHANGED"
"""FAILED_PRECONDITION: the catalog changed since the client read its version; read the
catalog's information (version, item count, ids) again, then retry."""
CONJUGATION_KEY_MISSING = "CONJUGATION_KEY_MISSING"
"""FAILED_PRECONDITION: real-slot scores need the conjugation key, which the registered
keys lack; register keys with it, or ask for complex scores."""
