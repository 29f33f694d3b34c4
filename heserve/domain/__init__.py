"""The service's domain: catalogs, the key store, the catalog's noise defences and
the `Scorer` that checks every request before it computes. Raises `ServiceError`s
that name their gRPC status; knows nothing of gRPC itself.
"""
