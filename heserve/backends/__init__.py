"""Where encoded catalogs live and are scored: in this process (`local`), in worker
processes (`pool`, with `pool_worker`) or in Ray actors (`ray_cluster`), all through
`base.Backend`, and each computing with the same `shard.Shard`.
"""
