"""heserve_client: rank a server's catalog for a user without showing it the user.

from heserve_client import Client

with Client("127.0.0.1:50051") as client:
    top = client.recommend(user_vector, catalog="demo", k=10)
"""

from heserve.protocol.convert import CatalogInfo
from heserve_client._client import Client, TransferStats
from heserve_client._errors import (
    HeserveError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    ParameterMismatchError,
    ServerUnavailableError,
    StaleCatalogError,
)
from heserve_client._secret import SecretContext

__all__ = [
    "CatalogInfo",
    "Client",
    "HeserveError",
    "InvalidRequestError",
    "LimitExceededError",
    "NotFoundError",
    "ParameterMismatchError",
    "SecretContext",
    "ServerUnavailableError",
    "StaleCatalogError",
    "TransferStats",
]
