"""Where encoded catalogs live and are scored: in this process (`local`), in worker
processes (`pool`) or in Ray actors (`ray_cluster`), all through `base.Backend`.
"""
