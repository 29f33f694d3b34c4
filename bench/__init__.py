"""heserve's benchmark harness: the encrypted inner loop, end to end over gRPC, reports.

- `bench.methods`: the workloads and the registry of scoring methods (heserve's
  engine and its peers), each a setup callable returning a timed `Runner`.
- `bench.tiers`: which methods, dimensions and catalog sizes a tier covers.
- `bench.e2e`: a real server on loopback under concurrent clients, and the
  server-side "Apple PNNS" case.
- `bench.report`: the results document, the table, the plot, the regression gate
  (`python -m bench.report run|report|compare`).

The pytest-benchmark files (`bench/test_*.py`) are not part of the normal test
run; `make bench` / `make bench-quick` run them.
"""
