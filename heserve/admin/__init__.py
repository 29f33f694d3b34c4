"""Generated protobuf of heserve.admin.v1, the catalog admin service (scripts/gen_stubs.py)."""
