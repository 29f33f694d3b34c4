"""heserve_client: rank a server's catalog for a user without showing it the user.

from heserve_client import Client

with Client("127.0.0.1:50051") as client:
    top = client.recommend(user_vector, catalog="demo", k=10)

Privacy: `Client(..., policy=Policy.mobile())` refuses a server whose privacy statement
does not meet the policy (PolicyError) before sending anything derived from the user;
`client.forget_me()` (or `forget_me(target, key_file)`) erases the keys on the server
and the key file here; `client.popular(catalog)` is the catalog's non-personalized
order, for a user who has not opted in (nothing about the user is sent).
"""

from heserve.protocol.convert import CatalogInfo
from heserve.protocol.privacy import Policy, PrivacyStatement, Unmet
from heserve_client._client import (
    Client,
    ErasureReport,
    RegistrationRecord,
    TransferStats,
    forget_me,
)
from heserve_client._errors import (
    ClientClosedError,
    ConjugationKeyMissingError,
    HeserveError,
    InvalidRequestError,
    KeyNotFoundError,
    LimitExceededError,
    NotFoundError,
    ParameterMismatchError,
    PermissionDeniedError,
    PolicyError,
    PreconditionError,
    ServerUnavailableError,
    StaleCatalogError,
    UnauthenticatedError,
)
from heserve_client._secret import SecretContext

__all__ = [
    "CatalogInfo",
    "Client",
    "ClientClosedError",
    "ConjugationKeyMissingError",
    "ErasureReport",
    "HeserveError",
    "InvalidRequestError",
    "KeyNotFoundError",
    "LimitExceededError",
    "NotFoundError",
    "ParameterMismatchError",
    "PermissionDeniedError",
    "Policy",
    "PolicyError",
    "PreconditionError",
    "PrivacyStatement",
    "RegistrationRecord",
    "SecretContext",
    "ServerUnavailableError",
    "StaleCatalogError",
    "TransferStats",
    "UnauthenticatedError",
    "Unmet",
    "forget_me",
]
