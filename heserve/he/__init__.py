"""The HE core: how a catalog is laid out in slots (`plan`) and the encrypted inner
loop over SEAL (`engine`). Knows nothing of gRPC, catalogs' names or callers.
"""
