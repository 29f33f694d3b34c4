"""heserve_client: rank a server's catalog for a user without showing it the user.

from heserve_client import Client

with Client("127.0.0.1:50051") as client:
    top = client.recommend(user_vector, catalog="demo", k=10)
"""

from heserve.protocol.convert import CatalogInfo
from heserve_client._client import Client, RegistrationRecord, TransferStats
from heserve_client._errors import (
    ConjugationKeyMissingError,
    HeserveError,
    InvalidRequestError,
    KeyNotFoundError,
    LimitExceededError,
    NotFoundError,
    ParameterMismatchError,
    PermissionDeniedError,
    PreconditionError,
    ServerUnavailableError,
    StaleCatalogError,
    UnauthenticatedError,
)
from heserve_client._secret import SecretContext

__all__ = [
    "CatalogInfo",
    "Client",
    "ConjugationKeyMissingError",
    "HeserveError",
    "InvalidRequestError",
    "KeyNotFoundError",
    "LimitExceededError",
    "NotFoundError",
    "ParameterMismatchError",
    "PermissionDeniedError",
    "PreconditionError",
    "RegistrationRecord",
    "SecretContext",
    "ServerUnavailableError",
    "StaleCatalogError",
    "TransferStats",
    "UnauthenticatedError",
]
