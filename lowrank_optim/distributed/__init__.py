"""Distributed training support: GaLore-family optimizers on FSDP2-sharded parameters.

* :mod:`.sharding`: row-sharded ``DTensor`` layout and the sharded optimizer state;
* :mod:`.refresh`: basis refresh from a row-sharded gradient (Gram all-reduce or all-gather);
* :mod:`.fsdp`: the optimizer step on ``DTensor`` parameters, dispatched to by ``GaLoreAdamW``;
* :mod:`.comm`: counting the bytes of collectives (benchmarks and tests).
"""

from lowrank_optim.distributed.comm import CollectiveCounter
from lowrank_optim.distributed.fsdp import refuse_sharded_handoff, step_sharded
from lowrank_optim.distributed.refresh import (
    FSDP_REFRESH,
    choose_strategy,
    gather_refresh_bytes,
    gram_refresh_bytes,
)

__all__ = [
    "FSDP_REFRESH",
    "CollectiveCounter",
    "choose_strategy",
    "gather_refresh_bytes",
    "gram_refresh_bytes",
    "refuse_sharded_handoff",
    "step_sharded",
]
