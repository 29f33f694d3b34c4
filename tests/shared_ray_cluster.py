"""One local two-node Ray cluster (a head and a second node on loopback) for the test
modules that run next to each other and ask for it, instead of one per module: Ray takes
seconds to start on a loaded 2-core machine, and a raylet can miss its start-up window.

A module asks for it with a module-scoped fixture named `ray_cluster` whose body is
`yield from shared_ray_cluster.two_node_cluster(request)`. The cluster is started by
the first such module, and shut down when a module ends unless the very next test also
asks for it, so no other module (test_operator_ray starts a Ray of its own) ever runs
while it is up, whatever order the modules run in. A session that stops early (-x, a
failure in a fixture) shuts it down at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs the heserve[ray] extra")
from ray.cluster_utils import Cluster  # noqa: E402

FIXTURE_NAME = "ray_cluster"
_running: list[Cluster] = []  # the cluster while it is up (at most one)


def _start() -> Cluster:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 200 << 20},
    )
    try:
        cluster.add_node(num_cpus=1, object_store_memory=200 << 20)
        ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False)
    except Exception:
        ray.shutdown()
        cluster.shutdown()
        raise
    return cluster


def _start_with_one_retry() -> Cluster:
    # Ray waits a fixed 30 s for a raylet to register; on a loaded 2-core machine
    # that can pass. One more attempt, from scratch, tells load from breakage.
    try:
        return _start()
    except Exception as first:  # Ray raises a bare Exception for the timeout
        if "timed out during startup" not in str(first):
            raise
        return _start()


def _shutdown() -> None:
    while _running:
        cluster = _running.pop()
        ray.shutdown()
        cluster.shutdown()


def _next_test_uses_it(request: pytest.FixtureRequest) -> bool:
    """Whether the test right after this module's last one asks for the cluster."""
    items = request.session.items
    module = request.module
    mine = [index for index, item in enumerate(items) if getattr(item, "module", None) is module]
    if not mine or mine[-1] + 1 >= len(items):
        return False
    return FIXTURE_NAME in getattr(items[mine[-1] + 1], "fixturenames", ())


def two_node_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The body of a module's `ray_cluster` fixture: the shared cluster, started if it is
    not up, and shut down after the module unless the next test needs it."""
    if not _running:
        _running.append(_start_with_one_retry())
        request.config.add_cleanup(_shutdown)
    yield _running[0]
    if not _next_test_uses_it(request):
        _shutdown()
